"""Command line of the runtime: ``brainunet segment | batch | demo | models | register``.

The lab (``brainunet_lab``: evaluate, train, finetune, cv, ...) adds its commands through the
``brainunet.commands`` entry point group when it is installed; the runtime never imports it.

Exit status 0 on success; 2 with a one-line ``error: ...`` on bad input; 3 on missing/corrupt
weights; 130 when cancelled (``protocol``). ``--progress machine`` prints ``BRAINUNET_PROGRESS
<fraction> <text>`` lines, which the Slicer module's background process reads.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from .errors import BrainUNetError, Cancelled, InputError, WeightsError
from .protocol import (EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_CODES_HELP, EXIT_UNEXPECTED, EXIT_WEIGHTS,  # noqa: F401
                       PROGRESS_PREFIX, RESULT_PREFIX)

PLUGIN_GROUP = "brainunet.commands"
PLUGIN_LOADERS: list = []  # add-on command loaders given directly (python -m brainunet_lab), besides entry points


class Progress:
    """A tqdm bar for people, or parseable lines for the Slicer module."""

    def __init__(self, mode: str = "bar", desc: str = ""):
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=desc, unit="%", file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
        self._last = -1.0

    def __call__(self, fraction: float, message: str = ""):
        if self.mode == "machine":
            print(f"{PROGRESS_PREFIX} {fraction:.4f} {message}", flush=True)
        elif self.bar is not None:
            self.bar.n = round(100 * fraction)
            self.bar.set_postfix_str(message[:40], refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def _add_model_args(p):
    p.add_argument("--model", help="registry name or weights file "
                   "(default: the model registered last, else the bundled one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the network")
    p.add_argument("--tta", action="store_true", help="test-time augmentation over the 8 flips: 8 network passes; "
                                                      "no more accurate in cross-validation (MODEL_CARD.md)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="network arithmetic; auto (default, or $BRAINUNET_PRECISION): bf16 only on a CPU with "
                        "native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--progress", default="bar", choices=["bar", "machine", "none"],
                   help="bar (default): a progress bar; machine: BRAINUNET_PROGRESS lines, as the Slicer module "
                        "reads them; none: messages only")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainunet", description="Glioma segmentation (ET, NETC, SNFH) on MRI.",
                                     epilog=EXIT_CODES_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment one case",
                       description="Segment one case. Required: --t1c, --t2w and --t2f (a model trained with "
                                   "modality dropout, like the bundled one, runs with one of them missing) and "
                                   "--output. Outputs are written only when every one is complete; inputs are "
                                   "never changed.", epilog=EXIT_CODES_HELP)
    # All three are needed, except that a model trained with modality dropout copes with one missing
    # (old protocols often lack a sequence); pipeline.load_inputs says what is missing.
    # each a .nii / .nii.gz, .nrrd / .mha file, or a folder holding one DICOM series
    p.add_argument("--t1c", help="T1 after contrast (reference grid of the output; a T1 without contrast here "
                                 "gives a wrong ET, undetected: without a contrast T1, leave --t1c out); each "
                                 "input is a .nii, .nii.gz, .nrrd or .mha file, or a folder holding one DICOM "
                                 "series")
    p.add_argument("--t2w", help="T2-weighted")
    p.add_argument("--t2f", help="T2-FLAIR (reference grid when T1CE is missing)")
    p.add_argument("--t1n", help="native T1 (optional; used in statistics)")
    p.add_argument("--study", help="a patient's study folder (DICOM series, or images): T1CE, T2W, FLAIR and T1 "
                                   "found by their series descriptions or file names, as the Slicer panel's "
                                   "Auto-detect finds them; --t1c / --t2w / --t2f / --t1n override its choice, "
                                   "with a path or with the description or UID of one of its series")
    p.add_argument("--output", required=True, help="labels: .nii.gz (1 NETC, 2 SNFH, 3 ET) or .seg.nrrd")
    p.add_argument("--seg-nrrd", help="also write a Slicer .seg.nrrd with named, coloured segments")
    p.add_argument("--stats", help="statistics CSV")
    p.add_argument("--overlay", help="PNG overlay of the result")
    _add_model_args(p)

    p = sub.add_parser("batch", help="segment every case folder inside DIR",
                       description="Segment every case folder inside DIR: its sequences found by BraTS 2021 or "
                                   "2023 file names (<id>-t1c.nii.gz or <id>_t1ce.nii.gz, also .nrrd / .mha, or a "
                                   "DICOM series folder named T1CE, T2W, FLAIR, ...), else by the names a scanner "
                                   "gives them (DICOM series descriptions or file names, as segment --study finds "
                                   "them). A case that fails, for whatever reason, is reported and skipped; the "
                                   "others go on. Folders without images are passed over. "
                                   "With --skip-existing an interrupted batch resumes where it stopped.",
                       epilog="exit status: 0 every case segmented (or skipped); 1 some cases failed (each named, "
                              "with the reason, and listed in the summary); 2 nothing to do (bad or unwritable "
                              "folder, or options); 3 missing or corrupt weights; 130 cancelled (the cases before "
                              "are kept: run again with --skip-existing)")
    p.add_argument("data_dir")
    p.add_argument("--output-dir",
                   help="where to write <case>-seg.nii.gz and <case>-stats.csv (default: DIR/brainunet)")
    p.add_argument("--format", default="nii.gz", choices=["nii.gz", "seg.nrrd"])
    p.add_argument("--skip-existing", action="store_true",
                   help="skip a case whose labels (<case>-seg.FORMAT, not empty) and statistics "
                        "(<case>-stats.csv) are both in the output folder, e.g. to resume an interrupted batch")
    _add_model_args(p)

    p = sub.add_parser("demo", help="segment the built-in synthetic case; writes labels, .seg.nrrd, CSV and PNG",
                       description="Write a synthetic case (a phantom brain with a ring-enhancing glioma; no data "
                                   "needed) to OUTPUT_DIR/demo_case and segment it as 'brainunet segment' would: "
                                   "demo-seg.nii.gz, demo.seg.nrrd, demo-stats.csv and demo-overlay.png in "
                                   "OUTPUT_DIR.", epilog=EXIT_CODES_HELP)
    p.add_argument("--output-dir", default="out", help="folder for the case and the outputs (default: %(default)s)")
    _add_model_args(p)

    sub.add_parser("models", help="list registered models and which one is the default")

    p = sub.add_parser("register", help="install a trained weights file (e.g. from train / finetune) as the "
                                        "default model of this installation")
    p.add_argument("weights", help="model.pt written by brainunet train or finetune")
    p.add_argument("--name", required=True, help="registry name (letters, digits, -, _ and .)")
    p.add_argument("--description", default="")
    p.add_argument("--replace", action="store_true", help="replace a model of yours registered under this name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference option stored with the model, e.g. fill_core_holes=true, "
                        "min_component_voxels=200 (JSON values)")
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub):
    """Commands of installed add-ons (the lab's train, cv, ...): each entry point of the group is a
    function taking the subparsers object; its parsers set ``handler``."""
    from importlib.metadata import entry_points

    try:
        found = entry_points(group=PLUGIN_GROUP)
    except TypeError:  # Python 3.9 (Slicer 5.6): entry_points() is a dict of groups
        found = entry_points().get(PLUGIN_GROUP, [])
    loaders = list(PLUGIN_LOADERS)
    for ep in found:
        loader = ep.load()
        if loader not in loaders:
            loaders.append(loader)
    for loader in loaders:
        loader(sub)


def _say(args, text):
    if getattr(args, "progress", "bar") == "bar":
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)  # printed above a running bar, not through it
    elif getattr(args, "progress", "bar") == "none":
        print(text, file=sys.stderr)
    else:
        print(f"{PROGRESS_PREFIX} -1 {text}", flush=True)


def cmd_segment(args) -> int:
    from . import pipeline

    paths = {"t1c": args.t1c, "t2w": args.t2w, "t2f": args.t2f, "t1n": args.t1n}
    if args.study:
        from .sequences import find_study_inputs

        # with --study, an input that is no path names one of the study's series by description or UID
        named = {role: str(p) for role, p in paths.items() if p and not Path(p).exists()}
        found, notes = find_study_inputs(args.study, named)
        for role, note in notes.items():
            if role in found and paths[role] and role not in named:
                continue  # a file or folder given on the command line: the study's choice is not used
            if role in found:
                paths[role] = found[role]
            _say(args, f"Study: {note}")
    progress = Progress(args.progress, "BrainUNet")
    try:
        loaded = _load_model(args, progress)
        result = pipeline.run(paths, args.output, args.stats, args.overlay, device=args.device, tta=args.tta,
                              precision=args.precision,
                              progress=progress, loaded_model=loaded, seg_nrrd=args.seg_nrrd)
    finally:
        progress.close()
    _report(args, result)
    return 0


def _load_model(args, progress):
    from . import pipeline
    from .inference import resolve_device

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = pipeline.load_model(args.model, device=resolve_device(args.device), progress=progress)
    note = " (not a trained network: install trained weights for real use)" if loaded.kind == "baseline" else ""
    _say(args, f"Model: {loaded.entry_name}{note}")
    return loaded


def _report(args, result):
    for note in result.notes:
        _say(args, f"Note: {note}")
    ml = {r["region"]: r["volume_ml"] for r in result.statistics}
    outs = ", ".join(str(p) for p in result.outputs.values())
    line = (f"{result.model_name}: WT {ml['WT']:.1f} mL (whole tumour; core TC {ml['TC']:.1f} mL, enhancing ET "
            f"{ml['ET']:.1f} mL), segmented in {result.timings['total_s']:.1f} s -> {outs}")
    if args.progress == "machine":
        print(f"{RESULT_PREFIX} {line}", flush=True)
    else:
        print(line)


def cmd_batch(args) -> int:
    from . import pipeline
    from .outputs import OutputError

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir} is not a folder of case folders.")
    out_dir = Path(args.output_dir) if args.output_dir else data_dir / "brainunet"
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output-dir {out_dir} is a file, not a folder; give a folder (it is made if needed).")
    out_real = out_dir.absolute().resolve()
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir())
    # a folder without any image (__MACOSX, .git, notes, an older output folder of label maps) is no case; one
    # with images is, and is segmented, or fails saying which of its images are not named as a sequence
    cases = [f for f in folders if _holds_images(f)]
    inside = next((c for c in cases if c.resolve() == out_real or c.resolve() in out_real.parents), None)
    if inside is not None:
        # every other patient's segmentation would land among this patient's images
        raise InputError(f"--output-dir {out_dir} is the case folder {inside} or inside it; choose a folder "
                         f"outside the case folders (the default is {data_dir / 'brainunet'}).")
    by_name: dict[str, list[str]] = {}
    for case in cases:
        by_name.setdefault(case.name.casefold(), []).append(case.name)
    clashes = [" and ".join(names) for names in by_name.values() if len(names) > 1]
    if clashes:  # on Windows', macOS' or a USB disk's file system their outputs would be one file
        raise InputError(f"Case folders {'; '.join(clashes)} differ only in upper and lower case: their results "
                         "would overwrite each other where case is ignored (Windows, macOS, USB disks). Rename one.")
    others = [f.name for f in folders if f not in cases and f.resolve() != out_real]
    if not cases:
        raise InputError(f"No case folders in {data_dir}; expected one folder per case holding its T1CE, T2W and "
                         "FLAIR (.nii.gz, .nrrd or .mha images, or DICOM series).")
    progress = Progress(args.progress, "BrainUNet batch")
    if others:
        _say(args, f"Skipped, no images (.nii.gz, .nrrd, .mha or DICOM other than label maps) inside: "
                   f"{', '.join(others)}")
    loaded = _load_model(args, progress)
    try:  # an output folder that cannot be written fails every case: say so once, before any case
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        progress.close()
        raise InputError(f"--output-dir {out_dir} cannot be written ({exc.strerror or type(exc).__name__}); choose "
                         "a folder you may write to.") from exc
    skipped = finished = 0
    failed: list[str] = []
    try:
        for n, case in enumerate(cases):
            out = out_dir / f"{case.name}-seg.{args.format}"
            stats = out_dir / f"{case.name}-stats.csv"
            # both files, the labels not empty: a case cut short between its two files is segmented again
            if args.skip_existing and out.is_file() and out.stat().st_size > 0 and stats.is_file():
                skipped += 1
                _say(args, f"{case.name}: skipped, {out} and its statistics already exist")
                progress((n + 1) / len(cases), f"{case.name}: skipped")
                continue

            def case_progress(f, msg, n=n, case=case):
                progress((n + f) / len(cases), f"{case.name}: {msg}")

            written_before = out.stat().st_mtime_ns if out.exists() else None
            try:
                files, found_notes = _case_inputs(case)
                for note in found_notes:
                    _say(args, f"{case.name}: Study: {note}")
                result = pipeline.run({k: files.get(k) for k in ("t1c", "t2w", "t2f", "t1n")}, out, stats,
                                      device=args.device, tta=args.tta, precision=args.precision,
                                      progress=case_progress, loaded_model=loaded)
                finished += 1
                for note in result.notes:  # a missing sequence, a registration: what the user must know per case
                    _say(args, f"{case.name}: Note: {note}")
            except (Cancelled, KeyboardInterrupt):
                # the cases before this one are written and stay; this one is whole or as it was (a cancel
                # during the move into place takes effect once the set is in)
                written = out.exists() and out.stat().st_mtime_ns != written_before
                finished += written
                state = f"{case.name} was {'' if written else 'not '}written"
                raise Cancelled(f"Cancelled during {case.name}; {finished + skipped} of {len(cases)} cases are "
                                f"segmented in {out_dir} ({state}). Run again with --skip-existing to go "
                                "on.") from None
            except WeightsError:
                raise  # no case can run: not one case's failure
            except (InputError, OutputError) as exc:
                failed.append(case.name)
                _say(args, f"{case.name}: failed, nothing written: {exc}")
            except Exception as exc:  # e.g. a RuntimeError from torch (out of memory): the next case may run
                failed.append(case.name)
                # outputs are staged and moved into place only after a complete run, so none is left
                _say(args, f"{case.name}: failed, nothing written: {type(exc).__name__}: {exc}")
    finally:
        progress.close()
    done = len(cases) - len(failed) - skipped
    listed = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more (named above)" if len(failed) > 10 else "")
    print(f"{done} of {len(cases)} cases segmented into {out_dir}"
          + (f"; {skipped} skipped (output already there)" if skipped else "")
          + (f"; {len(failed)} failed: {listed}" if failed else ""))
    return 0 if not failed else 1


#: Names of label maps, not sequences: ``<case>_seg.nii.gz``, BrainUNet's ``<case>-seg.nii.gz``, masks.
LABEL_WORDS = ("seg", "label", "labels", "labelmap", "mask", "segmentation")
#: Files looked at, at most, to tell whether a folder holds any image: a folder whose first files (in name
#: order) are no image nor DICOM is taken for something else (notes, a program) and passed over, named.
MAX_FILES_LOOKED_AT = 5000


def _image_kind(name: str) -> str | None:
    """"image" for a file name of an image that may be a sequence, "label" for a label map's, else None."""
    from .imageio import image_stem

    stem = image_stem(name)
    if stem is None or name.startswith("."):
        return None
    is_label = name.lower().endswith(".seg.nrrd") or stem.lower().replace("-", "_").split("_")[-1] in LABEL_WORDS
    return "label" if is_label else "image"


def _image_files(folder: Path) -> list[Path]:
    """The image files (not label maps) directly inside ``folder``."""
    return [p for p in sorted(folder.iterdir()) if _image_kind(p.name) == "image" and p.is_file()]


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds, at any depth (links followed, as ``segment --study`` follows them), an image
    file that is no label map or a DICOM file (its "DICM" mark)."""
    import os

    looked_at = 0
    seen: set = set()
    for root, subfolders, files in os.walk(folder, followlinks=True, onerror=lambda exc: None):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(files):
            kind = _image_kind(name)
            if kind == "image":
                return True
            if kind == "label" or name.startswith("."):
                continue
            looked_at += 1
            if looked_at > MAX_FILES_LOOKED_AT:
                return False
            try:
                with open(os.path.join(root, name), "rb") as f:
                    if f.read(132)[128:] == b"DICM":
                        return True
            except OSError:
                continue
    if not os.access(folder, os.R_OK | os.X_OK):
        return True  # unreadable: a case that fails with its own message
    return False


def _series_named(folder: Path, most: int = 9) -> list[str]:
    """How the first DICOM series under ``folder`` are described, for a message."""
    import os

    from .imageio import dicom_series_in

    named = []
    for root, subfolders, _ in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__MACOSX")
        named += [f"series '{series.description}'" for series in dicom_series_in(Path(root))]
        if len(named) >= most:
            break
    return named


def _case_inputs(case: Path) -> tuple[dict, list[str]]:
    """A case folder's sequences: by their BraTS names (``<case>-t1c.nii.gz``, ``T1CE/``), else as a scanner or
    an archive names them (the rules of ``segment --study``, with a note saying what was taken)."""
    from .errors import NoSequenceFound
    from .imageio import MODALITY_NAMES, find_case_files
    from .sequences import find_study_inputs

    try:
        files = find_case_files(case)
        if files.keys() & {"t1c", "t2w", "t2f"}:
            return _completed_by_scanner_names(case, files)
        images = _image_files(case)
    except OSError as exc:
        raise InputError(f"the folder cannot be read ({exc.strerror or type(exc).__name__}); check its "
                         "permissions.") from exc
    try:
        found, notes = find_study_inputs(case)
    except NoSequenceFound:
        roles = {p: MODALITY_NAMES[role] for role, p in files.items()}
        seen = [f"{p.name} ({roles[p]})" if p in roles else p.name for p in images] + _series_named(case)
        raise InputError(f"no T1CE, T2W or FLAIR is recognised among its images: {', '.join(seen[:8])}"
                         + (f" and {len(seen) - 8} more" if len(seen) > 8 else "")
                         + ". Name them as BraTS does (<case>-t1c.nii.gz, <case>-t2w.nii.gz, <case>-t2f.nii.gz) or "
                           "as a scanner does (T1 POST, T2, FLAIR), or give them one by one to brainunet segment "
                           "--t1c ... --t2w ... --t2f ...") from None
    return found, list(notes.values())


def _completed_by_scanner_names(case: Path, files: dict) -> tuple[dict, list[str]]:
    """A case whose BraTS names leave a sequence out: an image of the folder that a scanner's name gives that
    sequence (``AX T2 TSE.nii.gz``) is taken for it, with a note, rather than segmenting without it."""
    import os

    from .sequences import find_study_inputs

    missing = {"t1c", "t2w", "t2f"} - files.keys()
    used = {os.path.realpath(os.fspath(p)) for p in files.values()}
    if not missing or all(os.path.realpath(p) in used for p in _image_files(case)):
        return files, []
    try:
        study, notes = find_study_inputs(case)
    except BrainUNetError:  # nothing recognisable among the rest: the case runs on its BraTS names alone
        return files, []
    taken = []
    for role in ("t1c", "t2w", "t2f"):
        path = study.get(role)
        if role in missing and path is not None and os.path.realpath(os.fspath(path)) not in used:
            files[role] = path
            taken.append(notes.get(role, ""))
    return files, [note for note in taken if note]


def cmd_demo(args) -> int:
    from .synthetic import write_case

    out = Path(args.output_dir)
    case = write_case(out / "demo_case")  # a phantom brain with a ring-enhancing glioma: no data needed
    _say(args, f"Built-in synthetic case written to {out / 'demo_case'}")
    common = ["--t1c", str(case["t1c"]), "--t2w", str(case["t2w"]), "--t2f", str(case["t2f"]),
              "--device", args.device, "--progress", args.progress]
    if args.model:
        common += ["--model", args.model]
    if args.tta:
        common += ["--tta"]
    if args.precision:
        common += ["--precision", args.precision]
    if args.threads:
        common += ["--threads", str(args.threads)]
    return main(["segment", *common, "--output", str(out / "demo-seg.nii.gz"), "--seg-nrrd", str(out / "demo.seg.nrrd"),
                 "--stats", str(out / "demo-stats.csv"), "--overlay", str(out / "demo-overlay.png")])


def parse_settings(items) -> dict:
    """``--set KEY=VALUE`` options as a dict (values read as JSON: true, 0.9, null; else as text)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item}: expected KEY=VALUE, e.g. fill_core_holes=true.")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def cmd_register(args) -> int:
    import re

    from . import weights

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise InputError(f"Model name '{args.name}' may hold only letters, digits, '-', '_' and '.'.")
    weights.check_user_model_name(args.name)
    registry = weights.user_registry_path()
    if not args.replace and registry.is_file() and args.name in {e.name for e in weights.load_registry(registry)}:
        raise InputError(f"A model named '{args.name}' is already registered ({registry}); add --replace to "
                         "replace it, or choose another name.")
    settings = parse_settings(args.set)
    entry = weights.register_model(Path(args.weights), args.name, args.description, settings)
    print(f"registered {entry.name} ({entry.path()}, sha256 {entry.sha256[:12]}…); it is now the default model")
    return 0


def cmd_models(args) -> int:
    from . import weights

    entries = weights.load_registry()
    try:
        default_name = weights.default_model(entries).name
    except WeightsError as exc:
        default_name = None
        print(f"warning: {exc}", file=sys.stderr)
    for e in entries:
        path = e.path()
        state = "baseline" if e.kind == "baseline" else ("installed" if path and path.exists() else "not installed")
        mark = "*" if e.name == default_name else " "
        settings = e.extra.get("settings")
        extra = f" [settings: {', '.join(f'{k}={v}' for k, v in settings.items())}]" if settings else ""
        print(f"{mark} {e.name:28s} {state:14s} {e.description}{extra}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # The Slicer module cancels by terminating the process: exit cleanly, leaving no partial output.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(Cancelled()))
    handlers = {"segment": cmd_segment, "batch": cmd_batch, "demo": cmd_demo, "models": cmd_models,
                "register": cmd_register}
    try:
        return (handlers.get(args.command) or args.handler)(args)
    except (Cancelled, KeyboardInterrupt) as exc:
        written = getattr(exc, "outputs_written", None)  # the stop came as the outputs were moved into place
        message = (f"stopped once its outputs were written: {', '.join(map(str, written.values()))}" if written
                   else str(exc) if isinstance(exc, Cancelled) else "interrupted; nothing was written.")
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_CANCELLED
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_WEIGHTS
    except BrainUNetError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except MemoryError:
        print("error: the computer ran out of memory; no partial output was left. Close other programs and try "
              "again, or run on a computer with more memory.", file=sys.stderr, flush=True)
        return EXIT_UNEXPECTED
    except Exception as exc:  # a bug: its traceback for the report, and one line that says what happened
        traceback.print_exc()
        print(f"error: BrainUNet stopped on an unexpected error ({type(exc).__name__}: {str(exc)[:200]}); no "
              "partial output was left. The lines above say where it happened: please report them.",
              file=sys.stderr, flush=True)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
