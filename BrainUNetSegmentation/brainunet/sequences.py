"""Which input a series is, from its name as scanners, archives and Slicer write it: the one set of rules
behind the panel's Auto-detect and ``brainunet segment --study``."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

# Series names as scanners and archives write them ("AX T1 FLAIR POST", "t1_mprage_sag_p2_iso_post",
# "T2W_TSE", "BraTS-GLI-00001-000-t1c"), read as words: a word starts after anything but a letter or digit.
_W = r"(?<![a-z0-9])"
#: Series that are none of the four inputs, whatever else their name says (T2* and susceptibility,
#: diffusion, perfusion).
NOT_AN_INPUT = [r"t2[\W_]*(\*|star)", _W + r"(swi|swan|dwi|dti|adc|tracew?|dsc|dce|pwi|asl)(?![a-z])",
                _W + r"(diff|perf)"]  # diff, diffusion, perf, perfusion
#: A T1-weighted series: T1 (T1W, T1N, T1C, ...) or a T1 sequence named without "T1".
T1_NAMES = [_W + r"(ce)?t1(?![0-9])", _W + r"(mprage|spgr|fspgr|bravo)(?![a-z])"]
#: Marks of a contrast-enhanced T1, anywhere in its name ("T1 FS POST", "T1W_TSE_GD", "Ax T1 SE +C", "T1wCE").
# "post" as in after contrast, not posterior or post-operative / post-treatment (a native T1 after surgery,
# whose blood is bright without contrast)
_POST = r"post(?!er|[\W_]*op|[\W_]*(surg|treat|therap|rad))"
CONTRAST = [_W + r"t1w?[\W_]*(ce|c|gd)(?![a-z]|-(?![a-z0-9]))", _W + r"t1w?[\W_]*(" + _POST + r"|gad|contrast)",
            _W + r"cet1",
            _W + r"(ce|gd|km)(?![a-z])", _W + r"(" + _POST + r"|gad|contrast)", r"\+"]
#: ... overruled by marks of a native T1 ("T1 PRE", "T1 pre-contrast", "T1 non contrast", "T1N").
NATIVE = [_W + r"t1n(?![a-z])", _W + r"pre(?![a-z]|[\W_]*op)", _W + r"pre[\W_]*(contrast|gd|gad)",
          r"c-(?![a-z0-9])", r"-c(?![a-z0-9])",  # "T1 C-", "T1C-", "T1 -C": without contrast
          _W + r"non[\W_]*(contrast|gd|gad)", _W + r"without(?![a-z])", _W + r"w/o(?![a-z])", _W + r"nativ"]
T2_NAMES = [_W + r"t2(?![0-9])"]
#: FLAIR: T2F, FLAIR, Siemens's "dark-fluid"; a T1-weighted FLAIR (GE's "AX T1 FLAIR") is a T1 all the same.
FLAIR_NAMES = [_W + r"t2[\W_]*f(lair)?(?![a-z])", _W + r"flair", _W + r"dark[\W_]*fluid"]
#: Gradient echo: a T2-weighted one is T2* (not T2W); a T1-weighted one (spoiled GRE) is a T1.
GRADIENT_ECHO = [_W + r"gre(?![a-z])"]


def _any(patterns, text: str) -> bool:
    return any(re.search(p, text) for p in patterns)


def guess_role(name: str) -> str | None:
    """The input role a volume's name suggests (t1c, t1n, t2w, t2f), or None for any other series and
    for a name that says both T1 and T2."""
    low = name.lower()
    if _any(NOT_AN_INPUT, low):
        return None
    t1, t2, flair = _any(T1_NAMES, low), _any(T2_NAMES, low), _any(FLAIR_NAMES, low)
    if t1 and t2:
        return None
    if t1:
        return "t1c" if _any(CONTRAST, low) and not _any(NATIVE, low) else "t1n"
    if _any(GRADIENT_ECHO, low):
        return None
    if flair:
        return "t2f"
    if t2:
        return "t2w"
    return None


#: More folders than any patient's study export holds: ``--study`` was given a whole disk or home folder.
MAX_STUDY_FOLDERS = 5000

#: Series a study holds besides the acquisitions: reformats, projections and subtractions named like them.
DERIVED_NAMES = [_W + r"(sub|subtract\w*|mip|minip|mpr|reformat\w*|recon)(?![a-z])"]


def _is_derived(name: str, image_type: str = "") -> bool:
    return _any(DERIVED_NAMES, name.lower()) or any(
        word in image_type.upper() for word in ("DERIVED", "SECONDARY", "SUBTRACTION", "PROJECTION", "MPR", "MIP"))


def find_study_inputs(root, named: dict | None = None) -> tuple[dict, dict]:
    """The inputs of a study folder as a scanner or an archive exports it: every DICOM series under ``root``
    (by its description; a T1 with a contrast agent recorded is T1CE) and every image file (by its name),
    each given the role its name suggests. Series that are not one regular volume are passed over; of the
    rest, acquisitions come before reformats and subtractions, then the series with the most slices.
    ``named``: role -> a series description or UID the user gave instead of a path (``--t1c "AX T1 POST"``),
    taken for that role whatever its name suggests.
    Returns role -> DicomSeries or Path, and role -> a note saying what was taken and what was not."""
    import os

    from .errors import InputError, NoSequenceFound
    from .imageio import IMAGE_SUFFIXES, MODALITY_NAMES, check_slice_geometry, dicom_series_in, image_stem

    root = Path(root)
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"--study {root}: not a readable folder. Give the folder of the patient's study (DICOM or "
                         "images).")
    candidates: dict = {}
    by_uid: dict = {}  # some exports split a series over several folders: its parts are one series
    image_files = []
    unreadable = []
    # linked folders are followed (archives link series into a study folder); each real folder is read once,
    # so a link back up the tree ends there
    walk = os.walk(root, onerror=lambda exc: unreadable.append(exc.filename), followlinks=True)
    seen: set = set()
    for count, (folder, subfolders, files) in enumerate(walk):
        if count >= MAX_STUDY_FOLDERS:
            raise InputError(f"--study {root}: more than {MAX_STUDY_FOLDERS} folders, far more than one study; give "
                             "the folder of one patient's study.")
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__MACOSX")
        for series in dicom_series_in(Path(folder)):
            first = by_uid.setdefault(series.uid, series)
            if first is not series:
                by_uid[series.uid] = replace(first, files=first.files + series.files)
        image_files += [(folder, name) for name in sorted(files)]
    every_series = list(by_uid.values())
    for series in every_series:
        role = guess_role(series.description)
        if role == "t1n" and series.contrast_agent:
            role = "t1c"
        if role:
            derived = _is_derived(series.description, series.image_type)
            candidates.setdefault(role, []).append((derived, -len(series.files), str(series), series))
    for folder, name in image_files:
        if name.startswith("."):
            continue
        stem = image_stem(name)
        role = guess_role(stem) if stem else None
        if role:
            path = Path(folder) / name
            candidates.setdefault(role, []).append((_is_derived(stem), 0, str(path), path))
    chosen, notes = {}, {}
    for role, wanted in (named or {}).items():
        matches = [x for x in every_series if wanted.strip().lower() in (x.description.lower(), x.uid.lower())]
        listed = "; ".join(f"'{x.description}'" for x in every_series) or "none"
        looks_like_path = "/" in wanted or "\\" in wanted or wanted.lower().endswith(IMAGE_SUFFIXES + (".dcm",))
        if not matches and looks_like_path:
            raise InputError(f"--{role} {wanted}: no such file or folder, and no series of the study {root} is so "
                             f"described (its series: {listed}). Check the path, or name a series by its "
                             "description or UID.")
        if len(matches) != 1:
            raise InputError(f"--{role} {wanted!r}: {'no' if not matches else len(matches)} series of the study "
                             f"{root} {'is' if not matches else 'are'} so described (its series: {listed}). Give a "
                             "description or UID that names one, or a file or folder.")
        chosen[role] = matches[0]
        notes[role] = f"{MODALITY_NAMES[role]}: {matches[0]}, as asked"
    for role in ("t1c", "t2w", "t2f", "t1n"):
        if role in chosen:
            continue
        passed = []
        for derived, slices, text, item in sorted(candidates.get(role, []), key=lambda c: c[:2]):
            if role in chosen:
                passed.append(text)
                continue
            if not isinstance(item, Path):
                try:
                    check_slice_geometry(item.files, item.folder, MODALITY_NAMES[role])
                except InputError:
                    passed.append(f"{text}: not one regular volume")
                    continue
            chosen[role] = item
            notes[role] = f"{MODALITY_NAMES[role]}: {text}"
        if role in chosen and passed:
            notes[role] += (f", chosen over {'; '.join(passed)} (to take another, give its description with "
                            f"--{role})")
    if unreadable:
        notes["unreadable"] = f"folders that could not be read were passed over: {', '.join(map(str, unreadable[:3]))}"
    if not chosen.keys() & {"t1c", "t2w", "t2f"}:
        raise NoSequenceFound(f"--study {root}: no series or image named as T1CE, T2W or FLAIR was found in it. Give "
                         "the sequences with --t1c, --t2w and --t2f.")
    return chosen, notes
