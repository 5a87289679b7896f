"""From input volumes to the network's tensor and back.

Steps: resample every modality in physical space onto the reference (T1CE) grid; reorient to
RAS voxel order; crop to the foreground bounding box (nothing inside the head/brain is cut);
per-modality percentile clipping and z-scoring inside the foreground; resample to the model's
working spacing. ``PreparedCase.restore`` undoes the geometry for label maps and probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as ornt_mod
from scipy import ndimage

from .errors import InputError
from .imageio import MODALITY_NAMES, Volume


def same_grid(a: Volume, shape, affine, atol: float = 1e-3) -> bool:
    return tuple(a.data.shape) == tuple(shape) and np.allclose(a.affine, affine, atol=atol)


def resample_to_grid(moving: Volume, shape, affine, order: int = 1) -> np.ndarray:
    """Resample ``moving`` onto the grid (shape, affine) through world (RAS) coordinates."""
    if same_grid(moving, shape, affine):
        return moving.data
    ref_to_moving = np.linalg.inv(moving.affine) @ np.asarray(affine, dtype=float)
    # Refuse grids that share no physical space: their resampled image would be all zeros.
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    mapped = (ref_to_moving @ corners.T).T[:, :3]
    lo, hi = mapped.min(axis=0), mapped.max(axis=0)
    mshape = np.array(moving.data.shape) - 1
    if np.any(hi < -0.5) or np.any(lo > mshape + 0.5):
        raise InputError(f"{moving.name} does not overlap the reference image in physical space; the images are "
                         "from different patients or sessions, or one has a wrong origin. Register them first "
                         "(e.g. General Registration (BRAINS)).")
    # float32 output whatever the input's type: an int16 volume (as Slicer holds one) is not rounded
    out = ndimage.affine_transform(moving.data, ref_to_moving[:3, :3], offset=ref_to_moving[:3, 3],
                                   output_shape=tuple(shape), order=order, mode="constant", cval=0.0,
                                   prefilter=False, output=np.float32)
    if not np.any(out):
        raise InputError(f"{moving.name} covers none of the reference image after alignment; check that the "
                         "images belong together and are registered.")
    return out.astype(np.float32, copy=False)


@dataclass
class PreparedCase:
    image: np.ndarray  # (C, X, Y, Z) float32, RAS voxel order, cropped, normalised, working spacing
    mask: np.ndarray  # (X, Y, Z) bool foreground, same grid as image
    crop_mask: np.ndarray  # bool foreground on the crop grid (native spacing)
    reference_shape: tuple[int, int, int]
    to_ras: np.ndarray  # nibabel orientation transform from reference voxel order to RAS
    from_ras: np.ndarray
    crop: tuple[slice, slice, slice]  # in RAS-ordered reference grid
    crop_shape: tuple[int, int, int]
    working_spacing: tuple[float, float, float]
    native_spacing: tuple[float, float, float]  # RAS-ordered reference spacing

    def restore_channels(self, channels: np.ndarray) -> np.ndarray:
        """(K, working grid) -> (K, crop grid) by trilinear interpolation (for probabilities)."""
        if tuple(channels.shape[1:]) == tuple(self.crop_shape):
            return channels
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None]
        return F.interpolate(t, size=tuple(self.crop_shape), mode="trilinear", align_corners=False)[0].numpy()

    def restore_labels(self, crop_labels: np.ndarray) -> np.ndarray:
        """Labels on the crop grid -> labels on the reference grid in the reference's voxel order."""
        full = np.zeros(tuple(self.reference_shape[i] for i in self.ras_axes), dtype=np.uint8)
        full[self.crop] = crop_labels
        return ornt_mod.apply_orientation(full, self.from_ras).astype(np.uint8)

    @property
    def ras_axes(self) -> list[int]:
        return _ras_axes(self.to_ras)


def _ras_axes(to_ras: np.ndarray) -> list[int]:
    """Which reference axis lands on each RAS axis."""
    axes = [0, 0, 0]
    for src, (dst, _flip) in enumerate(to_ras):
        axes[int(dst)] = src
    return axes


def foreground_bbox(mask: np.ndarray) -> tuple[slice, slice, slice]:
    if not mask.any():
        raise InputError("The images contain no foreground (every voxel is zero after alignment).")
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


def normalise(channel: np.ndarray, mask: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    values = channel[mask]
    lo, hi = np.percentile(values, percentiles)
    clipped = np.clip(channel, lo, hi)
    inside = clipped[mask]
    std = float(inside.std())
    out = (clipped - float(inside.mean())) / (std if std > 1e-6 else 1.0)
    out[~mask] = 0.0
    return out.astype(np.float32)


def align_to_reference(volumes: dict[str, Volume], reference_key: str = "t1c") -> dict[str, np.ndarray]:
    """Every volume resampled onto the reference grid (reference voxel order, raw intensities)."""
    if reference_key not in volumes:
        raise InputError(f"{MODALITY_NAMES.get(reference_key, reference_key)} (the reference image) is missing.")
    ref = volumes[reference_key]
    return {k: resample_to_grid(v, ref.data.shape, ref.affine) for k, v in volumes.items()}


def prepare(aligned: dict[str, np.ndarray], reference: Volume, modalities, working_spacing=(1.0, 1.0, 1.0),
            clip_percentiles=(0.5, 99.5), allow_missing: bool = False, bias_correction: bool = False) -> PreparedCase:
    """``allow_missing``: a missing modality becomes an all-zero channel (the value a model trained
    with modality dropout saw for a dropped sequence); at least one must be present.
    ``bias_correction``: divide each sequence by its N4 bias field (``biasfield``) before normalising."""
    missing = [MODALITY_NAMES.get(m, m) for m in modalities if m not in aligned]
    if missing and (not allow_missing or len(missing) == len(modalities)):
        raise InputError(f"Missing input: {', '.join(missing)}. Select every required image and try again.")
    to_ras = ornt_mod.ornt_transform(ornt_mod.io_orientation(reference.affine), ornt_mod.axcodes2ornt("RAS"))
    from_ras = ornt_mod.ornt_transform(ornt_mod.axcodes2ornt("RAS"), ornt_mod.io_orientation(reference.affine))
    stack = {m: ornt_mod.apply_orientation(aligned[m], to_ras) for m in modalities if m in aligned}
    mask = np.zeros(next(iter(stack.values())).shape, bool)
    for ch in stack.values():
        mask |= ch != 0
    crop = foreground_bbox(mask)
    mask = mask[crop]
    native = tuple(float(reference.spacing[a]) for a in _ras_axes(to_ras))
    cropped = {m: stack[m][crop] for m in stack}
    if bias_correction:
        from .biasfield import correct_all

        cropped = correct_all(cropped, mask, native)
    channels = [normalise(cropped[m], mask, clip_percentiles) if m in cropped else np.zeros(mask.shape, np.float32)
                for m in modalities]
    image = np.stack(channels)
    crop_shape = tuple(int(s) for s in mask.shape)
    working = tuple(float(s) for s in working_spacing)
    target = tuple(max(2, int(round(n * s / w))) for n, s, w in zip(crop_shape, native, working))
    if target != crop_shape:
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(image)[None]
        image = F.interpolate(t, size=target, mode="trilinear", align_corners=False)[0].numpy()
        m = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=target, mode="nearest")
        mask_w = m[0, 0].numpy() > 0.5
    else:
        mask_w = mask
    return PreparedCase(image=np.ascontiguousarray(image), mask=mask_w, crop_mask=mask, reference_shape=tuple(reference.data.shape),
                        to_ras=to_ras, from_ras=from_ras, crop=crop, crop_shape=crop_shape,
                        working_spacing=working, native_spacing=native)
