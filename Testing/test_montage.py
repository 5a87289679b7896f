"""``brainunet montage``: real vs synthetic montage, tissue histograms and intensity CSV (offline, phantom anatomy)."""
import argparse
import csv
import shutil

import numpy as np
import pytest

from brainunet_lab import montage
from brainunet.errors import InputError

# write_case's phantom spans the phantom anatomy's field of view (160 x 192 x 144 mm), as a BraTS
# case spans SRI24's, so its GM/WM/CSF come from the anatomy's maps.
PHANTOM_FOV = dict(shape=(50, 60, 45), spacing=(3.2, 3.2, 3.2))


def parse(*argv):
    parser = argparse.ArgumentParser(prog="brainunet")
    montage.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["montage", *map(str, argv)])


@pytest.fixture(scope="module")
def unlabelled_real(tmp_path_factory):
    """A 'real' case whose labels are not a *-seg file, as in the unlabelled demo case."""
    from brainunet import synthetic

    folder = tmp_path_factory.mktemp("real") / "Phantom-00001"
    paths = synthetic.write_case(folder, "Phantom-00001", seed=3, **PHANTOM_FOV)
    labels = folder / "algo_segmentation_NOT_GT.nii.gz"
    shutil.move(paths["seg"], labels)
    return folder, labels


@pytest.fixture(scope="module")
def result(unlabelled_real, tmp_path_factory):
    folder, labels = unlabelled_real
    out = tmp_path_factory.mktemp("montage")
    args = parse("--real", folder, "--real-labels", labels, "--synthetic", 2, "--seed", 5, "--output-dir", out,
                 "--spacing", 4.0, "--anatomy", "phantom", "--coronal")
    assert args.func(args) == 0
    with open(out / "tissue_intensities.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return out, {(r["tissue"], r["modality"], r["source"]): r for r in rows}, rows


def test_writes_montage_histograms_and_csv(result):
    from PIL import Image

    out, _, _ = result
    for name, min_height in (("montage.png", 3 * 2 * 150), ("histograms.png", 600)):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            width, height = im.size
        assert 500 <= width <= 4000 and min_height <= height <= 6000, (name, im.size)


def test_csv_has_a_row_per_tissue_modality_and_source(result):
    _, by_key, rows = result
    assert list(rows[0]) == ["tissue", "modality", "source", "median", "p25", "p75", "n", "cases", "mask"]
    assert set(by_key) == {(t, m, s) for t in montage.TISSUES for m in ("T1CE", "T2W", "FLAIR")
                           for s in ("real", "synthetic")}
    assert len(rows) == len(by_key)
    for (tissue, _, source), r in by_key.items():
        if source == "real" or tissue in ("WM", "GM", "CSF", "SNFH"):  # engine cases may lack NETC or ET
            assert int(r["n"]) > 0 and 1 <= int(r["cases"]) <= (1 if source == "real" else 2), (tissue, source)
            assert float(r["p25"]) <= float(r["median"]) <= float(r["p75"])
    assert "approximate" in by_key["WM", "FLAIR", "real"]["mask"]  # the atlas approximation is stated
    assert by_key["ET", "T1CE", "real"]["mask"] == "labels"


def test_real_medians_follow_the_phantom_contrasts(result):
    """write_case renders FLAIR SNFH > WM, T2W CSF > GM > WM and T1CE ET brightest: the masks must show it."""
    _, by_key, _ = result
    med = {k: float(r["median"]) for k, r in by_key.items() if k[2] == "real"}
    assert med["SNFH", "FLAIR", "real"] > med["WM", "FLAIR", "real"] + 1
    assert med["CSF", "T2W", "real"] > med["GM", "T2W", "real"] > med["WM", "T2W", "real"]
    assert med["ET", "T1CE", "real"] == max(v for (t, m, s), v in med.items() if m == "T1CE")


def test_median_gaps_are_sorted_by_size(result):
    _, _, rows = result
    parsed = [{**r, "median": float(r["median"]) if r["median"] else np.nan} for r in rows]
    gaps = montage.median_gaps(parsed)
    assert gaps and all(abs(a[2]) >= abs(b[2]) for a, b in zip(gaps, gaps[1:]))


def test_every_case_weighs_the_same():
    values = np.concatenate([np.zeros(1000), np.ones(10)])
    weights = np.concatenate([np.full(1000, 1 / 1000), np.full(10, 1 / 10)])
    low, high = montage._weighted_percentiles(values, weights, (25, 75))
    assert low == 0 and high == 1  # the 10-voxel case is half the distribution, not 1 %


def test_real_case_outside_atlas_space_gets_no_healthy_tissue(capsys):
    from brainunet import synthetic
    from brainunet_lab.engine import phantom_anatomy
    from brainunet.preprocessing import align_to_reference, prepare

    volumes, _ = synthetic.make_case(seed=1, shape=(30, 36, 28), spacing=(3.0, 3.0, 3.0))  # 90 mm, not 160
    prepared = prepare(align_to_reference(volumes), volumes["t1c"], montage.MODALITIES, (4.0, 4.0, 4.0))
    assert montage._atlas_probabilities(phantom_anatomy(4.0), prepared) is None
    assert "not in atlas space" in capsys.readouterr().err
    tissue = montage.real_tissue(prepared.image, prepared.mask, np.zeros(prepared.mask.shape, np.uint8), None)
    assert not tissue.any()


@pytest.mark.parametrize("argv, message", [
    (["--synthetic", 0], "Nothing to show"),
    (["--synthetic", -1], "0 or more"),
    (["--synthetic", 1, "--real-labels", "x.nii.gz"], "one label file per --real"),
])
def test_bad_arguments_are_clear_input_errors(tmp_path, argv, message):
    args = parse(*argv, "--output-dir", tmp_path / "out", "--anatomy", "phantom", "--spacing", 4)
    with pytest.raises(InputError, match=message):
        args.func(args)
    assert not (tmp_path / "out").exists()  # nothing written


def test_folder_without_a_case_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    args = parse("--real", tmp_path / "empty", "--synthetic", 0, "--output-dir", tmp_path / "out",
                 "--anatomy", "phantom", "--spacing", 4)
    with pytest.raises(InputError, match="No case in .*T1CE, T2W, FLAIR not found"):
        args.func(args)
    args = parse("--real", tmp_path / "missing", "--output-dir", tmp_path / "out", "--anatomy", "phantom")
    with pytest.raises(InputError, match="is not a folder"):
        args.func(args)


def test_unreadable_label_file_is_an_input_error(unlabelled_real, tmp_path):
    folder, _ = unlabelled_real
    bad = tmp_path / "bad-seg.nii.gz"
    bad.write_bytes(b"not a nifti")
    args = parse("--real", folder, "--real-labels", bad, "--synthetic", 0, "--output-dir", tmp_path / "out",
                 "--anatomy", "phantom", "--spacing", 4)
    with pytest.raises(InputError, match="bad-seg.nii.gz"):
        args.func(args)
