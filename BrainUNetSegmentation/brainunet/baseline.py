"""A transparent intensity rule, used only when no trained network is installed.

Whole tumour = FLAIR (or T2W) hyperintensity, enhancing tumour = strong T1CE enhancement inside it,
necrotic core = what the enhancing rim encloses. It works on clear ring-enhancing tumours and
poorly elsewhere (whole-tumour Dice ~0.5 on typical real cases): it is a fallback, not a model.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .labels import ET, NETC, SNFH


def intensity_rule(image: np.ndarray, mask: np.ndarray, modalities) -> np.ndarray:
    """(C, X, Y, Z) z-scored channels -> one-hot class scores (4, X, Y, Z)."""
    ch = {m: image[i] for i, m in enumerate(modalities)}
    flair = ch.get("t2f", ch.get("t2w"))
    t1c = ch["t1c"]
    ball = ndimage.generate_binary_structure(3, 1)
    wt = (flair > 2.0) & mask
    wt = ndimage.binary_opening(wt, ball, iterations=1)
    comp, n = ndimage.label(wt)
    if n:
        sizes = ndimage.sum(wt, comp, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= max(50, 0.1 * sizes.max())) + 1
        wt = np.isin(comp, keep)
    # Enhancement counts only where it touches the hyperintense region (vessels and dura elsewhere enhance too).
    et = (t1c > 1.6) & mask
    comp, n = ndimage.label(et)
    if n:
        near = np.unique(comp[ndimage.binary_dilation(wt, ball, iterations=3) & et])
        et = np.isin(comp, near[near > 0])
    tc = ndimage.binary_fill_holes(et) if et.any() else et
    netc = tc & ~et
    wt |= tc
    labels = np.zeros(mask.shape, np.uint8)
    labels[wt] = SNFH.label
    labels[netc] = NETC.label
    labels[et] = ET.label
    scores = np.zeros((4,) + mask.shape, np.float32)
    for cls, value in enumerate((0, NETC.label, SNFH.label, ET.label)):
        scores[cls][labels == value] = 1.0
    return scores
