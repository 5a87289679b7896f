"""The CLI on the real cases in ../shared/data/real, and the training cases' layout (skipped when ../shared/data
is absent; a missing folder inside it fails)."""
import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA, SHARED_REAL, dice
from test_cli import brainunet

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")

CASES = {
    "BraTS2021_00006": {"t1c": "BraTS2021_00006_t1ce.nii.gz", "t2w": "BraTS2021_00006_t2.nii.gz",
                        "t2f": "BraTS2021_00006_flair.nii.gz", "ref": "BraTS2021_00006_seg.nii.gz"},
    "unlabelled_demo_case": {"t1c": "t1c.nii.gz", "t2w": "t2w.nii.gz", "t2f": "t2f.nii.gz",
                             "ref": "algo_segmentation_NOT_GT.nii.gz"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_on_real_case_gives_labels_on_input_grid(tmp_path, case):
    files = {k: SHARED_REAL / case / v for k, v in CASES[case].items()}
    out = tmp_path / "labels.nii.gz"
    r = brainunet("segment", "--t1c", files["t1c"], "--t2w", files["t2w"], "--t2f", files["t2f"], "--output", out,
                  "--stats", tmp_path / "s.csv", "--device", "cpu", "--progress", "none", "--model", BUNDLED,
                  timeout=600)
    assert r.returncode == 0, r.stderr
    # the sequences are as named and of one patient: no false alarm
    assert "may be swapped" not in r.stdout + r.stderr and "different patients" not in r.stdout + r.stderr
    ref = nib.load(str(files["t1c"]))
    lab = nib.load(str(out))
    assert lab.shape == ref.shape and np.allclose(lab.affine, ref.affine)
    labels = np.asarray(lab.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels > 0).any()
    # Regression guards a little below what MODEL_CARD.md reports for the bundled model (dev case, looked at
    # once after the model was chosen by cross-validation: WT 0.945, ET 0.836, NETC 0.936, SNFH 0.860;
    # agreement with the algorithm's output on the unlabelled case: WT 0.955, ET 0.891, SNFH 0.918): a change
    # that loses them must be looked at, not absorbed. They choose nothing.
    from brainunet.labels import to_brats2023

    reference = to_brats2023(np.asarray(nib.load(str(files["ref"])).dataobj))
    for label, floor in FLOORS[case].items():
        region = labels > 0 if label == "WT" else labels == label
        truth = reference > 0 if label == "WT" else reference == label
        assert dice(region, truth) > floor, (label, dice(region, truth))


BUNDLED = "brainunet-2mm-real-v2"
FLOORS = {"BraTS2021_00006": {"WT": 0.91, 3: 0.79, 1: 0.90, 2: 0.82},
          "unlabelled_demo_case": {"WT": 0.93, 3: 0.86, 2: 0.89}}


def test_another_patients_flair_on_the_same_grid_is_warned_and_the_patients_own_is_not():
    """Two BraTS cases share one grid (240 x 240 x 155, 1 mm), so nothing is registered: only the anatomy
    the sequences share tells that one of them is another patient's."""
    from brainunet import pipeline
    from brainunet.imageio import find_case_files

    own = find_case_files(SHARED_REAL / "BraTS2021_00006")
    other = find_case_files(SHARED_REAL / "unlabelled_demo_case")
    model = pipeline.load_model(None, device="cpu")
    for given, expected in ((own, 0), (dict(own, t2f=other["t2f"]), 1)):
        given = {k: v for k, v in given.items() if k in ("t1c", "t2w", "t2f")}
        notes: list[str] = []
        pipeline.prepare_inputs(pipeline.load_inputs(given, notes), model, notes=notes)
        warned = [n for n in notes if "may be of different patients" in n]
        assert len(warned) == expected, notes
        assert all(n.startswith("FLAIR and T1CE") for n in warned), warned


def test_the_29_training_cases_are_found_read_and_split_by_institution():
    from brainunet_lab.realdata import find_labelled_cases, institution, institution_folds, read_labels
    from brainunet_lab.evaluation import find_reference

    cases = find_labelled_cases(SHARED_DATA / "train")
    assert len(cases) == 29
    institutions = {institution(c.name) for c in cases}
    assert {"2013", "CBICA"} <= institutions and "other" not in institutions
    labels, affine = read_labels(find_reference(cases[0]), cases[0].name)  # BraTS 2018: 4 is ET
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and 3 in labels and labels.shape == (240, 240, 155)
    folds = institution_folds([c.name for c in cases], [1.0] * len(cases), 5)
    assert sorted(i for f in folds for i in f) == list(range(29)) and min(map(len, folds)) >= 5

