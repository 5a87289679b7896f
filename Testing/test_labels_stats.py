import numpy as np
import pytest

from brainunet import labels as L
from brainunet.statistics import max_diameter_mm, region_statistics, write_csv, read_csv
from brainunet.settings import Postprocessing


def test_label_values_follow_brats2023():
    assert (L.NETC.label, L.SNFH.label, L.ET.label) == (1, 2, 3)
    assert L.TC.labels == (1, 3) and L.WT.labels == (1, 2, 3)
    assert L.CLASS_LABELS == (0, 1, 2, 3)
    assert len({r.color for r in L.SUBREGIONS}) == 3


def test_terminology_entries_are_slicer_format():
    for r in L.SUBREGIONS:
        parts = r.terminology_entry().split("~")
        assert len(parts) == 7
        assert parts[1] == "SCT^49755003^Morphologically Altered Structure"
        assert parts[2] == "^".join(r.snomed_type)
    with pytest.raises(ValueError):
        L.WT.terminology_entry()


def test_brats2021_labels_are_converted():
    a = np.array([0, 1, 2, 4])
    assert L.to_brats2023(a).tolist() == [0, 1, 2, 3]
    assert L.to_brats2023(np.array([0, 1, 2, 3])).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="mixes"):
        L.to_brats2023(np.array([3, 4]))
    with pytest.raises(ValueError, match="values"):
        L.to_brats2023(np.array([0, 7]))


def test_statistics_match_numpy():
    rng = np.random.default_rng(0)
    labels = np.zeros((30, 32, 20), np.uint8)
    labels[5:15, 6:20, 4:10] = 2
    labels[8:12, 9:14, 5:8] = 3
    labels[9:11, 10:12, 6:7] = 1
    affine = np.array([[0.0, -1.2, 0, 10], [0.9, 0, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    t1c = rng.normal(100, 10, labels.shape).astype(np.float32)
    rows = {r["region"]: r for r in region_statistics(labels, affine, {"t1c": t1c})}
    voxel_ml = 1.2 * 0.9 * 3.0 / 1000
    for key, values in {"ET": [3], "NETC": [1], "SNFH": [2], "TC": [1, 3], "WT": [1, 2, 3]}.items():
        mask = np.isin(labels, values)
        r = rows[key]
        assert r["voxels"] == mask.sum()
        assert r["volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
        assert r["mean_T1CE"] == pytest.approx(t1c[mask].mean(), rel=1e-5)
        assert r["median_T1CE"] == pytest.approx(np.median(t1c[mask]), rel=1e-5)
        centroid = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
        assert [r["centroid_r_mm"], r["centroid_a_mm"], r["centroid_s_mm"]] == pytest.approx(centroid.tolist())
        pts = np.argwhere(mask) @ affine[:3, :3].T
        assert len(pts) < 3000  # small enough for the brute-force diameter
        assert r["max_diameter_mm"] == pytest.approx(np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max())


def test_diameter_of_box_and_empty():
    m = np.zeros((10, 10, 10), bool)
    assert max_diameter_mm(m, np.eye(4)) == 0.0
    m[2:7, 1:4, 3:5] = True  # corners 4, 2, 1 voxels apart
    assert max_diameter_mm(m, np.diag([1.0, 2.0, 3.0, 1.0])) == pytest.approx(np.sqrt(4**2 + 4**2 + 3**2))
    m[:] = False
    m[0:3, 5:10, 0:10] = True  # touching the volume's edges on three sides
    assert max_diameter_mm(m, np.eye(4)) == pytest.approx(np.sqrt(2**2 + 4**2 + 9**2))


def test_csv_round_trip(tmp_path):
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 3
    rows = region_statistics(labels, np.eye(4))
    write_csv(rows, tmp_path / "s.csv")
    back = read_csv(tmp_path / "s.csv")
    assert [r["region"] for r in back] == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert float(back[0]["volume_ml"]) == pytest.approx(0.008)
    # a table read back from Slicer holds counts as doubles: a large count stays a whole number
    big = [{**rows[4], "voxels": 1234567.0, "volume_ml": 1234.567891, "mean_t1c": float("nan")}]
    write_csv(big, tmp_path / "big.csv")
    again = read_csv(tmp_path / "big.csv")[0]
    assert again["voxels"] == "1234567" and again["volume_ml"] == "1234.57" and again["mean_t1c"] == "nan"


def test_et_post_processing_rules():
    from brainunet import postprocess

    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:20, 5:20, 5:20] = 2
    labels[8:14, 8:14, 8:14] = 1
    labels[8:14, 8:14, 14:16] = 3  # an ET rim piece of 72 voxels
    labels[17, 17, 17] = 3  # a single bright voxel
    out = postprocess.small_et_components_to_netc(labels, 10)
    assert out[17, 17, 17] == 1 and (out == 3).sum() == 72 and (labels == 3).sum() == 73  # input untouched
    assert np.array_equal(postprocess.small_et_components_to_netc(labels, 0), labels)
    assert np.array_equal(postprocess.tiny_et_to_netc(labels, 73), labels)  # not tiny: kept
    tiny = postprocess.tiny_et_to_netc(labels, 74)
    assert not (tiny == 3).any() and (tiny == 1).sum() == (labels == 1).sum() + 73
    probs = np.zeros((4,) + labels.shape, np.float32)
    for c in range(4):
        probs[c][labels == c] = 1.0
    assert np.array_equal(postprocess.apply(probs, None, Postprocessing()), labels)
    both = postprocess.apply(probs, None, Postprocessing(min_et_component_voxels=10, et_to_netc_below_voxels=50))
    assert np.array_equal(both, out)


def test_region_decoding_thresholds_decide_core_and_et_inside_the_tumour():
    from brainunet import postprocess
    from brainunet.settings import Postprocessing

    # (background, NETC, SNFH, ET) per voxel, one voxel each along x
    probs = np.array([
        [0.10, 0.10, 0.45, 0.35],  # SNFH by argmax; core share 0.45/0.9 = 0.5; ET share 0.35/0.45 = 0.78
        [0.10, 0.50, 0.10, 0.30],  # NETC by argmax; core share 0.89; ET share 0.375
        [0.10, 0.20, 0.10, 0.60],  # ET by argmax; ET share 0.75
        [0.70, 0.10, 0.10, 0.10],  # background: never touched
    ], np.float32).T.reshape(4, 4, 1, 1)
    labels = lambda **rule: postprocess.apply(probs, None, Postprocessing(**rule)).ravel().tolist()
    assert labels() == [2, 1, 3, 0]
    assert labels(core_threshold=0.5) == [3, 1, 3, 0]  # the first voxel reaches the core share: its ET wins
    assert labels(core_threshold=0.6) == [2, 1, 3, 0]
    assert labels(core_threshold=0.95) == [2, 2, 2, 0]  # no voxel is that sure of core
    assert labels(et_threshold=0.3) == [2, 3, 3, 0]  # only core voxels change; SNFH stays
    assert labels(et_threshold=0.8) == [2, 1, 1, 0]
    assert labels(core_threshold=0.5, et_threshold=0.8) == [1, 1, 1, 0]
    assert labels(tumour_threshold=0.95, core_threshold=0.5) == [0, 0, 0, 0]  # decoding stays inside the tumour
    zero = np.zeros((4, 2, 1, 1), np.float32)
    zero[2, 0] = 1.0  # SNFH sure; its core share is 0
    zero[0, 1] = 1.0  # background sure
    assert postprocess.apply(zero, None, Postprocessing(core_threshold=0.4, et_threshold=0.5)).ravel().tolist() == [2, 0]
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match="core_threshold must be between 0 and 1"):
            Postprocessing(core_threshold=bad)
    assert Postprocessing(et_threshold="0.4").et_threshold == 0.4  # --set values arrive as JSON numbers or text


def test_small_components_go_but_never_the_largest():
    from brainunet import postprocess

    labels = np.zeros((30, 30, 30), np.uint8)
    labels[2:6, 2:6, 2:6] = 2  # 64 voxels: the tumour
    labels[20:22, 20:22, 20:22] = 2  # 8 voxels: a speck
    out = postprocess.remove_small_components(labels, 100)
    assert (out[2:6, 2:6, 2:6] == 2).all() and not out[20:22, 20:22, 20:22].any()
    assert np.array_equal(postprocess.remove_small_components(labels, 5), labels)


def test_components_without_core_go_but_never_the_largest():
    """A FLAIR-only blob away from the tumour goes; a satellite with enhancement stays; a tumour that is
    all SNFH (no core anywhere) keeps its largest part."""
    from brainunet import postprocess
    from brainunet.settings import Postprocessing

    labels = np.zeros((40, 40, 40), np.uint8)
    labels[2:12, 2:12, 2:12] = 2
    labels[5:8, 5:8, 5:8] = 3  # the tumour: SNFH around ET
    labels[20:26, 20:26, 20:26] = 2  # oedema-like, no core: goes
    labels[30:34, 30:34, 30:34] = 2
    labels[31, 31, 31] = 3  # a satellite with enhancement: stays
    out = postprocess.remove_components_without_core(labels)
    assert not out[20:26, 20:26, 20:26].any()
    assert np.array_equal(out[2:12, 2:12, 2:12], labels[2:12, 2:12, 2:12])
    assert np.array_equal(out[30:34, 30:34, 30:34], labels[30:34, 30:34, 30:34])
    no_core = np.where(labels == 3, 2, labels).astype(np.uint8)
    kept = postprocess.remove_components_without_core(no_core)
    assert kept[2:12, 2:12, 2:12].all() and not kept[20:26, 20:26, 20:26].any()  # the largest only
    probs = np.zeros((4,) + labels.shape, np.float32)
    for c in range(4):
        probs[c][labels == c] = 1.0
    assert np.array_equal(postprocess.apply(probs, None, Postprocessing(components_need_core=True)), out)
    assert np.array_equal(postprocess.apply(probs, None, Postprocessing()), labels)  # off by default


def test_core_holes_become_netc_in_3d_and_in_a_rim_open_at_one_pole():
    """Background or SNFH enclosed by an enhancing rim is necrosis (NETC); a rim open at its top still
    encloses its centre slice by slice; nothing outside the rim changes, and the rule off changes nothing."""
    from brainunet import postprocess

    labels = np.zeros((30, 30, 30), np.uint8)
    labels[3:27, 3:27, 3:27] = 2  # SNFH around everything
    labels[8:20, 8:20, 8:20] = 3  # a closed ET shell ...
    labels[10:18, 10:18, 10:18] = 2  # ... around SNFH
    labels[12:16, 12:16, 12:16] = 0  # ... and background
    out = postprocess.fill_core_holes(labels)
    assert (out[10:18, 10:18, 10:18] == 1).all()
    outside = np.ones(labels.shape, bool)
    outside[8:20, 8:20, 8:20] = False
    assert np.array_equal(out[outside], labels[outside]) and (out == 3).sum() == (labels == 3).sum()

    open_top = labels.copy()
    open_top[10:18, 10:18, 18:20] = 2  # the shell's top cap gone: no 3D hole any more
    filled = postprocess.fill_core_holes(open_top)
    assert not postprocess.ndimage.binary_fill_holes(np.isin(open_top, (1, 3)))[12, 12, 12]  # open in 3D
    assert (filled[10:18, 10:18, 10:20] == 1).all()  # but each axial slice inside the rim walls is enclosed
    assert np.array_equal(filled[outside], open_top[outside])

    probs = np.zeros((4,) + labels.shape, np.float32)
    for c in range(4):
        probs[c][labels == c] = 1.0
    assert np.array_equal(postprocess.apply(probs, None, Postprocessing(fill_core_holes=True)), out)
    assert np.array_equal(postprocess.apply(probs, None, Postprocessing(fill_core_holes=False)), labels)
    no_core = np.where(labels == 3, 2, labels).astype(np.uint8)
    assert np.array_equal(postprocess.fill_core_holes(no_core), no_core)


def test_rule_sizes_are_volumes_whatever_the_grid():
    """min_component_voxels=3000 means 3 mL: on a 0.9 x 0.9 x 5.5 mm clinical grid (4.455 mm³ a voxel) a
    700-voxel satellite (3.1 mL) stays and a 600-voxel one (2.7 mL) goes; on 1 mm both go."""
    from brainunet import postprocess

    labels = np.zeros((60, 60, 20), np.uint8)
    labels[0:20, 0:20, 0:10] = 2  # the tumour, 4000 voxels
    labels[30:37, 0:10, 0:10] = 2  # 700 voxels
    labels[45:51, 0:10, 0:10] = 2  # 600 voxels
    probs = np.zeros((4,) + labels.shape, np.float32)
    for c in range(4):
        probs[c][labels == c] = 1.0
    rule = Postprocessing(min_component_voxels=3000)
    clinical = postprocess.apply(probs, None, rule, voxel_mm3=0.9 * 0.9 * 5.5)
    assert clinical[30:37, 0:10, 0:10].all() and not clinical[45:51].any() and clinical[0:20, 0:20, 0:10].all()
    one_mm = postprocess.apply(probs, None, rule)
    assert not one_mm[30:].any() and one_mm[0:20, 0:20, 0:10].all()
    assert postprocess.native_voxels(3000, 0.5 ** 3) == 24000 and postprocess.native_voxels(0, 4.0) == 0
    assert postprocess.native_voxels(1, 8.0) == 1  # a rule that is on stays on
