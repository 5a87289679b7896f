"""Input that cannot be what it is named is refused with a message saying what to select; input that
may be wrong gets a warning in the run's output."""
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from conftest import case_args

from brainunet import cli, pipeline, plausibility, synthetic
from brainunet.imageio import Volume


def run(*args):
    return cli.main([*map(str, args), "--progress", "none"])


def test_one_file_for_two_sequences_is_refused(tmp_path, synthetic_case, capsys):
    args = ["--t1c", synthetic_case["t1c"], "--t2w", synthetic_case["t2f"], "--t2f", synthetic_case["t2f"]]
    assert run("segment", *args, "--output", tmp_path / "x.nii.gz") == 2
    assert "same file" in capsys.readouterr().err
    link = tmp_path / "copy.nii.gz"
    os.link(synthetic_case["t2f"], link)
    args[3] = link
    assert run("segment", *args, "--output", tmp_path / "x.nii.gz") == 2
    assert "given as T2W and FLAIR" in capsys.readouterr().err
    copy = tmp_path / "bytes.nii.gz"
    copy.write_bytes(synthetic_case["t2f"].read_bytes())  # another file, the same image
    args[3] = copy
    assert run("segment", *args, "--output", tmp_path / "x.nii.gz") == 2
    assert "are the same image" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("kind", ["label map", "binary mask"])
def test_a_label_map_or_mask_given_as_an_image_is_refused(tmp_path, synthetic_case, capsys, kind):
    seg = nib.load(str(synthetic_case["seg"]))
    if kind == "label map":
        data = np.asarray(seg.dataobj).astype(np.int16)
        data[data == 3] = 4  # BraTS 2021 values
    else:
        data = (np.asarray(nib.load(str(synthetic_case["t1c"])).dataobj) > 0).astype(np.uint8)  # a brain mask
    path = tmp_path / "t1c.nii.gz"
    nib.save(nib.Nifti1Image(data, seg.affine), str(path))
    assert run("segment", *case_args(dict(synthetic_case, t1c=path)), "--output", tmp_path / "x.nii.gz") == 2
    assert f"T1CE looks like a {kind}" in capsys.readouterr().err


def test_an_image_with_almost_no_signal_is_refused(tmp_path, synthetic_case, capsys):
    img = nib.load(str(synthetic_case["t2w"]))
    data = np.zeros(img.shape, np.float32)
    data[10:15, 10:15, 10:15] = np.random.default_rng(0).uniform(1, 100, (5, 5, 5))
    path = tmp_path / "t2w.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    assert run("segment", *case_args(dict(synthetic_case, t2w=path)), "--output", tmp_path / "x.nii.gz") == 2
    assert "almost no signal" in capsys.readouterr().err


def test_swapped_t2w_and_flair_give_a_warning_and_a_correct_pair_none(synthetic_case):
    volumes, _ = synthetic.make_case(seed=0, shape=(96, 112, 80), spacing=(1.6, 1.6, 1.6))
    model = pipeline.load_model("intensity-baseline")
    result = pipeline.segment(volumes, model)
    assert result.notes == []
    swapped = dict(volumes, t2w=volumes["t2f"], t2f=volumes["t2w"])
    swapped = {k: Volume(v.data.copy(), v.affine, k) for k, v in swapped.items()}
    result = pipeline.segment(swapped, model)
    assert any("T2W and FLAIR may be swapped" in n for n in result.notes)


def test_swapped_t1ce_and_flair_give_a_warning_and_a_correct_set_none():
    volumes, _ = synthetic.make_case(seed=1, shape=(96, 112, 80), spacing=(1.6, 1.6, 1.6))
    model = pipeline.load_model("intensity-baseline")
    assert pipeline.segment(volumes, model).notes == []
    swapped = dict(volumes, t1c=volumes["t2f"], t2f=volumes["t1c"])
    swapped = {k: Volume(v.data.copy(), v.affine, k) for k, v in swapped.items()}
    notes = pipeline.segment(swapped, model).notes
    assert len(notes) == 1 and "T1CE and FLAIR may be swapped" in notes[0]
    without_t2w = {k: v.data for k, v in swapped.items() if k != "t2w"}  # the measure needs T2W
    assert plausibility.t2w_likeness(without_t2w) is None and plausibility.contrast_warnings(without_t2w) == []


def test_contrast_check_lists_each_case_as_given_and_swapped(tmp_path, synthetic_case, capsys):
    """The measure behind the T1CE/FLAIR warning, per case folder; a folder without the three sequences is
    skipped, and a --data that is no folder is refused."""
    import shutil

    data = tmp_path / "cases"
    shutil.copytree(synthetic_case["t1c"].parent, data / "case-a")
    (data / "empty").mkdir()
    assert cli.main(["contrast-check", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "empty: skipped" in out
    (line,) = [x for x in out.splitlines() if x.startswith("case-a")]
    shared, given, *swaps = line.split(" | ")[1:]
    assert shared.startswith("shared information with T1CE FLAIR") and "(warned)" not in shared
    assert "(warned)" not in given and "bright T2W" in given and len(swaps) == 3  # one case: no other patient
    assert all(swap.endswith(": warned") for swap in swaps), swaps
    assert "1 cases as given" in out and "warned as given: 0" in out
    assert "the sequences of one head from" in out and "(warned: 0 cases); another patient's from -" in out
    assert cli.main(["contrast-check", "--data", str(tmp_path / "nowhere")]) == 2


def test_a_constant_image_gives_no_correlation_and_no_warning():
    rng = np.random.default_rng(0)
    aligned = {k: rng.uniform(1, 100, (40, 40, 40)).astype(np.float32) for k in ("t1c", "t2w", "t2f")}
    aligned["t1c"][:] = 50.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plausibility.t2w_likeness(aligned) is None and plausibility.contrast_warnings(aligned) == []


def test_rank_correlation_is_spearmans_ties_included():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    a = rng.integers(0, 40, 5000).astype(np.float32)  # many ties, as in integer MRI intensities
    b = a + rng.normal(0, 15, 5000).round()
    for x, y in ((a, b), (a, -b), (a, rng.permutation(b)), (b[:7], a[:7])):
        assert plausibility.rank_correlation(x, y) == pytest.approx(spearmanr(x, y).correlation, abs=1e-9)
    assert np.isnan(plausibility.rank_correlation(np.full(10, 2.0), np.arange(10.0)))
    assert np.isnan(plausibility.rank_correlation(np.array([1.0, np.nan, 3.0]), np.arange(3.0)))


def test_swapped_t1ce_and_t2w_give_a_warning_naming_them():
    volumes, _ = synthetic.make_case(seed=2, shape=(96, 112, 80), spacing=(1.6, 1.6, 1.6))
    model = pipeline.load_model("intensity-baseline")
    swapped = dict(volumes, t1c=volumes["t2w"], t2w=volumes["t1c"])
    swapped = {k: Volume(v.data.copy(), v.affine, k) for k, v in swapped.items()}
    notes = pipeline.segment(swapped, model).notes
    assert len(notes) == 1 and "T2W and T1CE may be swapped" in notes[0]


def test_a_sequence_sharing_little_anatomy_with_the_reference_is_warned_as_another_patients():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    grid = np.indices((60, 64, 56)).astype(float)

    def head(centre, radius, seed):
        inside = ((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(axis=0) < radius ** 2
        anatomy = gaussian_filter(np.random.default_rng(seed).normal(size=inside.shape), 2.0)
        return np.where(inside, 100 + 40 * anatomy, 0.0).astype(np.float32), anatomy

    t1c, anatomy = head((30, 32, 28), 24, 1)
    inside = t1c != 0
    own = np.where(inside, 300 - 80 * anatomy + rng.normal(0, 2, inside.shape), 0.0)  # one head, other contrast
    another, _ = head((27, 34, 29), 21, 2)
    spacing = np.full(3, plausibility.SHARED_INFORMATION_MM)  # blocks of one voxel
    aligned = {"t1c": t1c, "t2w": own.astype(np.float32), "t2f": another}
    information = plausibility.shared_information(aligned, "t1c", spacing)
    assert information["t2w"] > plausibility.SAME_PATIENT_MIN_INFORMATION > information["t2f"], information
    notes = plausibility.patient_warnings(aligned, "t1c", spacing)
    assert len(notes) == 1 and notes[0].startswith("FLAIR and T1CE may be of different patients"), notes
    # too little brain in common to judge (a few blocks): no measure, no warning
    tiny = {k: np.where(grid[0] < 3, v, 0).astype(np.float32) for k, v in aligned.items()}
    assert plausibility.patient_warnings(tiny, "t1c", spacing) == []


def test_a_tumour_over_half_the_brain_gives_a_warning():
    assert plausibility.size_warnings(30.0, 1400.0) == []
    assert "implausible" in plausibility.size_warnings(800.0, 1400.0)[0]


def test_overlay_and_statistics_honour_thick_slices():
    """A 0.9 x 0.9 x 5.5 mm scan is drawn in true proportions, and its volumes count 5.5 mm slices."""
    shape, spacing = (120, 140, 18), (0.9, 0.9, 5.5)
    volumes, labels = synthetic.make_case(seed=1, shape=shape, spacing=spacing)
    result = pipeline.segment(volumes, pipeline.load_model("intensity-baseline"))
    views = {title: aspect for title, _, _, aspect, _ in pipeline.overlay_views(result)}
    assert views == pytest.approx({"Axial": 1.0, "Coronal": 5.5 / 0.9, "Sagittal": 5.5 / 0.9})
    wt = next(r for r in result.statistics if r["region"] == "WT")
    assert wt["volume_ml"] == pytest.approx(wt["voxels"] * 0.9 * 0.9 * 5.5 / 1000)


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S")])
def test_the_overlay_shows_the_patients_right_on_the_images_left_whatever_the_files_orientation(axcodes):
    """A tumour in the patient's right anterior brain: left of centre in the axial and coronal views and
    left in the sagittal one (anterior), under the letters that say so, however the voxels are stored."""
    from nibabel import orientations as o

    volumes, _ = synthetic.make_case(seed=1, shape=(40, 48, 36))
    flip = o.ornt_transform(o.axcodes2ornt("RAS"), o.axcodes2ornt(axcodes))
    stored = {}
    for key, volume in volumes.items():
        affine = volume.affine @ o.inv_ornt_aff(flip, volume.data.shape)
        stored[key] = Volume(o.apply_orientation(volume.data, flip).astype(np.float32), affine, volume.name)
    result = pipeline.segment(stored, pipeline.load_model("intensity-baseline"))
    world = np.argwhere(result.labels > 0)
    mm = (result.reference.affine @ np.c_[world, np.ones(len(world))].T)[:3].mean(axis=1)
    brain = np.argwhere(result.reference.data > 0)
    centre = (result.reference.affine @ np.c_[brain, np.ones(len(brain))].T)[:3].mean(axis=1)
    right, anterior = mm[0] > centre[0], mm[1] > centre[1]
    views = {title: (labels, sides) for title, _, labels, _, sides in pipeline.overlay_views(result)}
    for title, expected_left in (("Axial", "R"), ("Coronal", "R"), ("Sagittal", "A")):
        labels, sides = views[title]
        assert sides[0] == expected_left
        on_left = np.argwhere(labels > 0)[:, 0].mean() < labels.shape[0] / 2
        assert on_left == (right if title != "Sagittal" else anterior), title


def test_the_run_notes_and_the_model_stay_with_the_seg_nrrd_and_the_picture(tmp_path):
    """Once the terminal is closed, the files still say which model made them and what was done to the
    input (a registration, a warning)."""
    import matplotlib.image
    import slicerio

    volumes, _ = synthetic.make_case(seed=1, shape=(40, 48, 36))
    result = pipeline.segment(volumes, pipeline.load_model("intensity-baseline"))
    plain = pipeline.write_overlay_png(result, tmp_path / "plain.png")
    result.notes = ["T1 registered to T1CE (the patient moved: 3.2 mm, 9.0°)",
                    "brain extracted (deepbet): 1554 mL of brain kept\nfrom a 6384 mL head"]
    noted = pipeline.write_overlay_png(result, tmp_path / "noted.png")
    assert matplotlib.image.imread(noted).shape[0] > matplotlib.image.imread(plain).shape[0]
    path = pipeline.write_seg_nrrd(result.labels, result.reference.affine, tmp_path / "l.seg.nrrd",
                                   result.model_name, result.notes)
    seg = slicerio.read_segmentation(str(path))
    assert seg[pipeline.SEG_NRRD_MODEL_FIELD] == "intensity-baseline"
    assert seg[pipeline.SEG_NRRD_NOTES_FIELD] == ("T1 registered to T1CE (the patient moved: 3.2 mm, 9.0 deg) | "
                                                  "brain extracted (deepbet): 1554 mL of brain kept from a 6384 mL "
                                                  "head")


def _slab(volume, first, count, name):
    """Slices ``first`` .. ``first + count`` of ``volume`` on their own grid (same world positions)."""
    shift = np.eye(4)
    shift[2, 3] = first
    return Volume(volume.data[:, :, first:first + count].copy(), volume.affine @ shift, name)


def test_a_slab_or_localiser_is_refused_and_a_partial_field_of_view_is_noted():
    volumes, _ = synthetic.make_case(seed=2, shape=(40, 48, 36))
    model = pipeline.load_model("intensity-baseline")
    with pytest.raises(pipeline.InputError, match="T2W has only 4 slices along one axis: it is a localiser"):
        pipeline.segment({**volumes, "t2w": _slab(volumes["t2w"], 16, 4, "T2W")}, model)
    # every sequence the same thin slab: nothing to register, still not a brain
    slabs = {k: _slab(volumes[k], 16, 3, k) for k in ("t1c", "t2w", "t2f")}
    with pytest.raises(pipeline.InputError, match="T1CE has only 3 slices along one axis"):
        pipeline.segment(slabs, model)
    with pytest.raises(pipeline.InputError, match=r"FLAIR covers only \d+% of the T1CE image's brain"):
        pipeline.segment({**volumes, "t2f": _slab(volumes["t2f"], 12, 10, "FLAIR")}, model)
    result = pipeline.segment({**volumes, "t2w": _slab(volumes["t2w"], 10, 20, "T2W")}, model)
    assert any("T2W covers" in n and "relies on the other sequences" in n for n in result.notes)
    whole = pipeline.segment(volumes, model)
    assert not any("covers" in n for n in whole.notes)


def test_an_unusable_native_t1_is_left_out_of_the_statistics_not_a_reason_to_stop():
    """T1 feeds only the statistics table: a T1 from another study (no overlap) or a localiser is dropped
    with a note, and the segmentation is the one made without it."""
    volumes, _ = synthetic.make_case(seed=2, shape=(40, 48, 36))
    model = pipeline.load_model("intensity-baseline")
    without = pipeline.segment({k: v for k, v in volumes.items() if k != "t1n"}, model)
    elsewhere = Volume(volumes["t1n"].data, volumes["t1n"].affine @ np.diag([1, 1, 1, 1.0]), "T1")
    elsewhere.affine[2, 3] += 400.0
    for bad in (elsewhere, _slab(volumes["t1n"], 16, 3, "T1")):
        result = pipeline.segment({**volumes, "t1n": bad}, model)
        assert any(n.startswith("T1 left out of the statistics:") for n in result.notes), result.notes
        assert np.array_equal(result.labels, without.labels)



def test_an_unreadable_or_mask_native_t1_is_left_out_with_a_note(tmp_path, synthetic_case, capsys):
    corrupt = tmp_path / "t1.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    assert run("segment", *case_args(synthetic_case), "--t1n", corrupt, "--output", out / "l.nii.gz",
               "--model", "intensity-baseline") == 0
    err = capsys.readouterr().err
    assert "Note: T1 left out of the statistics: T1:" in err and "cannot be read" in err
    volumes, _ = synthetic.make_case(seed=2, shape=(40, 48, 36))
    mask = Volume((volumes["t1n"].data > volumes["t1n"].data.mean()).astype(np.float32), volumes["t1n"].affine, "T1")
    result = pipeline.segment({**volumes, "t1n": mask}, pipeline.load_model("intensity-baseline"))
    assert any(n.startswith("T1 left out of the statistics:") and "binary mask" in n for n in result.notes)
    assert "t1n" not in result.aligned
