"""The synthetic-glioma data engine: healthy templates, procedural tumours, MRI rendering."""
from .generator import ENGINE_VERSION, MODALITIES, EngineConfig, SyntheticCase, generate_case, normalise, write_case
from .templates import Anatomy, cache_dir, fetch_templates, load_anatomy, phantom_anatomy

__all__ = ["ENGINE_VERSION", "MODALITIES", "EngineConfig", "SyntheticCase", "generate_case", "normalise", "write_case",
           "Anatomy", "cache_dir", "fetch_templates", "load_anatomy", "phantom_anatomy"]
