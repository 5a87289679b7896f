"""A small, deterministic synthetic glioma case: the built-in default case and the test fixture.

This is a phantom (ellipsoid brain, ventricles, a ring-enhancing tumour with oedema), not the
training data engine. It lets the demo command and the tests run on a fresh machine with no data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .imageio import Volume
from .labels import ET, NETC, SNFH

# Relative intensities per tissue: background, WM, GM, CSF, SNFH, ET, NETC.
TISSUE_INTENSITY = {
    "t1c": (0, 0.80, 0.60, 0.20, 0.55, 1.50, 0.25),
    "t2w": (0, 0.40, 0.60, 1.40, 1.05, 0.80, 1.20),
    "t2f": (0, 0.50, 0.65, 0.15, 1.35, 1.00, 0.70),
    "t1n": (0, 0.90, 0.65, 0.25, 0.50, 0.60, 0.30),
}


def default_affine(shape, spacing) -> np.ndarray:
    """RAS affine with the volume centred on the origin."""
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return a


def make_case(seed: int = 0, shape=(96, 112, 80), spacing=(1.6, 1.6, 1.6), affine: np.ndarray | None = None,
              tumour_radius_mm: float = 22.0, modalities=("t1c", "t2w", "t2f", "t1n")):
    """Return ``(volumes, labels)``: Volume per modality and BraTS 2023 labels, all on one grid."""
    rng = np.random.default_rng(seed)
    affine = default_affine(shape, spacing) if affine is None else np.asarray(affine, float)
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float32)
    xyz = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)  # RAS mm per voxel

    def ellipsoid(centre, radii):
        return (((xyz - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1)

    brain_r = np.array([62.0, 78.0, 55.0]) * rng.uniform(0.95, 1.05, 3)
    brain_d = ellipsoid((0, 0, 0), brain_r)
    brain = brain_d <= 1
    wm = brain_d <= 0.72
    csf = (ellipsoid((-9, 5, 8), (6, 24, 9)) <= 1) | (ellipsoid((9, 5, 8), (6, 24, 9)) <= 1)
    tissue = np.zeros(shape, np.uint8)
    tissue[brain] = 2  # GM
    tissue[wm] = 1  # WM
    tissue[csf & brain] = 3

    side = rng.choice([-1, 1])
    centre = np.array([side * rng.uniform(22, 32), rng.uniform(-25, 25), rng.uniform(-5, 20)])
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3) * 4.0
    d = np.sqrt(ellipsoid(centre, np.array([1.0, 1.15, 0.9]) * tumour_radius_mm)) + noise / tumour_radius_mm
    labels = np.zeros(shape, np.uint8)
    labels[(d <= 1.0) & brain] = SNFH.label
    labels[(d <= 0.55) & brain] = ET.label
    labels[(d <= 0.38) & brain] = NETC.label
    tissue_lab = tissue.copy()
    tissue_lab[labels == SNFH.label] = 4
    tissue_lab[labels == ET.label] = 5
    tissue_lab[labels == NETC.label] = 6

    bias = np.exp(0.15 * (xyz[..., 0] / 60.0) - 0.1 * (xyz[..., 2] / 50.0))
    volumes = {}
    for m in modalities:
        table = np.asarray(TISSUE_INTENSITY[m], np.float32) * rng.uniform(0.9, 1.1)
        img = table[tissue_lab]
        img = ndimage.gaussian_filter(img, 0.7)
        img = img * bias + rng.normal(0, 0.03, shape).astype(np.float32) * brain
        img[~brain] = 0
        volumes[m] = Volume(np.clip(img * 1000, 0, None).astype(np.float32), affine.copy(), m)
    return volumes, labels


def write_case(folder, case_id: str = "BrainUNet-Demo-00000", seed: int = 0, **kwargs) -> dict[str, Path]:
    """Write a synthetic case in BraTS 2023 layout (``<id>-t1c.nii.gz`` ... ``<id>-seg.nii.gz``)."""
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volumes, labels = make_case(seed=seed, **kwargs)
    paths = {}
    for key, vol in volumes.items():
        paths[key] = folder / f"{case_id}-{key}.nii.gz"
        nib.save(nib.Nifti1Image(vol.data.astype(np.int16), vol.affine), str(paths[key]))
    paths["seg"] = folder / f"{case_id}-seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, next(iter(volumes.values())).affine), str(paths["seg"]))
    return paths
