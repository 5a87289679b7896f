import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainunet import weights
from brainunet.errors import Cancelled, WeightsError
from brainunet.inference import predict_probabilities, resolve_device, window_plan
from brainunet.network import PAPER_CONFIG, BrainUNet, NetworkConfig, count_parameters
from brainunet.settings import ModelSettings


def test_paper_configuration_size():
    n = count_parameters(BrainUNet(PAPER_CONFIG))
    assert 20e6 < n < 25e6  # the paper's ~22 M parameters (~90 MB fp32)


def test_attention_gates_on_every_skip_and_residual_blocks():
    net = BrainUNet(NetworkConfig(features=(4, 8, 16)))
    assert len(net.gates) == 2 and all(g.__class__.__name__ == "AttentionGate" for g in net.gates)
    assert all(m[0].__class__.__name__ == "ResidualBlock" for m in list(net.encoders) + list(net.decoders))
    out = net(torch.zeros(1, 3, 16, 16, 16))
    assert out.shape == (1, 4, 16, 16, 16)


def test_deep_supervision_outputs_in_training():
    net = BrainUNet(NetworkConfig(features=(4, 8, 16), deep_supervision=True)).train()
    outs = net(torch.zeros(1, 3, 16, 16, 16))
    assert [o.shape[-1] for o in outs] == [16, 8]


def test_weights_round_trip_fp16_and_checksum(tmp_path):
    torch.manual_seed(0)
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    sha = weights.save_weights(tmp_path / "w.pt", net, "t")
    model, payload = weights.load_weights(tmp_path / "w.pt", sha)
    assert payload["name"] == "t"
    for k, v in net.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v.half().float())
    with pytest.raises(WeightsError, match="checksum"):
        weights.load_weights(tmp_path / "w.pt", "0" * 64)


def test_missing_truncated_and_foreign_weights(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        weights.load_weights(tmp_path / "nope.pt")
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    weights.save_weights(tmp_path / "w.pt", net, "t")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt|truncated"):
        weights.load_weights(tmp_path / "cut.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError):  # weights_only refuses arbitrary pickled objects
        weights.load_weights(tmp_path / "evil.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not a BrainUNet"):
        weights.load_weights(tmp_path / "other.pt")
    payload = torch.load(tmp_path / "w.pt", weights_only=True)
    torch.save({**payload, "version": weights.WEIGHTS_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(WeightsError, match="written by a newer BrainUNet.*Update BrainUNet"):
        weights.load_weights(tmp_path / "newer.pt")
    torch.save({**payload, "state_dict": list(payload["state_dict"].values())}, tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="does not match the BrainUNet network"):
        weights.load_weights(tmp_path / "list.pt")


@pytest.mark.parametrize("text", ["{", "{}", "[]", '{"models": {}}', '{"models": [{"name": "x"}]}',
                                  '{"models": [{"name": "x", "kind": "network", "file": 3}]}',
                                  '{"models": [{"name": " ", "kind": "network"}]}',
                                  '{"models": [{"name": "x", "kind": "network", "sha256": 12}]}'])
def test_a_registry_that_is_not_a_list_of_models_is_reported_and_not_overwritten(tmp_path, text):
    """A hand-edited or damaged user registry: one message saying to remove it (models listing, running and
    registering alike), and registering leaves it as it was."""
    registry = tmp_path / "models" / "registry.json"
    registry.parent.mkdir()
    registry.write_text(text)
    with pytest.raises(WeightsError, match="remove that file"):
        weights.load_registry(user_registry=registry)
    src = tmp_path / "w.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "t")
    with pytest.raises(WeightsError, match="remove that file"):
        weights.register_model(src, "ours", registry_path=registry)
    assert registry.read_text() == text and not (registry.parent / "ours.pt").exists()


def test_registering_into_a_folder_that_cannot_be_written_says_so(tmp_path):
    src = tmp_path / "w.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "t")
    with pytest.raises(WeightsError, match="cannot be written into /proc/brainunet.*BRAINUNET_HOME"):
        weights.register_model(src, "ours", registry_path=Path("/proc/brainunet/models/registry.json"))


def test_registry_default_and_offline_download(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINUNET_MODEL", raising=False)
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    src = tmp_path / "src.pt"
    sha = weights.save_weights(src, net, "remote")
    entries = [weights.ModelEntry("remote", "network", "d", file="remote.pt", sha256=sha, url=src.as_uri()),
               weights.ModelEntry("intensity-baseline", "baseline", "b")]
    reg = tmp_path / "models"
    assert weights.default_model(entries, reg).name == "remote"  # downloadable: fetched on first use
    path = weights.ensure_weights(entries[0], reg)
    assert path.exists() and weights.sha256_of(path) == sha
    assert weights.default_model(entries, reg).name == "remote"
    bad = weights.ModelEntry("bad", "network", "d", file="bad.pt", sha256="0" * 64, url=src.as_uri())
    with pytest.raises(WeightsError, match="checksum"):
        weights.ensure_weights(bad, reg)
    assert not (reg / "bad.pt").exists()
    gone = weights.ModelEntry("gone", "network", "d", file="gone.pt", url=(tmp_path / "missing.pt").as_uri())
    with pytest.raises(WeightsError, match="download"):
        weights.ensure_weights(gone, reg)
    assert [e.name for e in weights.load_registry()]  # the shipped registry parses


def test_window_plan_covers_volume_without_cropping():
    padded, patch, origins = window_plan((70, 40, 20), (32, 32, 32), divisor=8)
    assert patch == (32, 32, 24)
    assert padded == (70, 40, 24)
    for axis in range(3):
        covered = np.zeros(padded[axis], bool)
        for o in origins:
            covered[o[axis]:o[axis] + patch[axis]] = True
        assert covered.all()


def test_sliding_window_probabilities_tta_progress_and_cancel():
    torch.manual_seed(0)
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    image = np.random.default_rng(0).normal(size=(3, 40, 30, 20)).astype(np.float32)
    seen = []
    probs = predict_probabilities(net, image, (16, 16, 16), progress=lambda f, m: seen.append(f))
    assert probs.shape == (4, 40, 30, 20)
    assert np.allclose(probs.sum(0), 1, atol=1e-4)
    assert seen == sorted(seen) and seen[-1] == 1.0
    tta = predict_probabilities(net, image, (48, 32, 32), tta=True)
    assert tta.shape == probs.shape and np.allclose(tta.sum(0), 1, atol=1e-4)
    # every flip's output, flipped back and averaged (one whole-volume window, so nothing else mixes in)
    flips = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
    each = [np.flip(predict_probabilities(net, np.ascontiguousarray(np.flip(image, axes)), (48, 32, 32)), axes)
            for axes in flips]
    assert np.allclose(tta, np.mean(each, axis=0), atol=1e-5)
    calls = []
    with pytest.raises(Cancelled):
        predict_probabilities(net, image, (16, 16, 16), should_cancel=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3  # stopped at the first check that said so, not after the remaining windows


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "no-gpu"])
def test_device_choice(monkeypatch, gpu):
    from brainunet.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_device("cpu") == "cpu" and resolve_device("CPU") == "cpu"
    assert resolve_device("auto") == ("cuda" if gpu else "cpu") and resolve_device(None) == resolve_device("auto")
    if gpu:
        assert resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    else:
        monkeypatch.setattr(torch.version, "cuda", "12.4")  # a GPU build on a computer without a GPU
        with pytest.raises(InputError, match="no.*available; choose device 'cpu' or 'auto'"):
            resolve_device("cuda")
        monkeypatch.setattr(torch.version, "cuda", None)  # the CPU-only build: where the GPU build comes from
        monkeypatch.setattr(sys, "platform", "linux")
        for device in ("cuda", "cuda:1"):
            with pytest.raises(InputError, match="CPU-only build; choose device 'cpu' or 'auto'. To use the GPU, "
                                                 "replace it with the GPU build .*Uninstall, restart Slicer"):
                resolve_device(device)
        monkeypatch.setattr(sys, "platform", "darwin")  # no CUDA build exists there: the plain message
        with pytest.raises(InputError, match="no.*available; choose device 'cpu' or 'auto'"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="Unknown device 'tpu'"):
        resolve_device("tpu")


def test_cuda_out_of_memory_falls_back_to_cpu(monkeypatch):
    from brainunet import inference

    original = inference._predict
    devices = []

    def fake_predict(model, image, patch, overlap, tta, device, progress, should_cancel, precision="fp32"):
        devices.append(device)
        if device == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(model, image, patch, overlap, tta, device, progress, should_cancel, precision)

    monkeypatch.setattr(inference, "_predict", fake_predict)
    messages = []
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    probs = inference.predict_probabilities(net, np.zeros((3, 16, 16, 16), np.float32), (16, 16, 16), device="cuda",
                                            progress=lambda f, m: messages.append(m))
    assert devices == ["cuda", "cpu"] and probs.shape == (4, 16, 16, 16)
    assert any("out of memory" in m for m in messages)


def test_register_installs_a_trained_model_as_default_with_inference_options(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINUNET_MODEL", raising=False)
    import json
    import shutil

    registry = tmp_path / "models" / "registry.json"
    registry.parent.mkdir()
    shutil.copy(weights.REGISTRY_PATH, registry)
    before = [e.name for e in weights.load_registry(registry)]
    src = tmp_path / "model.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "run-folder-name",
                         ModelSettings.from_flat({"spacing_mm": [2, 2, 2]}))
    entry = weights.register_model(src, "clinic-finetuned", "fine-tuned on our cases", {"fill_core_holes": True},
                                   registry_path=registry)
    entries = weights.load_registry(registry)
    assert [e.name for e in entries] == ["clinic-finetuned"] + [n for n in before if n != "clinic-finetuned"]
    assert weights.default_model(entries, registry.parent).name == "clinic-finetuned"
    _, payload = weights.load_weights(entry.path(registry.parent), entry.sha256)
    assert payload["postprocessing"]["fill_core_holes"] is True and payload["name"] == "clinic-finetuned"
    assert payload["preprocessing"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert entries[0].extra.get("settings") == {"fill_core_holes": True}  # shown by `brainunet models`
    # registering the same name again replaces the entry instead of duplicating it
    weights.register_model(src, "clinic-finetuned", registry_path=registry)
    assert [e.name for e in weights.load_registry(registry)].count("clinic-finetuned") == 1
    assert json.loads(registry.read_text())["models"][0]["file"] == "clinic-finetuned.pt"


def test_brainunet_model_environment_variable_picks_the_default(monkeypatch):
    entries = [weights.ModelEntry("intensity-baseline", "baseline", "b")]
    monkeypatch.setenv("BRAINUNET_MODEL", "intensity-baseline")
    assert weights.default_model(entries).name == "intensity-baseline"
    monkeypatch.setenv("BRAINUNET_MODEL", "nope")
    with pytest.raises(WeightsError, match="Unknown model 'nope'"):
        weights.default_model(entries)


def test_missing_bundled_weights_are_an_error_not_a_silent_intensity_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINUNET_MODEL", raising=False)
    entries = [weights.ModelEntry("bundled", "network", "d", file="bundled.pt", sha256="0" * 64),
               weights.ModelEntry("intensity-baseline", "baseline", "b")]
    with pytest.raises(WeightsError, match="weights of the default model 'bundled' are missing"):
        weights.default_model(entries, tmp_path)
    with pytest.raises(WeightsError, match="No trained model"):
        weights.default_model(entries[1:], tmp_path)
    users = [weights.ModelEntry("ours", "network", "d", file="ours.pt", base_dir=tmp_path / "home")]
    with pytest.raises(WeightsError, match="missing.*Register its file again.*--name ours --replace"):
        weights.default_model(users, tmp_path / "home")
    monkeypatch.setenv("BRAINUNET_MODEL", "intensity-baseline")  # the rule runs when asked for by name
    assert weights.default_model(entries, tmp_path).name == "intensity-baseline"


def test_register_writes_to_the_users_folder_and_never_the_install_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINUNET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BRAINUNET_MODEL", raising=False)
    install = {p: p.stat().st_mtime_ns for p in weights.MODELS_DIR.iterdir()}
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    src = tmp_path / "ours.pt"
    weights.save_weights(src, net, "ours")
    entry = weights.register_model(src, "clinic-model", "ours")
    assert entry.path() == tmp_path / "home" / "models" / "clinic-model.pt" and entry.path().is_file()
    assert weights.default_model().name == "clinic-model"  # the user's model comes first
    assert [e.name for e in weights.load_registry()][:2] == ["clinic-model", weights.load_registry(weights.REGISTRY_PATH)[0].name]
    assert {p: p.stat().st_mtime_ns for p in weights.MODELS_DIR.iterdir()} == install  # nothing written there


def test_bundle_replaces_the_old_bundled_model_and_keeps_the_rest(tmp_path):
    from brainunet_lab.cli import bundle_model

    models = tmp_path / "models"
    models.mkdir()
    old = models / "old.pt"
    weights.save_weights(old, BrainUNet(NetworkConfig(features=(4, 8))), "old")
    registry = models / "registry.json"
    registry.write_text('{"models": [{"name": "old", "kind": "network", "description": "d", "file": "old.pt"}, '
                        '{"name": "intensity-baseline", "kind": "baseline", "description": "rule"}]}')
    src = tmp_path / "final.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "final")
    entry = bundle_model(src, "new", "trained on real cases", {"tumour_threshold": 0.75}, replaces=["old"],
                         registry_path=registry, fields={"accuracy": "CV WT 0.8", "licence": "Apache-2.0"})
    assert entry.extra["accuracy"] == "CV WT 0.8" and entry.extra["licence"] == "Apache-2.0"
    assert entry.extra["inputs"] == {"sequences": ["t1c", "t2w", "t2f"], "one_may_be_missing": False}
    assert [e.name for e in weights.load_registry(registry)] == ["new", "intensity-baseline"]
    assert not old.exists() and entry.path().is_file() and weights.sha256_of(entry.path()) == entry.sha256
    _, payload = weights.load_weights(entry.path(), entry.sha256)
    assert payload["postprocessing"]["tumour_threshold"] == 0.75


def test_entries_listed_for_another_home_download_there_and_find_it(tmp_path, monkeypatch):
    """The Slicer process lists the worker's models (its BRAINUNET_HOME, not its own): an install-tree
    entry's download goes to that home, and the listing then finds the file there, as the worker does."""
    worker_home, own_home = tmp_path / "worker", tmp_path / "own"
    monkeypatch.setenv("BRAINUNET_HOME", str(own_home))
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    src = tmp_path / "src.pt"
    sha = weights.save_weights(src, net, "remote")
    entry = weights.load_registry(user_registry=weights.user_registry_path(worker_home))[0]
    remote = weights.ModelEntry("remote", "network", "d", file="remote-test.pt", sha256=sha, url=src.as_uri(),
                                base_dir=weights.MODELS_DIR, user_dir=entry.user_dir)
    assert entry.user_dir == worker_home / "models"
    assert remote.download_target() == worker_home / "models" / "remote-test.pt"  # never the install tree
    path = weights.ensure_weights(remote)
    assert path == worker_home / "models" / "remote-test.pt" and remote.path() == path
    assert not (own_home / "models").exists()
    elsewhere = weights.ModelEntry("local", "network", "d", file="local.pt", base_dir=tmp_path / "registry")
    assert elsewhere.download_target() == tmp_path / "registry" / "local.pt"  # a writable registry's own folder


def test_mirror_tta_averages_the_image_and_its_left_right_mirror():
    """"mirror" is two passes, the second on the image flipped along its first (left-right) axis: its
    output on an image equals that on the mirrored image, mirrored back."""
    from brainunet.inference import tta_flips

    assert len(tta_flips(False)) == 1 and len(tta_flips("mirror")) == 2 and len(tta_flips(True)) == 8
    with pytest.raises(ValueError, match="mirror"):
        tta_flips("sideways")
    torch.manual_seed(0)
    net = BrainUNet(NetworkConfig(features=(4, 8)))
    image = np.random.default_rng(0).normal(size=(3, 32, 24, 16)).astype(np.float32)
    plain = predict_probabilities(net, image, (32, 24, 16))
    mirrored = predict_probabilities(net, image, (32, 24, 16), tta="mirror")
    flipped = predict_probabilities(net, np.ascontiguousarray(image[:, ::-1]), (32, 24, 16), tta="mirror")
    assert not np.allclose(plain, mirrored, atol=1e-4)
    assert np.allclose(mirrored, flipped[:, ::-1], atol=1e-5)
    assert np.allclose(mirrored, (plain + predict_probabilities(
        net, np.ascontiguousarray(image[:, ::-1]), (32, 24, 16))[:, ::-1]) / 2, atol=1e-5)


def test_registrations_at_once_keep_each_others_entries_and_a_dead_processs_lock_is_taken_over(tmp_path):
    """Jobs registering at once (one per fold, a shared BRAINUNET_HOME) take turns on the registry; a lock
    held by a live BrainUNet makes a registration wait and then say so; one left by a dead process is taken over."""
    import os
    import threading
    import time

    registry = tmp_path / "models" / "registry.json"
    src = tmp_path / "w.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "t")
    errors = []

    def register(name):
        try:
            weights.register_model(src, name, registry_path=registry)
        except Exception as exc:  # reported below, with the others' outcome
            errors.append(exc)

    jobs = [threading.Thread(target=register, args=(f"fold{i}",)) for i in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert errors == []
    assert {e.name for e in weights.load_registry(registry)} == {f"fold{i}" for i in range(4)}
    lock = Path(str(registry) + ".lock")
    assert not lock.exists() and not list(registry.parent.glob("*.tmp"))
    lock.touch()
    with pytest.raises(WeightsError, match="being changed by another BrainUNet.*remove .*registry.json.lock"):
        with weights.registry_lock(registry, wait_s=0.2):
            pass
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    weights.register_model(src, "fold4", registry_path=registry)
    assert not lock.exists() and weights.load_registry(registry)[0].name == "fold4"


def test_model_names_differing_only_in_case_are_refused_and_a_newer_kind_of_model_is_left_out(tmp_path, caplog):
    """On Windows and macOS Clinic.pt and clinic.pt are one file: the second name is refused. A model of a kind
    that a newer BrainUNet registered in the same folder is left out with a warning; the others still run."""
    registry = tmp_path / "models" / "registry.json"
    src = tmp_path / "w.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "t")
    weights.register_model(src, "Clinic", registry_path=registry)
    with pytest.raises(WeightsError, match="'Clinic' is already registered.*upper and lower case"):
        weights.register_model(src, "clinic", registry_path=registry)
    assert [e.name for e in weights.load_registry(registry)] == ["Clinic"]
    assert sorted(p.name for p in registry.parent.glob("*.pt")) == ["Clinic.pt"]
    text = registry.read_text(encoding="utf-8")
    registry.write_text(text.replace('"models": [', '"models": [{"name": "future", "kind": "cascade"}, '),
                        encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert [e.name for e in weights.load_registry(registry)] == ["Clinic"]
    assert "future" in caplog.text and "Update BrainUNet" in caplog.text
    weights.register_model(src, "second", registry_path=registry)  # the newer entry is kept for its version
    assert '"future"' in registry.read_text(encoding="utf-8")
