"""The background worker as Slicer runs it: Cancel stops the whole process tree (PythonSlicer is a
launcher whose child does the work), and a broken output stream cannot leave the panel on Cancel."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from BrainUNetSegmentationLib.logic import BackgroundRun, kill_tree, launch

LAUNCHER = """
import subprocess, sys, time
# like PythonSlicer: start the real interpreter as a child and wait for it, passing no signal on
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
print("BRAINUNET_PROGRESS 0.1 started", flush=True)
child.wait()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_stops_the_launcher_and_its_child(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    pid_file = tmp_path / "child.pid"
    process = launch([sys.executable, str(script), str(pid_file)], dict(os.environ), tmp_path)
    run = BackgroundRun(process, tmp_path / "work", None, {})
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert alive(child)
    run.cancel()  # how long it holds the panel is measured in benchmarks/gui_thread.py, not here
    assert run.state == "cancelled" and process.poll() is not None
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the launcher's child kept running after Cancel"


def test_an_undecodable_output_stream_still_ends_the_run(tmp_path):
    code = "import sys; sys.stdout.buffer.write(b'BRAINUNET_PROGRESS 0.5 \\xff\\xfe bad bytes\\n'); sys.stdout.flush()"
    # strict decoding, as a worker started without launch() would be read: the reader thread meets a decode error
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, encoding="utf-8")
    run = BackgroundRun(process, tmp_path / "work", None, {})
    assert run.wait(timeout=20) in ("done", "failed")  # not stuck on "running" (the panel's Cancel button)
    assert any("could not be read" in line for line in run.log)


def test_kill_tree_on_a_finished_process_is_harmless(tmp_path):
    process = launch([sys.executable, "-c", "pass"], dict(os.environ), tmp_path)
    process.wait()
    kill_tree(process)  # its group is gone: neither a signal nor an error may come of it


# -- the application's thread only copies the inputs out of their nodes; a thread of the run writes them --

def _case_logic(scene, tmp_path, write_volume):
    from BrainUNetSegmentationLib.logic import BrainUNetLogic
    from BrainUNetSegmentationLib.scenarios import load_synthetic_case

    load_synthetic_case(scene, seed=4)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    logic.write_volume = write_volume
    logic.command = lambda files, outputs, options: [sys.executable, "-c", "pass"]  # a worker that succeeds
    return logic


def test_start_returns_before_the_inputs_are_written(scene, tmp_path):
    import threading

    from BrainUNetSegmentationLib import mrml

    release = threading.Event()

    def gated_writer(volume, path):
        release.wait(30)
        mrml.save_volume_nifti(volume, path)

    logic = _case_logic(scene, tmp_path, gated_writer)
    run = logic.start(logic.guess_inputs())
    try:
        assert list(run.workdir.iterdir()) == [] and run.process is None
        assert run.poll() == "running"
    finally:
        release.set()
    assert run.wait(60) == "done"
    written = sorted(p.name for p in run.workdir.iterdir())
    assert written == ["t1c.nii", "t1n.nii", "t2f.nii", "t2w.nii"]
    import nibabel as nib

    stored = nib.load(str(run.workdir / "t1c.nii"))
    node = scene.GetFirstNodeByName("Case_T1CE")
    assert stored.get_data_dtype() == mrml.voxels_from_node(node).data.dtype  # the node's own voxel type
    assert (stored.get_fdata() == mrml.volume_from_node(node).data).all()
    run.cleanup()


def test_cancel_while_the_inputs_are_written_leaves_nothing(scene, tmp_path):
    from BrainUNetSegmentationLib import mrml

    calls = []
    release = threading.Event()

    def slow_writer(volume, path):
        calls.append(path)
        release.wait(30)  # held until the test has pressed Cancel: Cancel lands during the first file
        mrml.save_volume_nifti(volume, path)

    logic = _case_logic(scene, tmp_path, slow_writer)
    count = scene.GetNumberOfNodes()
    run = logic.start(logic.guess_inputs())
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    run.cancel()  # during the first file
    release.set()
    run._writer.join(30)
    assert not run._writer.is_alive()
    assert run.state == "cancelled" and run.poll() == "cancelled"
    assert len(calls) == 1, "the writer went on after Cancel"
    assert run.process is None, "the worker was started after Cancel"
    assert not run.workdir.exists() and list(tmp_path.iterdir()) == []
    assert scene.GetNumberOfNodes() == count


def test_a_failed_write_fails_the_run_with_its_reason(scene, tmp_path):
    def full_disk(volume, path):
        raise OSError(28, "No space left on device")

    logic = _case_logic(scene, tmp_path, full_disk)
    run = logic.start(logic.guess_inputs())
    assert run.wait(30) == "failed"
    assert "could not start" in run.error and "No space left on device" in run.error
    assert run.process is None and not run.workdir.exists()


def test_the_inputs_are_copied_once_in_their_own_voxel_type(scene):
    import numpy as np

    import slicer
    from BrainUNetSegmentationLib import mrml
    from brainunet.errors import InputError
    from brainunet.imageio import Volume

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    node = mrml.add_volume_node(scene, Volume(data, np.diag([2.0, 2.0, 3.0, 1.0]), "int16"))
    volume = mrml.voxels_from_node(node)
    assert volume.data.dtype == np.int16 and (volume.data == data).all()
    assert not np.shares_memory(volume.data, slicer.util.arrayFromVolume(node))  # the node may change meanwhile
    assert volume.data.flags.f_contiguous  # NIfTI's order: written without another copy
    flat = mrml.add_volume_node(scene, Volume(np.full((4, 5, 6), 7, np.int16), np.eye(4), "flat"))
    with pytest.raises(InputError, match="constant"):
        mrml.voxels_from_node(flat)


def test_on_windows_the_worker_gets_no_console_window_and_its_own_process_group(monkeypatch):
    """Defect 3: Popen without CREATE_NO_WINDOW opens a console window on every run under Windows. The
    Windows branch of launch() is run here with Popen recorded (the flags exist only on Windows)."""
    import subprocess

    from BrainUNetSegmentationLib import logic

    calls = []
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200, raising=False)
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: calls.append(kw) or "process")
    monkeypatch.setattr(logic.os, "name", "nt")
    assert logic.launch(["python", "-m", "brainunet"], {}, ".") == "process"
    flags = calls[0]["creationflags"]
    assert flags & 0x08000000 and flags & 0x00000200
    assert "start_new_session" not in calls[0]


def test_the_worker_writes_utf8_whatever_the_code_page_of_its_pipe(scene, tmp_path, monkeypatch):
    """On Windows a pipe carries the ANSI code page (here cp1252 stands for it): the worker is told to write
    UTF-8, which the run decodes, so a note such as "rotated 13.4°" arrives as written."""
    from BrainUNetSegmentationLib.logic import BrainUNetLogic

    monkeypatch.setenv("PYTHONIOENCODING", "cp1252")
    env = BrainUNetLogic(scene, sys.executable, str(tmp_path)).worker_environment()
    out = subprocess.run([sys.executable, "-c", "print('rotated 13.4\u00b0 \u2192 registered')"], env=env,
                         stdout=subprocess.PIPE, check=True).stdout
    assert out.decode("utf-8").strip() == "rotated 13.4\u00b0 \u2192 registered"
