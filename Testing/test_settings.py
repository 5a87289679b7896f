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


def test_missing_sequence_postprocessing_is_typed_stored_and_applied_only_without_that_sequence():
    s = ModelSettings.from_flat({"tumour_threshold": 0.75, "modality_dropout": True,
                                 "no-t2w.tumour_threshold": "0.65", "no-t1c.min_component_voxels": 1000.0})
    assert s.missing_postprocessing == {"t2w": {"tumour_threshold": 0.65}, "t1c": {"min_component_voxels": 1000}}
    assert s.postprocessing_for(()) == s.postprocessing == Postprocessing(tumour_threshold=0.75)
    assert s.postprocessing_for(("t2w",)) == Postprocessing(tumour_threshold=0.65)
    assert s.postprocessing_for(("t1c",)) == Postprocessing(tumour_threshold=0.75, min_component_voxels=1000)
    assert s.postprocessing_for(("t2f",)) == s.postprocessing  # no rule of its own: the model's
    assert s.to_stored()["postprocessing_missing"] == {"t2w": {"tumour_threshold": 0.65},
                                                       "t1c": {"min_component_voxels": 1000}}
    assert ModelSettings.from_stored(s.to_stored()) == s
    assert s.with_overrides({"no-t2w.tumour_threshold": None}).postprocessing_for(("t2w",)).tumour_threshold is None
    assert "postprocessing_missing" not in ModelSettings().to_stored()


def test_region_decoding_is_stored_only_when_set():
    """A weights file without the region-decoding settings loads in releases that predate them; one that uses
    them stores them (and such a release refuses it by name instead of running without them)."""
    plain = ModelSettings.from_flat({"tumour_threshold": 0.75, "modality_dropout": True})
    assert not {"core_threshold", "et_threshold"} & plain.to_stored()["postprocessing"].keys()
    assert ModelSettings.from_stored(plain.to_stored()) == plain
    decoded = plain.with_overrides({"et_threshold": 0.4, "no-t1c.et_threshold": None, "no-t2w.core_threshold": None})
    stored = decoded.to_stored()
    assert stored["postprocessing"]["et_threshold"] == 0.4 and "core_threshold" not in stored["postprocessing"]
    # unset without T1CE while set with every sequence: kept, or the every-sequence value would apply there
    assert stored["postprocessing_missing"] == {"t1c": {"et_threshold": None}}
    again = ModelSettings.from_stored(stored)
    assert again.postprocessing_for(("t1c",)).et_threshold is None and again.postprocessing_for(("t2w",)).et_threshold == 0.4


@pytest.mark.parametrize("key,value,message", [
    ("no-adc.tumour_threshold", 0.5, r"unknown setting no-adc\.tumour_threshold.*t1c, t2w, t2f"),
    ("no-t2w.spacing_mm", [1, 1, 1], r"unknown setting no-t2w\.spacing_mm.*post-processing setting"),
    ("without-t2w.tumour_threshold", 0.5, "unknown setting without-t2w"),
    ("no-t2w.min_component_voxels", "many", "without t2w has a value of the wrong kind"),
    ("no-t2w.components_need_core", "nope", "without t2w has a value of the wrong kind.*true or false"),
])
def test_a_bad_missing_sequence_setting_is_refused_by_name(key, value, message):
    with pytest.raises(WeightsError, match=message):
        ModelSettings(Preprocessing(modality_dropout=True)).with_overrides({key: value}, "--set")


def test_a_missing_sequence_rule_is_refused_for_a_model_that_cannot_run_without_one():
    with pytest.raises(WeightsError, match=r"no-t2w\.tumour_threshold set, but the model was not trained"):
        ModelSettings().with_overrides({"no-t2w.tumour_threshold": 0.6}, "--set")


def test_yes_no_settings_read_true_and_false_and_refuse_other_text():
    assert ModelSettings.from_flat({"components_need_core": "true", "bias_correction": 0}).postprocessing \
        .components_need_core
    assert not ModelSettings.from_flat({"components_need_core": "FALSE"}).postprocessing.components_need_core
    with pytest.raises(WeightsError, match="true or false"):
        ModelSettings.from_flat({"fill_core_holes": "no"})


@pytest.mark.parametrize("key,value", [("tumour_threshold", 0), ("tumour_threshold", 1.5),
                                       ("min_component_voxels", -1), ("no-t2w.tumour_threshold", -0.2)])
def test_out_of_range_postprocessing_is_refused(key, value):
    with pytest.raises(WeightsError, match=r"must be (above 0 and at most 1|0 or more)"):
        ModelSettings(Preprocessing(modality_dropout=True)).with_overrides({key: value}, "--set")
    assert ModelSettings.from_flat({"tumour_threshold": 1}).postprocessing.tumour_threshold == 1.0


def test_a_registry_entry_can_give_a_missing_sequence_its_own_postprocessing(tmp_path):
    src = tmp_path / "model.pt"
    weights.save_weights(src, BrainUNet(NetworkConfig(features=(4, 8))), "run",
                         ModelSettings(Preprocessing(modality_dropout=True), Postprocessing(tumour_threshold=0.75)))
    registry = tmp_path / "models" / "registry.json"
    weights.register_model(src, "tuned", "", {"no-t2w.tumour_threshold": 0.6}, registry_path=registry)
    loaded = pipeline.load_model(weights.load_registry(registry)[0].path())
    assert loaded.settings.postprocessing_for(("t2w",)).tumour_threshold == 0.6
    assert loaded.postprocessing.tumour_threshold == 0.75
