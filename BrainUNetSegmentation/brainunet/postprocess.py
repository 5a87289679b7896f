"""Class probabilities -> BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .labels import CLASS_LABELS, ET, NETC


def probabilities_to_labels(probs: np.ndarray, mask: np.ndarray | None = None,
                            tumour_threshold: float | None = None) -> np.ndarray:
    """Argmax over (background, NETC, SNFH, ET) probabilities; with ``tumour_threshold`` a voxel is
    tumour when P(tumour) = 1 - P(background) reaches it, and then takes its most likely subregion.
    The threshold corrects a network's systematic over- or under-segmentation (a recall-weighted
    Tversky loss over-segments); ``brainunet calibrate`` picks it on held-out engine cases."""
    classes = np.asarray(CLASS_LABELS, dtype=np.uint8)
    if tumour_threshold is None:
        labels = classes[np.argmax(probs, axis=0)]
    else:
        tumour = (1.0 - probs[0]) >= float(tumour_threshold)
        labels = np.where(tumour, classes[1:][np.argmax(probs[1:], axis=0)], 0).astype(np.uint8)
    if mask is not None:
        labels[~mask] = 0
    return labels


def remove_small_components(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop whole-tumour components smaller than ``min_voxels`` (isolated false-positive specks)."""
    if min_voxels <= 0 or not labels.any():
        return labels
    comp, n = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comp.ravel())
    small = np.flatnonzero(sizes < min_voxels)
    small = small[small > 0]
    if small.size:
        labels = labels.copy()
        labels[np.isin(comp, small)] = 0
    return labels


def fill_core_holes(labels: np.ndarray) -> np.ndarray:
    """Everything enclosed by tumour core is tumour core: background or SNFH voxels inside an
    enhancing rim become NETC (the BraTS definition of necrosis inside a ring). Holes are filled in
    3D and in every axial slice (RAS order: axis 2), since a rim open at one pole still encloses
    its necrosis in-plane."""
    core = np.isin(labels, (NETC.label, ET.label))
    if not core.any():
        return labels
    filled = ndimage.binary_fill_holes(core)
    for z in np.flatnonzero(core.any(axis=(0, 1))):
        filled[:, :, z] |= ndimage.binary_fill_holes(core[:, :, z])
    enclosed = filled & ~core
    if not enclosed.any():
        return labels
    labels = labels.copy()
    labels[enclosed] = NETC.label
    return labels
