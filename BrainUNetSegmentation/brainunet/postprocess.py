"""Class probabilities -> BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .labels import CLASS_LABELS, ET, NETC, SNFH
from .settings import Postprocessing


def probabilities_to_labels(probs: np.ndarray, mask: np.ndarray | None = None,
                            tumour_threshold: float | None = None, core_threshold: float | None = None,
                            et_threshold: float | None = None) -> np.ndarray:
    """Argmax over (background, NETC, SNFH, ET) probabilities; with ``tumour_threshold`` a voxel is
    tumour when P(tumour) = 1 - P(background) reaches it, and then takes its most likely subregion.
    The threshold corrects a network's systematic over- or under-segmentation (a recall-weighted
    Tversky loss over-segments); ``brainunet cv-postprocess`` picks it on real held-out cases
    (``brainunet calibrate`` on held-out engine cases, for a model trained on the engine only).

    Region decoding, as BraTS scores (whole tumour, core inside it, ET inside the core): with
    ``core_threshold`` a tumour voxel is core when its share of core, (P(NETC) + P(ET)) / P(tumour), reaches
    it (else SNFH), and core voxels take the more likely of NETC and ET; with ``et_threshold`` a core voxel
    is ET when P(ET) / (P(NETC) + P(ET)) reaches it (else NETC)."""
    classes = np.asarray(CLASS_LABELS, dtype=np.uint8)
    if tumour_threshold is None:
        labels = classes[np.argmax(probs, axis=0)]
    else:
        tumour = (1.0 - probs[0]) >= float(tumour_threshold)
        labels = np.where(tumour, classes[1:][np.argmax(probs[1:], axis=0)], 0).astype(np.uint8)
    if core_threshold is not None or et_threshold is not None:
        labels = _decode_regions(probs, labels, core_threshold, et_threshold)
    if mask is not None:
        labels[~mask] = 0
    return labels


def _decode_regions(probs: np.ndarray, labels: np.ndarray, core_threshold: float | None,
                    et_threshold: float | None) -> np.ndarray:
    """The subregions of the tumour voxels of ``labels`` by the core and ET shares (``probabilities_to_labels``)."""
    tumour = labels > 0
    background, netc, et = (probs[i][tumour].astype(np.float32) for i in (0, 1, 3))
    sub = labels[tumour]
    core_p = netc + et
    if core_threshold is not None:  # P(tumour) as the tumour threshold reads it: 1 - P(background)
        core = core_p >= float(core_threshold) * np.maximum(1.0 - background, np.finfo(np.float32).tiny)
        sub = np.where(core, np.where(et > netc, ET.label, NETC.label), SNFH.label)
    if et_threshold is not None:
        is_core = (sub == NETC.label) | (sub == ET.label)
        is_et = et >= float(et_threshold) * np.maximum(core_p, np.finfo(np.float32).tiny)
        sub = np.where(is_core, np.where(is_et, ET.label, NETC.label), sub)
    labels = labels.copy()
    labels[tumour] = sub
    return labels


def remove_small_components(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop whole-tumour components smaller than ``min_voxels`` (false-positive specks and FLAIR
    hyperintensities away from the tumour), but never the largest one: a small tumour is still a tumour."""
    if min_voxels <= 0 or not labels.any():
        return labels
    comp, n = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    small = np.flatnonzero((sizes < min_voxels) & (sizes > 0))
    small = small[small != int(np.argmax(sizes))]
    if small.size:
        labels = labels.copy()
        labels[np.isin(comp, small)] = 0
    return labels


def remove_components_without_core(labels: np.ndarray) -> np.ndarray:
    """Drop whole-tumour components that hold no tumour core (ET or NETC), but never the largest: a FLAIR
    hyperintensity away from the tumour (white-matter disease, a bright cortex) has no core, while the
    second lesion of a multifocal glioma usually has, and a tumour without core is its own largest part."""
    if not labels.any():
        return labels
    comp, n = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    if n < 2:
        return labels
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    with_core = np.bincount(comp[np.isin(labels, (NETC.label, ET.label))], minlength=n + 1) > 0
    sizes[0] = 0
    drop = np.flatnonzero(~with_core)
    drop = drop[(drop > 0) & (drop != int(np.argmax(sizes)))]
    if not drop.size:
        return labels
    labels = labels.copy()
    labels[np.isin(comp, drop)] = 0
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


def small_et_components_to_netc(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Lesion-wise: enhancing components smaller than ``min_voxels`` become NETC (a few bright voxels in a
    core are rarely enhancing tumour, and BraTS scores ET lesion by lesion)."""
    if min_voxels <= 0:
        return labels
    et = labels == ET.label
    if not et.any():
        return labels
    comp, _ = ndimage.label(et, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comp.ravel())
    small = np.flatnonzero(sizes < min_voxels)
    small = small[small > 0]
    if not small.size:
        return labels
    labels = labels.copy()
    labels[np.isin(comp, small)] = NETC.label
    return labels


def tiny_et_to_netc(labels: np.ndarray, below_voxels: int) -> np.ndarray:
    """All ET becomes NETC when the whole ET is smaller than ``below_voxels``: the BraTS convention for a
    tumour without enhancement (its ET is empty, and a few false ET voxels would score Dice 0)."""
    if below_voxels <= 0:
        return labels
    et = labels == ET.label
    count = int(et.sum())
    if count == 0 or count >= below_voxels:
        return labels
    labels = labels.copy()
    labels[et] = NETC.label
    return labels


def native_voxels(mm3: int, voxel_mm3: float) -> int:
    """A rule's size, given in 1 mm voxels (mm³), as a count of the image's own voxels: the same volume on
    a 0.9 × 0.9 × 5.5 mm clinical scan (4.5 mm³ a voxel) as on the 1 mm cases that chose it."""
    if mm3 <= 0:
        return 0
    return max(1, int(round(mm3 / float(voxel_mm3))))


def apply(probs: np.ndarray, mask: np.ndarray | None, rules: Postprocessing, voxel_mm3: float = 1.0) -> np.ndarray:
    """Probabilities (background, NETC, SNFH, ET) on the native crop grid -> labels, with every
    post-processing rule of a model's settings (the one place the pipeline and cross-validation share).
    The rules' sizes are in 1 mm voxels (mm³); ``voxel_mm3`` is the volume of one voxel of ``probs``."""
    labels = probabilities_to_labels(probs, mask, rules.tumour_threshold, rules.core_threshold, rules.et_threshold)
    labels = remove_small_components(labels, native_voxels(rules.min_component_voxels, voxel_mm3))
    if rules.components_need_core:
        labels = remove_components_without_core(labels)
    labels = small_et_components_to_netc(labels, native_voxels(rules.min_et_component_voxels, voxel_mm3))
    labels = tiny_et_to_netc(labels, native_voxels(rules.et_to_netc_below_voxels, voxel_mm3))
    if rules.fill_core_holes:
        labels = fill_core_holes(labels)
    return labels
