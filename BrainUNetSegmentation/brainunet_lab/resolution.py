"""The best Dice a network working on a coarser grid can reach: the resolution ceiling.

A network that works at 2 mm returns one class probability per 2 mm voxel; inference interpolates them
back to the image's grid (trilinearly, ``PreparedCase.restore_channels``) and takes the most likely
class. The best such a network can do is to return, in each coarse voxel, the fraction of it that each
class fills. ``grid_ceiling`` builds exactly that from the reference labels (area averaging), sends it
back to the fine grid as inference does, and scores the result against the reference: what is lost to
the grid alone, before any error of the network. It tells whether a finer grid (1.5 mm, or a 1 mm pass
inside the tumour's box) is worth its cost.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from brainunet.labels import ALL_REGIONS, CLASS_LABELS


def _target_shape(shape, native_spacing, working_spacing):
    # the same rounding as preprocessing.prepare, so the coarse grid is the one inference uses
    return tuple(max(2, int(round(n * s / w))) for n, s, w in zip(shape, native_spacing, working_spacing))


def grid_ceiling(labels: np.ndarray, native_spacing, working_spacing) -> np.ndarray:
    """``labels`` (BraTS 2023 values on the native grid) as the best network on ``working_spacing``
    would return them: class fractions per coarse voxel, interpolated back and arg-maxed."""
    import torch
    import torch.nn.functional as F

    labels = np.asarray(labels)
    coarse = _target_shape(labels.shape, native_spacing, working_spacing)
    if coarse == tuple(labels.shape):
        return labels.astype(np.uint8, copy=True)
    onehot = np.stack([labels == value for value in CLASS_LABELS]).astype(np.float32)
    t = torch.from_numpy(onehot)[None]
    fractions = F.adaptive_avg_pool3d(t, coarse)  # area averaging: each coarse voxel's class fractions
    back = F.interpolate(fractions, size=tuple(labels.shape), mode="trilinear", align_corners=False)[0]
    return np.asarray(CLASS_LABELS, np.uint8)[back.argmax(0).numpy()]


def tumour_box(labels: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The tumour's bounding box plus ``margin`` voxels (the whole volume when there is no tumour)."""
    found = np.argwhere(labels > 0)
    if found.size == 0:
        return tuple(slice(0, n) for n in labels.shape)
    lo = np.maximum(found.min(0) - margin, 0)
    hi = np.minimum(found.max(0) + margin + 1, labels.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def ceiling_rows(case_dirs, spacings_mm, label_pattern: str | None = None, progress=None) -> list[dict]:
    """One row per case and working spacing: Dice of the resolution ceiling per region.

    Only the tumour's box (plus a margin of 16 voxels) is resampled: outside it the reference is empty,
    and so is its ceiling."""
    from .evaluation import dice, find_reference
    from .realdata import read_labels

    rows = []
    case_dirs = [Path(c) for c in case_dirs]
    for n, case_dir in enumerate(case_dirs):
        path = find_reference(case_dir, label_pattern)
        labels, affine = read_labels(path, case_dir.name)
        native = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))  # per array axis
        box = labels[tumour_box(labels, 16)]
        for spacing in spacings_mm:
            best = grid_ceiling(box, native, (spacing,) * 3)
            row = {"case": case_dir.name, "spacing_mm": spacing}
            for region in ALL_REGIONS:
                row[f"dice_{region.key}"] = dice(region.mask(best), region.mask(box))
            rows.append(row)
        if progress:
            progress((n + 1) / len(case_dirs), case_dir.name)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean Dice per working spacing over the cases, in the order the spacings came."""
    out = []
    for spacing in dict.fromkeys(r["spacing_mm"] for r in rows):
        chosen = [r for r in rows if r["spacing_mm"] == spacing]
        row = {"spacing_mm": spacing, "cases": len(chosen)}
        for region in ALL_REGIONS:
            row[f"dice_{region.key}"] = float(np.mean([r[f"dice_{region.key}"] for r in chosen]))
        out.append(row)
    return out
