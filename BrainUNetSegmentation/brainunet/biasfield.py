"""Intensity non-uniformity (bias field) correction: N4 (SimpleITK) fitted on a coarse grid.

Why: the network learnt tissue contrast from engine cases whose bias fields are mild; real scans,
above all from older scanners and surface coils, carry smooth multiplicative fields that shift the
oedema and enhancement intensities after z-scoring (benchmarks/robustness.py: a torchio bias field
cost 0.25 whole-tumour Dice). The field is smooth by definition, so it is fitted on a ~12 mm grid
and applied at full resolution, with ONE B-spline fitting level: a field that smooth cannot absorb a
lesion-sized hyperintensity (more levels flattened part of a synthetic lesion's contrast in
Testing/test_biasfield.py's phantom), and it costs about a second per sequence.
"""
from __future__ import annotations

import logging

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)


GRID_MM = 12.0  # coarse grid of the fit: ~2,000 points for a brain, plenty for a 4×4×4 control-point field
ITERATIONS = (200,)  # one fitting level, run to (near) convergence


def n4_log_field(channel: np.ndarray, mask: np.ndarray, spacing, grid_mm: float = GRID_MM,
                 iterations=ITERATIONS, threads: int | None = None) -> np.ndarray:
    """The log bias field of ``channel`` (same shape), fitted by N4 inside ``mask``; 0 outside."""
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - SimpleITK ships with Slicer and is a dependency
        raise InputError("Bias-field correction needs SimpleITK (pip install SimpleITK).") from exc
    import torch
    import torch.nn.functional as F

    mask = mask & (channel > 0)  # N4 works on the log of positive intensities
    if mask.sum() < 1000:
        return np.zeros(channel.shape, np.float32)
    factors = [max(1, int(round(grid_mm / float(s)))) for s in spacing]
    coarse_shape = [max(4, int(np.ceil(n / f))) for n, f in zip(channel.shape, factors)]
    # area-averaged down-sampling: the mean intensity of each coarse cell inside the mask
    t = torch.from_numpy(np.where(mask, channel, 0).astype(np.float32))[None, None]
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    sums = F.adaptive_avg_pool3d(t, coarse_shape)
    cover = F.adaptive_avg_pool3d(m, coarse_shape)
    coarse_mask = (cover > 0.5)[0, 0].numpy()
    coarse = torch.where(cover > 0, sums / cover.clamp_min(1e-6), torch.zeros_like(sums))[0, 0].numpy()
    if coarse_mask.sum() < 64:
        return np.zeros(channel.shape, np.float32)
    # SimpleITK indexes (z, y, x); the order does not matter here as long as spacing follows it
    image = sitk.GetImageFromArray(coarse.astype(np.float32))
    cell = [float(s) * f for s, f in zip(spacing, factors)]
    image.SetSpacing(cell[::-1])
    sitk_mask = sitk.GetImageFromArray(coarse_mask.astype(np.uint8))
    sitk_mask.CopyInformation(image)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    # run the single level to convergence: at ITK's default threshold (0.001) N4 stops after a few
    # iterations with most of a smooth field left in (Testing/test_biasfield.py measures this)
    n4.SetConvergenceThreshold(1e-5)
    if threads:
        n4.SetNumberOfThreads(int(threads))
    try:
        n4.Execute(image, sitk_mask)
        log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).astype(np.float32)
    except RuntimeError as exc:  # an ITK exception on odd data must not cost the user the segmentation
        log.warning("Bias-field correction skipped for one sequence (N4 failed: %s).", str(exc).splitlines()[0])
        return np.zeros(channel.shape, np.float32)
    full = F.interpolate(torch.from_numpy(log_field)[None, None], size=tuple(channel.shape), mode="trilinear",
                         align_corners=False)[0, 0].numpy()
    return np.where(mask, full, 0.0).astype(np.float32)


def correct(channel: np.ndarray, mask: np.ndarray, spacing, grid_mm: float = GRID_MM, threads: int | None = None) -> np.ndarray:
    """``channel`` divided by its N4 bias field inside ``mask`` (outside: unchanged)."""
    log_field = n4_log_field(channel, mask, spacing, grid_mm, threads=threads)
    return (channel * np.exp(-log_field)).astype(np.float32)


def correct_all(channels: dict[str, np.ndarray], mask: np.ndarray, spacing) -> dict[str, np.ndarray]:
    """Every sequence corrected, side by side: a fit on ~2,000 points hardly uses a second thread,
    so the sequences run in parallel (SimpleITK and torch release the GIL), one thread each."""
    from concurrent.futures import ThreadPoolExecutor

    if len(channels) < 2:
        return {k: correct(c, mask, spacing) for k, c in channels.items()}
    with ThreadPoolExecutor(max_workers=len(channels)) as pool:
        futures = {k: pool.submit(correct, c, mask, spacing, GRID_MM, 1) for k, c in channels.items()}
        return {k: f.result() for k, f in futures.items()}
