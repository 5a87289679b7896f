"""Outputs never lose anything: inputs are never overwritten (links included), colliding outputs and
non-regular files are refused, a write error or a cancel leaves no partial set and no temporary file,
a refused run creates no folder, and the command line says what it needs and how it exits."""
import errno
import os

import numpy as np
import pytest

from conftest import case_args

from brainunet import cli, pipeline
from brainunet.errors import Cancelled


def run(*args):
    return cli.main([*map(str, args), "--progress", "none"])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_hard_or_symbolic_link_to_an_input_is_refused_and_the_input_kept(tmp_path, synthetic_case, capsys):
    before = synthetic_case["t1c"].read_bytes()
    hard = tmp_path / "labels.nii.gz"
    os.link(synthetic_case["t1c"], hard)
    assert run("segment", *case_args(synthetic_case), "--output", hard) == 2
    soft = tmp_path / "soft.nii.gz"
    soft.symlink_to(synthetic_case["t2w"])
    assert run("segment", *case_args(synthetic_case), "--output", tmp_path / "ok.nii.gz", "--stats", soft) == 2
    assert capsys.readouterr().err.count("one of the input images") == 2
    assert synthetic_case["t1c"].read_bytes() == before and hard.read_bytes() == before
    assert not (tmp_path / "ok.nii.gz").exists()


def test_outputs_that_are_the_same_file_or_not_regular_files_are_refused(tmp_path, synthetic_case, capsys):
    out = tmp_path / "x.nii.gz"
    assert run("segment", *case_args(synthetic_case), "--output", out, "--seg-nrrd", tmp_path / "a.seg.nrrd",
               "--stats", tmp_path / "same.png", "--overlay", tmp_path / "." / "same.png") == 2
    assert "same file" in capsys.readouterr().err
    assert run("segment", *case_args(synthetic_case), "--output", out, "--stats", "/dev/full") == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option,name,message", [("--overlay", "view", "ending in .png"),
                                                 ("--overlay", "view.txt", "ending in .png"),
                                                 ("--seg-nrrd", "copy.nii.gz", "must end in .seg.nrrd")])
def test_an_output_of_the_wrong_kind_is_refused_before_any_work(tmp_path, synthetic_case, capsys, option, name,
                                                                message):
    out = tmp_path / "out"
    assert run("segment", *case_args(synthetic_case), "--output", out / "x.nii.gz", "--stats", out / "x.csv",
               option, out / name) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_write_error_gives_exit_2_and_leaves_the_previous_outputs_as_they_were(tmp_path, synthetic_case, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "out"
    args = ["segment", *case_args(synthetic_case), "--output", out / "x.nii.gz", "--stats", out / "x.csv",
            "--overlay", out / "x.png"]
    assert run(*args) == 0
    before = snapshot(out)

    def disk_full(result, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_overlay_png", disk_full)
    capsys.readouterr()
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Nothing was written" in err and "Traceback" not in err
    assert snapshot(out) == before  # the earlier run's files, untouched; no temporary file left
    fresh = tmp_path / "new" / "deeper"
    assert run("segment", *case_args(synthetic_case), "--output", fresh / "x.nii.gz", "--overlay", fresh / "x.png") == 2
    assert not (tmp_path / "new").exists()  # the folders it made for the failed set are gone too


def test_a_move_into_place_that_fails_halfway_leaves_the_previous_set_whole(tmp_path):
    """The labels moved in, then the statistics' move fails: the new labels are taken back and the old
    ones restored, so the folder holds the previous set, whole, and no temporary file."""
    from brainunet.outputs import OutputError, OutputSet

    out = tmp_path / "out"
    out.mkdir()
    (out / "x.nii.gz").write_bytes(b"old labels")
    (out / "x.csv").write_bytes(b"old statistics")
    real_replace = os.replace

    def replace_failing_for_the_csv(src, dst):
        if str(dst).endswith("x.csv") and ".brainunet-" in str(src) and "-previous-" not in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "replace", replace_failing_for_the_csv)
        with pytest.raises(OutputError, match="Cannot move .*x.csv into place.*Nothing was changed"):
            with OutputSet({"labels": out / "x.nii.gz", "stats": out / "x.csv"}) as outputs:
                outputs.write("labels", lambda p: p.write_bytes(b"new labels"))
                outputs.write("stats", lambda p: p.write_bytes(b"new statistics"))
                outputs.commit()
    assert snapshot(out) == {"x.csv": b"old statistics", "x.nii.gz": b"old labels"}
    assert sorted(p.name for p in out.iterdir()) == ["x.csv", "x.nii.gz"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Cancelled])
def test_an_interrupt_during_the_write_leaves_nothing_behind(tmp_path, synthetic_case, monkeypatch, interrupt):
    out = tmp_path / "out"
    assert run("segment", *case_args(synthetic_case), "--output", out / "x.nii.gz") == 0
    before = snapshot(out)

    def interrupted(rows, path):
        with open(path, "w") as f:
            f.write("region,volume")
        raise interrupt()

    import brainunet.statistics as statistics

    monkeypatch.setattr(statistics, "write_csv", interrupted)
    assert run("segment", *case_args(synthetic_case), "--output", out / "x.nii.gz", "--stats", out / "x.csv") == 130
    assert snapshot(out) == before


def test_a_run_replaces_its_own_unchanged_results_but_refuses_any_other_existing_file(tmp_path, synthetic_case,
                                                                                     capsys):
    """Named over an expert's label map, a scan, its own label map corrected since (saved again with its
    header, or its .seg.nrrd edited by a script or saved from Slicer without BrainUNet's field), someone's
    table or picture, a run is refused and the file kept; its own unchanged results (and empty files)
    it replaces, .nii and .seg.nrrd labels included."""
    import nibabel as nib
    import nrrd
    from PIL import Image

    out = tmp_path / "out"
    names = {"--output": out / "x.nii.gz", "--seg-nrrd": out / "x.seg.nrrd", "--stats": out / "x.csv",
             "--overlay": out / "x.png"}
    args = ["segment", *case_args(synthetic_case)] + [str(v) for kv in names.items() for v in kv]
    assert run(*args) == 0
    first = snapshot(out)
    assert run(*args) == 0  # its own results: replaced
    assert set(snapshot(out)) == set(first) and (out / "x.csv").read_bytes() == first["x.csv"]
    for other in ("y.nii", "Y.Nii", "y.seg.nrrd"):
        assert run("segment", *case_args(synthetic_case), "--output", out / other) == 0
        assert run("segment", *case_args(synthetic_case), "--output", out / other) == 0

    reference = nib.load(str(synthetic_case["seg"]))
    expert = out / "expert_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(reference.dataobj).astype(np.uint8), reference.affine), str(expert))
    scan = synthetic_case["t1n"]  # in the case folder, not an input of this run
    ours = nib.load(str(out / "x.nii.gz"))
    corrected = np.asanyarray(ours.dataobj).copy()
    corrected[tuple(np.argwhere(corrected == 2)[0])] = 1  # one voxel relabelled, the header kept
    corrected_nifti = out / "corrected.nii.gz"
    nib.save(nib.Nifti1Image(corrected, ours.affine, ours.header), str(corrected_nifti))
    assert ours.header["descrip"] == nib.load(str(corrected_nifti)).header["descrip"]
    voxels, header = nrrd.read(str(out / "x.seg.nrrd"))
    edited = out / "edited.seg.nrrd"
    nrrd.write(str(edited), np.where(voxels == 3, 1, voxels).astype(np.uint8), header)  # the field kept
    del header["BrainUNet_Output"]
    resaved = out / "resaved.seg.nrrd"
    nrrd.write(str(resaved), voxels, header)
    table, picture = out / "mine.csv", out / "photo.png"
    table.write_text("patient,volume\nA,12\n")
    annotated = out / "annotated.csv"  # our table with a reader's note added, or a column of their own
    annotated.write_text((out / "x.csv").read_text() + "reviewed by Dr X: ET volume confirmed\n")
    with_column = out / "with-column.csv"
    with_column.write_text("\n".join(line + (",checked" if i else ",review") for i, line in
                                     enumerate((out / "x.csv").read_text().splitlines())) + "\n")
    Image.new("RGB", (4, 4)).save(picture)
    for option, target in [("--output", expert), ("--output", scan), ("--output", corrected_nifti),
                           ("--output", edited), ("--output", resaved), ("--seg-nrrd", resaved),
                           ("--stats", table), ("--stats", annotated), ("--stats", with_column),
                           ("--overlay", picture)]:
        before = target.read_bytes()
        chosen = dict(names, **{option: target})
        assert run("segment", *case_args(synthetic_case), *[str(v) for kv in chosen.items() for v in kv]) == 2
        err = capsys.readouterr().err
        assert f"{target} exists and is not an unchanged BrainUNet result" in err and "Traceback" not in err
        assert target.read_bytes() == before
    empty = out / "empty.nii.gz"
    empty.touch()
    assert run("segment", *case_args(synthetic_case), "--output", empty) == 0
    assert nib.load(str(empty)).shape == reference.shape


def test_a_file_saved_under_an_output_name_during_the_run_is_kept(tmp_path, synthetic_case, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run("segment", *case_args(synthetic_case), "--output", out / "x.nii.gz") == 0
    real_write = pipeline.write_overlay_png

    def meanwhile_someone_saves(result, path):
        (out / "x.nii.gz").write_bytes(b"saved by another program during the run")
        return real_write(result, path)

    monkeypatch.setattr(pipeline, "write_overlay_png", meanwhile_someone_saves)
    capsys.readouterr()
    assert run("segment", *case_args(synthetic_case), "--output", out / "x.nii.gz", "--overlay", out / "x.png") == 2
    err = capsys.readouterr().err
    assert "is not an unchanged BrainUNet result" in err and "Nothing was written" in err
    assert snapshot(out) == {"x.nii.gz": b"saved by another program during the run"}


def test_a_refused_run_creates_no_folder(tmp_path, synthetic_case):
    target = tmp_path / "a" / "b" / "labels.nii.gz"
    missing = dict(synthetic_case, t2w=tmp_path / "missing.nii.gz")
    assert run("segment", *case_args(missing), "--output", target) == 2
    assert not (tmp_path / "a").exists()


def test_options_are_range_checked_and_help_lists_inputs_and_exit_codes(tmp_path, synthetic_case, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("segment", *case_args(synthetic_case), "--output", tmp_path / "x.nii.gz", "--threads", "-1")
    assert exit_.value.code == 2 and "give 1 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needed in ("--t1c", "--t2w", "--t2f", "--output", "Required", "3 missing or corrupt weights", "130 cancelled"):
        assert needed in text
    assert not list(tmp_path.iterdir())


def test_batch_reports_each_failure_goes_on_and_summarises(tmp_path, capsys):
    from brainunet import synthetic

    data = tmp_path / "data"
    for i in range(3):
        synthetic.write_case(data / f"case{i}", f"case{i}", seed=i, shape=(40, 48, 36), spacing=(2.4, 2.4, 2.4))
    next((data / "case1").glob("*-t2w.nii.gz")).write_bytes(b"not an image")
    assert run("batch", data, "--output-dir", tmp_path / "out") == 1
    captured = capsys.readouterr()
    assert "case1: failed, nothing written" in captured.err
    assert "2 of 3 cases segmented" in captured.out and "1 failed" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".nii.gz")) == \
        ["case0-seg.nii.gz", "case2-seg.nii.gz"]


def test_an_output_name_too_long_for_its_temporary_name_is_refused_before_the_work(tmp_path, synthetic_case, capsys):
    from brainunet.outputs import MAX_OUTPUT_NAME_BYTES

    fits = "x" * (MAX_OUTPUT_NAME_BYTES - len(".nii.gz")) + ".nii.gz"
    assert run("segment", *case_args(synthetic_case), "--output", tmp_path / fits) == 0
    too_long = "y" + fits
    assert run("segment", *case_args(synthetic_case), "--output", tmp_path / "o" / too_long) == 2
    assert "bytes long; give a name of at most" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_batch_refuses_an_output_folder_that_is_a_file_or_inside_a_case_and_prints_each_case_note(tmp_path,
                                                                                                   capsys):
    import nibabel as nib
    import numpy as np

    from brainunet import synthetic

    data = tmp_path / "data"
    for i in range(2):
        synthetic.write_case(data / f"case{i}", f"case{i}", seed=i, shape=(40, 48, 36), spacing=(2.4, 2.4, 2.4))
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    stray = tmp_path / "stray.txt"
    stray.write_text("notes")
    assert run("batch", data, "--output-dir", stray) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for inside in (data / "case0" / "out", data / "case0"):
        assert run("batch", data, "--output-dir", inside) == 2
        assert "or inside it; choose a folder outside the case folders" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} and stray.read_text() == "notes"
    t2w = next((data / "case1").glob("*-t2w.nii.gz"))  # this case's T2W was acquired 6 mm higher: registered
    image = nib.load(str(t2w))
    moved = image.affine.copy()
    moved[2, 3] += 6.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), moved, image.header), str(t2w))
    assert run("batch", data, "--output-dir", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "case1: Note: T2W registered to T1CE" in err, err
    assert "case0: Note" not in err


def test_model_given_a_folder_says_so(tmp_path, synthetic_case, capsys):
    assert run("segment", *case_args(synthetic_case), "--output", tmp_path / "x.nii.gz", "--model", tmp_path) == 3
    assert "is a folder; give a weights file" in capsys.readouterr().err


def test_misleading_files_get_messages_that_say_what_to_do(tmp_path, synthetic_case, capsys):
    import shutil

    import nibabel as nib
    import numpy as np

    named = tmp_path / "t1c.nii"
    shutil.copy(synthetic_case["t1c"], named)  # gzip data named .nii
    assert run("segment", *case_args(dict(synthetic_case, t1c=named)), "--output", tmp_path / "x.nii.gz") == 2
    assert "gzip-compressed but its name does not end in .gz; rename it" in capsys.readouterr().err
    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))
    header.set_data_dtype(np.float32)
    huge = tmp_path / "t2w.nii"
    huge.write_bytes(header.binaryblock + b"\0" * 4 + np.zeros(1000, np.float32).tobytes())
    assert run("segment", *case_args(dict(synthetic_case, t2w=huge)), "--output", tmp_path / "x.nii.gz") == 2
    err = capsys.readouterr().err
    assert "header claims 10000 x 10000 x 10000 voxels" in err and "MemoryError" not in err


def test_a_cancel_while_a_file_is_read_is_a_cancel_not_a_corrupt_file(tmp_path, synthetic_case, tiny_weights,
                                                                      monkeypatch):
    """Slicer's Cancel arrives as SIGTERM, raised as Cancelled wherever the worker is: inside nibabel or
    torch.load it must stay a cancel (exit 130), not become 'the file is corrupt' (exit 2 or 3)."""
    import nibabel
    import torch

    from brainunet import imageio, weights

    def cancelled(*args, **kwargs):
        raise Cancelled()

    monkeypatch.setattr(nibabel, "load", cancelled)
    with pytest.raises(Cancelled):
        imageio.load_volume(synthetic_case["t1c"], "T1CE")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "load", cancelled)
    with pytest.raises(Cancelled):
        weights.load_weights(tiny_weights[0])


def test_a_label_map_is_written_under_the_name_asked_for_and_not_with_the_scans_display(tmp_path):
    """A mixed-case ending (Case1.Nii.gz) is written under that very name, gzip-compressed (nibabel would
    write case1.nii.gz beside it); the T1CE's display window, colour map and intent stay with the T1CE."""
    import gzip

    import nibabel as nib

    from brainunet.imageio import load_volume, save_label_nifti

    scan = nib.Nifti1Image(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8), np.diag([1.0, 1.0, 3.0, 1.0]))
    scan.header["cal_min"], scan.header["cal_max"], scan.header["aux_file"] = 0, 1200, b"hot"
    scan.header.set_intent("z score")
    nib.save(scan, str(tmp_path / "t1c.nii.gz"))
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 3
    out = save_label_nifti(labels, load_volume(tmp_path / "t1c.nii.gz", "T1CE"), tmp_path / "Case1.Nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Case1.Nii.gz", "t1c.nii.gz"]
    written = nib.Nifti1Image.from_bytes(gzip.decompress(out.read_bytes()))
    assert np.array_equal(np.asanyarray(written.dataobj), labels) and np.allclose(written.affine, scan.affine)
    assert written.header["cal_min"] == 0 and written.header["cal_max"] == 0
    assert written.header["aux_file"] == b"" and written.header.get_intent()[0] == "none"


def test_signals_arriving_in_a_held_block_are_each_handled_once_when_it_ends():
    """A block that must not be cut (moving outputs into place, a training update) defers SIGINT and SIGTERM:
    each signal that came is handled once at its end, in order, by the handler in place before (an ignored
    one stays ignored and does not swallow the other), and the handlers are put back."""
    import signal
    import time

    from brainunet.outputs import signals_held

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    seen = []

    def record(signum, frame):
        seen.append(signum)

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background of a script
        signal.signal(signal.SIGTERM, record)
        with signals_held():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGTERM):
                os.kill(os.getpid(), signum)
            time.sleep(0.05)
            assert seen == []  # held
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is record
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
