"""Brain extraction for scans as clinics export them (skull, face and neck included).

Every BrainUNet model learns from skull-stripped brains, as in BraTS. A scan that still holds the head
is detected from the image itself, and only then is the brain extracted, with deepbet (MIT licence; its
weights ship inside its PyPI wheel, so it runs offline; about 4 s on one CPU core). An image that is
already stripped is left as it is, at no cost.

Detection (``needs_extraction``): a stripped image is zero outside the brain, so its non-zero region
is brain-sized (at most ``MAX_STRIPPED_ML``) and its outer shell is cortex and CSF, not brighter than
the brain inside. A head scan fails one of these: its non-zero region is the whole head, or its outer
shell is scalp fat, which is bright on T1CE, T2W and FLAIR.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError

MAX_STRIPPED_ML = 2200.0  # the largest adult brain is ~1.9 L (BraTS brains here: 1.0-1.9 L)
SHELL_MM = 3.0  # outer shell of the non-zero region
CORE_MM = 12.0  # erosion depth of the "inside" it is compared with
BRIGHT_SHELL_RATIO = 1.25  # shell mean / inside median above which the rim is taken for scalp
MIN_BRAIN_ML = 300.0  # an extraction keeping less than this failed


@dataclass
class Extraction:
    needed: bool
    reason: str  # why extraction was or was not needed, for the log and the statistics notes
    mask: np.ndarray | None = None  # bool on the reference grid (when needed)
    brain_ml: float | None = None
    head_ml: float | None = None


def _depth_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) of each voxel of ``mask`` to its outside, in physical space (anisotropic voxels)."""
    if not mask.any():
        return np.zeros(mask.shape)
    return ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]


def needs_extraction(image: np.ndarray, spacing) -> tuple[bool, str, float]:
    """(needed, reason, non-zero volume in mL) for one volume on its own grid."""
    # on a ~2 mm grid (every n-th voxel): the decision needs no finer detail, and this keeps it cheap
    step = [max(1, int(round(2.0 / float(s)))) for s in spacing]
    image = image[::step[0], ::step[1], ::step[2]]
    spacing = tuple(float(s) * n for s, n in zip(spacing, step))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    foreground = ndimage.binary_fill_holes(image != 0)
    volume_ml = float(foreground.sum()) * voxel_ml
    if volume_ml > MAX_STRIPPED_ML:
        return True, f"the image's non-zero region is {volume_ml:.0f} mL, more than any brain", volume_ml
    depth = _depth_mm(foreground, spacing)  # one distance transform for both depths
    inside = depth > CORE_MM
    shell = foreground & ~(depth > SHELL_MM)
    if inside.sum() < 100 or shell.sum() < 100:
        return False, "the image is too small to hold a head", volume_ml
    ratio = float(image[shell].mean()) / max(float(np.median(image[inside])), 1e-6)
    if ratio > BRIGHT_SHELL_RATIO:
        return True, f"its outer rim is {ratio:.1f}x brighter than the brain (scalp)", volume_ml
    return False, "already skull-stripped", volume_ml


def extract_brain(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """deepbet's brain mask (bool, the image's voxel order)."""
    try:
        import nibabel as nib
        import torch
        from deepbet import BrainExtraction
    except ImportError as exc:
        raise InputError("This scan still includes the skull, and brain extraction needs the deepbet package: "
                         "pip install deepbet (or give a skull-stripped scan).") from exc
    threads = torch.get_num_threads()
    try:
        extractor = BrainExtraction(no_gpu=True)  # CPU: the masks are the same, and the GPU is for the network
        _, mask_img, _ = extractor.run(nib.Nifti1Image(np.asarray(image, np.float32), affine))
    finally:
        torch.set_num_threads(threads)
    mask = np.asarray(mask_img.dataobj) > 0
    return mask.reshape(image.shape)


def check_and_extract(image: np.ndarray, affine: np.ndarray, spacing) -> Extraction:
    """Extract the brain of ``image`` (the reference sequence on its grid) when it is not stripped."""
    needed, reason, head_ml = needs_extraction(image, spacing)
    if not needed:
        return Extraction(False, reason, head_ml=head_ml)
    mask = extract_brain(image, affine)
    brain_ml = float(mask.sum()) * float(np.prod(spacing)) / 1000.0
    if brain_ml < MIN_BRAIN_ML:
        raise InputError(f"Brain extraction found only {brain_ml:.0f} mL of brain in this scan ({reason}). Check that "
                         "the images are brain MRI, or give skull-stripped images.")
    return Extraction(True, reason, mask, brain_ml, head_ml)
