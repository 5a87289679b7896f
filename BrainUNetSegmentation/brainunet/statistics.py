"""Per-region statistics: volume, voxel count, intensities, centroid (RAS) and largest 3D diameter."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from .imageio import MODALITY_NAMES
from .labels import ALL_REGIONS
from .outputs import STATISTICS_COLUMNS


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks; 1 when both are empty (the BraTS convention)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def max_diameter_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Largest distance between two voxel centres of ``mask`` in mm (0 for an empty mask)."""
    if not mask.any():
        return 0.0
    # Erode only the bounding box plus one voxel: the same surface as eroding the whole volume
    # (outside counts as background either way), at a fraction of the cost for a small tumour.
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    lo = [max(b.start - 1, 0) for b in box]
    crop = mask[tuple(slice(a, b.stop + 1) for a, b in zip(lo, box))]
    surface = crop & ~ndimage.binary_erosion(crop)
    ijk = np.argwhere(surface).astype(float) + lo
    pts = ijk @ affine[:3, :3].T + affine[:3, 3]
    if len(pts) > 3:
        try:
            pts = pts[ConvexHull(pts).vertices]  # the diameter is reached between hull vertices
        except QhullError:  # flat or collinear sets: fall back to all surface points
            pass
    if len(pts) > 20000:
        pts = pts[np.random.default_rng(0).choice(len(pts), 20000, replace=False)]
    return float(pdist(pts).max()) if len(pts) > 1 else 0.0


def region_statistics(labels: np.ndarray, affine: np.ndarray, intensities: dict[str, np.ndarray] | None = None):
    """One dict per region (ET, NETC, SNFH, TC, WT); ``labels`` and intensities share the grid of ``affine``."""
    intensities = intensities or {}
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    rows = []
    for region in ALL_REGIONS:
        mask = region.mask(labels)
        n = int(mask.sum())
        row = {"region": region.key, "name": region.name, "voxels": n, "volume_ml": n * voxel_ml}
        if n:
            centroid = np.argwhere(mask).mean(axis=0)
            ras = affine[:3, :3] @ centroid + affine[:3, 3]
        else:
            ras = (np.nan, np.nan, np.nan)
        row.update(centroid_r_mm=float(ras[0]), centroid_a_mm=float(ras[1]), centroid_s_mm=float(ras[2]),
                   max_diameter_mm=max_diameter_mm(mask, affine))
        for key, image in intensities.items():
            label = MODALITY_NAMES.get(key, key)
            values = image[mask]
            row[f"mean_{label}"] = float(values.mean()) if n else np.nan
            row[f"median_{label}"] = float(np.median(values)) if n else np.nan
        rows.append(row)
    return rows


def write_csv(rows, path) -> Path:
    path = Path(path)
    columns = list(rows[0].keys()) if rows else STATISTICS_COLUMNS
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def _cell(value):
    """Six significant digits for measurements; whole numbers whole (a table read back from Slicer holds
    voxel counts as doubles, and 1234567 must not become 1.23457e+06)."""
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{float(value):.6g}"
    return value


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
