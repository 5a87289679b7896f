"""Auto-detect: the input role a volume's name suggests, as scanners, archives and BraTS name series, and
the choice of inputs from a real MRML scene (slicer-core)."""
import pytest

from BrainUNetSegmentationLib.logic import ambiguous_inputs, guess_inputs, guess_role

NAMES = [
    # BraTS 2021 and 2023, UPenn-GBM, RSNA-MICCAI, the module's own synthetic case and sample data
    ("BraTS2021_00001_t1ce", "t1c"), ("BraTS2021_00001_t1", "t1n"), ("BraTS2021_00001_t2", "t2w"),
    ("BraTS2021_00001_flair", "t2f"), ("BraTS-GLI-00001-000-t1c", "t1c"), ("BraTS-GLI-00001-000-t1n", "t1n"),
    ("BraTS-GLI-00001-000-t2w", "t2w"), ("BraTS-GLI-00001-000-t2f", "t2f"), ("UPENN-GBM-00001_11_T1GD", "t1c"),
    ("T1wCE", "t1c"), ("T1w", "t1n"), ("Case_T1CE", "t1c"), ("Case_T1", "t1n"), ("Case_T2", "t2w"),
    ("Case_FLAIR", "t2f"), ("BraTS-GLI-00001-000-T1CE", "t1c"),
    # T1-weighted FLAIR (GE) is a T1: native, or contrast-enhanced when marked so
    ("AX T1 FLAIR", "t1n"), ("AX T1 FLAIR POST", "t1c"), ("T1 FLAIR +C", "t1c"),
    # a contrast mark anywhere in a T1 name
    ("T1W_TSE_GD", "t1c"), ("T1_MPRAGE_GD", "t1c"), ("t1_mprage_sag_p2_iso_post", "t1c"), ("T1 FS POST", "t1c"),
    ("SAG T1 3D POST", "t1c"), ("Ax T1 SE +C", "t1c"), ("T1C+", "t1c"), ("T1 post-contrast", "t1c"),
    ("CE-T1", "t1c"), ("3D MPRAGE POST", "t1c"), ("T1 GRE POST", "t1c"), ("T1 FS KM", "t1c"), ("t1_mprage_KM", "t1c"),
    # ... unless it says pre-contrast; a plain T1 sequence is native
    ("T1 PRE", "t1n"), ("T1 pre-contrast", "t1n"), ("T1 W/O contrast", "t1n"), ("MPRAGE", "t1n"),
    ("T1 SPACE", "t1n"), ("T1 C-", "t1n"), ("T1 -C", "t1n"),
    # "post" after surgery or treatment, or posterior, is no contrast mark (post-operative blood is bright
    # on a native T1); "pre-op" does not overrule one
    ("T1 POST-OP", "t1n"), ("T1_postop", "t1n"), ("T1 postoperative", "t1n"), ("sub-01_ses-postop_T1w", "t1n"),
    ("T1 post-treatment", "t1n"), ("T1 posterior fossa", "t1n"), ("T1 pre-op +C", "t1c"),
    ("T1 post Gd (pre-op)", "t1c"), ("t1c-resampled", "t1c"), ("postcontrast T1", "t1c"),
    # T2 and FLAIR as scanners name them
    ("AX T2 FSE", "t2w"), ("T2W_TSE", "t2w"), ("AX T2 FLAIR", "t2f"), ("301: Ax T2 FLAIR", "t2f"),
    ("t2_tirm_tra_dark-fluid", "t2f"),
    # not one of the inputs: T2* and susceptibility, diffusion, perfusion, or both T1 and T2
    ("AX T2* GRE", None), ("T2 star", None), ("T2*W", None), ("T2 GRE", None), ("SWI", None), ("DWI", None),
    ("ADC", None), ("ep2d_diff_b1000", None), ("Perfusion", None), ("T1_T2", None), ("Localizer", None),
]


@pytest.mark.parametrize("name, role", NAMES)
def test_role_from_a_series_name(name, role):
    assert guess_role(name) == role


def _volumes(scene, *names):
    return [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name) for name in names]


def test_inputs_are_chosen_from_the_scene(scene):
    t1c, t2w, t2f, t1n, _ = _volumes(scene, "AX T1 FLAIR POST", "AX T2 FSE", "AX T2 FLAIR", "AX T1 FLAIR", "SWI")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "T2W labels")  # a label map is never an input
    assert guess_inputs(scene) == {"t1c": t1c, "t2w": t2w, "t2f": t2f, "t1n": t1n}
    assert ambiguous_inputs(scene) == {}


def test_a_role_that_several_volumes_match_is_left_to_the_user(scene):
    t1c, _, _, t2f = _volumes(scene, "T1 POST", "T2W_TSE", "T2 FSE", "FLAIR")
    assert guess_inputs(scene) == {"t1c": t1c, "t2f": t2f}  # not the first T2 in scene order
    assert ambiguous_inputs(scene) == {"t2w": ["T2W_TSE", "T2 FSE"]}
