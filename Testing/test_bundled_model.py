"""The bundled model: present, verified, small, the default, and it segments a synthetic glioma.
(Its accuracy on real cases is measured by `brainunet evaluate` and, when ../shared is present,
guarded in test_real_data.py.)"""
import numpy as np
import pytest

from brainunet import pipeline, weights
from brainunet.engine import generate_case, phantom_anatomy
from brainunet.evaluation import dice

BUNDLED = "brainunet-2mm-synthetic"


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
    assert all(v.dtype.is_floating_point is False or str(v.dtype) == "torch.float16"
               for v in __import__("torch").load(path, weights_only=True)["state_dict"].values())


@pytest.fixture(scope="module")
def loaded():
    return pipeline.load_model(BUNDLED)


def _volumes(case):
    from brainunet.imageio import Volume

    affine = np.diag([*case.spacing, 1.0])
    image = case.image.numpy()
    # undo the z-score's zero background: inference sees raw-like positive intensities outside nothing
    return {m: Volume(image[i] - image[i].min() * case.mask.numpy(), affine, m)
            for i, m in enumerate(("t1c", "t2w", "t2f"))}


def test_bundled_model_segments_an_engine_case(loaded):
    case = generate_case(12345, phantom_anatomy(2.0))
    result = pipeline.segment(_volumes(case), loaded, device="cpu")
    ref = case.labels.numpy()
    assert dice(result.labels > 0, ref > 0) > WT_FLOOR


WT_FLOOR = 0.7
