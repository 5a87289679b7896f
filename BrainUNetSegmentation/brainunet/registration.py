"""Rigid co-registration of each sequence to the reference (T1CE) when the patient moved between them.

Scanner coordinates already align sequences of one session unless the patient moved. Each sequence is
registered rigidly (6 degrees of freedom) to the reference with Mattes mutual information (SimpleITK,
which Slicer ships too), on coarse grids (8, 4, then 2 mm) so it takes seconds (3.4 s a sequence on the
raw clinical case). A movement under ``MOVED_MM`` is treated as none (the images keep their scanner
alignment, untouched); a larger one is corrected; a registration that cannot have worked (images sharing
no structure, or a movement no patient makes in a scanner) is refused with a message instead of segmenting
misaligned images. A movement that does not improve the match by ``MIN_GAIN`` is the optimiser's noise,
not the patient's: the sequences are left as they are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .imageio import MODALITY_NAMES, Volume

log = logging.getLogger(__name__)

MOVED_MM = 2.0  # largest displacement of a brain point below which the sequence is left as it is
MAX_PLAUSIBLE_MM = 40.0  # a patient does not move further inside the head coil
MAX_PLAUSIBLE_DEG = 30.0
MIN_GAIN = 0.05  # relative mutual-information gain below which a found movement is not trusted
MIN_SHARED_INFORMATION = 0.1  # Mattes MI (negated by SimpleITK) of unrelated images is ~0; sequences of one head: 0.4-0.9
BRAIN_RADIUS_MM = 80.0  # how far from the centre a brain point lies, to turn a rotation into millimetres
MIN_LEVEL_VOXELS = 32  # a registration level needs at least this many voxels along every axis
MIN_SLICES = 8  # a brain series has more slices than this along every axis (5.5 mm slices: about 26)


@dataclass
class Registration:
    moved_mm: float  # largest displacement of a point within BRAIN_RADIUS_MM of the centre
    rotation_deg: float
    translation_mm: float
    metric_before: float
    metric_after: float
    transform: object  # SimpleITK Euler3DTransform (fixed physical point -> moving physical point, LPS)


def to_sitk(volume: Volume):
    """A Volume (RAS affine, [i, j, k] array) as a SimpleITK image (LPS physical space)."""
    import SimpleITK as sitk

    affine = np.asarray(volume.affine, float)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume.data, np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def _shrunk(image, target_mm: float):
    """Block-averaged to about ``target_mm`` (anti-aliased and cheap: no full-resolution filtering)."""
    import SimpleITK as sitk

    # never more than the image holds along an axis (a thin slab: BinShrink refuses a factor beyond its size)
    factors = [max(1, min(int(round(target_mm / s)), n)) for s, n in zip(image.GetSpacing(), image.GetSize())]
    return sitk.BinShrink(image, factors)


LEVELS_MM = (8.0, 4.0, 2.0)


def registration_levels(volume: Volume) -> dict:
    """The normalised image at each level (mm -> SimpleITK image), full resolution under None."""
    import SimpleITK as sitk

    image = sitk.Normalize(to_sitk(volume))
    return {None: image, **{mm: _shrunk(image, mm) for mm in LEVELS_MM}}


def register_rigid(fixed: Volume, moving: Volume, seed: int = 1) -> Registration:
    """Rigid transform taking the fixed (reference) grid's points to the moving image's, by mutual
    information on ~8, 4 and 2 mm grids (deterministic for a given ``seed``; SimpleITK reads a seed of 0
    as "from the wall clock", so 0 is refused)."""
    import SimpleITK as sitk

    if seed == sitk.sitkWallClock:
        raise ValueError("register_rigid: seed 0 means a random seed in SimpleITK; give a positive seed.")
    fixed_levels = registration_levels(fixed)
    moving_levels = registration_levels(moving)
    f = fixed_levels[None]
    centre = f.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in f.GetSize()])
    initial = sitk.Euler3DTransform()
    initial.SetCenter(centre)  # identity: the scanner frame is the starting point

    def metric(transform, fi, mi) -> float:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(32)
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(0.25, seed)  # REGULAR sampling jitters its points: seeded
        method.SetInterpolator(sitk.sitkLinear)
        method.SetInitialTransform(transform, inPlace=False)
        return float(method.MetricEvaluate(fi, mi))

    levels = {mm: (fixed_levels[mm], moving_levels[mm]) for mm in LEVELS_MM}
    before = metric(initial, *levels[4.0])
    transform = sitk.Euler3DTransform(initial)
    # a level needs enough voxels to show anatomy: on a small image the coarse ones mislead the optimiser
    usable = [mm for mm in LEVELS_MM if min(levels[mm][0].GetSize()) >= MIN_LEVEL_VOXELS] or [2.0]
    for level_mm in usable:
        fi, mi = levels[level_mm]
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(32)
        method.SetMetricSamplingStrategy(method.REGULAR)  # deterministic
        method.SetMetricSamplingPercentage(0.5, seed)
        method.SetInterpolator(sitk.sitkLinear)
        # slow step relaxation: faster settings stopped short of a 5 degree rotation (3 mm off at the cortex)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.001, numberOfIterations=100,
                                                        relaxationFactor=0.8, gradientMagnitudeTolerance=1e-8)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(fi, mi)
    after = metric(transform, *levels[4.0])
    angles = np.asarray(transform.GetParameters()[:3])
    translation = np.asarray(transform.GetParameters()[3:])
    rotation_deg = float(np.degrees(np.linalg.norm(angles)))
    translation_mm = float(np.linalg.norm(translation))
    moved_mm = translation_mm + float(np.linalg.norm(angles)) * BRAIN_RADIUS_MM
    return Registration(moved_mm, rotation_deg, translation_mm, before, after, transform)


def resample_registered(moving: Volume, reference: Volume, transform) -> np.ndarray:
    """``moving`` on the reference grid through ``transform`` (linear, 0 outside), [i, j, k] order."""
    import SimpleITK as sitk

    out = sitk.Resample(to_sitk(moving), to_sitk(reference), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(np.float32)


def register_to_reference(volumes: dict, aligned: dict, ref_key: str, notes: list,
                          optional=(), on_optional_failure=None) -> None:
    """Replace (in ``aligned``) each sequence that moved relative to the reference by its registered
    version; say so in ``notes``. Refuse a registration that failed; for a sequence in ``optional`` (the
    native T1, statistics only) call ``on_optional_failure(key, error)`` instead. Sequences
    stored on the reference's grid were resampled together (BraTS, or a registration's output):
    co-registered already, left alone."""
    from concurrent.futures import ThreadPoolExecutor

    from .preprocessing import same_grid

    reference = volumes[ref_key]
    keys = [key for key in volumes
            if key != ref_key and not same_grid(volumes[key], reference.data.shape, reference.affine)]
    if not keys:
        return
    own_notes = {key: [] for key in keys}

    def register(key):
        try:  # each thread makes its own SimpleITK images of the reference: ITK's filters write to their inputs
            _register_one(volumes, aligned, key, ref_key, reference, own_notes[key])
        except InputError as exc:
            return exc
        return None

    # two at a time: SimpleITK's optimiser keeps two cores only partly busy on these small grids (the raw
    # clinical case, whose T2W and FLAIR moved, gave the same labels and a median run 1.1x faster:
    # BENCHMARKS.md)
    with ThreadPoolExecutor(max_workers=min(2, len(keys))) as pool:
        failures = dict(zip(keys, pool.map(register, keys)))
    for key in keys:  # notes and refusals in the sequences' order, as if one after the other
        notes.extend(own_notes[key])
        if failures[key] is not None:
            if key not in optional:
                raise failures[key]
            on_optional_failure(key, failures[key])


def register_if_it_moved(volumes: dict, aligned: dict, key: str, ref_key: str, notes: list) -> bool:
    """Register one sequence stored on the reference's grid whose anatomy does not line up with it (the
    patient moved between two series of one planning, which keep the grid); True if ``aligned[key]`` was
    replaced. A match that fails or is implausible leaves it as it was: the caller's warning follows."""
    before = aligned[key]
    try:
        _register_one(volumes, aligned, key, ref_key, volumes[ref_key], notes)
    except InputError as exc:
        log.info("%s not registered: %s", key, exc)
        return False
    return aligned[key] is not before


def check_full_series(name: str, shape) -> None:
    """Refuse a localiser or a thin slab: too few slices along some axis to hold a brain."""
    thinnest = int(min(shape))
    if thinnest < MIN_SLICES:
        raise InputError(f"{name} has only {thinnest} slices along one axis: it is a localiser or a thin slab, "
                         "not the full series. Select the whole 3D series.")


def _register_one(volumes, aligned, key, ref_key, reference, notes):
    """``register_to_reference`` for one sequence."""
    name, ref_name = MODALITY_NAMES.get(key, key), MODALITY_NAMES.get(ref_key, ref_key)
    check_full_series(name, volumes[key].data.shape)
    try:
        reg = register_rigid(reference, volumes[key])
    except RuntimeError as exc:  # SimpleITK: too few voxels or samples to match on (its text goes to the log)
        log.warning("registration of %s to %s failed: %s", name, ref_name, exc)
        raise InputError(f"{name} could not be registered to {ref_name}: too little of it overlaps the "
                         f"{ref_name} image to match them. Check that it is the full 3D series of the same "
                         "patient.") from exc
    shared = max(-reg.metric_before, -reg.metric_after)
    if shared < MIN_SHARED_INFORMATION:
        raise InputError(f"{name} shares almost no structure with {ref_name} (mutual information "
                         f"{shared:.2f}); the images may be from different patients, or one is not a brain "
                         "scan. Check the selection.")
    gain = (reg.metric_before - reg.metric_after) / max(abs(reg.metric_before), 1e-6)
    if gain < MIN_GAIN or reg.moved_mm < MOVED_MM:
        return  # the sequences line up already: a move that does not match better is noise
    if reg.moved_mm > MAX_PLAUSIBLE_MM or reg.rotation_deg > MAX_PLAUSIBLE_DEG:
        raise InputError(f"{name} could not be registered to {ref_name} (the best rigid match moves it "
                         f"{reg.moved_mm:.0f} mm and turns it {reg.rotation_deg:.0f}°, more than a patient "
                         "moves in the scanner); the images may be from different patients or sessions. "
                         "Register them in Slicer (General Registration) and try again.")
    aligned[key] = resample_registered(volumes[key], reference, reg.transform)
    notes.append(f"{name} registered to {ref_name} (the patient moved: {reg.translation_mm:.1f} mm, "
                 f"{reg.rotation_deg:.1f}°)")
