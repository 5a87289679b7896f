"""Training, resuming, fine-tuning and their command line, on the engine's phantom anatomy at 4 mm
with a two-level network (fast, offline, CPU)."""
import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

from brainunet import cli, synthetic
from brainunet.errors import InputError
from brainunet_lab.training import TrainConfig, finetune, read_history, train

TINY = {"network": {"features": [4, 8]}, "anatomy": "phantom", "spacing_mm": 4.0, "patch_size": [16, 16, 16],
        "inference_patch_size": [32, 32, 32], "batch_size": 2, "crops_per_case": 2, "lr": 1e-2, "warmup_steps": 5,
        "validate_every": 0, "validation_cases": 1, "checkpoint_every": 1000, "device": "cpu",
        # one thread: on a shared 2-core machine, two OpenMP threads competing with other processes can be 100x slower
        "threads": 1}


def tiny_config(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    real = tmp_path_factory.mktemp("real")
    synthetic.write_case(real / "case0", "case0", seed=5, shape=(40, 48, 36), spacing=(2.4, 2.4, 2.4))
    config = tiny_config(steps=60, validate_every=30, validation_data=str(real))
    return train(config, out, progress=False), out


def test_tversky_is_zero_for_a_perfect_prediction_and_grows_when_worse():
    from brainunet_lab.losses import build_loss, tversky_loss

    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 8, 8, 8))
    onehot = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).float()
    assert float(tversky_loss(onehot, target)) == pytest.approx(0.0, abs=1e-6)
    noisy = 0.7 * onehot + 0.3 * torch.rand_like(onehot)
    noisy = noisy / noisy.sum(1, keepdim=True)
    worse = torch.roll(onehot, 1, dims=1)  # every voxel in the wrong class
    assert 0 < float(tversky_loss(noisy, target)) < float(tversky_loss(worse, target))
    # beta > alpha: missing tumour costs more than the same amount of false alarm
    missed = onehot.clone()
    missed[:, 0] += missed[:, 3]
    missed[:, 3] = 0
    alarm = onehot.clone()
    alarm[:, 3] += alarm[:, 0]
    alarm[:, 0] = 0
    assert float(tversky_loss(missed, target, classes=(3,))) > float(tversky_loss(alarm, target, classes=(3,)))
    # the training loss (with CE and deep supervision over a coarser output) follows the same order
    loss = build_loss()
    assert float(loss([onehot * 50, onehot[..., ::2, ::2, ::2] * 50], target)) < 1e-4
    assert float(loss([worse * 50, worse[..., ::2, ::2, ::2] * 50], target)) > 1.0


def test_training_decreases_the_loss_and_writes_every_output(tiny_run):
    result, out = tiny_run
    assert result.step == 60 and result.finished
    losses = [r["loss"] for r in result.history]
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    for name in ("config.json", "checkpoint.pt", "history.csv", "model.pt"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["patch_size"] == [16, 16, 16]
    history = read_history(out / "history.csv")
    assert [r["step"] for r in history] == list(range(1, 61))
    validated = [r for r in history if r["val_dice_WT"] is not None]
    assert [r["step"] for r in validated] == [30, 60]
    assert all(0 <= r[f"{kind}_dice_{k}"] <= 1 for r in validated for k in ("ET", "NETC", "SNFH", "TC", "WT")
               for kind in ("val", "real"))  # synthetic and real (validation_data) validation


def test_the_weights_file_loads_and_segments(tiny_run, synthetic_case):
    from brainunet import pipeline, weights

    _, out = tiny_run
    loaded = pipeline.load_model(out / "model.pt")
    assert loaded.kind == "network" and loaded.preprocessing.spacing_mm == (4.0, 4.0, 4.0)
    assert loaded.modalities == ("t1c", "t2w", "t2f")
    _, payload = weights.load_weights(out / "model.pt")
    training = payload["extra"]["training"]
    assert training["steps"] == 60 and training["finished"] and training["engine_version"]
    assert payload["state_dict"]["heads.0.weight"].dtype == torch.float16
    volumes = pipeline.load_inputs({k: synthetic_case[k] for k in ("t1c", "t2w", "t2f")})
    result = pipeline.segment(volumes, loaded)
    assert result.labels.shape == volumes["t1c"].data.shape
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3}
    # trained with modality dropout: the model says so, and a case without T2W is accepted
    assert loaded.preprocessing.modality_dropout
    without_t2w = pipeline.segment({k: v for k, v in volumes.items() if k != "t2w"}, loaded)
    assert without_t2w.labels.shape == volumes["t1c"].data.shape
    # a rule of its own for a missing T2W applies without T2W, and only then: nothing is tumour by the model's
    # rule (P(tumour) never reaches 1), every brain voxel is by the no-T2W rule (a threshold near 0)
    tuned = dataclasses.replace(loaded, settings=loaded.settings.with_overrides(
        {"tumour_threshold": 1.0, "no-t2w.tumour_threshold": 1e-9}))
    assert not pipeline.segment(volumes, tuned).labels.any()
    assert pipeline.segment({k: v for k, v in volumes.items() if k != "t1c"}, tuned).labels.sum() == 0
    assert (pipeline.segment({k: v for k, v in volumes.items() if k != "t2w"}, tuned).labels > 0).sum() > 1000


def test_engine_case_dice_honours_tta():
    """mean_dice (behind ``evaluate --synthetic``) runs mirroring TTA when asked: an untrained network is not
    mirror-symmetric, so its labels with and without TTA differ (an earlier version ignored --tta there)."""
    from brainunet.network import BrainUNet, NetworkConfig
    from brainunet_lab.training import mean_dice, predict_labels

    torch.manual_seed(0)
    model = BrainUNet(NetworkConfig(features=[4, 8], deep_supervision=False)).eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 16, 16, 16)).astype(np.float32)
    mask = np.ones((16, 16, 16), bool)
    plain = predict_labels(model, image, mask, (16, 16, 16), "cpu")
    mirrored = predict_labels(model, image, mask, (16, 16, 16), "cpu", tta=True)
    assert (plain != mirrored).any() and (mirrored > 0).any() and (mirrored == 0).any()
    reference = [(image, mirrored, mask)]
    assert mean_dice(model, reference, (16, 16, 16), "cpu", tta=True)["WT"] == pytest.approx(1.0)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    config = tiny_config(steps=12, crops_per_case=3, validation_cases=0)
    whole = train(config, tmp_path / "whole", progress=False)
    part = train(config, tmp_path / "part", progress=False, stop_after_step=5)  # mid-chunk
    assert part.step == 5 and not part.finished
    assert len(read_history(tmp_path / "part" / "history.csv")) == 5
    with pytest.raises(InputError, match="--resume"):
        train(config, tmp_path / "part", progress=False)  # never silently overwrites a run
    with pytest.raises(InputError, match="network"):
        train(tiny_config(steps=12, network={"features": [4, 16]}), tmp_path / "part", resume=True, progress=False)
    resumed = train(config, tmp_path / "part", resume=True, progress=False)
    assert resumed.step == 12 and resumed.finished
    assert [r["step"] for r in resumed.history] == list(range(1, 13))
    # the data stream is a function of the step, so the resumed run matches the uninterrupted one
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in whole.history], rel=1e-5)


def test_a_cancel_during_the_weight_update_leaves_a_checkpoint_whose_step_matches_its_weights(tmp_path, monkeypatch):
    """SIGTERM (a preempted or stopped job; the CLI turns it into Cancelled) landing inside the optimiser update
    waits until the update is counted and recorded: the checkpoint's step, AdamW's own step count, the schedule
    and the history agree, so --resume does not apply an update twice."""
    import signal

    from brainunet.errors import Cancelled

    update = torch.optim.lr_scheduler.LambdaLR.step

    def update_then_terminate(self, *args, **kwargs):
        update(self, *args, **kwargs)
        if self.last_epoch == 4:  # the fourth training update, between the weights and the step count
            os.kill(os.getpid(), signal.SIGTERM)

    def cancel(*_):
        raise Cancelled()

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", update_then_terminate)
    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        with pytest.raises(Cancelled, match="Training stopped at step 4 of 12"):
            train(tiny_config(steps=12, crops_per_case=3, validation_cases=0), tmp_path / "run", progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and saved["scheduler"]["last_epoch"] == 4
    assert {float(state["step"]) for state in saved["optimizer"]["state"].values()} == {4.0}
    assert [r["step"] for r in read_history(tmp_path / "run" / "history.csv")] == [1, 2, 3, 4]


def test_a_run_resumed_on_other_cases_records_every_case_it_learned_from(tmp_path):
    """What a model learned from is what keeps its held-out scores honest: resumed on other cases (a fold
    split again), it records the cases of both parts, and is refused for scoring on any of them."""
    from brainunet_lab.realdata import load_labelled_case
    from brainunet_lab.training import check_held_out

    cases = []
    for name, seed in (("case_a", 3), ("case_b", 4)):
        synthetic.write_case(tmp_path / name, name, seed=seed, shape=(40, 48, 36))
        cases.append(load_labelled_case(tmp_path / name, (4.0, 4.0, 4.0)))
    config = tiny_config(steps=4, validation_cases=0, engine_fraction=0.0)
    train(config, tmp_path / "run", progress=False, data=cases[:1], validation_data=[], stop_after_step=2)
    train(config, tmp_path / "run", resume=True, progress=False, data=cases[1:], validation_data=[])
    learned = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["extra"]["training"]["real_case_names"]
    assert learned == ["case_a", "case_b"]
    with pytest.raises(InputError, match="has learned from 1 of the cases it would be scored on"):
        check_held_out(tmp_path / "run" / "model.pt", ["case_a", "case_c"])
    check_held_out(tmp_path / "run" / "model.pt", ["case_c"])


def _write_brats_folder(root, layouts=("2023", "2021", "2023")):
    """Labelled synthetic cases of different tumour sizes; one in BraTS 2021 naming with label 4 for ET."""
    import nibabel as nib

    for i, layout in enumerate(layouts):
        name = f"BraTS-GLI-{i:05d}-000" if layout == "2023" else f"BraTS2021_{i:05d}"
        folder = root / name
        paths = synthetic.write_case(folder, "tmp", seed=i + 1, shape=(40, 48, 36), spacing=(2.4, 2.4, 2.4),
                                     tumour_radius_mm=14.0 + 5 * i)
        for key in ("t1c", "t2w", "t2f", "t1n", "seg"):
            suffix = {"t1c": "t1ce", "t2w": "t2", "t2f": "flair", "t1n": "t1"}.get(key, key) if layout == "2021" else key
            sep = "_" if layout == "2021" else "-"
            paths[key].rename(folder / f"{name}{sep}{suffix}.nii.gz")
        if layout == "2021":
            seg = folder / f"{name}_seg.nii.gz"
            img = nib.load(str(seg))
            labels = np.asarray(img.dataobj).copy()
            labels[labels == 3] = 4
            nib.save(nib.Nifti1Image(labels, img.affine), str(seg))
    return root


def test_real_cases_are_preprocessed_like_inference_with_aligned_labels(tmp_path):
    from brainunet_lab.realdata import load_labelled_case

    shape = (40, 48, 36)
    flipped = synthetic.default_affine(shape, (2.4, 2.4, 2.4))
    flipped[:3, :2] *= -1  # LPS voxel order (same brain): labels must follow the reorientation
    flipped[:2, 3] *= -1
    synthetic.write_case(tmp_path / "c", "c", seed=3, shape=shape, affine=flipped)
    case = load_labelled_case(tmp_path / "c", (4.0, 4.0, 4.0))
    assert case.image.shape[1:] == case.labels.shape == case.mask.shape
    assert set(np.unique(case.labels)) <= {0, 1, 2, 3} and (case.labels == 3).any()
    flair = case.image[2]
    assert flair[case.labels == 2].mean() > flair[case.mask & (case.labels == 0)].mean() + 1.0
    t1c = case.image[0]
    assert t1c[case.labels == 3].mean() > t1c[case.mask & (case.labels == 0)].mean() + 1.0


def test_real_case_augmentation_warps_image_labels_and_mask_together(tmp_path):
    from brainunet_lab.realdata import load_labelled_case
    from brainunet_lab.training import augment_real

    synthetic.write_case(tmp_path / "c", "c", seed=3, shape=(40, 48, 36))
    case = load_labelled_case(tmp_path / "c", (2.4, 2.4, 2.4))
    image, labels, mask = (torch.from_numpy(a) for a in (case.image, case.labels, case.mask))
    draws = [augment_real(image, labels, mask, case.spacing, np.random.default_rng(s)) for s in (0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))  # deterministic by seed
    assert not torch.equal(draws[0][1], draws[2][1])  # another seed, another warp
    for img, lab, msk in draws:
        assert img.shape[0] == 3 and img.shape[1:] == lab.shape == msk.shape
        assert lab.dtype == torch.uint8 and set(lab.unique().tolist()) <= {0, 1, 2, 3}
        assert not lab[~msk].any() and not img[:, ~msk].any()  # nothing outside the warped brain
        # the tumour moved but kept its size (scale 0.85-1.15 per axis) and its look
        assert 0.5 < (lab > 0).sum() / (labels > 0).sum() < 1.6
        flair = img[2]
        assert flair[lab == 2].mean() > flair[msk & (lab == 0)].mean() + 1.0


def test_real_data_errors_are_clear(tmp_path):
    import nibabel as nib

    from brainunet_lab.realdata import find_labelled_cases, institution_folds, load_labelled_case

    with pytest.raises(InputError, match="No labelled cases"):
        find_labelled_cases(tmp_path)
    paths = synthetic.write_case(tmp_path / "a", "a", seed=1, shape=(40, 48, 36))
    paths["t2w"].unlink()
    with pytest.raises(InputError, match=r"a: missing T2W"):
        load_labelled_case(tmp_path / "a")
    paths = synthetic.write_case(tmp_path / "b", "b", seed=1, shape=(40, 48, 36))
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 18), np.uint8), np.eye(4)), str(paths["seg"]))
    with pytest.raises(InputError, match="not on the T1CE grid"):
        load_labelled_case(tmp_path / "b")
    with pytest.raises(InputError, match="only 2"):
        institution_folds(["a", "b"], [1.0, 2.0], 3)
    names = [f"case{i}" for i in range(10)]
    folds = institution_folds(names, list(range(10)), 3)
    assert folds == institution_folds(names, list(range(10)), 3)
    assert sorted(i for f in folds for i in f) == list(range(10)) and sorted(map(len, folds)) == [3, 3, 4]
    terciles = [{0, 1, 2}, {3, 4, 5}, {6, 7, 8}]
    assert all(len(t & set(f)) == 1 for f in institution_folds(names[:9], list(range(9)), 3) for t in terciles)


def test_finetune_with_folds_on_brats_2021_and_2023_cases(tiny_run, tmp_path):
    _, base = tiny_run
    data = _write_brats_folder(tmp_path / "data")
    out = tmp_path / "ft"
    result = finetune(base / "model.pt", data, out, steps=6, folds=3, progress=False,
                      overrides={"validation_cases": 1, "threads": 1, "device": "cpu"})
    assert result.finished and (out / "model.pt").is_file()
    with open(out / "folds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["fold"] for r in rows] == ["0", "1", "2", "mean"]
    assert sorted(r["cases"] for r in rows[:3]) == sorted(p.name for p in data.iterdir())
    assert all(0 <= float(r["dice_WT"]) <= 1 for r in rows)
    for i in range(3):
        history = read_history(out / f"fold{i}" / "history.csv")
        assert history[-1]["real_dice_WT"] is not None  # validated on its held-out fold
    config = json.loads((out / "config.json").read_text())
    assert config["init_weights"].endswith("model.pt") and config["engine_fraction"] == 0.25
    assert config["spacing_mm"] == 4.0 and config["patch_size"] == [16, 16, 16]


def test_cli_finetune(tiny_run, tmp_path, capsys):
    _, base = tiny_run
    data = _write_brats_folder(tmp_path / "data", ("2021", "2023"))
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"validation_cases": 0, "threads": 1, "engine_fraction": 0.0}))
    code = cli.main(["finetune", "--data", str(data), "--output", str(tmp_path / "ft"), "--model", str(base / "model.pt"),
                     "--steps", "3", "--config", str(settings), "--device", "cpu", "--progress", "none"])
    out = capsys.readouterr().out
    assert code == 0 and "Training finished at step 3 of 3" in out
    from brainunet import weights

    _, payload = weights.load_weights(tmp_path / "ft" / "model.pt")
    assert payload["name"].endswith("-finetuned") and payload["extra"]["training"]["real_cases"] == 2


def test_cli_finetune_on_pseudo_labels_named_by_a_pattern(tiny_run, tmp_path, capsys):
    """--labels GLOB trains on another algorithm's output; a case holding only a *-seg file (e.g. a
    held-out ground truth) is not picked up."""
    _, base = tiny_run
    data = _write_brats_folder(tmp_path / "data", ("2023", "2023"))
    pseudo = data / "BraTS-GLI-00000-000"
    (pseudo / "BraTS-GLI-00000-000-seg.nii.gz").rename(pseudo / "algo_segmentation_NOT_GT.nii.gz")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"validation_cases": 0, "threads": 1, "engine_fraction": 0.0}))
    args = ["finetune", "--data", str(data), "--output", str(tmp_path / "ft"), "--model", str(base / "model.pt"),
            "--steps", "2", "--config", str(settings), "--device", "cpu", "--progress", "none"]
    assert cli.main(args + ["--labels", "algo_segmentation*.nii.gz"]) == 0
    from brainunet import weights

    _, payload = weights.load_weights(tmp_path / "ft" / "model.pt")
    assert payload["extra"]["training"]["real_cases"] == 1
    capsys.readouterr()
    assert cli.main(args + ["--labels", "nothing*.nii.gz"]) == 2
    assert "matching 'nothing*.nii.gz'" in capsys.readouterr().err


def test_tumour_threshold_corrects_over_segmentation():
    """A network that spreads low-confidence tumour around the true lesion: argmax over-segments,
    a higher P(tumour) threshold trims it, and the sweep picks that threshold."""
    from brainunet import postprocess
    from brainunet_lab import calibration

    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"))
    radius = np.sqrt(((grid - 16) ** 2).sum(0))
    reference = np.where(radius < 8, 2, 0).astype(np.uint8)
    reference[radius < 4] = 3
    # sure inside the lesion (0.8-1), a 3-voxel halo at 0.75 around it, unlikely further out
    p_tumour = np.where(radius < 8, np.clip(1.2 - radius / 20, 0.8, 1.0), np.where(radius < 11, 0.75, 0.2))
    probs = np.zeros((4, 32, 32, 32), np.float32)
    probs[0] = 1 - p_tumour
    probs[3] = np.where(radius < 4, p_tumour, 0.1 * p_tumour)
    probs[2] = p_tumour - probs[3]
    mask = np.ones_like(reference, bool)
    rows = calibration.sweep([probs], [reference], [mask], thresholds=(0.5, 0.7, 0.78, 0.9))
    assert [r["threshold"] for r in rows] == ["argmax", 0.5, 0.7, 0.78, 0.9]
    fp = [r["wt_false_positive_voxels"] for r in rows[1:]]
    fn = [r["wt_false_negative_voxels"] for r in rows[1:]]
    assert fp == sorted(fp, reverse=True) and fn == sorted(fn)  # a stricter rule never adds tumour
    assert rows[0]["wt_false_positive_voxels"] > 0
    chosen = calibration.best(rows)
    assert chosen["threshold"] == 0.78 and chosen["dice_WT"] == 1.0 > rows[0]["dice_WT"]
    labels = postprocess.probabilities_to_labels(probs, mask, 0.78)
    assert np.array_equal(labels, reference)
    # one voxel: background most likely, yet tumour (NETC) is more likely than not overall
    voxel = np.array([0.45, 0.3, 0.15, 0.1]).reshape(4, 1, 1, 1)
    assert postprocess.probabilities_to_labels(voxel).item() == 0
    assert postprocess.probabilities_to_labels(voxel, tumour_threshold=0.5).item() == 1
    assert postprocess.probabilities_to_labels(voxel, tumour_threshold=0.6).item() == 0


def test_cli_calibrate_on_engine_cases(tiny_run, tmp_path, capsys):
    _, base = tiny_run
    out = tmp_path / "calibration.csv"
    code = cli.main(["calibrate", "--model", str(base / "model.pt"), "--synthetic", "2", "--anatomy", "phantom",
                     "--thresholds", "0.5,0.9", "--output", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "Best: " in text and out.is_file()
    with open(out) as f:
        assert [r["threshold"] for r in csv.DictReader(f)] == ["argmax", "0.5000", "0.9000"]
    assert cli.main(["calibrate", "--model", str(base / "model.pt"), "--thresholds", "0.5,1.5"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err


def test_cli_bad_inputs_exit_2_with_a_clear_message(tmp_path, capsys):
    def run(*args):
        code = cli.main([str(a) for a in args])
        return code, capsys.readouterr().err

    code, err = run("train", "--config", tmp_path / "missing.json", "--output", tmp_path / "o")
    assert code == 2 and err.startswith("error: ") and "missing.json not found" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY, "stepz": 10}))
    code, err = run("train", "--config", bad, "--output", tmp_path / "o")
    assert code == 2 and "unknown setting(s) stepz" in err and err.count("\n") == 1
    bad.write_text("{not json")
    code, err = run("train", "--config", bad, "--output", tmp_path / "o")
    assert code == 2 and "not valid JSON" in err
    (tmp_path / "empty").mkdir()
    code, err = run("finetune", "--data", tmp_path / "empty", "--output", tmp_path / "o")
    assert code == 2 and "No labelled cases" in err
    _write_brats_folder(tmp_path / "two", ("2023", "2023"))
    code, err = run("finetune", "--data", tmp_path / "two", "--output", tmp_path / "o", "--folds", "3")
    assert code == 2 and "only 2" in err


def test_distributed_training_with_torchrun(tmp_path):
    import importlib.util

    import torch.distributed as dist

    # the CPU build of torch on Linux has both: a missing one is a broken install, not a reason to skip
    assert dist.is_available() and importlib.util.find_spec("torch.distributed.run") is not None
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({**TINY, "steps": 3, "crops_per_case": 1, "warmup_steps": 1}))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "BrainUNetSegmentation"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "brainunet", "train", "--config", config, "--output", tmp_path / "run",
                        "--progress", "none"], capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("Training finished at step 3 of 3") == 1  # only rank 0 reports
    assert [h["step"] for h in read_history(tmp_path / "run" / "history.csv")] == [1, 2, 3]
    assert (tmp_path / "run" / "model.pt").is_file()
    # refused before the first step (a run is already there, no --resume): each rank still destroys the
    # process group it made, so none is left to abort at interpreter exit
    script = tmp_path / "again.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from brainunet.errors import InputError\n"
        "from brainunet_lab.training import TrainConfig, train\n"
        "try:\n"
        "    train(TrainConfig.from_file(sys.argv[1]), sys.argv[2], progress=False)\n"
        "except InputError as exc:\n"
        "    # one write of one short line: the two ranks share the pipe, and print's several writes interleave\n"
        "    sys.stdout.write(f'refused: {exc} | group left: {dist.is_initialized()}\\n')\n"
        "    sys.stdout.flush()\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(config), str(tmp_path / "run")], capture_output=True, text=True,
                       encoding="utf-8", env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("already holds a training run") == 2, r.stdout
    assert r.stdout.count("group left: False") == 2, r.stdout


def test_the_bundled_model_may_not_start_a_cross_validation_on_the_cases_it_learned_from():
    """Its weights predate recorded case names; its registry entry lists them, by the weights' checksum."""
    from brainunet import weights
    from brainunet_lab.training import check_not_learned, learned_cases

    bundled = weights.load_registry(weights.REGISTRY_PATH)[0]
    names, unnamed = learned_cases(bundled.path())
    assert len(names) == 30 and unnamed == 0  # the 29 training cases and the pseudo-labelled demo case
    with pytest.raises(InputError, match="has learned from 1 of these cases"):
        check_not_learned(bundled.path(), ["Brats18_CBICA_ABM_1", "unseen_case"])
    notes = []
    check_not_learned(bundled.path(), ["unseen_case"], notes.append)
    assert notes == []


def test_bundle_names_the_cases_a_model_learned_from(tmp_path):
    """Weights that record only a count of real cases: --learned-from names them, the rest stays counted, and a
    cross-validation from such a model gets a note, not a refusal."""
    from brainunet import weights
    from brainunet.network import BrainUNet, NetworkConfig
    from brainunet_lab.cli import learned_fields
    from brainunet_lab.training import check_not_learned

    model = tmp_path / "model.pt"
    weights.save_weights(model, BrainUNet(NetworkConfig(features=(4, 8))), "counted",
                         extra={"training": {"real_cases": 3}})
    cases = tmp_path / "cases"
    for name in ("case_a", "case_b"):
        (cases / name).mkdir(parents=True)
    (cases / "README.md").write_text("not a case")
    fields, lines = learned_fields(model, [cases, "demo_case"])
    assert fields == {"training_cases": ["case_a", "case_b", "demo_case"]} and len(lines) == 1
    fields, lines = learned_fields(model, [cases])
    assert fields == {"training_cases": ["case_a", "case_b"], "unnamed_training_cases": 1}
    assert "1 more real case(s)" in lines[-1]
    with pytest.raises(InputError, match="not a folder of cases"):
        learned_fields(model, [str(tmp_path / "no" / "such")])
    with pytest.raises(InputError, match="not found"):
        learned_fields(tmp_path / "missing.pt")
    notes = []
    check_not_learned(model, ["case_a"], notes.append)  # names unknown: it cannot refuse, it says so
    assert len(notes) == 1 and "3 real case(s) whose names it does not record" in notes[0]


def test_every_shipped_training_config_is_valid():
    """The configs that reproduce the bundled model (and the paper-size run) parse and validate."""
    from pathlib import Path

    import brainunet_lab

    configs = sorted((Path(brainunet_lab.__file__).parent / "configs").glob("*.json"))
    assert len(configs) >= 5
    for path in configs:
        config = TrainConfig.from_file(path)
        assert config.steps > 0, path.name
    assert TrainConfig.from_file(configs[0].parent / "bundled-cpu-2mm-stage2.json").bias_correction


def test_cli_cross_validation_scores_every_case_once_per_condition_and_resumes(tiny_run, tmp_path, capsys):
    from brainunet_lab import crossval

    _, base = tiny_run
    data = _write_brats_folder(tmp_path / "data", ("2023", "2021", "2023", "2023"))
    settings = tmp_path / "recipe.json"
    settings.write_text(json.dumps({"threads": 1, "device": "cpu", "validation_cases": 0, "engine_fraction": 0.0,
                                    "modality_dropout": 0.5}))
    out = tmp_path / "cv"
    argv = ["cv", "--data", str(data), "--output", str(out), "--model", str(base / "model.pt"), "--steps", "3",
            "--folds", "2", "--config", str(settings), "--progress", "none"]
    env_cache = os.environ.get("BRAINUNET_CASE_CACHE")
    os.environ["BRAINUNET_CASE_CACHE"] = str(tmp_path / "cache")
    try:
        assert cli.main(argv + ["--final", "--threads", "2"]) == 0  # how this job runs, not part of the recipe
        rows = crossval.read_cases(out)
        names = sorted(p.name for p in data.iterdir())
        for condition in crossval.CONDITIONS:
            assert sorted(r["case"] for r in rows if r["condition"] == condition) == names
        folds = json.loads((out / "folds.json").read_text())
        assert sorted(c for f in folds.values() for c in f) == names
        for i, held in enumerate(folds.values()):
            trained = json.loads((out / f"fold{i}" / "config.json").read_text())
            assert trained["steps"] == 3 and trained["init_weights"].endswith("model.pt")
            assert trained["threads"] == 2  # --threads, over the recipe's 1
            assert sorted({r["case"] for r in rows if r["fold"] == i}) == sorted(held)  # scored only where held out
            assert len(list((out / f"fold{i}" / "heldout").glob("*.npz"))) == len(held)
            for condition in ("no-t2w", "no-t1c"):
                assert len(list((out / f"fold{i}" / "heldout" / condition).glob("*.npz"))) == len(held)
        assert (out / "final" / "model.pt").is_file()
        # every model records the real cases it learned from; none of them may start a cross-validation on them
        learned = lambda path: torch.load(path, weights_only=True)["extra"]["training"]["real_case_names"]  # noqa: E731
        assert learned(out / "final" / "model.pt") == names
        for i, held in enumerate(folds.values()):
            assert learned(out / f"fold{i}" / "model.pt") == sorted(set(names) - set(held))
        with pytest.raises(InputError, match="has learned from 4 of these cases"):
            crossval.run_cv(data, tmp_path / "cv-again", out / "final" / "model.pt", 3, 2, progress=False)
        assert not (tmp_path / "cv-again").exists()
        assert len(list((tmp_path / "cache").rglob("*.npz"))) == 4  # preprocessed once, kept outside the run
        with pytest.raises(InputError, match="--resume"):
            crossval.run_cv(data, out, base / "model.pt", 3, 2, overrides=json.loads(settings.read_text()),
                            progress=False)
        capsys.readouterr()
        assert cli.main(argv + ["--resume"]) == 0  # everything scored already: nothing retrained
        assert "| all | 4 |" in capsys.readouterr().out
        # the final model alone, as a job beside the folds' jobs: no fold is trained or scored
        alone = tmp_path / "cv-final-only"
        assert cli.main([a if a != str(out) else str(alone) for a in argv] + ["--final-only"]) == 0
        assert (alone / "final" / "model.pt").is_file() and not [p for p in alone.glob("fold*") if p.is_dir()]
        assert learned(alone / "final" / "model.pt") == names
        assert cli.main(argv + ["--final-only", "--fold", "0"]) == 2
        assert "--final-only trains no fold" in capsys.readouterr().err
        # the folds stay those the fold models learned on: resuming over another set of cases is refused
        import shutil
        fewer = tmp_path / "fewer"
        shutil.copytree(data, fewer)
        shutil.rmtree(fewer / names[0])
        assert cli.main([a if a != str(data) else str(fewer) for a in argv] + ["--resume"]) == 2
        assert f"1 of its cases missing ({names[0]})" in capsys.readouterr().err
        assert json.loads((out / "folds.json").read_text()) == folds
        # cv-rescore scores finished fold models only, each on cases it never learned from
        broken = tmp_path / "cv-broken"
        shutil.copytree(out, broken)
        payload = torch.load(broken / "fold0" / "model.pt", weights_only=True)
        payload["extra"]["training"]["finished"] = False
        torch.save(payload, broken / "fold0" / "model.pt")
        rescore = ["cv-rescore", str(broken), "--data", str(data), "--tag", "t"]
        assert cli.main(rescore) == 2
        assert "model.pt is not a finished training of 3 steps" in capsys.readouterr().err
        shutil.copy(out / "fold1" / "model.pt", broken / "fold0" / "model.pt")  # fold 1's model learned fold 0's cases
        assert cli.main(rescore) == 2
        assert "has learned from 2 of the cases it would be scored on" in capsys.readouterr().err
        # cv-postprocess pools scored folds only, and only runs of one split
        (broken / "fold1" / "scores.csv").unlink()
        assert cli.main(["cv-postprocess", str(broken)]) == 0
        assert f"({len(folds['fold0'])} held-out cases)" in capsys.readouterr().out
        (broken / "folds.json").write_text(json.dumps({"fold0": folds["fold1"], "fold1": folds["fold0"]}))
        assert cli.main(["cv-postprocess", str(out), str(broken)]) == 2
        assert "split the cases into folds differently" in capsys.readouterr().err
        assert cli.main(["cv-report", str(out)]) == 0
        report = capsys.readouterr().out
        assert "| no-t2w | 4 |" in report and "| no-t1c | 4 |" in report and "| other | 4 |" in report
        # the five-region mean of each row is the mean of its five regions, fold by fold as well
        by_fold = [line.strip("|").split("|") for line in report.splitlines() if line.startswith(("| 0 | 2 |", "| 1 | 2 |"))]
        assert len(by_fold) == 2
        for cells in by_fold:
            regions = [float(c) for c in cells[2:7]]
            assert float(cells[7]) == pytest.approx(sum(regions) / 5, abs=6e-4)
        assert "nan" not in report
        assert cli.main(["cv-postprocess", str(out), "--output", str(tmp_path / "pp.csv"), "--nested"]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("none ") and "(4 held-out cases)" in printed
        assert "nested (each fold scored with the rule chosen on the others)" in printed and "(4 cases)" in printed
        assert "  fold0: tumour_threshold=" in printed and "  fold1: tumour_threshold=" in printed
        register = printed.split("register with: ")[1]  # pasted into --set, read as JSON
        assert "--set components_need_core=false" in register or "--set components_need_core=true" in register
        assert "et_threshold" not in printed  # searched only with --region-decoding
        with open(tmp_path / "pp.csv") as f:
            assert len(list(csv.DictReader(f))) == sum(len(values) for _, values in crossval.POSTPROCESS_STAGES)
        capsys.readouterr()
        assert cli.main(["cv-rescore", str(out), "--data", str(data), "--set", "tumour_threshold=0.99",
                         "--set", "min_component_voxels=10", "--tag", "strict"]) == 0
        strict = crossval.read_cases(out, "strict")
        assert len(strict) == len(rows) and "| all | 4 |" in capsys.readouterr().out
        wt = {(r["case"], r["condition"]): r["dice_WT"] for r in rows}
        assert any(r["dice_WT"] != wt[(r["case"], r["condition"])] for r in strict)  # the settings were applied
        # a preprocessing setting reaches the preparation of the cases, not only the label of the table
        coarse = ["--set", "spacing_mm=[8,8,8]", "--tag", "coarse"]
        assert cli.main(["cv-rescore", str(out), "--data", str(data)] + coarse) == 0
        assert any(r["dice_WT"] != wt[(r["case"], r["condition"])] for r in crossval.read_cases(out, "coarse"))
        # a rule of its own without T2W: applied to the no-t2w rows, and to them only
        assert cli.main(["cv-rescore", str(out), "--data", str(data), "--set", "no-t2w.tumour_threshold=0.99",
                         "--set", "no-t2w.min_component_voxels=10", "--tag", "own"]) == 0
        own = crossval.read_cases(out, "own")
        assert all(r["dice_WT"] == wt[(r["case"], r["condition"])] for r in own if r["condition"] != "no-t2w")
        assert any(r["dice_WT"] != wt[(r["case"], r["condition"])] for r in own if r["condition"] == "no-t2w")
        capsys.readouterr()
        assert cli.main(["cv-postprocess", str(out), "--condition", "no-t2w", "--nested"]) == 0
        printed = capsys.readouterr().out
        assert "every-sequence rule (tumour_threshold=" in printed and "no-t2w rule (" in printed
        assert "nested, no-t2w rule chosen on the other folds: " in printed and "register with: " in printed
        assert cli.main(["cv-rescore", str(out), "--data", str(data), "--tag", "x", "--keep", "--tta", "mirror"]) == 2
        assert "without --tta" in capsys.readouterr().err
        assert cli.main(["cv-rescore", str(out), "--data", str(data), "--tag", "x", "--keep",
                         "--set", "patch_size=[16,16,16]"]) == 2
        assert "only post-processing settings" in capsys.readouterr().err
        # a run whose missing-sequence probabilities were not kept gets them from cv-rescore --keep
        for folder in out.glob("fold*/heldout/no-t*"):
            shutil.rmtree(folder)
        assert cli.main(["cv-rescore", str(out), "--data", str(data), "--tag", "kept", "--keep"]) == 0
        assert crossval.read_cases(out, "kept") == rows  # the same scoring, and ...
        for i, held in enumerate(folds.values()):  # ... the probabilities behind it kept
            for condition in ("no-t2w", "no-t1c"):
                assert len(list((out / f"fold{i}" / "heldout" / condition).glob("*.npz"))) == len(held)
    finally:
        if env_cache is None:
            os.environ.pop("BRAINUNET_CASE_CACHE", None)
        else:
            os.environ["BRAINUNET_CASE_CACHE"] = env_cache


def test_preprocessed_case_cache_is_keyed_by_settings_and_source_files(tmp_path):
    from brainunet_lab.realdata import load_labelled_case

    paths = synthetic.write_case(tmp_path / "c", "c", seed=3, shape=(40, 48, 36))
    cache = tmp_path / "cache"
    fresh = load_labelled_case(tmp_path / "c", (4.0, 4.0, 4.0), cache=cache)
    entries = list(cache.rglob("*.npz"))
    assert len(entries) == 1
    hit = load_labelled_case(tmp_path / "c", (4.0, 4.0, 4.0), cache=cache)
    assert np.array_equal(hit.image, fresh.image) and np.array_equal(hit.labels, fresh.labels)
    assert np.array_equal(hit.mask, fresh.mask) and hit.spacing == fresh.spacing
    assert hit.wt_volume_ml == pytest.approx(fresh.wt_volume_ml)
    uncached = load_labelled_case(tmp_path / "c", (4.0, 4.0, 4.0))
    assert np.abs(uncached.image - hit.image).max() < 0.01  # float16 storage of z-scores
    load_labelled_case(tmp_path / "c", (3.0, 3.0, 3.0), cache=cache)  # other settings: another folder
    assert len({p.parent for p in cache.rglob("*.npz")}) == 2
    entries[0].write_bytes(b"damaged")
    assert np.array_equal(load_labelled_case(tmp_path / "c", (4.0, 4.0, 4.0), cache=cache).labels, fresh.labels)
    synthetic.write_case(tmp_path / "c", "c", seed=4, shape=(40, 48, 36))  # the source changed: not the old entry
    os.utime(paths["t1c"], ns=(1, 1))
    changed = load_labelled_case(tmp_path / "c", (4.0, 4.0, 4.0), cache=cache)
    assert not np.array_equal(changed.labels, fresh.labels)


def test_institution_folds_spread_institutions_and_tumour_sizes():
    from brainunet_lab.realdata import institution, institution_folds

    assert [institution(n) for n in ("Brats18_2013_23_1", "Brats18_CBICA_ABM_1", "Brats18_TCIA10_628_1",
                                     "BraTS2021_00006")] == ["2013", "CBICA", "TCIA", "other"]
    names = [f"Brats18_CBICA_A{i:02d}_1" for i in range(19)] + [f"Brats18_TCIA0{i % 9 + 1}_{i}_1" for i in range(8)] \
        + ["Brats18_2013_3_1", "Brats18_2013_23_1"]
    volumes = [float((7 * i) % 29) for i in range(len(names))]
    folds = institution_folds(names, volumes, 5)
    assert folds == institution_folds(names, volumes, 5)
    assert sorted(i for f in folds for i in f) == list(range(len(names)))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for inst, count in (("CBICA", 19), ("TCIA", 8)):
        per_fold = [sum(institution(names[i]) == inst for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    cbica = sorted((i for i in range(19)), key=lambda i: volumes[i])
    smallest, largest = set(cbica[:5]), set(cbica[-5:])
    assert all(len(smallest & set(f)) == 1 and len(largest & set(f)) == 1 for f in folds)
    with pytest.raises(InputError, match="only 3"):
        institution_folds(names[:3], volumes[:3], 5)
    # a patient's time points (BraTS 2023 names) stay in one fold; with one scan per patient nothing changes
    timepoints = ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000",
                  "BraTS-GLI-00003-001", "BraTS-GLI-00004-000"]
    for split in (institution_folds(timepoints, [1.0, 9.0, 2.0, 3.0, 4.0, 5.0], k) for k in (2, 3, 4)):
        fold_of = {timepoints[i]: f for f, held in enumerate(split) for i in held}
        assert fold_of["BraTS-GLI-00001-000"] == fold_of["BraTS-GLI-00001-001"]
        assert fold_of["BraTS-GLI-00003-000"] == fold_of["BraTS-GLI-00003-001"]
    with pytest.raises(InputError, match="of different patients, but there are only 4"):
        institution_folds(timepoints, [1.0] * 6, 5)


def test_gpu_script_trains_from_a_pack_and_the_folds_are_scored_here_without_retraining(tiny_run, tmp_path):
    """The prepared GPU job, run on the CPU with a tiny network: cv-pack -> the script (train only, from
    the pack, checkpoints dropped) -> cv --data --resume scores the fold models it brought back."""
    _, base = tiny_run
    data = _write_brats_folder(tmp_path / "data", ("2023", "2021", "2023", "2023", "2021"))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"threads": 1, "validation_cases": 0, "engine_fraction": 0.0,
                                  "real_augmentation": False, "spacing_mm": 4.0}))
    pack = tmp_path / "pack"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "BrainUNetSegmentation"), BRAINUNET_CASE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "brainunet_lab", "cv-pack", "--data", str(data), "--output", str(pack),
                        "--model", str(base / "model.pt"), "--config", str(recipe)], capture_output=True, text=True,
                       encoding="utf-8", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list(pack.glob("*.npz"))) == 5 and "5 cases packed" in r.stdout
    script = ROOT / "BrainUNetSegmentation" / "brainunet_lab" / "scripts" / "gpu-paper-cv.sh"
    r = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=600,
                       env=dict(env, STEPS="2", DEVICE="cpu", PACK=str(pack), CONFIG=str(recipe), OUT=str(tmp_path),
                                MODEL=str(base / "model.pt"), PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "paper-cv"
    models = sorted(run.glob("fold*/model.pt")) + [run / "final" / "model.pt"]
    assert len(models) == 6 and not list(run.rglob("checkpoint.pt"))  # 5 folds and the final model
    stamps = {p: p.stat().st_mtime_ns for p in models}
    from brainunet_lab import crossval

    assert crossval.run_cv(data, run, base / "model.pt", 2, 5, scratch=True, overrides=json.loads(recipe.read_text()),
                           resume=True, final=True, progress=False, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in models} == stamps  # scored, not retrained
    rows = crossval.read_cases(run)
    assert sorted({r["case"] for r in rows}) == sorted(p.name for p in data.iterdir())


def test_nested_postprocess_scores_each_fold_with_the_rule_chosen_without_it(tmp_path, monkeypatch):
    """Two folds that want different thresholds: each is scored with the rule chosen on the other, which is
    worse than the rule chosen on both and scored on both (the in-sample figure cv-postprocess prints)."""
    from brainunet_lab import crossval

    monkeypatch.setattr(crossval, "POSTPROCESS_STAGES", (("tumour_threshold", (None, 0.3, 0.9)),))
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:6, 2:6, 2:6] = 2
    for fold, p_tumour in (("fold0", 0.95), ("fold1", 0.35)):
        probs = np.zeros((4, 8, 8, 8), np.float32)
        probs[0] = 1 - p_tumour / 2  # argmax says background in the tumour, a threshold can say tumour
        probs[2] = p_tumour / 2
        probs[0][reference == 0], probs[2][reference == 0] = 0.8, 0.2  # outside: P(tumour) 0.2
        # a fold's two cases: the tumour at P(tumour) p_tumour and a false blob at 0.5 / 0.92
        blob = np.zeros_like(reference, bool)
        blob[0, 0, :] = True
        probs[0][blob] = 0.5 if fold == "fold0" else 0.08
        probs[2][blob] = 0.5 if fold == "fold0" else 0.92
        folder = tmp_path / "run" / fold / "heldout"
        _write_heldout(folder, probs, reference)
    heldout = crossval.load_heldout([tmp_path / "run"])
    _, chosen = crossval.sweep_postprocess(heldout)
    row, rules = crossval.nested_postprocess(heldout)
    assert rules["fold0"]["tumour_threshold"] != rules["fold1"]["tumour_threshold"]  # chosen on the other fold
    assert row["cases"] == 2
    best_in_sample = max(r["mean"] for r in crossval._score_rules(
        [c for _, c in heldout], [chosen]))
    assert row["mean"] < best_in_sample  # choosing on the scored cases flatters; nested does not


def _write_heldout(folder, probs, reference, **extra):
    """One kept held-out case of a scored fold (cv-postprocess reads folds whose scores.csv is there)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "case.npz", probs=probs, mask=np.ones_like(reference, bool), reference=reference, **extra)
    fold = folder.parent if folder.name == "heldout" else folder.parent.parent
    (fold / "scores.csv").touch()


def test_a_missing_sequence_gets_its_own_rule_only_where_its_held_out_cases_want_one(tmp_path, monkeypatch):
    """Every sequence: the tumour is found by argmax. Without T2W the tumour's probability falls to 0.35: the
    search for no-t2w starts from the every-sequence rule (argmax) and moves to the threshold that finds it,
    nested as well, and the setting it prints is only the key that differs. A run scored before conditions
    were kept says how to keep them."""
    from brainunet_lab import crossval

    monkeypatch.setattr(crossval, "POSTPROCESS_STAGES", (("tumour_threshold", (None, 0.3, 0.9)),
                                                         ("min_component_voxels", (0, 5))))
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:6, 2:6, 2:6] = 2
    for fold in ("fold0", "fold1"):
        for condition, p_tumour in (("all", 0.9), ("no-t2w", 0.35)):
            probs = np.zeros((4, 8, 8, 8), np.float32)
            probs[0], probs[2] = 0.9, 0.1
            probs[0][reference == 2], probs[2][reference == 2] = 1 - p_tumour, p_tumour
            heldout = tmp_path / "run" / fold / "heldout"
            _write_heldout(heldout if condition == "all" else heldout / condition, probs, reference)
    every = crossval.load_heldout([tmp_path / "run"])
    without = crossval.load_heldout([tmp_path / "run"], "no-t2w")
    _, shared, chosen = crossval.sweep_condition_postprocess(every, without)
    assert shared["tumour_threshold"] is None and chosen["tumour_threshold"] == 0.3
    assert crossval.condition_settings("no-t2w", chosen) == {f"no-t2w.{k}": chosen[k] for k in crossval.RULE_KEYS}
    shared_row, own_row, rules = crossval.nested_condition_postprocess(every, without)
    assert shared_row["dice_WT"] == 0.0 and own_row["dice_WT"] == 1.0 and own_row["cases"] == 2
    assert all(rule["tumour_threshold"] == 0.3 for rule in rules.values())
    with pytest.raises(InputError, match="cv-rescore .* --keep"):
        crossval.load_heldout([tmp_path / "run"], "no-t1c")


def test_ensemble_averages_the_runs_probabilities_case_by_case(tmp_path):
    """Two runs of the same folds, each sure of the tumour in a different half: pooled, each run's cases
    count apart (four cases, each half-right); averaged, each case once with both halves found by a
    threshold. Runs of other folds are refused."""
    from brainunet_lab import crossval

    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:6, 2:6, 2:6] = 2
    for run, half in (("a", slice(0, 4)), ("b", slice(4, 8))):
        probs = np.zeros((4, 8, 8, 8), np.float32)
        probs[0] = 1.0
        tumour = reference == 2
        inside = np.zeros_like(tumour)
        inside[half] = True
        probs[0][tumour & inside], probs[2][tumour & inside] = 0.0, 1.0
        for fold in ("fold0", "fold1"):
            _write_heldout(tmp_path / run / fold / "heldout", probs, reference)
    runs = [tmp_path / "a", tmp_path / "b"]
    assert len(crossval.load_heldout(runs)) == 4
    averaged = crossval.load_heldout(runs, ensemble=True)
    assert [fold for fold, _ in averaged] == ["fold0", "fold1"]
    assert np.allclose(averaged[0][1][0][2][reference == 2], 0.5)
    rows = crossval._score_rules([c for _, c in averaged], [{**crossval._no_rule(), "tumour_threshold": 0.4}])
    assert rows[0]["dice_WT"] == 1.0  # each run alone finds half the tumour; their average, all of it
    import shutil
    shutil.rmtree(tmp_path / "b" / "fold1")
    with pytest.raises(InputError, match="same folds"):
        crossval.load_heldout(runs, ensemble=True)


def test_a_postprocessing_stage_must_gain_the_minimum_to_change_the_rule(tmp_path, monkeypatch):
    """A threshold that helps a little is kept only when its gain reaches ``min_gain``; the argmax stays
    otherwise, and what the search prints is still every rule's score."""
    from brainunet_lab import crossval

    monkeypatch.setattr(crossval, "POSTPROCESS_STAGES", (("tumour_threshold", (None, 0.3)),))
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[2:6, 2:6, 2:6] = 2  # 64 voxels
    probs = np.zeros((4, 8, 8, 8), np.float32)
    probs[0], probs[2] = 0.8, 0.2  # background everywhere by argmax and by threshold 0.3
    probs[0][reference == 2], probs[2][reference == 2] = 0.2, 0.8
    probs[0][2, 2, 2], probs[2][2, 2, 2] = 0.6, 0.4  # one tumour voxel only the threshold finds
    folder = tmp_path / "run" / "fold0" / "heldout"
    _write_heldout(folder, probs, reference)

    rows, chosen = crossval.sweep_postprocess(crossval.load_heldout([tmp_path / "run"]), min_gain=0.0)
    gain = rows[1]["mean"] - rows[0]["mean"]
    assert 0 < gain < 0.05 and chosen["tumour_threshold"] == 0.3
    _, chosen = crossval.sweep_postprocess(crossval.load_heldout([tmp_path / "run"]), min_gain=gain * 2)
    assert chosen["tumour_threshold"] is None
    _, chosen = crossval.sweep_postprocess(crossval.load_heldout([tmp_path / "run"]), min_gain=gain / 2)
    assert chosen["tumour_threshold"] == 0.3


def test_region_decoding_search_finds_the_et_share_argmax_misses(tmp_path, capsys):
    """An enhancing core the network calls a little less likely ET than NETC: the argmax labels it NETC, the
    ET-share threshold of ``--region-decoding`` finds it, and the plain search never offers that rule."""
    from brainunet_lab import crossval

    reference = np.zeros((12, 12, 12), np.uint8)
    reference[2:10, 2:10, 2:10] = 2
    reference[4:8, 4:8, 4:8] = 3  # 64 ET voxels inside SNFH
    probs = np.zeros((4, 12, 12, 12), np.float32)
    probs[0] = 1.0
    probs[:, reference == 2] = np.array([0.05, 0.05, 0.85, 0.05])[:, None]
    probs[:, reference == 3] = np.array([0.05, 0.5, 0.05, 0.4])[:, None]  # ET share 0.44: NETC by argmax
    for fold in ("fold0", "fold1"):
        folder = tmp_path / "run" / fold / "heldout"
        _write_heldout(folder, probs, reference)
    heldout = crossval.load_heldout([tmp_path / "run"])

    plain_rows, plain = crossval.sweep_postprocess(heldout)
    assert plain["et_threshold"] is None and all(r["et_threshold"] is None for r in plain_rows)
    rows, chosen = crossval.sweep_postprocess(heldout, stages=crossval.postprocess_stages(region_decoding=True))
    assert chosen["et_threshold"] in (0.3, 0.4) and chosen["core_threshold"] is None
    best = next(r for r in rows if all(r[k] == chosen[k] for k in crossval.RULE_KEYS))
    assert best["dice_ET"] == 1.0 and plain_rows[0]["dice_ET"] == 0.0
    assert len(rows) == sum(len(values) for _, values in crossval.postprocess_stages(True))  # a row per rule a stage lists
    nested, rules = crossval.nested_postprocess(heldout, stages=crossval.postprocess_stages(True))
    assert nested["dice_ET"] == 1.0 and all(r["et_threshold"] in (0.3, 0.4) for r in rules.values())

    assert cli.main(["cv-postprocess", str(tmp_path / "run"), "--region-decoding"]) == 0
    register = capsys.readouterr().out.split("register with: ")[1]
    assert "--set et_threshold=0.3" in register or "--set et_threshold=0.4" in register
    assert "core_threshold" not in register  # unset: not registered (a model without it loads in older releases)


def test_cv_errors_measures_excess_volume_and_how_far_it_lies(tmp_path, capsys):
    """A case whose prediction adds a far blob to the reference tumour: ratio and far share as drawn."""
    from brainunet_lab.crossval import volume_errors

    reference = np.zeros((40, 20, 20), np.uint8)
    reference[2:6, 2:6, 2:6] = 2  # 64 voxels
    probs = np.zeros((4, 40, 20, 20), np.float32)
    probs[0] = 1.0
    tumour = (reference > 0).copy()
    tumour[30:34, 2:6, 2:6] = True  # 64 more voxels, 24 mm away
    tumour[6, 2:6, 2:6] = True  # 16 voxels touching the tumour
    probs[0][tumour], probs[2][tumour] = 0.0, 1.0
    folder = tmp_path / "run" / "fold0" / "heldout"
    _write_heldout(folder, probs, reference,
             spacing=np.array([1.0, 1.0, 1.0]))
    row = volume_errors([tmp_path / "run"])[0]
    assert row["reference_ml"] == pytest.approx(0.064) and row["predicted_ml"] == pytest.approx(0.144)
    assert row["ratio"] == pytest.approx(144 / 64) and row["false_positive_far"] == pytest.approx(64 / 80)
    assert cli.main(["cv-errors", str(tmp_path / "run")]) == 0
    assert "2.25" in capsys.readouterr().out


def test_cpu_bf16_training_step_runs_the_loss_in_fp32():
    """cpu_bf16: the forward pass autocasts to bf16, the loss and the update stay fp32 (finite, weights fp32)."""
    import torch

    from brainunet_lab.training import TrainConfig, _Optimisation

    config = TrainConfig(network={"features": [4, 8], "blocks_per_level": 1, "attention": True, "dropout": 0.0},
                         patch_size=[16, 16, 16], batch_size=1, steps=3, lr=1e-3, cpu_bf16=True)
    opt = _Optimisation(config, None, "cpu", 1)
    x, y = torch.randn(1, 3, 16, 16, 16), torch.randint(0, 4, (1, 16, 16, 16))
    before = [p.detach().clone() for p in opt.model.parameters()]
    seen = {}

    def record_network_output(module, args, out):  # returns None: the output goes on unchanged
        seen["network"] = (out[0] if isinstance(out, (list, tuple)) else out).dtype

    opt.net.register_forward_hook(record_network_output)
    loss_fn = opt.loss_fn

    def recording_loss(outputs, target):
        seen["loss"] = {o.dtype for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])}
        return loss_fn(outputs, target)

    opt.loss_fn = recording_loss
    loss, _ = opt.train_step(x, y)
    assert seen["network"] == torch.bfloat16 and seen["loss"] == {torch.float32}
    assert np.isfinite(loss) and opt.cpu_bf16
    assert all(p.dtype == torch.float32 for p in opt.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, opt.model.parameters()))
