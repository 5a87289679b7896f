"""Dice and HD95 per region (ET, NETC, SNFH, TC, WT) against reference label maps.

Conventions follow the BraTS challenges: a region empty in both gives Dice 1 and HD95 0; empty in
only one gives Dice 0 and HD95 373.13 mm (the diagonal of the BraTS volume).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy import ndimage

from brainunet.labels import ALL_REGIONS
from brainunet.statistics import dice

__all__ = ["HD95_EMPTY_MM", "dice", "hd95", "evaluate_case", "write_metrics_csv", "find_reference"]

HD95_EMPTY_MM = 373.128664


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``."""
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    return distance_to_b[surface_a]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return HD95_EMPTY_MM
    # Work inside the joint bounding box (plus a margin) to keep the distance transform small.
    box = np.argwhere(pred | ref)
    lo, hi = np.maximum(box.min(0) - 2, 0), box.max(0) + 3
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    p, r = pred[sl], ref[sl]
    d = np.concatenate([_surface_distances(p, r, spacing), _surface_distances(r, p, spacing)])
    return float(np.percentile(d, 95))


def evaluate_case(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing) -> dict:
    row = {}
    for region in ALL_REGIONS:
        p, r = region.mask(pred_labels), region.mask(ref_labels)
        row[f"dice_{region.key}"] = dice(p, r)
        row[f"hd95_{region.key}"] = hd95(p, r, spacing)
    return row


def write_metrics_csv(rows: list[dict], path, fieldnames=None) -> Path:
    """Metric rows to CSV, floats to 4 decimals (evaluate, calibrate and fine-tuning folds share it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def write_results(rows: list[dict], csv_path, png_path=None) -> dict:
    """Per-case rows plus a 'mean' row to CSV; optional bar chart of mean Dice / HD95. Returns the mean row."""
    keys = [k for k in rows[0] if k != "case"]
    mean = {"case": "mean", **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    write_metrics_csv([*rows, mean], csv_path, ["case", *keys])
    if png_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.key for r in ALL_REGIONS]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        a1.bar(names, [mean[f"dice_{n}"] for n in names], color=[r.color for r in ALL_REGIONS])
        a1.set_ylim(0, 1)
        a1.set_title(f"Dice (mean of {len(rows)} case{'s' if len(rows) != 1 else ''})")
        a2.bar(names, [mean[f"hd95_{n}"] for n in names], color=[r.color for r in ALL_REGIONS])
        a2.set_title("HD95 (mm)")
        fig.tight_layout()
        fig.savefig(png_path, dpi=90)
        plt.close(fig)
    return mean


def find_reference(case_dir: Path, pattern: str | None = None) -> Path | None:
    """The case's label file: ``*_seg`` / ``*-seg`` NIfTI, or the first match of ``pattern`` (a glob,
    e.g. another algorithm's output to measure agreement with)."""
    if pattern:
        matches = sorted(Path(case_dir).glob(pattern))
        return matches[0] if matches else None
    for p in sorted(Path(case_dir).iterdir()):
        name = p.name.lower()
        if name.endswith((".nii.gz", ".nii")) and (name.split(".")[0].endswith(("_seg", "-seg"))):
            return p
    return None
