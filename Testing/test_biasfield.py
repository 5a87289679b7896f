"""N4 bias-field correction: removes a smooth multiplicative field, leaves a field-free image alone,
keeps a lesion, and is wired through the model settings (registry) into preprocessing and fine-tuning."""
import numpy as np
import pytest

from brainunet import biasfield, pipeline, weights
from brainunet.imageio import Volume
from brainunet.preprocessing import prepare

SHAPE = (64, 72, 56)
SPACING = (2.0, 2.0, 2.0)


def _phantom(seed=0):
    """Two-tissue brain with a bright lesion, mild noise; returns (image, brain mask, lesion mask)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grid))
    brain = r < 0.9
    image = np.where(r < 0.6, 100.0, 70.0) * brain
    lesion = np.sqrt((grid[0] - 0.3) ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.2
    image[lesion] = 160.0
    image += rng.normal(0, 2.0, SHAPE) * brain
    return image.astype(np.float32), brain, lesion


def _smooth_field(strength=0.5):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    return np.exp(strength * (0.8 * x + 0.5 * y * z - 0.4 * z ** 2)).astype(np.float32)


def _cv(values):
    return float(values.std() / values.mean())


def test_smooth_field_is_removed():
    clean, brain, lesion = _phantom()
    biased = clean * _smooth_field()
    corrected = biasfield.correct(biased, brain, SPACING)
    inner = brain & ~lesion & (np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE],
                                                                         indexing="ij"))) < 0.55)
    # within one tissue the biased image varies a lot; after correction it is nearly flat again
    assert _cv(biased[inner]) > 0.08
    assert _cv(corrected[inner]) < 0.5 * _cv(biased[inner])
    # the lesion stays clearly brighter than its surroundings (a field this smooth cannot absorb it)
    assert corrected[lesion].mean() > 1.3 * corrected[inner].mean()


def test_field_free_image_is_left_nearly_unchanged():
    clean, brain, _ = _phantom(1)
    corrected = biasfield.correct(clean, brain, SPACING)
    ratio = corrected[brain] / clean[brain]
    assert np.percentile(ratio, 95) / np.percentile(ratio, 5) < 1.15
    assert np.array_equal(corrected[~brain], clean[~brain])


def test_prepare_applies_correction_only_when_asked():
    clean, brain, _ = _phantom(2)
    biased = clean * _smooth_field()
    reference = Volume(biased, np.diag([*SPACING, 1.0]), "t1c")
    aligned = {"t1c": biased, "t2w": biased, "t2f": biased}
    plain = prepare(aligned, reference, ("t1c", "t2w", "t2f"), SPACING)
    fixed = prepare(aligned, reference, ("t1c", "t2w", "t2f"), SPACING, bias_correction=True)
    assert plain.image.shape == fixed.image.shape
    assert not np.allclose(plain.image, fixed.image)
    assert np.array_equal(plain.mask, fixed.mask)


def test_bundled_model_runs_with_bias_correction(monkeypatch):
    """Its training cases were N4-corrected (the recipe keeps its base model's preprocessing, and the case
    cache is keyed by it), so inference must correct too."""
    monkeypatch.delenv("BRAINUNET_MODEL", raising=False)
    loaded = pipeline.load_model(weights.default_model().name)
    assert loaded.preprocessing.bias_correction is True


def test_registry_settings_turn_correction_on(tmp_path):
    from brainunet.network import BrainUNet, NetworkConfig

    src = tmp_path / "model.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "plain")
    registry = tmp_path / "models" / "registry.json"
    entry = weights.register_model(src, "corrected", "", {"bias_correction": True}, registry_path=registry)
    assert pipeline.load_model(str(entry.path())).preprocessing.bias_correction is True


def test_finetuning_keeps_the_base_models_registry_settings(monkeypatch):
    from brainunet_lab.training import finetune_config

    monkeypatch.delenv("BRAINUNET_MODEL", raising=False)
    config = finetune_config(None, steps=1)
    assert config.bias_correction is True
    # the post-processing chosen for the base model by cross-validation goes into the fine-tuned model
    from brainunet_lab.training import model_settings

    base = pipeline.load_model(weights.default_model().name).postprocessing
    assert model_settings(config).postprocessing == base and base.tumour_threshold is not None


def test_tiny_volumes_are_left_alone(monkeypatch):
    """Under 1,000 brain voxels there is nothing to fit a field on: N4 is never called."""
    import SimpleITK as sitk

    def never(*args, **kwargs):
        raise AssertionError("N4 ran on a tiny volume")

    monkeypatch.setattr(sitk, "N4BiasFieldCorrectionImageFilter", never)
    image = np.linspace(1.0, 2.0, 9 ** 3, dtype=np.float32).reshape(9, 9, 9)  # a gradient N4 would flatten
    assert np.array_equal(biasfield.correct(image, image > 0, SPACING), image)


def test_an_n4_failure_leaves_the_sequence_uncorrected(monkeypatch, caplog):
    import SimpleITK as sitk

    class Failing:
        def __getattr__(self, name):
            if name == "Execute":
                def execute(*args):
                    raise RuntimeError("ITK ERROR: simulated")
                return execute
            return lambda *args: None

    monkeypatch.setattr(sitk, "N4BiasFieldCorrectionImageFilter", Failing)
    clean, brain, _ = _phantom(3)
    with caplog.at_level("WARNING"):
        out = biasfield.correct(clean, brain, SPACING)
    assert np.array_equal(out, clean)
    assert "Bias-field correction skipped" in caplog.text
