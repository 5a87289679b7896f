"""Reading and checking input volumes; writing label maps.

Every failure raises InputError with a message that names the modality, says what is wrong and
what to do. Nothing here modifies the input files.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError
from .labels import SUBREGIONS
from .outputs import SIGNATURE, label_mark

#: Start of the NIfTI description of a label map BrainUNet writes (then the digest of its labels).
LABEL_DESCRIPTION = f"{SIGNATURE} " + ", ".join(f"{r.label} {r.key}" for r in SUBREGIONS)

#: Modality key -> display name. Keys follow BraTS 2023 file suffixes.
MODALITY_NAMES = {"t1c": "T1CE", "t2w": "T2W", "t2f": "FLAIR", "t1n": "T1"}
#: File-name suffixes per modality, BraTS 2023 first then BraTS 2021.
MODALITY_SUFFIXES = {
    "t1c": ("t1c", "t1ce", "t1gd"),
    "t2w": ("t2w", "t2"),
    "t2f": ("t2f", "flair"),
    "t1n": ("t1n", "t1"),
}


@dataclass
class Volume:
    """A 3D scalar image: ``data[i, j, k]`` in file voxel order, ``affine`` maps (i, j, k, 1) to RAS mm."""

    data: np.ndarray
    affine: np.ndarray
    name: str = "image"
    header: object | None = None  # the nibabel header when read from a file

    @property
    def spacing(self) -> np.ndarray:
        return affine_spacing(self.affine)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each voxel axis of a voxel-to-world matrix."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def check_volume(data: np.ndarray, affine: np.ndarray, name: str) -> np.ndarray:
    """Validate an array as a 3D scalar image; returns it as float32 (a 4D image of one frame is squeezed)."""
    return check_voxels(data, affine, name).astype(np.float32, copy=False)


def check_voxels(data: np.ndarray, affine: np.ndarray, name: str) -> np.ndarray:
    """The checks of ``check_volume`` on the array in its own voxel type, which they never copy: the
    Slicer panel runs them on the application's thread before the inputs are written in the background."""
    data = np.asarray(data)
    if data.size == 0:
        raise InputError(f"{name} is empty (no voxels). Select or export the image again.")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputError(f"{name} is a 4D image with {data.shape[3]} volumes (shape {data.shape}); "
                         "BrainUNet needs a single 3D volume: extract one frame first.")
    if data.ndim > 4:
        raise InputError(f"{name} has {data.ndim} dimensions (shape {data.shape}); BrainUNet needs a 3D volume.")
    if data.ndim < 3 or min(data.shape) < 2:
        raise InputError(f"{name} is a 2D image (shape {data.shape}); BrainUNet needs a 3D volume "
                         "covering the whole brain. Load the full series, not a single slice.")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"{name} has voxel type {data.dtype}; BrainUNet needs a real-valued scalar image.")
    bad = int(np.count_nonzero(~np.isfinite(data))) if np.issubdtype(data.dtype, np.floating) else 0
    if bad:
        raise InputError(f"{name} contains {bad} NaN or infinite voxels; fix or re-export the image "
                         "(for example with the Threshold or Mask Scalar Volume modules) and try again.")
    lo, hi = float(data.min()), float(data.max())
    if max(-lo, hi) > float(np.finfo(np.float32).max):  # would turn infinite in float32
        raise InputError(f"{name} holds values beyond the float32 range ({lo:g} to {hi:g}); rescale or re-export "
                         "the image and try again.")
    if lo == hi:
        raise InputError(f"{name} is constant (every voxel is {lo:g}); it holds no image. "
                         "Check that the right series was selected.")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{name} has an invalid voxel-to-world matrix (zero or undefined spacing); "
                         "re-export it with correct geometry.")
    spacing = affine_spacing(affine)
    extent = spacing * np.asarray(data.shape[:3], dtype=float)
    if spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM or extent.max() > MAX_EXTENT_MM:
        # a header whose spacing is in the wrong unit or lost: the brain would be resampled to a few voxels
        # (the network fails) or to hundreds of millions (memory runs out), or segmented at a wrong size
        size = " x ".join(f"{v:.3g}" for v in spacing)
        fov = " x ".join(f"{v:.0f}" for v in extent)
        raise InputError(f"{name}'s voxels are {size} mm (a field of view of {fov} mm): no head MRI has voxels "
                         f"that size (from {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm, a field of view up to "
                         f"{MAX_EXTENT_MM:g} mm), so its header's spacing is wrong. Export the series again "
                         "from the scanner or PACS, or set its spacing right (3D Slicer: Volumes module, Volume "
                         "Information).")
    return data


MIN_SPACING_MM = 0.1  # the finest clinical MRI is ~0.2 mm in-plane
MAX_SPACING_MM = 15.0  # the thickest clinical slices are ~10 mm
MAX_EXTENT_MM = 700.0  # a whole-body coronal field of view is ~500 mm


MAX_VOXELS = 2**30  # 1024^3: no MRI volume comes near (a 0.5 mm whole-head scan is ~2^27)


#: Formats read through SimpleITK rather than nibabel: what Slicer saves volumes as (NRRD) and MetaImage.
SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a study folder: where its files are, its UID and description. As a path it is its
    first file, so the checks on input paths (the same file twice, an output over an input) apply to it."""

    folder: Path
    uid: str
    description: str
    files: tuple[str, ...]
    contrast_agent: str = ""  # (0018,0010): set on series acquired after contrast
    image_type: str = ""  # (0008,0008): ORIGINAL or DERIVED (a reformat, a subtraction, a projection)

    def __fspath__(self) -> str:
        return self.files[0]

    def __str__(self) -> str:
        return f"series '{self.description}' ({len(self.files)} files in {self.folder})"


def load_volume(path, name: str | None = None) -> Volume:
    """Read a NIfTI (single file or .hdr/.img pair), an NRRD / MetaImage file, a folder holding one DICOM
    series (as a scanner exports it), or a ``DicomSeries`` as a checked float32 volume."""
    import nibabel as nib

    if isinstance(path, DicomSeries):
        return _read_dicom_files(path.files, path.folder, name or path.description)
    path = Path(path)
    name = name or path.name
    if not path.exists():
        raise InputError(f"{name}: file not found: {path}. Check the path.")
    if path.is_dir():
        return _load_dicom_series(path, name)
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as exc:  # no read permission (a file copied from another user's account), a device error
        raise InputError(f"{name}: {path} cannot be opened ({exc.strerror or type(exc).__name__}). Check that "
                         "you may read it (its permissions, or copy it to your own folder) and try again.") from exc
    gzipped = head[:2] == b"\x1f\x8b"
    if head[128:132] == b"DICM":  # one file of a series: a slice, not the volume
        raise InputError(f"{name}: {path.name} is one DICOM file, a single slice of its series. Give the folder that "
                         f"holds the whole series ({path.parent}) instead of the file.")
    if path.name.lower().endswith(SITK_SUFFIXES):
        return _load_with_sitk(path, name)
    if gzipped and not path.name.lower().endswith((".gz", ".mgz")):  # .mgz: gzipped MGH, refused below
        raise InputError(f"{name}: {path.name} is gzip-compressed but its name does not end in .gz; rename it to "
                         f"{path.name}.gz (or {path.stem}.nii.gz) and try again.")
    try:
        img = nib.load(str(path))
    except Cancelled:  # SIGTERM (Slicer's Cancel) raised while reading: a cancel, not a corrupt file
        raise
    except Exception as exc:
        raise InputError(f"{name}: {path.name} cannot be read as an image ({type(exc).__name__}: "
                         f"{str(exc)[:120]}). The file is corrupt, truncated or not NIfTI: export it again.") from exc
    if not isinstance(img, nib.Nifti1Pair):  # NIfTI-1 and -2, single file or pair
        # MGH and Analyze images lack NIfTI's header (the labels are written with the input's), and
        # Analyze has no left-right orientation: nibabel would guess it
        raise InputError(f"{name}: {path.name} is not NIfTI (it reads as {type(img).__name__}). BrainUNet reads "
                         "NIfTI (.nii, .nii.gz), NRRD, MetaImage and DICOM: convert it first (load it in 3D Slicer "
                         "and save it as .nii.gz, or mri_convert for FreeSurfer's .mgz).")
    voxels = int(np.prod([int(n) for n in img.shape], dtype=np.int64)) if img.shape else 0
    if voxels > MAX_VOXELS:
        dims = " x ".join(str(int(n)) for n in img.shape)
        raise InputError(f"{name}: {path.name}'s header claims {dims} voxels, far more than any MRI volume; the header "
                         "is corrupt. Export the image again.")
    try:
        data = np.asanyarray(img.dataobj)
    except Cancelled:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt / truncated / foreign files
        raise InputError(f"{name}: {path.name} cannot be read as an image ({type(exc).__name__}: "
                         f"{str(exc)[:120]}). The file is corrupt, truncated or not NIfTI: export it again.") from exc
    data = check_volume(data, img.affine, name)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=float), name=name, header=img.header)


def _volume_from_sitk(image, name: str) -> Volume:
    """A SimpleITK image (LPS world, z-y-x array) as a checked Volume (RAS affine, x-y-z array)."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} values per voxel: a colour image, or "
                         "several volumes in one file (a time series, DWI). BrainUNet needs one 3D scalar volume: "
                         "extract one frame first.")
    if image.GetDimension() != 3:
        raise InputError(f"{name} is a {image.GetDimension()}D image; BrainUNet needs a 3D volume covering the "
                         "whole brain.")
    view = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = lps_to_ras @ np.asarray(image.GetOrigin(), dtype=float)
    data = check_volume(view, affine, name)
    if np.shares_memory(data, view):  # already float32: own the voxels, the SimpleITK image goes
        data = data.copy()
    return Volume(data=data, affine=affine, name=name)


def _reason(exc: Exception) -> str:
    """The last line of a SimpleITK error (its first lines are the C++ location), at most 120 characters."""
    lines = str(exc).strip().splitlines()
    return (lines[-1] if lines else type(exc).__name__)[:120]


def _load_with_sitk(path: Path, name: str) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except Cancelled:
        raise
    except Exception as exc:
        detached = path.name.lower().endswith((".nhdr", ".mhd"))
        raise InputError(f"{name}: {path.name} cannot be read as an image ({_reason(exc)}). " +
                         ("A .nhdr / .mhd header needs its data file (.raw, .zraw, ...) beside it under the name it "
                          "gives; copy both, or save the volume as one .nrrd." if detached else
                          "The file is corrupt or truncated: export it again.")) from exc
    return _volume_from_sitk(image, name)


def dicom_series_in(folder: Path) -> list[DicomSeries]:
    """The DICOM series whose files lie in ``folder`` itself (not its subfolders), in UID order."""
    import SimpleITK as sitk

    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns about every folder without DICOM
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except Cancelled:
        raise
    except Exception:
        return []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    found = []
    for uid in uids:
        files = tuple(f for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
                      if not Path(f).name.startswith("."))  # macOS's ._ copies of each file
        if not files:
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        tags = {}
        try:
            reader.ReadImageInformation()
            for key, tag in (("description", "0008|103e"), ("protocol", "0018|1030"), ("agent", "0018|0010"),
                             ("type", "0008|0008")):
                tags[key] = reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
        except Cancelled:
            raise
        except Exception:
            pass
        # an anonymised export may drop the description: the protocol's name, or the folder's, says as much
        label = tags.get("description") or tags.get("protocol") or (Path(folder).name if len(uids) == 1 else uid)
        found.append(DicomSeries(Path(folder), uid, label, files, tags.get("agent", ""), tags.get("type", "")))
    return found


def _load_dicom_series(folder: Path, name: str) -> Volume:
    """The one DICOM series in ``folder`` (its files only, not its subfolders)."""
    series = dicom_series_in(folder)
    if not series:
        raise InputError(f"{name}: {folder} is a folder without a DICOM series in it. Give a .nii / .nii.gz / "
                         ".nrrd file, or the folder holding the DICOM files of one series.")
    if len(series) > 1:
        described = "; ".join(f"'{s.description}' ({Path(s.files[0]).name}, ...)" for s in series)
        raise InputError(f"{name}: {folder} holds {len(series)} DICOM series: {described}. Put each series in its "
                         "own folder (or convert them to NIfTI) and give the folder of the right one, or give the "
                         "study folder with --study.")
    return _read_dicom_files(series[0].files, folder, name)


def _read_dicom_files(files, folder: Path, name: str) -> Volume:
    import SimpleITK as sitk

    if len(files) < 2:
        raise InputError(f"{name}: the DICOM series in {folder} has a single file, a 2D image or a multi-frame "
                         "file; BrainUNet needs the whole 3D series: export it again, or convert it to NIfTI.")
    files = check_slice_geometry(files, folder, name)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)  # slices may each have their own rescale slope
    try:
        image = reader.Execute()
    except Cancelled:
        raise
    except Exception as exc:
        raise InputError(f"{name}: the DICOM series in {folder} cannot be read ({_reason(exc)}). Export it again, "
                         "or convert it to NIfTI.") from exc
    return _volume_from_sitk(image, name)


def check_slice_geometry(files, folder: Path, name: str) -> tuple[str, ...]:
    """Refuse a series that is not one evenly spaced stack of parallel slices: ITK would read it as one with a
    warning only (a missing slice, a tilted gantry, two echoes or a 3-plane localiser under one series UID).
    Returns the files in slice order, along the normal of the slices (the order the reader needs)."""
    import SimpleITK as sitk

    origins, directions = [], []
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except Cancelled:
            raise
        except Exception as exc:
            raise InputError(f"{name}: {Path(f).name} in {folder} cannot be read as DICOM ({_reason(exc)}). Export "
                             "the series again, or convert it to NIfTI.") from exc
        origins.append(reader.GetOrigin())
        directions.append(reader.GetDirection())
    origins, directions = np.asarray(origins, float), np.asarray(directions, float)
    problem = None
    order = np.arange(len(files))
    if np.abs(directions - directions[0]).max() > 1e-4:
        problem = "its slices are not all parallel (several planes, as in a localiser)"
    else:
        normal = directions[0].reshape(3, 3)[:, 2]
        order = np.argsort(origins @ normal, kind="stable")
        origins = origins[order]
        steps = np.diff(origins @ normal)
        step = np.median(steps) if len(steps) else 0.0
        if step <= 1e-3 or np.abs(steps).min() <= 1e-3:
            problem = "two or more slices lie at the same position (several echoes or volumes in one series)"
        elif np.abs(steps - step).max() > max(0.01, 0.01 * step):
            problem = f"its slices are not evenly spaced ({steps.min():.2f} to {steps.max():.2f} mm: a slice missing?)"
        else:
            offsets = np.diff(origins, axis=0) - np.outer(steps, normal)
            if np.abs(offsets).max() > max(0.01, 0.01 * step):
                problem = "its slices are shifted sideways (a tilted gantry)"
    if problem:
        raise InputError(f"{name}: the DICOM series in {folder} is not one regular 3D volume: {problem}. Load it "
                         "with 3D Slicer's DICOM module, or convert it with dcm2niix, and give the NIfTI.")
    return tuple(files[i] for i in order)


def save_label_nifti(labels: np.ndarray, reference: Volume, path) -> Path:
    """Write ``labels`` (reference voxel order) with the reference's affine and header geometry."""
    import nibabel as nib

    header = reference.header.copy() if reference.header is not None else None
    img = nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header["scl_slope"] = 1
    img.header["scl_inter"] = 0
    # lets a later run recognise its own result, unchanged, and replace it (outputs.replaceable)
    img.header["descrip"] = label_mark(labels, LABEL_DESCRIPTION).encode()
    # a label map, not the T1CE: viewers would take its display window and colour map from these
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    img.header["aux_file"] = b""
    img.header.set_intent("none")
    if header is not None:
        # Keep the reference's exact qform/sform codes so viewers place the labels identically.
        img.set_qform(*reference.header.get_qform(coded=True))
        img.set_sform(*reference.header.get_sform(coded=True))
        if img.header["qform_code"] == 0 and img.header["sform_code"] == 0:
            img.set_sform(reference.affine, code=1)
    path = Path(path)
    # Written as bytes: nibabel picks the format by a case-sensitive ending (x.Nii fails, and x.Nii.gz is
    # written as x.nii.gz beside the name asked for).
    if path.name.lower().endswith(".nii"):
        path.write_bytes(img.to_bytes())
    elif path.name.lower().endswith(".nii.gz"):
        path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1))  # nibabel's level: fast, as small
    else:
        nib.save(img, str(path))
    return path


IMAGE_SUFFIXES = (".nii.gz", ".nii") + SITK_SUFFIXES


def image_stem(name: str) -> str | None:
    """A file name without its image suffix (``.nii.gz``, ``.nrrd``, ... in any case), or None for a file that
    is no image."""
    low = name.lower()
    return next((name[:-len(s)] for s in IMAGE_SUFFIXES if low.endswith(s)), None)


def find_case_files(case_dir) -> dict[str, Path]:
    """Map modality keys to the images of a case folder, named as BraTS names them (2021 ``*_t1ce.nii.gz``,
    2023 ``*-t1c.nii.gz``): NIfTI first, then NRRD / MetaImage files, then DICOM series folders (``T1CE/``,
    ``case_flair/``), each named by its last ``_`` / ``-`` word."""
    case_dir = Path(case_dir)
    found: dict[str, Path] = {}
    entries = sorted(p for p in case_dir.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX")
    kinds = [[p for p in entries if p.is_file() and p.name.lower().endswith((".nii.gz", ".nii"))],
             [p for p in entries if p.is_file() and p.name.lower().endswith(SITK_SUFFIXES)],
             [p for p in entries if p.is_dir()]]
    for kind in kinds:  # a kind found for a sequence wins over the kinds after it
        matches: dict[str, list[Path]] = {}
        for p in kind:
            stem = (image_stem(p.name) if p.is_file() else None) or p.name
            suffix = stem.replace("-", "_").split("_")[-1].lower()
            for key, options in MODALITY_SUFFIXES.items():
                if suffix in options and key not in found:
                    matches.setdefault(key, []).append(p)
        for key, paths in matches.items():
            if len(paths) > 1:  # which one is meant is not for the name order to decide
                raise InputError(f"{len(paths)} images are named as {MODALITY_NAMES.get(key, key)}: "
                                 f"{', '.join(p.name for p in paths)}; keep one of them in the folder {case_dir}.")
            found[key] = paths[0]
    return found
