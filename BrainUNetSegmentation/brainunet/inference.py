"""Sliding-window (or padded whole-volume) inference with optional mirroring TTA.

``progress(fraction, message)`` is called after every window; ``should_cancel()`` is polled
between windows and raises Cancelled. A CUDA out-of-memory error falls back to the CPU.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import sys

import numpy as np

from .errors import Cancelled, InputError

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        # the CPU-only build on Linux or Windows (the Slicer panel offers it where an NVIDIA driver is found)
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None and sys.platform != "darwin":
            raise InputError("A GPU (CUDA) was requested, but this PyTorch is the CPU-only build; choose device "
                             "'cpu' or 'auto'. To use the GPU, replace it with the GPU build (in 3D Slicer: "
                             "Utilities → PyTorch Utils: Uninstall, restart Slicer, then Install with a cuda "
                             "backend).")
        raise InputError("A GPU (CUDA) was requested but none is available; choose device 'cpu' or 'auto'.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"Unknown device '{device}'; choose auto, cpu or cuda.")
    return device


PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX (bf16 convolutions run natively: 3x faster than fp32
    here, benchmarks/variants.py). Elsewhere bf16 is emulated and slower, so it is never chosen."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:  # not Linux: keep fp32
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str | None, device: str) -> str:
    """'fp32' or 'bf16'. None means $BRAINUNET_PRECISION, else 'auto': bf16 autocast only on a CPU that
    runs it natively (label maps agree with fp32 to Dice 0.999 on the real dev case), fp32 otherwise."""
    choice = (precision or os.environ.get("BRAINUNET_PRECISION") or "auto").lower()
    if choice not in PRECISIONS:
        raise InputError(f"Unknown precision '{choice}'; choose {', '.join(PRECISIONS)}.")
    if choice == "auto":
        return "bf16" if str(device) == "cpu" and cpu_has_native_bf16() else "fp32"
    return choice


def _gaussian_weight(patch, sigma_scale=0.125):
    grids = np.meshgrid(*[np.arange(p) for p in patch], indexing="ij")
    w = np.ones(patch, np.float32)
    for g, p in zip(grids, patch):
        c, s = (p - 1) / 2.0, max(p * sigma_scale, 1.0)
        w *= np.exp(-((g - c) ** 2) / (2 * s * s)).astype(np.float32)
    w /= w.max()
    return np.maximum(w, 1e-3)


def _starts(size, patch, step):
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / step) + 1
    return sorted({int(round(i * (size - patch) / (n - 1))) for i in range(n)})


def window_plan(shape, patch_size, divisor, overlap=0.5):
    """Padded shape, effective patch and window origins for a (X, Y, Z) volume."""
    patch = []
    for s, p in zip(shape, patch_size):
        # A dimension that fits in one patch is processed whole (rounded up to the divisor).
        p_eff = min(int(p), int(math.ceil(s / divisor) * divisor))
        patch.append(max(p_eff, divisor))
    padded = [max(s, p) for s, p in zip(shape, patch)]
    steps = [max(1, int(p * (1 - overlap))) for p in patch]
    starts = [_starts(s, p, st) for s, p, st in zip(padded, patch, steps)]
    return tuple(padded), tuple(patch), list(itertools.product(*starts))


def tta_flips(tta) -> list[tuple]:
    """The tensor dimensions flipped by each pass of test-time augmentation. ``tta``: False (one pass),
    True or "all" (every combination of the three axes: 8 passes), "mirror" (the image and its left-right
    mirror: the prepared image is RAS, so its first spatial axis runs left to right)."""
    if tta in (False, None, "off"):
        return [()]
    if tta in (True, "all"):
        return [()] + [f for r in (1, 2, 3) for f in itertools.combinations((2, 3, 4), r)]
    if tta == "mirror":
        return [(), (2,)]
    raise ValueError(f"Unknown test-time augmentation {tta!r}: off, mirror or all.")


def predict_probabilities(model, image: np.ndarray, patch_size=(128, 128, 128), overlap=0.5, tta=False,
                          device="cpu", progress=None, should_cancel=None, num_threads=None,
                          precision: str | None = None) -> np.ndarray:
    """Softmax probabilities (K, X, Y, Z) for a normalised (C, X, Y, Z) image. ``tta``: see ``tta_flips``;
    ``precision``: see ``resolve_precision``."""
    import torch

    if num_threads:
        torch.set_num_threads(int(num_threads))
    precision = resolve_precision(precision, device)
    try:
        return _predict(model, image, patch_size, overlap, tta, device, progress, should_cancel, precision)
    except torch.cuda.OutOfMemoryError:
        if not str(device).startswith("cuda"):
            raise
        torch.cuda.empty_cache()
        msg = "The GPU ran out of memory; continuing on the CPU (slower)."
        log.warning(msg)
        if progress:
            progress(0.0, msg)
        return _predict(model.to("cpu"), image, patch_size, overlap, tta, "cpu", progress, should_cancel,
                        resolve_precision(None if precision == "bf16" else precision, "cpu"))


def _predict(model, image, patch_size, overlap, tta, device, progress, should_cancel, precision="fp32"):
    import torch

    def autocast():
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)

    model = model.to(device).eval()
    divisor = model.config.divisor
    shape = image.shape[1:]
    padded, patch, origins = window_plan(shape, patch_size, divisor, overlap)
    pad = [(0, 0)] + [(0, p - s) for p, s in zip(padded, shape)]
    x = np.pad(image, pad) if any(p[1] for p in pad) else image
    k = model.config.out_channels
    acc = torch.zeros((k, *padded), dtype=torch.float32)
    norm = torch.zeros(padded, dtype=torch.float32)
    weight = torch.from_numpy(_gaussian_weight(patch)) if len(origins) > 1 else torch.ones(patch)
    flips = tta_flips(tta)
    total = len(origins) * len(flips)
    done = 0
    with torch.inference_mode():
        for origin in origins:
            sl = tuple(slice(o, o + p) for o, p in zip(origin, patch))
            tile = torch.from_numpy(np.ascontiguousarray(x[(slice(None),) + sl]))[None].to(device)
            probs = torch.zeros((k, *patch), dtype=torch.float32)
            for flip in flips:
                if should_cancel and should_cancel():
                    raise Cancelled()
                inp = torch.flip(tile, flip) if flip else tile
                with autocast():
                    logits = model(inp)
                out = torch.softmax(logits.float(), dim=1)
                if flip:
                    out = torch.flip(out, flip)
                probs += out[0].cpu()
                done += 1
                if progress:
                    progress(done / total, f"Inference: window {done} of {total}")
            acc[(slice(None),) + sl] += probs / len(flips) * weight
            norm[sl] += weight
    acc /= norm.clamp_min(1e-6)
    crop = (slice(None),) + tuple(slice(0, s) for s in shape)
    return acc[crop].numpy()


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
