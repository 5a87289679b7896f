"""The bundled model: present, verified, small, the default, and it segments a synthetic glioma.
(Its accuracy on real cases is measured by `brainunet evaluate` and, when ../shared is present,
guarded in test_real_data.py.)"""
import numpy as np
import pytest

from brainunet import pipeline, weights
from brainunet_lab.engine import generate_case, phantom_anatomy
from brainunet_lab.evaluation import dice

BUNDLED = "brainunet-2mm-real-v2"
WT_FLOOR = 0.85  # whole-tumour Dice on engine case 12345 (measured 0.983 with brainunet-2mm-real-v2)


def test_bundled_model_is_registered_verified_compact_and_default(monkeypatch):
    monkeypatch.delenv("BRAINUNET_MODEL", raising=False)
    entry = weights.find_model(BUNDLED)
    path = entry.path()
    assert path.is_file() and weights.sha256_of(path) == entry.sha256
    assert path.stat().st_size < 16 * 2**20, "keep the clone small: fp16 weights"
    assert weights.default_model().name == BUNDLED
    model, payload = weights.load_weights(path, entry.sha256)
    pp = payload["preprocessing"]
    assert pp["modalities"] == ["t1c", "t2w", "t2f"] and pp["modality_dropout"] is True
    assert payload["extra"]["training"]["engine_version"]
    import torch

    state = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def loaded():
    return pipeline.load_model(BUNDLED)


def _volumes(case):
    """An engine case as input volumes (already normalised; the pipeline's normalisation is idempotent)."""
    from brainunet.imageio import Volume

    affine = np.diag([*case.spacing, 1.0])
    return {m: Volume(case.image[i].numpy(), affine, m) for i, m in enumerate(("t1c", "t2w", "t2f"))}


def test_bundled_model_segments_an_engine_case(loaded):
    case = generate_case(12345, phantom_anatomy(2.0))
    result = pipeline.segment(_volumes(case), loaded, device="cpu")
    ref = case.labels.numpy()
    assert dice(result.labels > 0, ref > 0) > WT_FLOOR

