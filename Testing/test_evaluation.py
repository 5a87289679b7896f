import numpy as np
import pytest

from brainunet_lab import evaluation
from brainunet.settings import ModelSettings
from test_cli import brainunet


def test_dice_and_hd95_conventions():
    a = np.zeros((20, 20, 20), bool)
    assert evaluation.dice(a, a) == 1.0 and evaluation.hd95(a, a) == 0.0
    b = a.copy()
    b[5:10, 5:10, 5:10] = True
    assert evaluation.dice(a, b) == 0.0 and evaluation.hd95(a, b) == pytest.approx(373.1287, abs=1e-4)  # BraTS
    assert evaluation.dice(b, b) == 1.0 and evaluation.hd95(b, b) == 0.0


def test_hd95_of_shifted_box_with_anisotropic_spacing():
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=2)  # shifted 3 voxels along k, spacing 2 mm there
    h = evaluation.hd95(a, b, spacing=(1.0, 1.0, 2.0))
    # brute force on surfaces
    def surf(m):
        from scipy import ndimage
        return m & ~ndimage.binary_erosion(m)
    pa, pb = np.argwhere(surf(a)) * [1, 1, 2], np.argwhere(surf(b)) * [1, 1, 2]
    d_ab = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1)
    d_ba = np.sqrt(((pb[:, None] - pa[None]) ** 2).sum(-1)).min(1)
    assert h == pytest.approx(np.percentile(np.concatenate([d_ab, d_ba]), 95))
    assert evaluation.dice(a, b) == pytest.approx(2 * 7 / 20)


def test_evaluate_command(tmp_path):
    from brainunet import synthetic

    synthetic.write_case(tmp_path / "data" / "BraTS-GLI-00002-000", "BraTS-GLI-00002-000", seed=3, shape=(40, 48, 36))
    r = brainunet("evaluate", "--data", tmp_path / "data", "--output-dir", tmp_path / "ev", "--progress", "none")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "ev" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("case,dice_ET,hd95_ET") and lines[-1].startswith("mean,")
    assert float(lines[1].split(",")[lines[0].split(",").index("dice_WT")]) > 0.8
    assert (tmp_path / "ev" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # leaving a sequence out is for models trained with modality dropout; the baseline says what is missing
    r = brainunet("evaluate", "--data", tmp_path / "data", "--without", "t2w", "--output-dir", tmp_path / "ev2",
                  "--progress", "none")
    assert r.returncode == 2 and "Missing input: T2W" in r.stderr


def test_evaluate_against_another_algorithms_output(tmp_path):
    """--reference GLOB scores agreement with another label file (e.g. a peer algorithm's output)."""
    import shutil

    from brainunet import synthetic

    case = tmp_path / "data" / "case1"
    synthetic.write_case(case, "BraTS-GLI-00003-000", seed=4, shape=(40, 48, 36))
    truth = next(case.glob("*-seg.nii.gz"))
    shutil.move(truth, case / "algo_output.nii.gz")
    r = brainunet("evaluate", "--data", tmp_path / "data", "--output-dir", tmp_path / "none", "--progress", "none")
    assert r.returncode == 2 and "No labelled cases" in r.stderr
    r = brainunet("evaluate", "--data", tmp_path / "data", "--reference", "algo_*.nii.gz",
                  "--output-dir", tmp_path / "ev", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ev" / "metrics.csv").read_text().splitlines()[-1].startswith("mean,")


def test_evaluate_needs_data_or_synthetic_and_a_network_for_synthetic(tmp_path):
    r = brainunet("evaluate", "--output-dir", tmp_path / "ev", "--progress", "none")
    assert r.returncode == 2 and "--data DIR" in r.stderr
    r = brainunet("evaluate", "--synthetic", "2", "--model", "intensity-baseline", "--progress", "none")
    assert r.returncode == 2 and "trained network" in r.stderr
    r = brainunet("evaluate", "--synthetic", "2", "--engine", "{faint: no", "--progress", "none")
    assert r.returncode == 2 and "not a JSON object" in r.stderr
    r = brainunet("evaluate", "--synthetic", "2", "--engine", '{"faintest": false}', "--progress", "none")
    assert r.returncode == 2 and "Unknown engine setting(s): faintest" in r.stderr


def test_evaluate_synthetic_without_a_sequence_is_refused_for_a_model_without_modality_dropout(tmp_path):
    """--without on engine cases asks what segment asks: a model not trained with modality dropout is refused
    (before any engine case is made, so no templates are needed)."""
    import torch

    from brainunet import weights
    from brainunet.network import BrainUNet, NetworkConfig

    torch.manual_seed(0)
    path = tmp_path / "no-dropout.pt"
    weights.save_weights(path, BrainUNet(NetworkConfig(features=(4, 8))), "no-dropout-test",
                         ModelSettings.from_flat({"spacing_mm": [2, 2, 2], "patch_size": [32, 32, 32], "modality_dropout": False}))
    r = brainunet("evaluate", "--synthetic", "1", "--without", "t2w", "--model", path, "--progress", "none")
    assert r.returncode == 2 and "Missing input: T2W" in r.stderr
