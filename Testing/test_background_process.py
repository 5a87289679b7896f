"""The background worker as Slicer runs it: Cancel stops the whole process tree (PythonSlicer is a
launcher whose child does the work), and a broken output stream cannot leave the panel on Cancel."""
import os
import subprocess
import sys
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
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 3.0  # the panel is not held up
    assert run.state == "cancelled" and process.poll() is not None
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the launcher's child kept running after Cancel"


def test_plain_terminate_would_leave_the_child_running(tmp_path):
    """Why kill_tree exists: terminating only the launcher orphans the worker (the defect it fixes)."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    pid_file = tmp_path / "child.pid"
    process = subprocess.Popen([sys.executable, str(script), str(pid_file)], stdout=subprocess.DEVNULL)
    while not pid_file.exists() or not pid_file.read_text():
        time.sleep(0.05)
    child = int(pid_file.read_text())
    process.terminate()
    process.wait()
    time.sleep(0.3)
    try:
        assert alive(child)
    finally:
        os.kill(child, 9)


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
    kill_tree(process)
    assert process.returncode == 0
