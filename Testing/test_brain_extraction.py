"""Brain extraction turns on by itself for a scan that still holds the head, and only then; the
segmentation stays inside the extracted brain. The raw clinical case (../shared) runs end to end."""
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import ROOT, SHARED_DATA, SHARED_REAL

from brainunet import brainmask, pipeline, synthetic
from brainunet.imageio import Volume


def head_with_scalp(volumes):
    """The stripped phantom with a bright scalp-like rim and a dark gap (skull) around its brain."""
    out = {}
    for key, vol in volumes.items():
        brain = vol.data > 0
        gap = ndimage.binary_dilation(brain, iterations=3)
        scalp = ndimage.binary_dilation(brain, iterations=6) & ~gap
        data = vol.data.copy()
        data[gap & ~brain] = 0.03 * data[brain].max()
        data[scalp] = 1.3 * data[brain].max()
        out[key] = Volume(data, vol.affine, vol.name)
    return out, scalp


@pytest.fixture(scope="module")
def phantom():
    return synthetic.make_case(seed=0, shape=(96, 112, 80), spacing=(1.6, 1.6, 1.6), modalities=("t1c", "t2w", "t2f"))


def test_a_stripped_scan_is_left_alone(phantom):
    volumes, _ = phantom
    needed, reason, volume_ml = brainmask.needs_extraction(volumes["t1c"].data, volumes["t1c"].spacing)
    assert not needed and reason == "already skull-stripped" and 800 < volume_ml < 1400
    model = pipeline.load_model("intensity-baseline")
    notes = []
    aligned, _ = pipeline.prepare_inputs(volumes, model, notes=notes)
    assert notes == [] and all(np.array_equal(aligned[k], volumes[k].data) for k in volumes)


def test_a_skull_like_rim_is_detected_and_removed(phantom):
    volumes, labels = phantom
    head, scalp = head_with_scalp(volumes)
    needed, reason, _ = brainmask.needs_extraction(head["t1c"].data, head["t1c"].spacing)
    assert needed and "rim" in reason
    result = pipeline.segment(head, pipeline.load_model("intensity-baseline"))
    assert len(result.notes) == 1 and result.notes[0].startswith("brain extracted")
    brain = volumes["t1c"].data > 0
    for key in head:
        assert not result.aligned[key][scalp].any()  # the rim is gone from every sequence
        kept = (result.aligned[key] != 0) & brain
        assert kept.sum() > 0.95 * brain.sum()  # and the brain is kept
    assert not (result.labels[scalp] > 0).any()
    assert (result.labels[labels > 0] > 0).mean() > 0.5  # the tumour is still found


RAW = SHARED_REAL / "raw_clinical_case"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_raw_clinical_case_end_to_end(tmp_path):
    native = RAW / "native"
    out = tmp_path / "seg.nii.gz"
    env = dict(os.environ)
    env.pop("BRAINUNET_MODEL", None)  # the bundled network, as a user runs it
    env["PYTHONPATH"] = str(ROOT / "BrainUNetSegmentation")
    r = subprocess.run([sys.executable, "-m", "brainunet", "segment", "--t1c", native / "t1c.nii.gz", "--t2w",
                        native / "t2w.nii.gz", "--t2f", native / "t2f.nii.gz", "--t1n", native / "t1n.nii.gz",
                        "--output", out, "--progress", "none"],
                       capture_output=True, text=True, encoding="utf-8", env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "may be swapped" not in r.stdout + r.stderr  # the sequences are as named: no false alarm
    # the T1 shares the T1CE's grid but the patient moved between them: registered, not another patient's
    assert "Note: T1 registered to T1CE (the patient moved: " in r.stderr
    assert "different patients" not in r.stdout + r.stderr
    brain_ml = float(re.search(r"brain extracted \(deepbet\): (\d+) mL", r.stderr).group(1))
    stripped = nib.load(str(RAW / "sri24" / "t1c.nii.gz"))
    reference_ml = float((np.asarray(stripped.dataobj) != 0).sum()) * float(np.prod(stripped.header.get_zooms()[:3])) / 1000
    assert abs(brain_ml - reference_ml) / reference_ml < 0.15
    wt_ml = float(re.search(r"WT ([\d.]+) mL", r.stdout).group(1))
    assert 15 <= wt_ml <= 60, r.stdout
    img = nib.load(str(native / "t1c.nii.gz"))
    mask = brainmask.extract_brain(np.asarray(img.dataobj, np.float32), img.affine)
    labels = np.asarray(nib.load(str(out)).dataobj)
    assert labels.any() and not labels[~mask].any()  # every label inside the extracted brain
