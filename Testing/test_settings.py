"""Typed model settings: the two parts, old weights files, and overrides that name no setting."""
import pytest
import torch

from brainunet import pipeline, weights
from brainunet.errors import WeightsError
from brainunet.network import BrainUNet, NetworkConfig
from brainunet.settings import ModelSettings, Postprocessing, Preprocessing


def test_flat_settings_split_into_preprocessing_and_postprocessing():
    s = ModelSettings.from_flat({"spacing_mm": [2, 2, 2], "bias_correction": 1, "tumour_threshold": "0.75",
                                 "min_component_voxels": 3000.0})
    assert s.preprocessing == Preprocessing(spacing_mm=(2.0, 2.0, 2.0), bias_correction=True)
    assert s.postprocessing == Postprocessing(tumour_threshold=0.75, min_component_voxels=3000)
    assert ModelSettings.from_stored(s.to_stored()) == s


def test_an_unknown_setting_is_refused_by_name():
    with pytest.raises(WeightsError, match=r"unknown setting\(s\) tumor_threshold.*tumour_threshold"):
        ModelSettings().with_overrides({"tumor_threshold": 0.7}, "--set")


def test_an_old_weights_file_with_postprocessing_inside_preprocessing_loads(tmp_path):
    path = tmp_path / "old.pt"
    weights.save_weights(path, BrainUNet(NetworkConfig(features=(4, 8))), "old")
    payload = torch.load(path, weights_only=True)
    payload["preprocessing"]["min_component_voxels"] = 50  # the layout before the split
    del payload["postprocessing"]
    torch.save(payload, path)
    loaded = pipeline.load_model(path)
    assert loaded.postprocessing.min_component_voxels == 50
    assert loaded.preprocessing.modalities == ("t1c", "t2w", "t2f")


def test_registry_settings_override_the_stored_postprocessing(tmp_path):
    src = tmp_path / "model.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "run",
                         ModelSettings(postprocessing=Postprocessing(min_component_voxels=50)))
    registry = tmp_path / "models" / "registry.json"
    weights.register_model(src, "tuned", "", {"tumour_threshold": 0.75, "min_component_voxels": 3000},
                           registry_path=registry)
    entry = weights.load_registry(registry)[0]
    _, payload = weights.load_weights(entry.path(), entry.sha256)
    assert payload["postprocessing"]["tumour_threshold"] == 0.75
    assert payload["postprocessing"]["min_component_voxels"] == 3000
    with pytest.raises(WeightsError, match="unknown setting"):
        weights.register_model(src, "typo", "", {"min_component_voxel": 10}, registry_path=registry)
