"""Real labelled cases (BraTS 2021 or 2023 layout) as training samples, folds and held-out scores.

Images go through exactly the inference preprocessing (``align_to_reference`` + ``prepare`` at the
model's spacing), so the network trains on what it will see; the label map is brought onto the
same working grid by nearest neighbour.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainunet.errors import InputError
from brainunet.imageio import MODALITY_NAMES, MODALITY_SUFFIXES, find_case_files, load_volume

# bump when what a cached case holds, or how it is made, changes: old entries are then ignored
CASE_CACHE_VERSION = 1


def case_cache_root() -> Path:
    """Where preprocessed training cases are kept: ``$BRAINUNET_CASE_CACHE`` or ``~/.cache/brainunet/cases``
    (outside the repository: derived images of real cases must never be committed)."""
    env = os.environ.get("BRAINUNET_CASE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "brainunet" / "cases"


def settings_key(spacing_mm, modalities, clip_percentiles, bias_correction: bool) -> str:
    """The preprocessing settings a cached case depends on, as a short folder name."""
    settings = {"version": CASE_CACHE_VERSION, "spacing_mm": [round(float(s), 4) for s in spacing_mm],
                "modalities": list(modalities), "clip_percentiles": [float(p) for p in clip_percentiles],
                "bias_correction": bool(bias_correction)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{'-'.join(f'{s:g}' for s in settings['spacing_mm'])}mm-{digest}"


def _files_key(paths) -> str:
    """Changes when any source file changes (name, size or modification time)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


PACK_FORMAT = "brainunet-case-pack-1"


def pack_case(case: "LabelledCase", path, margin_mm: float = 24.0) -> Path:
    """A compact copy of a preprocessed case for a machine without the data (the GPU machine, where only
    the checkout travels, 64 MiB in all): the tumour's bounding box plus ``margin_mm``, each channel
    quantised to 8 bits inside the brain (0 outside), compressed. Derived images of real cases: keep
    packs out of the repository (git-ignored ``.cache/``)."""
    labels = case.labels
    tumour = np.argwhere(labels > 0) if labels.any() else np.argwhere(case.mask)
    margin = [int(np.ceil(margin_mm / s)) for s in case.spacing]
    lo = np.maximum(tumour.min(0) - margin, 0)
    hi = np.minimum(tumour.max(0) + 1 + margin, labels.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    image, mask = case.image[(slice(None),) + box], case.mask[box]
    offsets, scales, quantised = [], [], np.zeros(image.shape, np.uint8)
    for c in range(image.shape[0]):
        inside = image[c][mask]
        low, high = (float(inside.min()), float(inside.max())) if inside.size else (0.0, 1.0)
        scale = max(high - low, 1e-6) / 254.0
        quantised[c] = np.where(mask, np.clip(np.round((image[c] - low) / scale), 0, 254) + 1, 0).astype(np.uint8)
        offsets.append(low)
        scales.append(scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, format=PACK_FORMAT, name=case.name, image=quantised, offsets=np.asarray(offsets),
                        scales=np.asarray(scales), labels=labels[box], mask=mask, spacing=np.asarray(case.spacing),
                        wt_volume_ml=np.asarray(case.wt_volume_ml))
    return path


def load_packed_cases(pack_dir) -> list["LabelledCase"]:
    """The cases of a pack folder (``pack_case``), in name order; ``path`` is the pack file."""
    files = sorted(Path(pack_dir).glob("*.npz"))
    if not files:
        raise InputError(f"No packed cases in {pack_dir}; make them with brainunet cv-pack.")
    cases = []
    for f in files:
        with np.load(f) as z:
            if str(z["format"]) != PACK_FORMAT:
                raise InputError(f"{f} is not a BrainUNet case pack ({PACK_FORMAT}).")
            q = z["image"].astype(np.float32)
            image = np.where(q > 0, (q - 1) * z["scales"].reshape(-1, 1, 1, 1) + z["offsets"].reshape(-1, 1, 1, 1), 0.0)
            cases.append(LabelledCase(str(z["name"]), f, image.astype(np.float32), z["labels"], z["mask"],
                                      tuple(float(v) for v in z["spacing"]), float(z["wt_volume_ml"])))
    return cases


LAYOUT_HINT = ("one folder per case with BraTS file names: <id>-t1c/-t2w/-t2f/-seg.nii.gz (2023) or "
               "<id>_t1ce/_t2/_flair/_seg.nii.gz (2021)")


@dataclass
class LabelledCase:
    name: str
    path: Path  # the case folder
    image: np.ndarray  # (C, X, Y, Z) float32 on the working grid, normalised like inference
    labels: np.ndarray  # (X, Y, Z) uint8 BraTS 2023 labels on the working grid
    mask: np.ndarray  # (X, Y, Z) bool foreground on the working grid
    spacing: tuple[float, float, float]  # working spacing (mm)
    wt_volume_ml: float  # whole tumour in the reference label map (stratifies the folds)


def find_labelled_cases(data_dir, label_pattern: str | None = None) -> list[Path]:
    """Case folders inside ``data_dir`` that hold a ``*_seg`` / ``*-seg`` label map, or a file matching
    ``label_pattern`` (a glob: e.g. a trusted algorithm's output used as pseudo-labels)."""
    from .evaluation import find_reference

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir} is not a folder; give a folder of labelled cases ({LAYOUT_HINT}).")
    cases = [c for c in sorted(data_dir.iterdir()) if c.is_dir() and find_reference(c, label_pattern)]
    if not cases:
        expected = f"case folders holding a file matching '{label_pattern}'" if label_pattern else LAYOUT_HINT
        raise InputError(f"No labelled cases in {data_dir}: expected {expected}.")
    return cases


def read_labels(path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A label map as BraTS 2023 uint8 labels and its affine."""
    import nibabel as nib

    from brainunet.labels import to_brats2023

    try:
        img = nib.load(str(path))
        data = np.squeeze(np.asanyarray(img.dataobj))
    except Exception as exc:
        raise InputError(f"{name}: the label map {Path(path).name} cannot be read ({type(exc).__name__}).") from exc
    if data.ndim != 3:
        raise InputError(f"{name}: the label map {Path(path).name} has shape {data.shape}; expected a 3D volume.")
    try:
        return to_brats2023(data), np.asarray(img.affine, float)
    except ValueError as exc:
        raise InputError(f"{name}: the label map {Path(path).name} is not a BraTS label map: {exc}.") from exc


def load_labelled_case(case_dir, spacing_mm=(1.0, 1.0, 1.0), modalities=("t1c", "t2w", "t2f"),
                       clip_percentiles=(0.5, 99.5), bias_correction: bool = False,
                       label_pattern: str | None = None, cache: bool | str | Path = False) -> LabelledCase:
    """One case, preprocessed as inference does. ``cache``: True (``case_cache_root()``) or a folder keeps
    the result on disk, keyed by the preprocessing settings and the source files, so later runs skip the
    bias correction and resampling. Images are stored as float16 (z-scores: ample precision)."""
    case_dir = Path(case_dir)
    cache_file = None
    if cache:
        files = find_case_files(case_dir)
        reference_path = _find_reference(case_dir, label_pattern)
        sources = [files[m] for m in modalities if m in files] + ([reference_path] if reference_path else [])
        root = case_cache_root() if cache is True else Path(cache)
        cache_file = (root / settings_key(spacing_mm, modalities, clip_percentiles, bias_correction)
                      / f"{case_dir.name}-{_files_key(sources)}.npz")
        if cache_file.is_file():
            try:
                with np.load(cache_file) as z:
                    return LabelledCase(case_dir.name, case_dir, z["image"].astype(np.float32), z["labels"],
                                        z["mask"], tuple(float(v) for v in z["spacing"]), float(z["wt_volume_ml"]))
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry is rebuilt below
    case = _load_labelled_case(case_dir, spacing_mm, modalities, clip_percentiles, bias_correction, label_pattern)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, image=case.image.astype(np.float16), labels=case.labels, mask=case.mask,
                 spacing=np.asarray(case.spacing), wt_volume_ml=np.asarray(case.wt_volume_ml))
        os.replace(tmp, cache_file)  # a reader never sees a half-written entry
        case.image = case.image.astype(np.float16).astype(np.float32)  # the same values a cache hit gives
    return case


def _find_reference(case_dir, label_pattern):
    from .evaluation import find_reference

    return find_reference(Path(case_dir), label_pattern)


def _load_labelled_case(case_dir, spacing_mm, modalities, clip_percentiles, bias_correction,
                        label_pattern) -> LabelledCase:
    import torch
    import torch.nn.functional as F
    from nibabel import orientations as ornt

    from .evaluation import find_reference
    from brainunet.preprocessing import align_to_reference, prepare

    case_dir = Path(case_dir)
    name = case_dir.name
    files = find_case_files(case_dir)
    missing = [m for m in modalities if m not in files]
    if missing:
        wanted = ", ".join(f"{MODALITY_NAMES[m]} (*-{MODALITY_SUFFIXES[m][0]} or *_{MODALITY_SUFFIXES[m][1]})"
                           for m in missing)
        raise InputError(f"{name}: missing {wanted}. Add the image or move the case out of the folder.")
    reference_path = find_reference(case_dir, label_pattern)
    if reference_path is None:
        raise InputError(f"{name}: no label map ({label_pattern or '*-seg.nii.gz or *_seg.nii.gz'}).")
    volumes = {m: load_volume(files[m], f"{name} {MODALITY_NAMES[m]}") for m in modalities}
    reference = volumes["t1c"]
    labels, label_affine = read_labels(reference_path, name)
    if labels.shape != reference.data.shape or not np.allclose(label_affine, reference.affine, atol=1e-3):
        raise InputError(f"{name}: the label map {reference_path.name} (shape {labels.shape}) is not on the T1CE "
                         f"grid (shape {reference.data.shape}); labels must share the T1CE image's grid, as in BraTS.")
    prepared = prepare(align_to_reference(volumes, "t1c"), reference, modalities, spacing_mm, clip_percentiles,
                       bias_correction=bias_correction)
    crop_labels = ornt.apply_orientation(labels, prepared.to_ras)[prepared.crop]
    working = prepared.image.shape[1:]
    if tuple(crop_labels.shape) != tuple(working):
        # 'nearest-exact' samples at voxel centres, matching the trilinear image resampling (align_corners=False)
        t = torch.from_numpy(np.ascontiguousarray(crop_labels, dtype=np.float32))[None, None]
        crop_labels = F.interpolate(t, size=tuple(working), mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
    wt_ml = float((labels > 0).sum()) * reference.voxel_volume_mm3 / 1000.0
    return LabelledCase(name, case_dir, prepared.image, np.ascontiguousarray(crop_labels, np.uint8), prepared.mask,
                        prepared.working_spacing, wt_ml)


def load_labelled_cases(data_dir, spacing_mm=(1.0, 1.0, 1.0), modalities=("t1c", "t2w", "t2f"),
                        clip_percentiles=(0.5, 99.5), progress=None, bias_correction: bool = False,
                        label_pattern: str | None = None, cache: bool | str | Path = False) -> list[LabelledCase]:
    """Every labelled case in ``data_dir``; a broken case stops with a message naming it."""
    case_dirs = find_labelled_cases(data_dir, label_pattern)
    cases = []
    for n, case_dir in enumerate(case_dirs):
        if progress:
            progress(n / len(case_dirs), f"Loading {case_dir.name}")
        cases.append(load_labelled_case(case_dir, spacing_mm, modalities, clip_percentiles, bias_correction,
                                        label_pattern, cache))
    return cases


def check_fold_count(n: int, k: int) -> None:
    if k < 2:
        raise InputError(f"Cross-validation needs at least 2 folds (got {k}).")
    if n < k:
        raise InputError(f"{k}-fold cross-validation needs at least {k} labelled cases of different patients, but "
                         f"there are only {n}. Use --folds {n} or fewer (at least 2), or add cases.")


INSTITUTIONS = ("2013", "CBICA", "TCIA", "TMC")


def institution(case_name: str) -> str:
    """The contributing institution in a BraTS 2018 case name (``Brats18_<institution>_...``): 2013 (the
    older BraTS 2013 scans), CBICA, TCIA (TCIA01..13 sites) or TMC; ``other`` for any other name."""
    parts = case_name.upper().split("_")
    for inst in INSTITUTIONS:
        if any(part.startswith(inst) for part in parts[1:] or parts):
            return inst
    return "other"


def patient(case_name: str) -> str:
    """The patient of a case name: BraTS 2023 names a patient's scans ``BraTS-GLI-00000-000``, ``-001``, ...
    (time points); any other name is a patient of its own (BraTS 2018 and 2021 hold one scan per patient)."""
    match = re.fullmatch(r"(BraTS-[A-Za-z]+-\d+)-\d+", case_name)
    return match.group(1) if match else case_name


def institution_folds(names, wt_volumes, k: int) -> list[list[int]]:
    """``k`` held-out folds (lists of case indices) by patient, stratified by institution and tumour size.

    A patient's scans (``patient``) stay in one fold: a model must not be scored on a time point of a
    patient it learned from. Institutions are taken largest first; inside each, patients are sorted by
    whole-tumour volume (their scans' mean) and dealt round-robin, continuing where the previous institution
    stopped. Every fold so gets its share of each institution and of small and large tumours, and with one
    scan per patient fold sizes differ by at most one. Deterministic: the folds depend only on the cases, so
    every recipe is scored on the same splits.
    """
    patients: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        patients.setdefault(patient(name), []).append(i)
    check_fold_count(len(patients), k)
    groups: dict[str, list[str]] = {}
    for key, cases in patients.items():
        groups.setdefault(institution(names[cases[0]]), []).append(key)
    folds: list[list[int]] = [[] for _ in range(k)]
    dealt = 0
    for inst in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        for key in sorted(groups[inst], key=lambda p: (float(np.mean([wt_volumes[i] for i in patients[p]])), p)):
            folds[dealt % k].extend(patients[key])
            dealt += 1
    return [sorted(f) for f in folds]


def evaluate_model(model, case_dirs, device: str = "cpu", progress=None, label_pattern: str | None = None) -> list[dict]:
    """Segment each labelled case exactly as ``brainunet evaluate`` does; Dice and HD95 per region."""
    from brainunet import pipeline
    from .evaluation import evaluate_case, find_reference

    loaded = model if isinstance(model, pipeline.LoadedModel) else pipeline.load_model(model, device=device)
    rows = []
    for n, case_dir in enumerate(case_dirs):
        case_dir = Path(case_dir)
        if progress:
            progress(n / len(case_dirs), f"Evaluating {case_dir.name}")
        files = find_case_files(case_dir)
        volumes = pipeline.load_inputs({m: files.get(m) for m in loaded.modalities})
        result = pipeline.segment(volumes, loaded, device=device)
        reference, _ = read_labels(find_reference(case_dir, label_pattern), case_dir.name)
        rows.append({"case": case_dir.name, **evaluate_case(result.labels, reference, result.reference.spacing)})
    return rows
