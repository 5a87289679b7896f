"""Shared fixtures: a real MRML scene (slicer-core), a synthetic case on disk, a tiny trained-shape network."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BrainUNetSegmentation"))
# the shared data (never in the repository): tests that read it skip when it is absent, and only then
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_REAL = SHARED_DATA / "real"
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The plumbing tests (geometry round trips, outputs, bad input) run the exact voxel-wise baseline, which
# is fast and orientation-exact; the bundled network is tested on its own (test_bundled_model.py).
os.environ["BRAINUNET_MODEL"] = "intensity-baseline"
# registered and downloaded models go to the user's folder: a throw-away one, never the tester's own
os.environ["BRAINUNET_HOME"] = tempfile.mkdtemp(prefix="brainunet-home-")


@pytest.fixture
def scene():
    from BrainUNetSegmentationLib import mrml

    s = mrml.new_headless_scene()
    yield s
    s.Clear(1)


@pytest.fixture(scope="session")
def synthetic_case(tmp_path_factory):
    from brainunet import synthetic

    return synthetic.write_case(tmp_path_factory.mktemp("case"), seed=0, shape=(48, 56, 40), spacing=(2.4, 2.4, 2.4))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A 2-level BrainUNet with random weights saved as a registry-style fp16 file."""
    import torch

    from brainunet import weights
    from brainunet.network import BrainUNet, NetworkConfig
    from brainunet.settings import ModelSettings

    torch.manual_seed(0)
    model = BrainUNet(NetworkConfig(features=(4, 8), blocks_per_level=1))
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    sha = weights.save_weights(path, model, "tiny-test",
                               ModelSettings.from_flat({"spacing_mm": [2, 2, 2], "patch_size": [32, 32, 32]}))
    return path, sha


def case_args(case: dict) -> list[str]:
    return ["--t1c", str(case["t1c"]), "--t2w", str(case["t2w"]), "--t2f", str(case["t2f"])]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    from brainunet_lab.evaluation import dice as _dice

    return _dice(a, b)
