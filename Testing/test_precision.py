"""Network precision: 'auto' picks bf16 only where the CPU runs it natively; bf16 gives the fp32 answer."""
import numpy as np
import pytest
import torch

from brainunet import inference
from brainunet.errors import InputError
from brainunet.network import BrainUNet, NetworkConfig


def test_auto_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("BRAINUNET_PRECISION", raising=False)
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision(None, "cpu") == "bf16"
    assert inference.resolve_precision(None, "cuda") == "fp32"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_precision("auto", "cpu") == "fp32"
    assert inference.resolve_precision("bf16", "cpu") == "bf16"  # explicit choice is obeyed


def test_environment_and_bad_values(monkeypatch):
    monkeypatch.setenv("BRAINUNET_PRECISION", "fp32")
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision(None, "cpu") == "fp32"
    with pytest.raises(InputError, match="precision"):
        inference.resolve_precision("fp8", "cpu")


def test_bf16_labels_agree_with_fp32():
    torch.manual_seed(0)
    net = BrainUNet(NetworkConfig(features=(8, 16, 32), deep_supervision=False)).eval()
    image = np.random.default_rng(0).normal(size=(3, 32, 32, 32)).astype(np.float32)
    fp32 = inference.predict_probabilities(net, image, (32, 32, 32), precision="fp32")
    bf16 = inference.predict_probabilities(net, image, (32, 32, 32), precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)  # bf16 did run: it is not fp32 under another name
    assert np.abs(bf16 - fp32).max() < 0.05  # bf16 keeps 8 bits of mantissa
    assert (bf16.argmax(0) == fp32.argmax(0)).mean() > 0.97
