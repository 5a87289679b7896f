"""The resolution ceiling (``brainunet grid-ceiling``): what a coarser working grid alone costs."""
import numpy as np
import pytest

from brainunet.imageio import Volume
from brainunet.labels import ET, NETC, WT
from brainunet.preprocessing import prepare
from brainunet_lab.evaluation import dice
from brainunet_lab.resolution import _target_shape, grid_ceiling, summarise, tumour_box
from test_cli import brainunet


def _shelled_tumour(shape=(60, 60, 60), radius=14, shell=1):
    """NETC ball inside an ET shell ``shell`` voxels thick, inside an SNFH ball."""
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] // 2
    r = np.sqrt((grid ** 2).sum(0))
    labels = np.zeros(shape, np.uint8)
    labels[r < radius + 6] = 2
    labels[r < radius] = 3
    labels[r < radius - shell] = 1
    return labels


def test_native_grid_is_the_reference_itself():
    labels = _shelled_tumour()
    assert np.array_equal(grid_ceiling(labels, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), labels)


def test_a_thin_rim_is_lost_on_a_coarse_grid_and_a_bulky_region_is_not():
    labels = _shelled_tumour(shell=1)
    coarse = grid_ceiling(labels, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert coarse.shape == labels.shape
    assert dice(WT.mask(coarse), WT.mask(labels)) > 0.95
    thin = dice(ET.mask(coarse), ET.mask(labels))
    thick = _shelled_tumour(shell=5)
    thick_coarse = grid_ceiling(thick, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert thin < 0.8 < dice(ET.mask(thick_coarse), ET.mask(thick))
    finer = grid_ceiling(labels, (1.0, 1.0, 1.0), (1.5, 1.5, 1.5))
    assert dice(ET.mask(finer), ET.mask(labels)) > thin
    assert set(np.unique(coarse)) <= {0, 1, 2, 3}
    assert dice(NETC.mask(coarse), NETC.mask(labels)) > 0.9


def test_the_coarse_grid_is_the_one_inference_uses():
    shape, spacing = (37, 41, 23), (1.0, 1.2, 3.0)
    data = np.random.default_rng(0).random(shape).astype(np.float32) + 1
    affine = np.diag([*spacing, 1.0])
    prepared = prepare({"t1c": data}, Volume(data, affine), ("t1c",), (2.0, 2.0, 2.0))
    assert prepared.image.shape[1:] == _target_shape(shape, spacing, (2.0, 2.0, 2.0))


def test_tumour_box_and_summary():
    labels = np.zeros((20, 20, 20), np.uint8)
    assert tumour_box(labels, 3) == (slice(0, 20),) * 3
    labels[5:8, 10, 2] = 2
    assert tumour_box(labels, 3) == (slice(2, 11), slice(7, 14), slice(0, 6))
    rows = [{"case": c, "spacing_mm": s, **{f"dice_{k}": v for k in ("ET", "NETC", "SNFH", "TC", "WT")}}
            for c, s, v in [("a", 2.0, 0.5), ("b", 2.0, 1.0), ("a", 1.5, 0.9)]]
    out = summarise(rows)
    assert [(r["spacing_mm"], r["cases"]) for r in out] == [(2.0, 2), (1.5, 1)]
    assert out[0]["dice_ET"] == pytest.approx(0.75)


def test_grid_ceiling_command(tmp_path):
    from brainunet import synthetic

    synthetic.write_case(tmp_path / "data" / "BraTS-GLI-00002-000", "BraTS-GLI-00002-000", seed=3, shape=(40, 48, 36))
    r = brainunet("grid-ceiling", "--data", tmp_path / "data", "--spacing", "2", "--spacing", "1",
                  "--output", tmp_path / "ceiling.csv")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("2 mm grid: ET ") and "(1 cases)" in lines[0]
    assert lines[1].startswith("1 mm grid: ET ")
    et = [float(line.split()[4]) for line in lines]
    assert et[0] < et[1]  # the synthetic case's own grid is finer than 2 mm
    assert len((tmp_path / "ceiling.csv").read_text().splitlines()) == 3
    bad = brainunet("grid-ceiling", "--data", tmp_path / "data", "--spacing", "0")
    assert bad.returncode == 2 and "greater than 0" in bad.stderr
    empty = brainunet("grid-ceiling", "--data", tmp_path / "nothing")
    assert empty.returncode == 2 and "not a folder" in empty.stderr
