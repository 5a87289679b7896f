"""Checks that the images are what they are named, before a segmentation is made from them.

Refusals (``InputError``, exit 2), because no segmentation of such input can be right:
- one file (or identical voxels) given for two sequences;
- a label map or a binary mask given as an image;
- an image with almost no signal;
- a sequence covering less than half of the reference image's brain (a slab, a localiser).
Warnings (a note in the run's output and in the log), because the input may still be right:
- a sequence covering less than 90 % of the reference image's brain;
- T2W and FLAIR, or T2W and T1CE, that look swapped (on T2W the CSF is bright, on FLAIR and T1CE dark);
- T1CE and FLAIR that look swapped (FLAIR's contrast follows T2W's, T1's runs against it);
- a sequence sharing too little structure with the reference image for one head (another patient's
  series on the same grid, or registered to it);
- a tumour implausibly large for the brain.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .imageio import MODALITY_NAMES
from .outputs import same_file

MAX_LABEL_VALUES = 8  # an MR image has far more distinct intensities than any label map
MIN_SIGNAL_VOXELS = 1000  # fewer non-zero voxels than this is no brain image
BRIGHT_FACTOR = 1.5  # "bright" = above 1.5 x the brain's median
# T2W's bright (CSF) fraction below 0.8 x FLAIR's or T1CE's: the two look swapped (T2W's was 1.06 to 16.1 times
# the larger of the other two on the 29 training cases and the real cases: `brainunet contrast-check`)
SWAP_RATIO = 0.8
# FLAIR's rank correlation with T2W minus T1CE's: +0.08 to +1.02 on the 29 training cases, +0.43 to +0.97
# on the four real cases of ../shared/data/real, and the negative of that when the two are swapped
# (`brainunet contrast-check --data DIR`); below -0.05 they look swapped
T1CE_FLAIR_SWAP_MARGIN = 0.05
# Mutual information (nats, 32 x 32 bins) with the reference within the brains on a ~4 mm grid: 0.41 to 0.78 for
# the sequences of one head, 0.07 to 0.26 for the next case's T2W or FLAIR on the same grid (the 29 training
# cases and the four real cases, `brainunet contrast-check --data DIR`); below this they look like two patients
SAME_PATIENT_MIN_INFORMATION = 0.33
SHARED_INFORMATION_MM = 4.0  # block size: noise and small misalignments average out, anatomy stays
MAX_TUMOUR_FRACTION = 0.5  # a whole tumour over half the brain is implausible
MIN_COVERAGE = 0.5  # a sequence seeing less of the reference's brain is a slab or a localiser
FULL_COVERAGE = 0.9  # below this the network sees zeros (no signal) over part of the brain


def _name(key: str) -> str:
    return MODALITY_NAMES.get(key, key)


def check_distinct_files(paths: dict) -> None:
    """One file given for two sequences (same path, link or hard link) is refused."""
    items = [(k, Path(p)) for k, p in paths.items() if p]
    for i, (ka, pa) in enumerate(items):
        for kb, pb in items[i + 1:]:
            if same_file(pa, pb):
                raise InputError(f"The same file ({pa}) is given as {_name(ka)} and {_name(kb)}; select the right image "
                                 "for each sequence.")


def check_images(volumes: dict) -> None:
    """Refuse label maps, masks, images without signal, and identical images given for two sequences."""
    digests = {}
    for key, vol in volumes.items():
        data = vol.data
        nonzero = int(np.count_nonzero(data))
        if nonzero < MIN_SIGNAL_VOXELS:
            raise InputError(f"{_name(key)} has almost no signal ({nonzero} non-zero voxels); check that the right "
                             "series was selected and exported completely.")
        sample = data[::3, ::3, ::3]
        values = np.unique(sample)
        if values.size <= MAX_LABEL_VALUES and np.all(values == np.round(values)):
            values = np.unique(data)  # confirm on every voxel
            if values.size <= MAX_LABEL_VALUES and np.all(values == np.round(values)):
                kind = "binary mask" if values.size <= 2 else "label map"
                raise InputError(f"{_name(key)} looks like a {kind} (only the values "
                                 f"{', '.join(f'{v:g}' for v in values)}), not an MR image; select the "
                                 f"{_name(key)} image itself.")
        digest = (data.shape, hash(np.ascontiguousarray(sample).tobytes()))
        for other, d in digests.items():
            if d == digest and np.array_equal(volumes[other].data, data):
                raise InputError(f"{_name(key)} and {_name(other)} are the same image; select the right image for "
                                 "each sequence.")
        digests[key] = digest


def bright_fraction(image: np.ndarray, brain: np.ndarray) -> float:
    values = image[brain]
    values = values[values > 0]
    if values.size == 0:
        return 0.0
    return float((values > BRIGHT_FACTOR * np.median(values)).mean())


def _sampled_brain(aligned: dict, keys) -> tuple[dict, np.ndarray] | None:
    """Every second voxel along each axis of the images ``keys`` (fractions and correlations over the brain
    need no more, at 8x less cost), and where all of them have signal; None if that is too little brain."""
    images = {k: aligned[k][::2, ::2, ::2] for k in keys}
    brain = np.all([image != 0 for image in images.values()], axis=0)
    return (images, brain) if brain.sum() >= MIN_SIGNAL_VOXELS / 8 else None


def bright_fractions(aligned: dict) -> dict[str, float] | None:
    """Fraction of the brain that is bright (fluid on T2W) in each of T2W, FLAIR and T1CE given."""
    sampled = _sampled_brain(aligned, [k for k in ("t2w", "t2f", "t1c") if k in aligned])
    if sampled is None:
        return None
    images, brain = sampled
    return {k: bright_fraction(image, brain) for k, image in images.items()}


def contrast_warnings(aligned: dict) -> list[str]:
    """Warnings about a contrast order impossible for the sequences named (aligned: one grid, brain only)."""
    if "t2w" not in aligned or not {"t2f", "t1c"} & aligned.keys():
        return []
    bright = bright_fractions(aligned)
    if bright is None:
        return []
    # CSF is bright on T2W and dark on FLAIR and T1CE: T2W has the most bright fluid of the three
    brightest = max((k for k in ("t2f", "t1c") if k in bright), key=bright.get)
    if bright["t2w"] < SWAP_RATIO * bright[brightest]:
        other = _name(brightest)
        return [f"T2W and {other} may be swapped: the image given as T2W has less bright fluid "
                f"({100 * bright['t2w']:.0f} % of the brain) than the one given as {other} "
                f"({100 * bright[brightest]:.0f} %), where CSF should be bright on T2W and dark on {other}. Check "
                "the selection; the result may be wrong."]
    likeness = t2w_likeness(aligned)
    if likeness is not None and likeness[1] - likeness[0] < -T1CE_FLAIR_SWAP_MARGIN:
        return [f"T1CE and FLAIR may be swapped: the image selected as T1CE looks like a T2-type image and the one "
                "selected as FLAIR like a T1-type image (their contrast's rank correlation with T2W: "
                f"{likeness[0]:+.2f} and {likeness[1]:+.2f}). Check which series is which; the result may be wrong."]
    return []


def t2w_likeness(aligned: dict) -> tuple[float, float] | None:
    """Rank correlations with T2W, within the brain, of the images given as T1CE and as FLAIR."""
    if not {"t1c", "t2w", "t2f"} <= aligned.keys():
        return None
    sampled = _sampled_brain(aligned, ("t1c", "t2w", "t2f"))
    if sampled is None:
        return None
    images, brain = sampled
    t2w = images["t2w"][brain]
    likeness = (rank_correlation(images["t1c"][brain], t2w), rank_correlation(images["t2f"][brain], t2w))
    return likeness if all(np.isfinite(likeness)) else None  # a constant image: no correlation, and no check


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two samples (NaN when either is constant or not finite). Here rather
    than ``scipy.stats.spearmanr``: importing ``scipy.stats`` costs about a second of every run."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = _average_ranks(np.ravel(a)), _average_ranks(np.ravel(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt(np.dot(ra, ra) * np.dot(rb, rb))
    return float(np.dot(ra, rb) / denominator) if denominator > 0 else float("nan")


def _block_mean(image: np.ndarray, factors) -> np.ndarray:
    """Means over blocks of ``factors`` voxels (the edge that does not fill a block is left out)."""
    shape = [n // f for n, f in zip(image.shape, factors)]
    if min(shape) == 0:
        return np.zeros(shape, np.float32)
    blocks = image[tuple(slice(0, n * f) for n, f in zip(shape, factors))]
    for axis, factor in enumerate(factors):  # one axis at a time: fast in either memory order
        blocks = np.add.reduceat(blocks, np.arange(0, blocks.shape[axis], factor), axis=axis, dtype=np.float32)
    return blocks / float(np.prod(factors))


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Mutual information (nats) of two samples of voxel values, each binned between its 1st and 99th
    percentiles."""
    def binned(x):
        low, high = np.percentile(x, (1, 99))
        if high <= low:
            return np.zeros(x.shape, np.int64)
        return np.clip(((x - low) / (high - low) * bins).astype(np.int64), 0, bins - 1)

    joint = np.bincount(binned(a) * bins + binned(b), minlength=bins * bins).reshape(bins, bins).astype(float)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log(joint[nonzero] / np.outer(pa, pb)[nonzero])).sum())


def shared_information(aligned: dict, ref_key: str, spacing_mm) -> dict[str, float]:
    """Mutual information of each sequence with the reference within the brain both show, on blocks of
    about ``SHARED_INFORMATION_MM`` (aligned: one grid, brain only). A sequence with too little brain in
    common is left out."""
    factors = [max(1, int(round(SHARED_INFORMATION_MM / float(s)))) for s in spacing_mm]
    reference = _block_mean(aligned[ref_key], factors)
    # blocks on the brain's edge count: one head's sequences share its outline, another patient's does not
    inside_reference = _block_mean(aligned[ref_key] != 0, factors) > 0
    result = {}
    for key, image in aligned.items():
        if key == ref_key:
            continue
        inside = inside_reference & (_block_mean(image != 0, factors) > 0)
        if inside.sum() < MIN_SIGNAL_VOXELS:
            continue
        result[key] = mutual_information(reference[inside], _block_mean(image, factors)[inside])
    return result


def patient_warnings(aligned: dict, ref_key: str, spacing_mm, information: dict | None = None) -> list[str]:
    """Warnings about a sequence that looks like another patient's (aligned: one grid, brain only).
    ``information``: ``shared_information``'s result, when the caller has it already."""
    if information is None:
        information = shared_information(aligned, ref_key, spacing_mm)
    notes = []
    for key, shared in information.items():
        if shared < SAME_PATIENT_MIN_INFORMATION:
            notes.append(f"{_name(key)} and {_name(ref_key)} may be of different patients: the image given as "
                         f"{_name(key)} shares too little anatomy with {_name(ref_key)}, even after trying to "
                         f"register it (shared anatomy, as mutual information: {shared:.2f}, where the sequences "
                         f"of one head share {SAME_PATIENT_MIN_INFORMATION:.2f} or more). Check that every "
                         "selected series is of this patient and study; the result may be wrong.")
    return notes


def size_warnings(wt_ml: float, brain_ml: float) -> list[str]:
    if brain_ml > 0 and wt_ml > MAX_TUMOUR_FRACTION * brain_ml:
        return [f"The whole tumour ({wt_ml:.0f} mL) is over half the brain ({brain_ml:.0f} mL), which is implausible; "
                "check that the sequences are selected correctly and that the images show a brain."]
    return []


def coverage_notes(aligned: dict, ref_key: str) -> list[str]:
    """How much of the reference image's foreground (its brain, once extracted) each other sequence
    covers on the reference grid (zero outside its own field of view). Refuses a slab or a localiser;
    a note for a partial field of view."""
    brain = aligned[ref_key] != 0
    total = int(np.count_nonzero(brain))
    notes = []
    if total == 0:
        return notes
    for key, data in aligned.items():
        if key == ref_key:
            continue
        covered = int(np.count_nonzero(brain & (data != 0))) / total
        if covered < MIN_COVERAGE:
            raise InputError(f"{_name(key)} covers only {covered:.0%} of the {_name(ref_key)} image's brain: it is a "
                             "partial slab or a localiser, not the full series. Select the whole 3D series.")
        if covered < FULL_COVERAGE:
            notes.append(f"{_name(key)} covers {covered:.0%} of the {_name(ref_key)} image's brain; outside its "
                         "field of view the segmentation relies on the other sequences.")
    return notes
