"""The BrainUNet module's logic, free of Qt: input guessing, background run, import of results.

The network runs in a separate Python process (PythonSlicer inside Slicer) so the application never
freezes; the widget polls ``BackgroundRun.poll()`` from a timer, and Cancel terminates the process.
Nothing is added to the scene until a run has finished successfully.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import mrml
from .mrml import _  # Slicer's translation where Slicer runs (see mrml)
from brainunet.protocol import LEFT_OUT_NOTE, PROGRESS_PREFIX, RESULT_PREFIX
from brainunet.errors import BrainUNetError, InputError
from brainunet.imageio import MODALITY_NAMES
from brainunet.sequences import guess_role

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # folder that contains the brainunet package
#: Node references of a result's segmentation to the volumes it was made from (role appended for inputs),
#: so its statistics can be computed again after corrections in Segment Editor.
REFERENCE_VOLUME_REFERENCE = "BrainUNetReferenceVolume"
INPUT_VOLUME_REFERENCE = "BrainUNetInput_"
RECOMPUTED_NOTE = "Statistics computed again from the segments as edited"
REMOVED_DURING_RUN_NOTE = "was removed from the scene while BrainUNet ran"
EDITED_DURING_RUN_NOTE = "was changed while BrainUNet ran"
#: Attributes of a result's segmentation and table: the model that made it, with which quality, when.
PROVENANCE_MODEL = "BrainUNet.Model"
PROVENANCE_QUALITY = "BrainUNet.Quality"
PROVENANCE_VERSION = "BrainUNet.Version"
PROVENANCE_DATE = "BrainUNet.Date"
#: on a statistics table: a digest of the segments it was computed from (saved with the scene), so a panel
#: shown again, or a scene opened again, knows when the segments were corrected after it
SEGMENTS_DIGEST_ATTRIBUTE = "BrainUNet.SegmentsDigest"

def missing_inputs(inputs: dict, roles=None) -> list[str]:
    """The names of the sequences ``roles`` (default: T1CE, T2W and FLAIR) that ``inputs`` (role -> node) lacks."""
    return [MODALITY_NAMES.get(r, r) for r in (roles or ("t1c", "t2w", "t2f")) if inputs.get(r) is None]


def input_candidates(scene) -> dict:
    """Role -> every scalar volume node whose name suggests that role, in scene order. Only plain scalar
    volumes, as the input selectors list them: a label map, a vector (RGB screenshot) or a diffusion volume
    named like a sequence is not one."""
    found: dict = {}
    for node in mrml.nodes_of_class(scene, "vtkMRMLScalarVolumeNode"):
        if node.GetClassName() != "vtkMRMLScalarVolumeNode":
            continue
        role = guess_role(node.GetName() or "")
        if role:
            found.setdefault(role, []).append(node)
    return found


def guess_inputs(scene) -> dict:
    """Role -> scalar volume node, from node names (t1c/t1ce/t1gd or a T1 marked post/gd/+c, t2w/t2,
    flair/t2f, t1/t1n). A role that two or more volumes match is left out: which one is meant is the
    user's choice, and the first in scene order is as likely the wrong one (a resampled copy, an older study)."""
    return {role: nodes[0] for role, nodes in input_candidates(scene).items() if len(nodes) == 1}


def ambiguous_inputs(scene) -> dict:
    """Role -> the names of the volumes that match it, for each role that two or more volumes match."""
    return {role: [n.GetName() for n in nodes] for role, nodes in input_candidates(scene).items() if len(nodes) > 1}


@dataclass(frozen=True)
class ModelChoice:
    """A model as the panel offers it, read from its registry entry alone (its weights need torch)."""

    name: str
    kind: str  # "network" or "baseline"
    description: str  # what it is and what it was trained on
    sequences: tuple[str, ...] = ()  # the input roles it reads; empty when its entry does not say
    one_may_be_missing: bool | None = None  # trained with modality dropout; None when its entry does not say
    accuracy: str = ""
    licence: str = ""
    default: bool = False  # what runs when the panel names no model


def model_choices(user_home: str | None = None) -> list[ModelChoice]:
    """The models the worker can run: the user's registered ones first, then the bundled ones, the
    intensity baseline last. ``user_home`` is the worker's BRAINUNET_HOME (None: this process's)."""
    from brainunet import weights
    from brainunet.errors import WeightsError

    entries = weights.load_registry(user_registry=weights.user_registry_path(user_home))
    try:
        default = weights.default_model(entries).name
    except WeightsError:  # the worker says why when it runs; the list still shows what is registered
        default = None
    choices = [_model_choice(e, e.name == default) for e in entries]
    return sorted(choices, key=lambda c: c.kind == "baseline")


def _model_choice(entry, default: bool) -> ModelChoice:
    inputs = entry.extra.get("inputs") or {}
    settings = entry.extra.get("settings") or {}  # a registered model's flat settings may name its inputs
    sequences = inputs.get("sequences", settings.get("modalities", ()))
    one_may_be_missing = inputs.get("one_may_be_missing", settings.get("modality_dropout"))
    return ModelChoice(entry.name, entry.kind, entry.description, tuple(sequences), one_may_be_missing,
                       str(entry.extra.get("accuracy", "")), str(entry.extra.get("licence", "")), default)


@dataclass
class RunOptions:
    device: str = "auto"  # auto | cpu | cuda
    tta: bool = False  # "quality: TTA" in the panel
    model: str | None = None


@dataclass
class BackgroundRun:
    """A running ``brainunet segment`` process and what it reported.

    Made with ``process=None`` and started with ``launch_after``, it first writes its inputs on a thread of
    its own and then starts the process, so the application's thread never waits for the files; it is
    "running" from the start, and Cancel works in either phase.
    """

    process: subprocess.Popen | None
    workdir: Path
    reference_node: object
    outputs: dict
    on_progress: object = None
    on_log: object = None
    state: str = "running"  # running | done | failed | cancelled
    progress: float = 0.0
    message: str = ""
    error: str = ""
    log: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what the worker did to the input ("Note: ..." lines)
    inputs: dict = field(default_factory=dict)  # role -> the volume node it was made from
    task: str = "the segmentation"  # what the worker does, as messages name it
    model_name: str = ""  # the registry name a "brainunet register" run adds
    model_used: str = ""  # the model a segmentation ran, as the worker's "Model: ..." line names it
    options: RunOptions | None = None
    output_segmentation: object = None  # the segmentation chosen to be replaced by the result, if any
    kept_output: object = None  # set when the result went into a new segmentation to keep those changes
    output_contents: tuple | None = ()  # its segments when the run started (None: they could not be read)
    _lines: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self):
        self._lock = threading.Lock()  # the launch and Cancel: one of them comes first, never both half-way
        self._reader = None  # set once the process runs: from then on its output is read
        self._writer = None
        self._start_error = ""
        if self.process is not None:
            self._start_reader()

    def _start_reader(self):
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self._reader = reader

    def launch_after(self, write_inputs, cmd: list[str], env: dict) -> None:
        """Call ``write_inputs(stopped)`` on a new thread, then start ``cmd`` unless the run was cancelled
        meanwhile; ``stopped()`` tells the writer to give up between files."""
        self._writer = threading.Thread(target=self._write_and_launch, args=(write_inputs, cmd, env), daemon=True)
        self._writer.start()

    def _write_and_launch(self, write_inputs, cmd, env):
        try:
            write_inputs(lambda: self.state != "running")
            with self._lock:
                if self.state == "running":
                    self.process = launch(cmd, env, self.workdir)
                    self._start_reader()
        except Exception as exc:  # a full disk, a missing interpreter: the run fails with the reason
            if self.state == "running":
                self._start_error = f"{self._sentence_start()} could not start: {exc}"
        finally:
            if self.state != "running":  # cancelled while a file was being written
                self.cleanup()

    def _read(self):
        try:
            for line in self.process.stdout:
                self._lines.put(line.rstrip("\n"))
        except Exception as exc:  # e.g. undecodable output: report it; the end marker still comes
            self._lines.put(f"error: the output of {self.task} could not be read ({type(exc).__name__}).")
        finally:
            self._lines.put(None)

    def poll(self) -> str:
        """Handle what the process printed since the last call; returns the state."""
        if self.state != "running":
            return self.state
        if self._reader is None:  # still writing the inputs, or it failed to
            if self._start_error:
                self.state = "failed"
                self.error = self._start_error
                self.cleanup()
            return self.state
        ended = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                # no end marker, yet the process is gone and nothing more can come: ended all the same
                ended = self.process.poll() is not None and not self._reader.is_alive() and self._lines.empty()
                break
            if line is None:
                ended = True
                break
            self._handle(line)
        if ended:
            code = self.process.wait()
            if code == 0:
                self.state = "done"
                self.progress = 1.0
            else:
                self.state = "failed"
                self.error = self.error or (f"{self._sentence_start()} stopped unexpectedly (its process ended "
                                            f"with exit code {code}).")
                self.cleanup()
        return self.state

    def _sentence_start(self) -> str:
        return self.task[:1].upper() + self.task[1:]

    def _handle(self, line: str):
        if line.startswith(PROGRESS_PREFIX):
            _, fraction, *text = line.split(" ", 2)
            text = text[0] if text else ""
            if float(fraction) >= 0:
                self.progress = float(fraction)
            self.message = text
            if self.on_progress:
                self.on_progress(self.progress, text)
            if float(fraction) < 0:
                self._log(text)
                if text.startswith("Note: "):
                    self.notes.append(text[len("Note: "):])
                elif text.startswith("Model: "):
                    self.model_used = text[len("Model: "):].split(" (")[0].strip()
            return
        if line.startswith(RESULT_PREFIX):
            line = line[len(RESULT_PREFIX):].strip()
        elif line.startswith("error: "):
            self.error = line[len("error: "):]
        self._log(line)

    def _log(self, text):
        self.log.append(text)
        if self.on_log:
            self.on_log(text)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() == "running":
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"{self.task} did not finish in time")
            time.sleep(interval)
        return self.state

    def cancel(self):
        with self._lock:
            process = self.process if self.state == "running" else None
            if self.state == "running":
                self.state = "cancelled"
                self.error = "Cancelled by the user; nothing was changed."
        if process is not None:
            kill_tree(process)
        # never waits for the input writer: it stops at the next file, and its own clean-up removes the
        # folder again after a file it was still writing
        self.cleanup()

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


class BrainUNetLogic:
    """Dependency-injected: the scene, the Python that runs the network, and the temp folder."""

    def __init__(self, scene, python_executable: str | None = None, temp_root: str | None = None,
                 user_home: str | None = None):
        self.scene = scene
        self.python_executable = python_executable or default_python()
        self.temp_root = temp_root
        self.user_home = user_home  # BRAINUNET_HOME of the worker: registered models (next to Slicer's settings)

    # -- models and inputs ------------------------------------------------------------------------
    def model_choices(self) -> list[ModelChoice]:
        return model_choices(self.user_home)

    def guess_inputs(self) -> dict:
        return guess_inputs(self.scene)

    def ambiguous_inputs(self) -> dict:
        return ambiguous_inputs(self.scene)

    def check_inputs(self, inputs: dict, left_out: list | None = None) -> dict:
        """Volumes per role (a checked copy each, in the node's voxel type); raises InputError naming what
        to fix. The native T1 feeds only the statistics: an unusable one is left out, with a note added
        to ``left_out`` (the worker's own note for it), instead of stopping the run."""
        missing = missing_inputs(inputs)
        # One missing sequence is left to the model to accept (modality dropout) or refuse, with its
        # own message from the background process; two missing is never enough.
        if len(missing) > 1:
            raise InputError(_("Select the {volumes} volumes first.").format(volumes=", ".join(missing)))
        volumes = {}
        for role, node in inputs.items():
            if node is None:
                continue
            try:
                volumes[role] = mrml.voxels_from_node(node, f"{MODALITY_NAMES[role]} ({node.GetName()})")
            except InputError as exc:
                if role != "t1n":
                    raise
                if left_out is not None:
                    left_out.append(f"{MODALITY_NAMES[role]} {LEFT_OUT_NOTE}: {exc}")
        return volumes

    def start_registering(self, weights_file, name: str) -> BackgroundRun:
        """Start adding a trained weights file to the worker's registry (its BRAINUNET_HOME) as ``name``, the
        new default, by ``brainunet register`` in a worker process, which checks the file (importing torch
        takes seconds: never on the application's thread). Returns the run at once, ``model_name`` set;
        raises InputError for a path that is not a file or a name that cannot be used."""
        weights_file = Path(weights_file)
        if not weights_file.is_file():
            raise InputError(_("{path} is not a file; choose a BrainUNet weights file (.pt).").format(
                path=weights_file))
        name = self.model_name(name)
        # a model of the same name is replaced: the panel asks before it starts this
        cmd = [self.python_executable, "-m", "brainunet", "register", str(weights_file), "--name", name,
               "--description", f"Added from {weights_file.name}", "--replace"]
        workdir = Path(tempfile.mkdtemp(prefix="brainunet-register-", dir=self.temp_root))
        run = BackgroundRun(None, workdir, None, {}, task="adding the model", model_name=name)
        run.launch_after(lambda stopped: None, cmd, self.worker_environment())
        return run

    def register_model_file(self, weights_file, name: str, timeout_s: float = 300) -> str:
        """``start_registering`` and wait for it (scripts, tests). Returns the name; raises InputError with
        the worker's reason."""
        run = self.start_registering(weights_file, name)
        try:
            state = run.wait(timeout_s)
        except TimeoutError:
            run.cancel()
            raise InputError(_("The model could not be added: the check did not end in {seconds} s.").format(
                seconds=f"{timeout_s:.0f}")) from None
        finally:
            run.cleanup()
        if state != "done":
            raise InputError(_("The model could not be added: {reason}").format(reason=run.error))
        return run.model_name

    @staticmethod
    def model_name(name: str) -> str:
        """``name`` as a registry name (other characters become '-'); raises InputError for an empty name
        or a bundled model's (a user's model of that name would hide the bundled one)."""
        from brainunet import weights

        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip("-.")
        if not name:
            raise InputError(_("Give the model a name (letters, digits, '-', '_' or '.')."))
        weights.check_user_model_name(name)
        return name

    def worker_environment(self) -> dict:
        """The environment of a worker process: this package importable, output unbuffered UTF-8, and the
        user's BrainUNet folder (registered models)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        # UTF-8 on every platform: on Windows a pipe would otherwise carry the ANSI code page and notes such
        # as "rotated 13.4°" would arrive garbled
        env["PYTHONIOENCODING"] = "utf-8"
        if self.user_home:
            env["BRAINUNET_HOME"] = str(self.user_home)
        return env

    # -- running ----------------------------------------------------------------------------------
    def command(self, files: dict, outputs: dict, options: RunOptions) -> list[str]:
        cmd = [self.python_executable, "-m", "brainunet", "segment", "--progress", "machine",
               "--device", options.device, "--output", str(outputs["labels"]), "--stats", str(outputs["stats"])]
        for role, path in files.items():
            cmd += [f"--{role}", str(path)]
        if options.tta:
            cmd.append("--tta")
        if options.model:
            cmd += ["--model", options.model]
        return cmd

    #: Writes one input for the worker (a Volume to a path), off the application's thread.
    write_volume = staticmethod(mrml.save_volume_nifti)

    def start(self, inputs: dict, options: RunOptions | None = None, on_progress=None, on_log=None,
              segmentation_node=None) -> BackgroundRun:
        """Check the inputs and copy them out of their nodes, then return at once: the inputs are written
        and the worker started by the run's own thread (see ``BackgroundRun.launch_after``).
        ``segmentation_node`` is the output the result is to replace: its segments are remembered, so that
        edits made to it while the worker runs are not overwritten (see ``import_results``)."""
        options = options or RunOptions()
        left_out: list[str] = []
        volumes = self.check_inputs(inputs, left_out)
        output_contents = contents_or_none(segmentation_node) if segmentation_node is not None else ()
        workdir = Path(tempfile.mkdtemp(prefix="brainunet-", dir=self.temp_root))
        # uncompressed: gzip took most of the time of writing (benchmarks/gui_thread.py)
        files = {role: workdir / f"{role}.nii" for role in volumes}
        outputs = {"labels": workdir / "labels.nii.gz", "stats": workdir / "stats.csv"}
        env = self.worker_environment()
        reference = self.reference_volume(inputs)

        def write_inputs(stopped):
            for role, volume in volumes.items():
                if stopped():
                    return
                self.write_volume(volume, files[role])

        run = BackgroundRun(None, workdir, reference, outputs, on_progress, on_log,
                            inputs={role: node for role, node in inputs.items() if node is not None},
                            options=options, output_segmentation=segmentation_node, output_contents=output_contents)
        run.notes.extend(left_out)  # kept with the worker's notes, in the table
        run.launch_after(write_inputs, self.command(files, outputs, options), env)
        return run

    @staticmethod
    def reference_volume(inputs: dict):
        """The input whose grid the result is on: T1CE, else FLAIR, else T2W (None when none is given)."""
        return next((inputs[r] for r in ("t1c", "t2f", "t2w") if inputs.get(r) is not None), None)

    @staticmethod
    def made_from_another_volume(segmentation_node, inputs: dict):
        """The volume a BrainUNet result was made from when it is not the reference of ``inputs`` (another
        patient's or another scan's result chosen as the output), else None."""
        if segmentation_node is None:
            return None
        before = segmentation_node.GetNodeReference(REFERENCE_VOLUME_REFERENCE)
        reference = BrainUNetLogic.reference_volume(inputs)
        return before if before is not None and reference is not None and before is not reference else None

    def import_results(self, run: BackgroundRun, segmentation_node=None, table_node=None):
        """Segmentation and statistics table from a finished run; returns (segmentation, table).

        The result replaces ``segmentation_node`` and ``table_node`` when given, unless that segmentation is
        the run's output and was edited while the worker ran: the edits are kept, the result goes into a
        new segmentation and table, and a note says so. A result made from another volume that still has
        the name it was given after that volume is renamed after this one, its table with it: the names
        never say one patient where the segments are another's."""
        import nibabel as nib
        import numpy as np

        from brainunet.statistics import read_csv

        if run.state != "done":
            raise BrainUNetError(run.error or _("The run has not finished (state: {state}).").format(state=run.state))
        try:
            written = nib.load(str(run.outputs["labels"]))
            labels = np.asarray(written.dataobj).astype(np.uint8)
            rows = read_csv(run.outputs["stats"])
            reference = run.reference_node
            # the scene may have changed while the worker ran: never import into a removed node, nor onto a
            # reference whose geometry is no longer the one the worker segmented
            if reference.GetScene() is not self.scene:
                raise InputError(_("The reference volume {name} was removed from the scene while BrainUNet ran; load "
                                   "it again and press Apply.").format(name=reference.GetName()))
            image = reference.GetImageData()
            if image is None or image.GetPointData().GetScalars() is None:
                raise InputError(_("The reference volume {name} lost its image data while BrainUNet ran; load the "
                                   "image again and press Apply.").format(name=reference.GetName()))
            if (labels.shape != tuple(image.GetDimensions())
                    or not np.allclose(mrml.ijk_to_ras(reference), written.affine, atol=1e-3)):
                raise InputError(_("The reference volume {name} was moved, transformed or changed while BrainUNet ran; "
                                   "press Apply again to segment it as it is now.").format(name=reference.GetName()))
            if segmentation_node is not None and segmentation_node.GetScene() is not self.scene:
                segmentation_node = None  # the chosen output was deleted during the run: a new one
            if table_node is not None and table_node.GetScene() is not self.scene:
                table_node = None
            kept = None  # the chosen output, changed during the run: left as it is
            if segmentation_node is not None and segmentation_node is run.output_segmentation:
                now = contents_or_none(segmentation_node)
                if now is None or now != run.output_contents:  # unreadable counts as changed: nothing is lost
                    kept, segmentation_node, table_node = segmentation_node, None, None
            notes = list(run.notes)
            for role, node in run.inputs.items():
                if left_out_by_worker(run.notes, role):
                    continue  # not an input of this result: its own note says why
                if node is not None and node is not reference and node.GetScene() is not self.scene:
                    notes.append(f"{MODALITY_NAMES.get(role, role)} {REMOVED_DURING_RUN_NOTE}: its intensities are "
                                 "those the run read; Update statistics keeps them while the segments are as made.")
            renamed = self._names_after(reference, segmentation_node, table_node)
            with mrml.scene_unchanged_on_error(self.scene, segmentation_node, table_node):
                seg = mrml.create_segmentation(self.scene, labels, reference, segmentation_node=segmentation_node)
                if kept is not None:
                    note = (f"\"{kept.GetName()}\" {EDITED_DURING_RUN_NOTE}: your changes are kept, and this result "
                            f"was added as a new segmentation, \"{seg.GetName()}\".")
                    notes.append(note)
                    run.notes.append(note)
                    run.kept_output = kept
                table = mrml.statistics_table(self.scene, rows, f"{renamed.get(seg, seg.GetName())} statistics",
                                              table_node, notes)
                mrml.place_beside(self.scene, table, reference)
                seg.SetNodeReferenceID(REFERENCE_VOLUME_REFERENCE, reference.GetID())
                for role in ("t1c", "t2w", "t2f", "t1n"):
                    node = run.inputs.get(role)
                    if left_out_by_worker(run.notes, role):
                        node = None  # the worker left it out: not an input of this result
                    seg.SetNodeReferenceID(INPUT_VOLUME_REFERENCE + role, node.GetID() if node is not None else None)
                provenance = self.provenance(run)
                for node in (seg, table):
                    for key, value in provenance.items():
                        node.SetAttribute(key, value)
                for node, name in renamed.items():
                    node.SetName(name)
                table.SetAttribute(SEGMENTS_DIGEST_ATTRIBUTE, segments_digest(seg))
        finally:
            run.cleanup()
        return seg, table

    @staticmethod
    def statistics_outdated(segmentation_node, table_node) -> bool:
        """Whether the segments were edited after ``table_node`` was computed from them (False when the
        table does not say what it was computed from, as in scenes saved by older versions)."""
        recorded = table_node.GetAttribute(SEGMENTS_DIGEST_ATTRIBUTE) if table_node is not None else None
        return bool(recorded) and segmentation_node is not None and recorded != segments_digest(segmentation_node)

    def _names_after(self, reference, segmentation_node, table_node) -> dict:
        """New names for a result (and its table) about to be replaced by one made from ``reference``,
        when it was made from another volume and is still named after it; {node: name}."""
        before = segmentation_node.GetNodeReference(REFERENCE_VOLUME_REFERENCE) if segmentation_node else None
        if before is None or before is reference:
            return {}
        old_name = segmentation_node.GetName()
        # only the names BrainUNet gives ("<volume> BrainUNet", "<volume> BrainUNet_1"): any other is the user's
        if not re.fullmatch(re.escape(f"{before.GetName()} BrainUNet") + r"(_\d+)?", old_name):
            return {}
        new_name = self.scene.GenerateUniqueName(f"{reference.GetName()} BrainUNet")
        renamed = {segmentation_node: new_name}
        if table_node is not None and re.fullmatch(re.escape(f"{old_name} statistics") + r"(_\d+)?",
                                                   table_node.GetName()):
            renamed[table_node] = self.scene.GenerateUniqueName(f"{new_name} statistics")
        return renamed

    @staticmethod
    def provenance(run: BackgroundRun) -> dict:
        """Attributes that say how a result was made (saved with the scene: a result opened months later
        still names its model)."""
        import brainunet

        options = run.options or RunOptions()
        return {PROVENANCE_MODEL: run.model_used or options.model or "",
                PROVENANCE_QUALITY: "test-time augmentation (8 passes)" if options.tta else "standard",
                PROVENANCE_VERSION: brainunet.__version__,
                PROVENANCE_DATE: time.strftime("%Y-%m-%d %H:%M")}

    def hide_other_results(self, segmentation_node, keep=()) -> list[str]:
        """Hide every other BrainUNet result on the same reference volume (a re-run, or another quality),
        so one result shows at a time; nothing is removed, and those in ``keep`` (a segmentation being
        corrected) stay as they are. Returns the names of those hidden."""
        reference_id = segmentation_node.GetNodeReferenceID(REFERENCE_VOLUME_REFERENCE)
        hidden = []
        for node in mrml.nodes_of_class(self.scene, "vtkMRMLSegmentationNode"):
            if not reference_id or node.GetID() == segmentation_node.GetID() or any(node is k for k in keep) \
                    or node.GetNodeReferenceID(REFERENCE_VOLUME_REFERENCE) != reference_id:
                continue
            display = node.GetDisplayNode()
            if display is not None and display.GetVisibility():
                display.SetVisibility(False)
                hidden.append(node.GetName())
        return hidden

    def update_statistics(self, segmentation_node, table_node) -> bool:
        """Compute ``table_node``'s statistics again from the segments of ``segmentation_node`` as they are
        now (after corrections); returns whether any figure changed (then a note says so). Intensities come
        from the input volumes, resampled onto the result's grid through their world coordinates as the
        worker does before it registers; a sequence the worker registered (a note says so) is left out,
        with a note, since its registration lives in the worker. Raises InputError, the table unchanged,
        when the segmentation is not a BrainUNet result or its volume was removed."""
        import numpy as np

        from brainunet import statistics
        from brainunet.preprocessing import resample_to_grid

        reference = segmentation_node.GetNodeReference(REFERENCE_VOLUME_REFERENCE)
        if reference is None or reference.GetImageData() is None:
            raise InputError(_("The statistics of \"{name}\" cannot be computed again: the volume it was segmented "
                               "on is no longer in the scene (or it is not a BrainUNet result).").format(
                                   name=segmentation_node.GetName()))
        labels = mrml.segmentation_to_labels(segmentation_node, reference)
        affine = mrml.ijk_to_ras(reference)
        old_notes = [n for n in (table_node.GetAttribute(mrml.NOTES_ATTRIBUTE) or "").split("\n") if n]
        intensities, left_out, gone = {}, [], []
        for role in ("t1c", "t2w", "t2f", "t1n"):
            node = segmentation_node.GetNodeReference(INPUT_VOLUME_REFERENCE + role)
            name = MODALITY_NAMES.get(role, role)
            if node is None or node.GetImageData() is None:
                # an input of the run since removed from the scene (a saved scene drops the reference itself)
                if (segmentation_node.GetNodeReferenceID(INPUT_VOLUME_REFERENCE + role)
                        or any(n.startswith(f"{name} {REMOVED_DURING_RUN_NOTE}") for n in old_notes)):
                    gone.append(name)
                continue
            volume = mrml.voxels_from_node(node)
            same = volume.data.shape == labels.shape and np.allclose(volume.affine, affine, atol=1e-3)
            if left_out_by_worker(old_notes, role):
                continue  # the worker could not use it (another study, a slab): neither can this
            if not same and any(n.startswith(f"{name} registered to") for n in old_notes):
                left_out.append(name)
                continue
            intensities[role] = np.asarray(resample_to_grid(volume, labels.shape, affine), np.float32)
        rows = statistics.region_statistics(labels, affine, intensities)
        table_rows = mrml.table_to_rows(table_node)
        if gone and len(rows) == len(table_rows):
            # the segments as made keep the figures of a volume removed since: compare what can be computed
            table_rows = [{k: t[k] for k in r if k in t} for r, t in zip(rows, table_rows)]
        if _same_rows(rows, table_rows):
            table_node.SetAttribute(SEGMENTS_DIGEST_ATTRIBUTE, segments_digest(segmentation_node))
            return False
        notes = [n for n in old_notes if not n.startswith(RECOMPUTED_NOTE)]
        note = f"{RECOMPUTED_NOTE} ({time.strftime('%Y-%m-%d %H:%M')})"
        if left_out:
            note += (f"; the intensities of {', '.join(left_out)} are left out (registered by the segmentation "
                     "run; run it again for them)")
        if gone:
            note += f"; the intensities of {', '.join(gone)} are left out (no longer in the scene)"
        mrml.statistics_table(self.scene, rows, table_node=table_node, notes=notes + [note + "."])
        table_node.SetAttribute(SEGMENTS_DIGEST_ATTRIBUTE, segments_digest(segmentation_node))
        return True

    def segment(self, inputs: dict, options: RunOptions | None = None, timeout: float | None = None, **kw):
        """Blocking run (scripts, tests, the self-test)."""
        run = self.start(inputs, options, **kw)
        try:
            state = run.wait(timeout)
        except BaseException:
            run.cancel()
            raise
        if state != "done":
            run.cleanup()
            raise BrainUNetError(run.error)
        return self.import_results(run)


def segments_digest(segmentation_node) -> str:
    """A short digest of ``mrml.segmentation_contents`` ("" when they cannot be read)."""
    import hashlib

    contents = contents_or_none(segmentation_node)
    return "" if contents is None else hashlib.sha1(repr(contents).encode("utf-8")).hexdigest()


def contents_or_none(segmentation_node):
    """``mrml.segmentation_contents``, or None when they cannot be read (a run then keeps the segmentation
    as it is rather than risk overwriting a change)."""
    import logging

    try:
        return mrml.segmentation_contents(segmentation_node)
    except Exception:
        logging.getLogger(__name__).exception("Could not read the segments of %s", segmentation_node.GetName())
        return None


def left_out_by_worker(notes, role: str) -> bool:
    """Whether the notes say the worker left this input out (``pipeline.leave_out``)."""
    return any(n.startswith(f"{MODALITY_NAMES.get(role, role)} {LEFT_OUT_NOTE}") for n in notes)


def _same_rows(rows: list[dict], table_rows: list[dict]) -> bool:
    """Whether statistics rows equal a table's: same columns, numbers within the 6 significant digits the
    worker's CSV keeps (NaN equals NaN), texts equal."""
    import math

    if len(rows) != len(table_rows) or any(list(a) != list(b) for a, b in zip(rows, table_rows)):
        return False

    def same(a, b) -> bool:
        try:
            a, b = float(a), float(b)
        except (TypeError, ValueError):
            return str(a) == str(b)
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)

    return all(same(a[k], b[k]) for a, b in zip(rows, table_rows) for k in a)


def launch(cmd: list[str], env: dict, cwd) -> subprocess.Popen:
    """Start the worker in its own process group (POSIX session, Windows process group) without a
    console window, so that Cancel can stop it and every process it started (``kill_tree``)."""
    kwargs = {"start_new_session": True}
    if os.name == "nt":
        kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            errors="replace", bufsize=1, env=env, cwd=str(cwd), **kwargs)


def kill_tree(process: subprocess.Popen, grace_s: float = 0.5) -> None:
    """Stop ``process`` and its children. Inside Slicer the worker is PythonSlicer, a launcher that
    starts python-real as a child and does not pass signals on: terminating the launcher alone would
    leave the network running. SIGTERM first (the worker exits cleanly, writing nothing), then SIGKILL
    for whatever is left; blocks at most ``grace_s`` plus the kill."""
    if os.name == "nt":
        try:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW, timeout=10)
            process.wait(grace_s + 5)
        except subprocess.TimeoutExpired:  # taskkill refused or stuck: leave the process rather than hang Slicer
            pass
        return
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)  # the group started by launch(): the launcher and its children
        except (ProcessLookupError, PermissionError):
            break
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:  # a launcher that cannot be signalled: leave it rather than hang the panel
        pass


def default_python() -> str:
    """PythonSlicer inside Slicer (same site-packages as the application), else this interpreter."""
    exe_dir = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = exe_dir / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which("PythonSlicer")
    return found or sys.executable
