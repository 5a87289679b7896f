"""The command line end to end, in a separate process as users run it, and its bad-input messages."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, case_args
from brainunet.settings import ModelSettings

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "BrainUNetSegmentation"))


def brainunet(*args, timeout=300):
    # utf-8 whatever the locale: DICOM writers in other tests may set this process's locale to C
    return subprocess.run([sys.executable, "-m", "brainunet", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", env=ENV, timeout=timeout)


def digest(paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def test_segment_with_network_writes_all_outputs_on_t1ce_grid(tmp_path, synthetic_case, tiny_weights):
    before = digest(synthetic_case.values())
    out, seg, stats, png = tmp_path / "l.nii.gz", tmp_path / "l.seg.nrrd", tmp_path / "s.csv", tmp_path / "o.png"
    r = brainunet("segment", *case_args(synthetic_case), "--output", out, "--seg-nrrd", seg, "--stats", stats,
                  "--overlay", png, "--model", tiny_weights[0], "--device", "cpu", "--tta")
    assert r.returncode == 0, r.stderr
    assert "tiny-test" in r.stdout + r.stderr  # says which model ran
    ref = nib.load(str(synthetic_case["t1c"]))
    lab = nib.load(str(out))
    assert lab.shape == ref.shape and np.allclose(lab.affine, ref.affine)
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1, 2, 3}
    assert stats.read_text().splitlines()[0].startswith("region,name,voxels,volume_ml")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import slicerio

    s = slicerio.read_segmentation(str(seg))
    assert [x["name"] for x in s["segments"]] == ["Enhancing tumour", "Necrotic / non-enhancing tumour core",
                                                  "Surrounding FLAIR hyperintensity"]
    assert [x["labelValue"] for x in s["segments"]] == [3, 1, 2]
    assert s["segments"][1]["terminology"]["type"] == ["SCT", "6574001", "Necrosis"]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert np.allclose(lps_to_ras @ s["ijkToLPS"], ref.affine, atol=1e-4)
    assert np.array_equal(s["voxels"], np.asarray(lab.dataobj))
    assert digest(synthetic_case.values()) == before  # inputs untouched


def test_segment_to_seg_nrrd_only(tmp_path, synthetic_case):
    r = brainunet("segment", *case_args(synthetic_case), "--output", tmp_path / "x.seg.nrrd", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.seg.nrrd").exists()


def test_machine_progress_protocol(tmp_path, synthetic_case):
    r = brainunet("segment", *case_args(synthetic_case), "--output", tmp_path / "x.nii.gz", "--progress", "machine")
    assert r.returncode == 0
    fractions = [float(l.split()[1]) for l in r.stdout.splitlines() if l.startswith("BRAINUNET_PROGRESS") and float(l.split()[1]) >= 0]
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any(l.startswith("BRAINUNET_RESULT") for l in r.stdout.splitlines())


def test_batch_reads_brats2021_and_2023_layouts(tmp_path):
    from brainunet import synthetic

    data = tmp_path / "data"
    synthetic.write_case(data / "BraTS-GLI-00001-000", "BraTS-GLI-00001-000", seed=1, shape=(40, 48, 36))
    c21 = data / "BraTS2021_00001"
    p = synthetic.write_case(c21, "tmp", seed=2, shape=(40, 48, 36))
    for key, new in (("t1c", "t1ce"), ("t2w", "t2"), ("t2f", "flair"), ("t1n", "t1"), ("seg", "seg")):
        p[key].rename(c21 / f"BraTS2021_00001_{new}.nii.gz")
    (data / "notes").mkdir()  # a folder without images is no case: reported and passed over
    (data / "partial").mkdir()  # a case with its FLAIR only: a case that fails, with the reason
    import shutil
    shutil.copy(c21 / "BraTS2021_00001_flair.nii.gz", data / "partial" / "partial_flair.nii.gz")
    r = brainunet("batch", data, "--output-dir", tmp_path / "out", "--progress", "none")
    assert (tmp_path / "out" / "BraTS-GLI-00001-000-seg.nii.gz").exists()
    assert (tmp_path / "out" / "BraTS2021_00001-seg.nii.gz").exists()
    assert (tmp_path / "out" / "BraTS2021_00001-stats.csv").exists()
    assert "Skipped, no images" in r.stderr and "inside: notes" in r.stderr
    assert "partial: failed, nothing written" in r.stderr and "Missing input" in r.stderr
    assert r.returncode == 1  # one case could not be done


def _two_cases(data):
    from brainunet import synthetic

    for seed, name in enumerate(("case-a", "case-b"), start=1):
        synthetic.write_case(data / name, name, seed=seed, shape=(40, 48, 36))


def _main_in_process(argv):
    """cli.main in this process (to reach inside it), its SIGTERM handler put back afterwards."""
    import signal

    from brainunet import cli

    before = signal.getsignal(signal.SIGTERM)
    try:
        return cli.main([str(a) for a in argv])
    finally:
        signal.signal(signal.SIGTERM, before)


def test_batch_goes_on_after_an_unexpected_error_in_one_case(tmp_path, tiny_weights, monkeypatch, capsys):
    """Any exception in one case (here a RuntimeError as torch raises one) fails that case only: the next is
    segmented, the summary is printed and the exit status says that a case failed."""
    from brainunet import pipeline

    data, out = tmp_path / "data", tmp_path / "out"
    _two_cases(data)
    real_run = pipeline.run

    def run_failing_on_case_a(paths, output, *args, **kwargs):
        if Path(output).name.startswith("case-a"):
            raise RuntimeError("CUDA out of memory")
        return real_run(paths, output, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run", run_failing_on_case_a)
    code = _main_in_process(["batch", data, "--output-dir", out, "--model", tiny_weights[0], "--device", "cpu",
                             "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 1
    assert "case-a: failed, nothing written: RuntimeError: CUDA out of memory" in captured.err
    assert not (out / "case-a-seg.nii.gz").exists() and (out / "case-b-seg.nii.gz").exists()
    assert "1 of 2 cases segmented" in captured.out and "1 failed" in captured.out


def test_an_unexpected_error_in_segment_ends_with_one_error_line_and_leaves_no_output(tmp_path, synthetic_case,
                                                                                      tiny_weights, monkeypatch, capsys):
    """A bug deep inside (here the network raising as torch does): the traceback for a report, then one "error:"
    line (the line the Slicer panel shows), exit 1, and no file in the output folder."""
    from brainunet import inference

    def failing(*args, **kwargs):
        raise ValueError("Expected more than 1 spatial element when training")

    monkeypatch.setattr(inference, "predict_probabilities", failing)
    out = tmp_path / "out"
    code = _main_in_process(["segment", "--t1c", synthetic_case["t1c"], "--t2w", synthetic_case["t2w"], "--t2f",
                             synthetic_case["t2f"], "--output", out / "labels.nii.gz", "--model", tiny_weights[0],
                             "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "in failing" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: BrainUNet stopped on an unexpected error (ValueError: Expected more than 1")
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [last]
    assert not out.exists() or list(out.iterdir()) == []


def test_ctrl_c_while_the_outputs_are_moved_into_place_says_they_were_written(tmp_path, synthetic_case, tiny_weights,
                                                                               monkeypatch, capsys):
    """Ctrl-C is held while the outputs are moved into place (all or none): once they are, the message says they
    were written rather than "nothing was written"."""
    import os
    import signal

    from brainunet import outputs

    real_replace, moved = os.replace, []

    def replace_then_interrupt(source, target):
        real_replace(source, target)
        moved.append(target)
        if len(moved) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(outputs.os, "replace", replace_then_interrupt)
    out = tmp_path / "out"
    code = _main_in_process(["segment", "--t1c", synthetic_case["t1c"], "--t2w", synthetic_case["t2w"], "--t2f",
                             synthetic_case["t2f"], "--output", out / "labels.nii.gz", "--stats", out / "stats.csv",
                             "--model", tiny_weights[0], "--device", "cpu", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 130 and len(moved) == 2
    assert (out / "labels.nii.gz").exists() and (out / "stats.csv").exists()
    assert "nothing was written" not in err
    assert f"error: stopped once its outputs were written: {out / 'labels.nii.gz'}, {out / 'stats.csv'}" in err


def test_batch_takes_sequences_named_as_a_scanner_names_them_and_fails_a_folder_without_any(tmp_path, tiny_weights,
                                                                                            capsys):
    """A case exported with the scanner's names is segmented (the rules of segment --study, each choice
    printed); a folder of images none of which is T1CE, T2W or FLAIR is a case that fails, its images listed,
    and the summary names every failed case."""
    import shutil

    data, out = tmp_path / "data", tmp_path / "out"
    _two_cases(data)
    scanner = data / "case-b"
    for old, new in (("t1c", "t1_post_gd"), ("t2w", "t2_tse_ax"), ("t2f", "flair_ax"), ("t1n", "t1_pre")):
        (scanner / f"case-b-{old}.nii.gz").rename(scanner / f"{new}.nii.gz")
    (data / "t1-only").mkdir()
    shutil.copy(scanner / "t1_pre.nii.gz", data / "t1-only" / "t1-only-t1n.nii.gz")
    (data / "unnamed").mkdir()
    for i in (1, 2):
        shutil.copy(scanner / "flair_ax.nii.gz", data / "unnamed" / f"scan{i}.nii.gz")
    code = _main_in_process(["batch", data, "--output-dir", out, "--model", tiny_weights[0], "--device", "cpu",
                             "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert (out / "case-a-seg.nii.gz").exists() and (out / "case-b-seg.nii.gz").exists()
    assert "case-b: Study: T1CE: " in captured.err and "t1_post_gd.nii.gz" in captured.err
    assert "case-b: Study: FLAIR: " in captured.err and "flair_ax.nii.gz" in captured.err
    assert "t1-only: failed, nothing written: no T1CE, T2W or FLAIR" in captured.err
    assert "t1-only-t1n.nii.gz (T1)" in captured.err
    assert "unnamed: failed, nothing written: no T1CE, T2W or FLAIR" in captured.err
    assert "scan1.nii.gz, scan2.nii.gz" in captured.err
    assert "2 of 4 cases segmented" in captured.out and "2 failed: t1-only, unnamed" in captured.out
    assert not (out / "t1-only-seg.nii.gz").exists() and not (out / "unnamed-seg.nii.gz").exists()


def test_batch_fails_a_case_with_two_images_named_as_one_sequence_and_completes_brats_names_by_scanner_names(
        tmp_path, tiny_weights, capsys):
    """Two files named as T1CE: which one is meant is not for the name order to decide, so the case fails naming
    both. BraTS names without a T2W beside a scanner-named T2 ("AX T2 TSE"): the T2 is taken, with a note,
    rather than segmenting without it."""
    import shutil

    data, out = tmp_path / "data", tmp_path / "out"
    _two_cases(data)
    shutil.copy(data / "case-a" / "case-a-t2w.nii.gz", data / "case-a" / "case-a_t1ce.nii.gz")  # a second "T1CE"
    (data / "case-b" / "case-b-t2w.nii.gz").rename(data / "case-b" / "AX T2 TSE.nii.gz")
    code = _main_in_process(["batch", data, "--output-dir", out, "--model", tiny_weights[0], "--device", "cpu",
                             "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "case-a: failed, nothing written: 2 images are named as T1CE: case-a-t1c.nii.gz, case-a_t1ce.nii.gz" \
        in captured.err
    assert not (out / "case-a-seg.nii.gz").exists() and (out / "case-b-seg.nii.gz").exists()
    assert "case-b: Study: T2W: " in captured.err and "AX T2 TSE.nii.gz" in captured.err
    assert "T2W missing" not in captured.err
    assert "1 of 2 cases segmented" in captured.out and "1 failed: case-a" in captured.out


def test_a_case_folder_is_one_with_images_at_any_depth_or_behind_a_link(tmp_path):
    from brainunet.cli import _holds_images

    (tmp_path / "bids" / "anat").mkdir(parents=True)
    (tmp_path / "bids" / "anat" / "sub-01_T2w.nii.gz").write_bytes(b"x")
    (tmp_path / "labels-only").mkdir()
    (tmp_path / "labels-only" / "case_seg.nii.gz").write_bytes(b"x")
    (tmp_path / "labels-only" / "case-seg.seg.nrrd").write_bytes(b"x")
    (tmp_path / "archive" / "series").mkdir(parents=True)
    (tmp_path / "archive" / "series" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "series").symlink_to(tmp_path / "archive" / "series")
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "up").symlink_to(tmp_path / "loop")
    (tmp_path / "loop" / "notes.txt").write_text("no image")
    assert _holds_images(tmp_path / "bids") and _holds_images(tmp_path / "linked")
    assert not _holds_images(tmp_path / "labels-only") and not _holds_images(tmp_path / "loop")


def test_batch_passes_over_folders_without_images_and_a_cancel_says_what_was_written(tmp_path, tiny_weights,
                                                                                        monkeypatch, capsys):
    from brainunet import pipeline
    from brainunet.errors import Cancelled

    data, out = tmp_path / "data", tmp_path / "out"
    _two_cases(data)
    (data / "__MACOSX").mkdir()
    (data / "__MACOSX" / "._case-a").write_bytes(b"resource fork")
    (data / "notes").mkdir()
    (data / "old-results").mkdir()  # an earlier batch's output folder: labels, no sequences
    (data / "old-results" / "case-a-seg.nii.gz").write_bytes((data / "case-a" / "case-a-seg.nii.gz").read_bytes())
    code = _main_in_process(["batch", data, "--output-dir", out, "--model", tiny_weights[0], "--device", "cpu",
                             "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "inside: __MACOSX, notes, old-results" in captured.err and "Skipped, no images" in captured.err
    assert "2 of 2 cases segmented" in captured.out

    real_run = pipeline.run

    def cancelled_during_case_b(paths, output, *args, **kwargs):
        if Path(output).name.startswith("case-b"):
            raise Cancelled()
        return real_run(paths, output, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run", cancelled_during_case_b)
    again = tmp_path / "again"
    code = _main_in_process(["batch", data, "--output-dir", again, "--model", tiny_weights[0], "--device", "cpu",
                             "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 130
    assert "Cancelled during case-b; 1 of 2 cases are segmented" in err and "case-b was not written" in err
    assert "--skip-existing" in err
    assert (again / "case-a-seg.nii.gz").exists() and not (again / "case-b-seg.nii.gz").exists()


def test_batch_skip_existing_resumes_an_interrupted_batch(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _two_cases(data)
    out.mkdir()
    (out / "case-a-seg.nii.gz").write_bytes(b"from the interrupted run")
    (out / "case-a-stats.csv").write_text("region,name\n")
    r = brainunet("batch", data, "--output-dir", out, "--skip-existing", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert f"case-a: skipped, {out / 'case-a-seg.nii.gz'} and its statistics already exist" in r.stderr
    assert (out / "case-a-seg.nii.gz").read_bytes() == b"from the interrupted run"  # left as it was
    assert (out / "case-a-stats.csv").read_text() == "region,name\n" and (out / "case-b-seg.nii.gz").exists()
    assert "1 of 2 cases segmented" in r.stdout and "1 skipped" in r.stdout
    # a case cut short between its two files (killed, the power gone): segmented again, its own labels replaced
    (out / "case-b-stats.csv").unlink()
    r = brainunet("batch", data, "--output-dir", out, "--skip-existing", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "case-b: skipped" not in r.stderr and (out / "case-b-stats.csv").is_file()
    assert "1 of 2 cases segmented" in r.stdout and "1 skipped" in r.stdout
    # without the option every case is segmented again: its own result replaced, a file it did not write kept
    own = (out / "case-b-seg.nii.gz").stat().st_mtime_ns
    r = brainunet("batch", data, "--output-dir", out, "--progress", "none")
    assert r.returncode == 1 and "1 of 2 cases segmented" in r.stdout
    assert f"{out / 'case-a-seg.nii.gz'} exists and is not an unchanged BrainUNet result" in r.stderr
    assert (out / "case-a-seg.nii.gz").read_bytes() == b"from the interrupted run"
    assert (out / "case-b-seg.nii.gz").stat().st_mtime_ns != own


def test_batch_refuses_case_folders_whose_names_differ_only_in_case(tmp_path):
    """Case1 and case1 side by side (a Linux disk) would write one result over the other on a Windows, macOS
    or USB disk: refused before any case, naming them."""
    from brainunet import synthetic

    data = tmp_path / "data"
    synthetic.write_case(data / "Case1", "Case1", seed=1, shape=(40, 48, 36))
    if (data / "case1").exists():
        pytest.skip("this file system ignores case")
    synthetic.write_case(data / "case1", "case1", seed=2, shape=(40, 48, 36))
    r = brainunet("batch", data, "--progress", "none")
    assert r.returncode == 2 and "Case1 and case1 differ only in upper and lower case" in r.stderr
    assert not (data / "brainunet").exists()


def test_demo_passes_precision_and_threads_to_segment(tmp_path, monkeypatch):
    from brainunet import cli

    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    args = cli.build_parser().parse_args(["demo", "--output-dir", str(tmp_path), "--precision", "fp32",
                                          "--threads", "2", "--progress", "none"])
    assert cli.cmd_demo(args) == 0
    (argv,) = seen
    assert argv[0] == "segment"
    assert argv[argv.index("--precision") + 1] == "fp32" and argv[argv.index("--threads") + 1] == "2"


def test_demo_segments_the_phantom_with_the_bundled_model(tmp_path):
    """What `make demo` runs: the bundled network (not the tests' baseline) finds the phantom's tumour."""
    from brainunet import weights
    from brainunet.statistics import dice

    env = {k: v for k, v in ENV.items() if k != "BRAINUNET_MODEL"}
    r = subprocess.run([sys.executable, "-m", "brainunet", "demo", "--output-dir", str(tmp_path / "out"),
                        "--progress", "none"], capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("demo-seg.nii.gz", "demo.seg.nrrd", "demo-stats.csv", "demo-overlay.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert f"Model: {weights.load_registry(weights.REGISTRY_PATH)[0].name}" in r.stdout + r.stderr
    truth = np.asarray(nib.load(str(next((tmp_path / "out" / "demo_case").glob("*-seg.nii.gz")))).dataobj)
    found = np.asarray(nib.load(str(tmp_path / "out" / "demo-seg.nii.gz")).dataobj)
    assert dice(found > 0, truth > 0) >= 0.8  # 0.97 with brainunet-2mm-real-v2


def test_models_lists_registry():
    r = brainunet("models")
    assert r.returncode == 0 and "intensity-baseline" in r.stdout
    from brainunet import weights

    bundled = weights.load_registry(weights.REGISTRY_PATH)[0]
    assert bundled.extra.get("settings")  # the bundled model carries the post-processing CV chose
    for key, value in bundled.extra["settings"].items():  # ... and `models` shows it
        assert f"{key}={value}" in r.stdout


# ---- bad input: one clear line, exit status != 0, nothing written, inputs unchanged ------------------------

def _bad(tmp_path, synthetic_case, **replace):
    files = {k: synthetic_case[k] for k in ("t1c", "t2w", "t2f")}
    files.update(replace)
    out = tmp_path / "out" / "labels.nii.gz"
    args = []
    for k, v in files.items():
        args += [f"--{k}", v]
    before = digest([v for v in files.values() if Path(v).is_file()])
    r = brainunet("segment", *args, "--output", out, "--progress", "none")
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert digest(before.keys()) == before
    return lines[0]


def _save(tmp_path, name, data, affine=None):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(p))
    return p


def test_missing_modality_file(tmp_path, synthetic_case):
    assert "FLAIR: file not found" in _bad(tmp_path, synthetic_case, t2f=tmp_path / "nope.nii.gz")


def test_2d_image(tmp_path, synthetic_case):
    p = _save(tmp_path, "2d.nii.gz", np.random.rand(64, 64).astype(np.float32))
    assert "2D image" in _bad(tmp_path, synthetic_case, t2w=p)


def test_single_slice_volume_is_2d(tmp_path, synthetic_case):
    p = _save(tmp_path, "slice.nii.gz", np.random.rand(64, 64, 1).astype(np.float32))
    assert "2D image" in _bad(tmp_path, synthetic_case, t2w=p)


def test_4d_image(tmp_path, synthetic_case):
    p = _save(tmp_path, "4d.nii.gz", np.random.rand(20, 20, 20, 3).astype(np.float32))
    assert "4D image with 3 volumes" in _bad(tmp_path, synthetic_case, t2f=p)


def test_nan_and_inf_voxels(tmp_path, synthetic_case):
    img = nib.load(str(synthetic_case["t2w"]))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[10, 10, 10] = np.nan
    data[11, 10, 10] = np.inf
    p = _save(tmp_path, "nan.nii.gz", data, img.affine)
    assert "2 NaN or infinite voxels" in _bad(tmp_path, synthetic_case, t2w=p)


@pytest.mark.parametrize("data, affine, message", [
    (np.zeros((0, 64, 64), np.float32), np.eye(4), "is empty (no voxels)"),
    (np.random.rand(8, 8, 8, 2, 2).astype(np.float32), np.eye(4), "has 5 dimensions"),
    (np.random.rand(8, 8, 8) + 1j, np.eye(4), "voxel type complex128"),
    (np.array([[[0.0, 1e39]] * 2] * 2), np.eye(4), "beyond the float32 range"),
    (np.random.rand(8, 8, 8), np.diag([1.0, 1.0, 0.0, 1.0]), "invalid voxel-to-world matrix"),
    (np.random.rand(8, 8, 8), np.full((4, 4), np.nan), "invalid voxel-to-world matrix"),
    (np.random.rand(8, 8, 8), np.diag([0.016, 0.016, 0.016, 1.0]), "voxels are 0.016 x 0.016 x 0.016 mm"),
    (np.random.rand(8, 8, 8), np.diag([1.0, 1.0, 32.0, 1.0]), "voxels are 1 x 1 x 32 mm"),
    (np.random.rand(160, 8, 8), np.diag([8.0, 1.0, 1.0, 1.0]), "a field of view of 1280 x 8 x 8 mm"),
], ids=["empty", "5d", "complex", "beyond-float32", "zero-spacing", "nan-matrix", "spacing-in-metres",
        "slices-too-thick", "field-of-view-too-large"])
def test_volumes_that_cannot_be_images_are_refused(data, affine, message):
    from brainunet.errors import InputError
    from brainunet.imageio import check_volume

    with pytest.raises(InputError, match=re.escape(message)):
        check_volume(data, affine, "T2W")


def test_a_header_with_a_wrong_spacing_is_refused_before_anything_runs(tmp_path, synthetic_case):
    """Spacing in the wrong unit (metres for mm) would resample the brain to a few voxels and fail deep in the
    network, or to billions and run out of memory: refused with the reason, exit 2, nothing written."""
    img = nib.load(str(synthetic_case["t2f"]))
    affine = img.affine.copy()
    affine[:3, :3] *= 0.001
    p = _save(tmp_path, "metres.nii.gz", np.asarray(img.dataobj), affine)
    message = _bad(tmp_path, synthetic_case, t2f=p)
    assert "header's spacing is wrong" in message and "Traceback" not in message


def test_a_4d_file_of_one_frame_is_read_as_its_3d_volume(tmp_path, synthetic_case):
    img = nib.load(str(synthetic_case["t2w"]))
    one_frame = _save(tmp_path, "t2w-4d.nii.gz", np.asarray(img.dataobj)[..., None], img.affine)
    out = tmp_path / "labels.nii.gz"
    r = brainunet("segment", "--t1c", synthetic_case["t1c"], "--t2w", one_frame, "--t2f", synthetic_case["t2f"],
                  "--output", out, "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert nib.load(str(out)).shape == nib.load(str(synthetic_case["t1c"])).shape


def test_an_rgb_image_is_refused(tmp_path, synthetic_case):
    rgb = np.zeros((30, 30, 30), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p = _save(tmp_path, "rgb.nii.gz", rgb)
    assert "real-valued scalar image" in _bad(tmp_path, synthetic_case, t2w=p)


def test_constant_image(tmp_path, synthetic_case):
    p = _save(tmp_path, "const.nii.gz", np.full((30, 30, 30), 7, np.int16))
    assert "constant" in _bad(tmp_path, synthetic_case, t1c=p)


def test_grids_that_do_not_overlap(tmp_path, synthetic_case):
    img = nib.load(str(synthetic_case["t2f"]))
    far = img.affine.copy()
    far[:3, 3] += 1000.0
    p = _save(tmp_path, "far.nii.gz", np.asarray(img.dataobj), far)
    assert "does not overlap" in _bad(tmp_path, synthetic_case, t2f=p)


def test_corrupt_and_truncated_nifti(tmp_path, synthetic_case):
    data = Path(synthetic_case["t2w"]).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert "cannot be read" in _bad(tmp_path, synthetic_case, t2w=cut)
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"this is not an image" * 10)
    assert "cannot be read" in _bad(tmp_path, synthetic_case, t2w=junk)


def test_folder_given_instead_of_file(tmp_path, synthetic_case):
    assert "is a folder" in _bad(tmp_path, synthetic_case, t1c=tmp_path)


def test_unwritable_output_path(tmp_path, synthetic_case):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = brainunet("segment", *case_args(synthetic_case), "--output", blocker / "labels.nii.gz", "--progress", "none")
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr
    r = brainunet("segment", *case_args(synthetic_case), "--output", "/proc/brainunet/labels.nii.gz", "--progress", "none")
    assert r.returncode == 2 and "error: " in r.stderr and "Traceback" not in r.stderr


def test_output_must_not_overwrite_an_input(tmp_path, synthetic_case):
    before = digest([synthetic_case["t2w"]])
    r = brainunet("segment", *case_args(synthetic_case), "--output", synthetic_case["t2w"], "--progress", "none")
    assert r.returncode == 2 and "one of the input images" in r.stderr
    assert digest([synthetic_case["t2w"]]) == before


def test_wrong_output_extension(tmp_path, synthetic_case):
    r = brainunet("segment", *case_args(synthetic_case), "--output", tmp_path / "x.png", "--progress", "none")
    assert r.returncode == 2 and ".seg.nrrd" in r.stderr


def test_missing_weights_file(tmp_path, synthetic_case):
    r = brainunet("segment", *case_args(synthetic_case), "--output", tmp_path / "x.nii.gz", "--model",
                  tmp_path / "missing.pt", "--progress", "none")
    assert r.returncode == 3 and "error: Weights file not found" in r.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_cancel_by_sigterm_leaves_no_output(tmp_path, synthetic_case, tiny_weights):
    import signal

    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "x.nii.gz"
    p = subprocess.Popen([sys.executable, "-m", "brainunet", "segment", *case_args(synthetic_case), "--output",
                          str(out), "--model", str(tiny_weights[0]), "--tta", "--progress", "machine"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", env=ENV)
    for line in p.stdout:  # wait until inference runs
        if "Inference" in line:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Cancelled" in err
    assert list((tmp_path / "out").iterdir()) == []  # no output, and no hidden temporary file either


def test_missing_sequence_is_refused_by_a_model_without_modality_dropout(tmp_path, synthetic_case):
    out = tmp_path / "labels.nii.gz"
    r = brainunet("segment", "--t1c", synthetic_case["t1c"], "--t2f", synthetic_case["t2f"], "--output", out,
                  "--progress", "none")
    assert r.returncode == 2 and "Missing input: T2W" in r.stderr and not out.exists()
    r = brainunet("segment", "--t1c", synthetic_case["t1c"], "--output", out, "--progress", "none")
    assert r.returncode == 2 and "T2W, FLAIR" in r.stderr


def test_model_trained_with_modality_dropout_segments_without_t1ce(tmp_path, synthetic_case):
    """Without T1CE the output lives on the FLAIR grid and the run says what was missing."""
    import torch

    from brainunet import weights
    from brainunet.network import BrainUNet, NetworkConfig

    torch.manual_seed(0)
    path = tmp_path / "dropout.pt"
    weights.save_weights(path, BrainUNet(NetworkConfig(features=(4, 8))), "dropout-test",
                         ModelSettings.from_flat({"spacing_mm": [2, 2, 2], "patch_size": [32, 32, 32], "modality_dropout": True}))
    out = tmp_path / "labels.nii.gz"
    r = brainunet("segment", "--t2w", synthetic_case["t2w"], "--t2f", synthetic_case["t2f"], "--output", out,
                  "--model", path, "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "T1CE missing" in r.stderr and "read the whole tumour (WT) only" in r.stderr
    flair = nib.load(str(synthetic_case["t2f"]))
    result = nib.load(str(out))
    assert result.shape == flair.shape and np.allclose(result.affine, flair.affine, atol=1e-4)


def test_register_rejects_bad_names_and_settings(tmp_path, tiny_weights):
    r = brainunet("register", tiny_weights[0], "--name", "../evil")
    assert r.returncode == 2 and "may hold only" in r.stderr
    r = brainunet("register", tiny_weights[0], "--name", "ok", "--set", "novalue")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    r = brainunet("register", tmp_path / "missing.pt", "--name", "ok")
    assert r.returncode == 3 and "not found" in r.stderr


def test_register_keeps_the_bundled_models_and_asks_before_replacing_one_of_the_users(tmp_path, tiny_weights,
                                                                                       synthetic_case):
    from brainunet import weights

    home = tmp_path / "home"
    env = {**ENV, "BRAINUNET_HOME": str(home)}

    def register(*args):
        return subprocess.run([sys.executable, "-m", "brainunet", "register", tiny_weights[0], *map(str, args)],
                              capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)

    bundled = weights.load_registry(weights.REGISTRY_PATH)[0].name
    for name in (bundled, "intensity-baseline"):  # a user's model of that name would hide the one shipped
        r = register("--name", name)
        assert r.returncode == 2 and "comes with BrainUNet" in r.stderr and not home.exists()
    assert register("--name", "ours", "--description", "first").returncode == 0
    r = register("--name", "ours", "--description", "second")
    assert r.returncode == 2 and "already registered" in r.stderr and "--replace" in r.stderr
    registry = home / "models" / "registry.json"
    assert weights.load_registry(registry)[0].description == "first"
    assert register("--name", "ours", "--description", "second", "--replace").returncode == 0
    assert [(e.name, e.description) for e in weights.load_registry(registry)] == [("ours", "second")]
    (home / "models" / "ours.pt").unlink()  # moved away after it was registered
    r = subprocess.run([sys.executable, "-m", "brainunet", "segment", *case_args(synthetic_case), "--output",
                        tmp_path / "y.nii.gz", "--model", "ours"],
                       capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    assert r.returncode == 3 and "register FILE --name ours --replace" in r.stderr and "Reinstall" not in r.stderr


def test_batch_default_folder_seg_nrrd_format_and_its_refusals(tmp_path):
    """Without --output-dir the results go to DIR/brainunet, which a second run does not take for a case;
    --format seg.nrrd writes Slicer segmentations; a bad folder (or one that cannot be written) is exit 2 and
    missing weights exit 3."""
    import slicerio

    data = tmp_path / "data"
    _two_cases(data)
    for attempt in range(2):
        r = brainunet("batch", data, "--format", "seg.nrrd", "--model", "intensity-baseline", "--progress", "none")
        assert r.returncode == 0, r.stderr
        assert "2 of 2 cases segmented" in r.stdout and "brainunet" not in r.stderr.split("Model:")[0]
    seg = slicerio.read_segmentation(str(data / "brainunet" / "case-a-seg.seg.nrrd"))
    assert [s["labelValue"] for s in seg["segments"]] == [3, 1, 2]
    assert (data / "brainunet" / "case-b-stats.csv").exists()
    assert brainunet("batch", tmp_path / "nothing-here").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    r = brainunet("batch", empty)
    assert r.returncode == 2 and "No case folders" in r.stderr
    r = brainunet("batch", data, "--output-dir", tmp_path / "w", "--model", tmp_path / "missing.pt")
    assert r.returncode == 3 and not (tmp_path / "w").exists()
    r = brainunet("batch", data, "--output-dir", "/proc/brainunet", "--model", "intensity-baseline")
    assert r.returncode == 2 and "/proc/brainunet cannot be written" in r.stderr and "case-a" not in r.stderr


def test_a_result_without_tumour_writes_every_output_and_imports_as_empty_segments(tmp_path, synthetic_case, scene):
    import torch

    from BrainUNetSegmentationLib import mrml
    from brainunet import weights
    from brainunet.network import BrainUNet, NetworkConfig
    from brainunet.settings import ModelSettings
    from brainunet.statistics import read_csv

    torch.manual_seed(0)
    finds_nothing = tmp_path / "nothing.pt"  # P(tumour) never reaches 1: no voxel is tumour
    weights.save_weights(finds_nothing, BrainUNet(NetworkConfig(features=(4, 8), blocks_per_level=1)), "nothing",
                         ModelSettings.from_flat({"spacing_mm": [2, 2, 2], "patch_size": [32, 32, 32],
                                                  "tumour_threshold": 1.0}))
    out = tmp_path / "out"
    r = brainunet("segment", *case_args(synthetic_case), "--output", out / "l.nii.gz", "--seg-nrrd",
                  out / "l.seg.nrrd", "--stats", out / "s.csv", "--overlay", out / "o.png", "--model", finds_nothing,
                  "--device", "cpu", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "WT 0.0 mL" in r.stdout
    labels = nib.load(str(out / "l.nii.gz"))
    assert not np.asarray(labels.dataobj).any()
    rows = {row["region"]: row for row in read_csv(out / "s.csv")}
    assert set(rows) == {"ET", "NETC", "SNFH", "TC", "WT"} and float(rows["WT"]["volume_ml"]) == 0.0
    assert (out / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    node = mrml.load_volume_file(scene, synthetic_case["t1c"], "T1CE")
    seg = mrml.create_segmentation(scene, np.asarray(labels.dataobj).astype(np.uint8), node)
    assert seg.GetSegmentation().GetNumberOfSegments() == 3
    assert not mrml.segmentation_to_labels(seg, node).any()
    table = mrml.statistics_table(scene, read_csv(out / "s.csv"))
    assert [row["region"] for row in mrml.table_to_rows(table)] == ["ET", "NETC", "SNFH", "TC", "WT"]
