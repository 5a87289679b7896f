"""Outputs that never lose anything: checked before any work, written to temporary files beside their
final place, and moved into place together only when every one of them has been written.

- An output that is one of the inputs (same path, another spelling, a hard or symbolic link), two
  outputs that are the same file, an output that is a folder or not a regular file (a device such as
  /dev/full), or a folder that cannot be written is refused before anything is computed.
- An existing file is replaced only if it is an unchanged BrainUNet result: a label map (NIfTI or
  ``.seg.nrrd``) whose mark (``SIGNATURE`` and a digest of its labels, in the NIfTI description or a
  ``.seg.nrrd`` header field) still matches its voxels, a PNG with BrainUNet as its Software text, a
  table with the statistics' header row, or an empty file. So a run named over an expert's label map,
  a scan, a segmentation corrected since (in Slicer, ITK-SNAP or a script), another table or picture,
  or a result of a BrainUNet version before the marks, is refused and the file kept; checked before
  any work and again just before the move into place.
- A refused run creates no folder: missing folders are made only when the outputs are moved in.
- A write error (disk full, permission, ...) removes every temporary file, leaves existing files as they
  were, and raises ``OutputError`` (exit 2) naming the file and the cause; so does a move into place that
  fails after others succeeded (they are taken back, and the files they replaced restored).
- Ctrl-C or SIGTERM (Slicer's Cancel) before the move leaves nothing behind; the move itself runs with
  those signals held, so a cancelled run never leaves part of a set in place. A killed process
  (SIGKILL) can leave only a hidden ``.brainunet-*`` temporary file, never a truncated output.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import BrainUNetError, Cancelled, InputError

TEMP_PREFIX = ".brainunet-"
# file systems allow 255 bytes a name; the temporary name (temp_path) adds the prefix and 9 characters
MAX_OUTPUT_NAME_BYTES = 255 - len(TEMP_PREFIX) - 9


#: Marks a file as a BrainUNet output, which a later run may replace while it is unchanged.
SIGNATURE = "BrainUNet"
#: Header field of a ``.seg.nrrd`` written by BrainUNet (value: ``label_mark(labels)``).
SEG_NRRD_FIELD = "BrainUNet_Output"
#: The statistics table's first columns (the sequences' mean and median follow); defined here, not in
#: statistics.py, which imports scipy: checking an output must stay light
STATISTICS_COLUMNS = ["region", "name", "voxels", "volume_ml", "centroid_r_mm", "centroid_a_mm", "centroid_s_mm",
                      "max_diameter_mm"]
_DIGEST_TAG = "; labels sha256 "


def label_mark(labels, prefix: str = SIGNATURE) -> str:
    """``prefix`` and a digest of the label voxels (their shape and values), which an edit changes."""
    import hashlib

    import numpy as np

    voxels = np.ascontiguousarray(labels, dtype=np.uint8)
    digest = hashlib.sha256(repr(voxels.shape).encode() + voxels.tobytes()).hexdigest()[:16]
    return f"{prefix}{_DIGEST_TAG}{digest}"


def _mark_matches(mark: str, labels) -> bool:
    return mark.startswith(SIGNATURE) and _DIGEST_TAG in mark and \
        label_mark(labels, mark.split(_DIGEST_TAG)[0]) == mark


class OutputError(BrainUNetError):
    """An output could not be written; nothing was changed."""


def same_file(a: Path, b: Path) -> bool:
    """Same file by path after resolving links, or by device and inode (hard links) when both exist."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def replaceable(key: str, path: Path) -> bool:
    """Whether the existing file ``path``, given as output ``key``, is an unchanged BrainUNet result (or
    empty), which a new run may replace."""
    try:
        if path.stat().st_size == 0:
            return True
        name = path.name.lower()
        if key == "stats":
            import csv

            from .imageio import MODALITY_NAMES
            from .labels import REGIONS_BY_KEY

            if path.stat().st_size > 1_000_000:  # ours holds a few rows
                return False
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                rows = list(csv.reader(f))
            # as written: our columns (the sequences' mean and median after the geometry), then a row per
            # region, nothing else: a note or a column added is the reader's work
            ours = {f"{stat}_{name}" for stat in ("mean", "median") for name in MODALITY_NAMES.values()}
            header = rows[0] if rows else []
            return (header[:len(STATISTICS_COLUMNS)] == STATISTICS_COLUMNS
                    and all(column in ours for column in header[len(STATISTICS_COLUMNS):])
                    and all(len(row) == len(header) and row[0] in REGIONS_BY_KEY for row in rows[1:]))
        if key == "overlay":
            from PIL import Image

            with Image.open(path) as image:
                return getattr(image, "text", {}).get("Software", "").startswith(SIGNATURE)
        if name.endswith(".seg.nrrd"):
            import nrrd

            if SEG_NRRD_FIELD not in nrrd.read_header(str(path)):
                return False
            voxels, header = nrrd.read(str(path))
            return _mark_matches(str(header[SEG_NRRD_FIELD]), voxels)
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib
            import numpy as np

            # a case-sensitive ending decides nibabel's format (x.Nii fails): plain .nii is read as bytes
            image = nib.Nifti1Image.from_bytes(path.read_bytes()) if name.endswith(".nii") else nib.load(str(path))
            mark = image.header["descrip"].item().decode("ascii", "replace")
            return mark.startswith(SIGNATURE) and _mark_matches(mark, np.asanyarray(image.dataobj))
    except Exception:  # unreadable, or another kind of file: not a result of this program
        return False
    return False


def _not_replaceable(path: Path) -> str:
    return (f"{path} exists and is not an unchanged BrainUNet result (another program's file, a segmentation "
            "edited since, or a result of an older BrainUNet), so it was kept. Choose another file name (in a "
            "batch, another output folder), or move that file away.")


def _nearest_existing(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path(".")


def check_outputs(outputs: dict[str, Path], inputs=()) -> dict[str, Path]:
    """Refuse, with a message saying what to change, any output set that could lose or mix up a file.
    Creates nothing."""
    outputs = {k: Path(v) for k, v in outputs.items() if v}
    inputs = [Path(p) for p in inputs if p]
    for key, path in outputs.items():
        for source in inputs:
            if same_file(path, source):
                raise InputError(f"Output {path} is one of the input images ({source}); choose another file "
                                 "name so no input is overwritten.")
        if path.is_dir():
            raise InputError(f"Output {path} is a folder; give a file name such as {path / 'segmentation.nii.gz'}.")
        if len(path.name.encode()) > MAX_OUTPUT_NAME_BYTES:
            raise InputError(f"Output file name {path.name[:40]}... is {len(path.name.encode())} bytes long; give a "
                             f"name of at most {MAX_OUTPUT_NAME_BYTES} (the run writes it first under a longer "
                             "temporary name).")
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise InputError(f"Output {path} is not a regular file (a device or a pipe); give a file name in a "
                             "folder you can write to.")
        if path.exists() and not replaceable(key, path):
            raise InputError(_not_replaceable(path))
        parent = path.parent if str(path.parent) else Path(".")
        existing = _nearest_existing(parent)
        if not existing.is_dir():
            raise InputError(f"Cannot write to {path}: {existing} is a file, not a folder. Choose another location.")
        if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise InputError(f"Cannot write to {path}: permission denied. Choose a folder you can write to.")
    keys = list(outputs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if same_file(outputs[a], outputs[b]):
                raise InputError(f"The {a} and {b} outputs are the same file ({outputs[a]}); give each its own "
                                 "file name.")
    return outputs


@contextmanager
def signals_held():
    """SIGINT and SIGTERM that arrive in the block are handled when it ends (main thread; elsewhere a no-op).
    Python-level deferral rather than a signal mask: the mask is per thread, and the kernel hands a signal to
    any thread that does not block it (torch's workers), whose handler flag the main thread then acts on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # installed outside Python: left alone
    for signum in previous:
        signal.signal(signum, lambda received, frame: pending.append((received, frame)))
    try:
        yield
    finally:
        _restore_handlers(list(previous.items()))
        handled = set()
        for signum, frame in pending:  # each signal once, in the order they came (as the kernel merges them)
            if signum in handled:
                continue
            handled.add(signum)
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _restore_handlers(items) -> None:
    """Each handler put back even when a signal lands between two of them (its exception then goes on)."""
    if items:
        try:
            signal.signal(*items[0])
        finally:
            _restore_handlers(items[1:])


class OutputSet:
    """Write each output with ``write(key, writer)`` (``writer(temp_path)`` writes the file), then
    ``commit()`` moves them all into place. Use as a context manager: leaving it without a commit
    (an error, a cancel) removes every temporary file."""

    def __init__(self, outputs: dict[str, Path], replace_only_results: bool = False):
        """``replace_only_results``: ``commit`` refuses to replace a file that is not an unchanged BrainUNet
        result (one saved under an output's name while the run worked)."""
        self.outputs = {k: Path(v) for k, v in outputs.items()}
        self.replace_only_results = replace_only_results
        self.temps: dict[str, Path] = {}
        self.created: list[Path] = []  # folders this set made, removed again if it is discarded

    def temp_path(self, key: str) -> Path:
        final = self.outputs[key]
        # same folder (so the move is a rename on one file system) and same name ending (writers pick
        # the format from it: .nii.gz, .seg.nrrd, .png)
        return final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}")

    def write(self, key: str, writer) -> Path:
        final = self.outputs[key]
        missing = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.created += [p for p in missing if p not in self.created]
        except OSError as exc:
            raise OutputError(f"Cannot create the folder {final.parent}: {exc.strerror or exc}. Nothing was written; "
                              "choose another location.") from exc
        temp = self.temp_path(key)
        self.temps[key] = temp
        try:
            writer(temp)
        except OSError as exc:
            raise OutputError(f"Cannot write {final}: {exc.strerror or exc}. Nothing was written; free some space "
                              "or choose another location.") from exc
        return temp

    def commit(self) -> dict[str, Path]:
        """Move every output into place; if one move fails, the files moved before it are taken back and
        the files they replaced restored, so the set is all new or all as it was."""
        if self.replace_only_results:
            for key in self.temps:
                final = self.outputs[key]
                if final.exists() and not replaceable(key, final):
                    raise OutputError(_not_replaceable(final) + " Nothing was written.")
        try:
            self._move_into_place()
        except (KeyboardInterrupt, Cancelled) as exc:  # held through the moves, acted on once they were done
            if not self.temps:  # every output is in place: the message must not say that nothing was written
                exc.outputs_written = dict(self.outputs)
            raise
        return dict(self.outputs)

    def _move_into_place(self) -> None:
        with signals_held():
            previous: dict[str, Path] = {}  # output -> a copy of the file it replaces, until all are in place
            placed: list[str] = []
            try:
                for key, temp in self.temps.items():
                    final = self.outputs[key]
                    if final.exists():
                        # a second name for the old file (the final name keeps it: each move stays atomic)
                        aside = final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-previous-{final.name}")
                        try:
                            os.link(final, aside)
                        except OSError:  # a file system without hard links
                            shutil.copy2(final, aside)
                        previous[key] = aside
                    os.replace(temp, final)
                    placed.append(key)
            except OSError as exc:
                failed = self.outputs[key]
                lost = self._take_back(placed, previous)
                raise OutputError(f"Cannot move {failed} into place: {exc.strerror or exc}. "
                                  + (f"Could not restore {', '.join(lost)}: their previous versions are beside them "
                                     f"as {TEMP_PREFIX}*-previous-*." if lost else "Nothing was changed.")) from exc
            for aside in previous.values():
                aside.unlink(missing_ok=True)
            self.temps = {}
            self.created = []

    def _take_back(self, placed, previous) -> list[str]:
        """Undo the moves of ``placed``: an output that replaced a file gets that file back, a new one is
        removed. Returns the outputs that could not be restored."""
        lost = []
        for key in placed:
            final = self.outputs[key]
            try:
                if key in previous:
                    os.replace(previous.pop(key), final)
                else:
                    final.unlink(missing_ok=True)
            except OSError:
                lost.append(str(final))
        for aside in previous.values():  # not replaced after all: the final name still holds it
            aside.unlink(missing_ok=True)
        return lost

    def discard(self):
        for temp in self.temps.values():
            try:
                temp.unlink()
            except OSError:
                pass
        self.temps = {}
        for folder in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()  # only if empty
            except OSError:
                pass
        self.created = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False
