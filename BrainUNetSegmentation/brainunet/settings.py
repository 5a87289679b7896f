"""A model's settings, typed: how its inputs are prepared and how its probabilities become labels.

Stored in the weights file as two dicts (``"preprocessing"``, ``"postprocessing"``); a registry
entry's ``settings`` and ``--set key=value`` override them by name, as one flat dict whose keys are
the field names below (no name is in both parts). Weights files written before the split kept the
post-processing keys inside ``"preprocessing"``; ``ModelSettings.from_stored`` sorts them out.

A model trained with modality dropout may also carry post-processing for when one sequence is missing,
chosen by cross-validation on held-out cases scored without it: flat keys ``no-<sequence>.<field>``
(``no-t2w.tumour_threshold``), stored as ``"postprocessing_missing": {"t2w": {...}}``; fields not named
there are the model's own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import WeightsError


def _flag(value, name: str) -> bool:
    """A yes/no setting; text only as true/false (``bool("False")`` would be True: a pasted Python value)."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false"):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value.strip().lower() == "true"
    return bool(value)


@dataclass(frozen=True)
class Preprocessing:
    """What the network was trained on, so what inference must feed it."""
    modalities: tuple[str, ...] = ("t1c", "t2w", "t2f")
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size: tuple[int, int, int] = (128, 128, 128)  # the sliding window
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    bias_correction: bool = False
    # trained with modality dropout: one sequence may be missing (fed as a zero channel)
    modality_dropout: bool = False

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(str(m) for m in self.modalities))
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "clip_percentiles", tuple(float(p) for p in self.clip_percentiles))
        object.__setattr__(self, "bias_correction", _flag(self.bias_correction, "bias_correction"))
        object.__setattr__(self, "modality_dropout", _flag(self.modality_dropout, "modality_dropout"))


@dataclass(frozen=True)
class Postprocessing:
    """Probabilities -> labels (``postprocess.apply``); chosen by cross-validation (``cv-postprocess``)."""
    tumour_threshold: float | None = None  # None: argmax over background and the three regions
    # Region decoding inside the tumour (None: the argmax over the three regions decides): a tumour voxel is
    # core (NETC or ET) when (P(NETC) + P(ET)) / P(tumour) reaches core_threshold, else SNFH; a core voxel is
    # ET when P(ET) / (P(NETC) + P(ET)) reaches et_threshold, else NETC.
    core_threshold: float | None = None
    et_threshold: float | None = None
    # Sizes are in 1 mm voxels (mm³: 3000 is 3 mL) whatever the scan's grid, so a rule chosen on 1 mm cases
    # removes the same volume from a 5.5 mm clinical scan (postprocess.native_voxels).
    min_component_voxels: int = 0  # tumour components smaller than this go (the largest always stays)
    components_need_core: bool = False  # tumour components without ET or NETC go (the largest always stays)
    min_et_component_voxels: int = 0  # ET components smaller than this become NETC
    et_to_netc_below_voxels: int = 0  # all ET becomes NETC when there is less than this in total
    fill_core_holes: bool = False

    def __post_init__(self):
        if self.tumour_threshold is not None:
            object.__setattr__(self, "tumour_threshold", float(self.tumour_threshold))
            if not 0.0 < self.tumour_threshold <= 1.0:  # a probability; outside it, all or nothing is tumour
                raise ValueError(f"tumour_threshold must be above 0 and at most 1, not {self.tumour_threshold:g}")
        for name in ("core_threshold", "et_threshold"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
                if not 0.0 < getattr(self, name) < 1.0:  # a share of a probability; 0 or 1 would make one region all
                    raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name):g}")
        for name in ("min_component_voxels", "min_et_component_voxels", "et_to_netc_below_voxels"):
            object.__setattr__(self, name, int(getattr(self, name) or 0))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        object.__setattr__(self, "fill_core_holes", _flag(self.fill_core_holes, "fill_core_holes"))
        object.__setattr__(self, "components_need_core", _flag(self.components_need_core, "components_need_core"))


#: Post-processing settings a weights file stores only when set: a file without them loads in releases that
#: predate them, and one that needs them is refused there (as an unknown setting) instead of run without them.
STORED_WHEN_SET = ("core_threshold", "et_threshold")
PREPROCESSING_KEYS = tuple(f.name for f in fields(Preprocessing))
POSTPROCESSING_KEYS = tuple(f.name for f in fields(Postprocessing))
MISSING_PREFIX = "no-"


def missing_condition(modality: str) -> str:
    """The name of the condition "``modality`` missing" (settings prefix and cross-validation condition)."""
    return f"{MISSING_PREFIX}{modality}"


@dataclass(frozen=True)
class ModelSettings:
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    # {missing sequence: the post-processing fields that differ when it is missing}
    missing_postprocessing: dict = field(default_factory=dict, hash=False)

    @classmethod
    def from_flat(cls, flat: dict, source: str = "model settings") -> "ModelSettings":
        plain = {k: v for k, v in flat.items() if "." not in k}
        unknown = sorted(set(plain) - set(PREPROCESSING_KEYS) - set(POSTPROCESSING_KEYS))
        if unknown:
            raise WeightsError(f"{source}: unknown setting(s) {', '.join(unknown)}. Known: "
                               f"{', '.join(PREPROCESSING_KEYS + POSTPROCESSING_KEYS)}, and "
                               f"{MISSING_PREFIX}<sequence>.<post-processing setting>.")
        try:
            pre = Preprocessing(**{k: v for k, v in plain.items() if k in PREPROCESSING_KEYS})
            post = Postprocessing(**{k: v for k, v in plain.items() if k in POSTPROCESSING_KEYS})
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{source}: a setting has a value of the wrong kind ({exc}).") from exc
        missing: dict[str, dict] = {}
        for key, value in flat.items():
            if "." not in key:
                continue
            condition, _, name = key.partition(".")
            modality = condition[len(MISSING_PREFIX):] if condition.startswith(MISSING_PREFIX) else None
            if modality not in pre.modalities or name not in POSTPROCESSING_KEYS:
                raise WeightsError(f"{source}: unknown setting {key}. A missing-sequence setting reads "
                                   f"{MISSING_PREFIX}<sequence>.<post-processing setting>, the sequence one of "
                                   f"{', '.join(pre.modalities)} and the setting one of "
                                   f"{', '.join(POSTPROCESSING_KEYS)}.")
            missing.setdefault(modality, {})[name] = value
        if missing and not pre.modality_dropout:
            raise WeightsError(f"{source}: {', '.join(sorted(k for k in flat if '.' in k))} set, but the model was not "
                               "trained to run without a sequence (modality_dropout); it would never apply.")
        for modality, changed in missing.items():
            try:  # typed as the model's own post-processing is
                typed = asdict(Postprocessing(**{**asdict(post), **changed}))
            except (TypeError, ValueError) as exc:
                raise WeightsError(f"{source}: a setting without {modality} has a value of the wrong kind ({exc}).") \
                    from exc
            missing[modality] = {k: typed[k] for k in changed}
        return cls(pre, post, missing)

    @classmethod
    def from_stored(cls, stored: dict, overrides: dict | None = None, source: str = "model settings") -> "ModelSettings":
        """From a weights payload's ``"preprocessing"`` / ``"postprocessing"`` (/ ``"postprocessing_missing"``)
        dicts, then ``overrides``."""
        missing = {f"{missing_condition(m)}.{k}": v
                   for m, changed in stored.get("postprocessing_missing", {}).items() for k, v in changed.items()}
        flat = {**stored.get("preprocessing", {}), **stored.get("postprocessing", {}), **missing, **(overrides or {})}
        return cls.from_flat(flat, source)

    def postprocessing_for(self, missing=()) -> Postprocessing:
        """The post-processing to apply when the sequences ``missing`` are (at most one, as inference allows)."""
        changed = self.missing_postprocessing.get(missing[0]) if len(missing) == 1 else None
        return Postprocessing(**{**asdict(self.postprocessing), **changed}) if changed else self.postprocessing

    def with_overrides(self, overrides: dict | None, source: str = "settings") -> "ModelSettings":
        return ModelSettings.from_flat({**self.flat(), **(overrides or {})}, source) if overrides else self

    def flat(self) -> dict:
        return {**asdict(self.preprocessing), **asdict(self.postprocessing),
                **{f"{missing_condition(m)}.{k}": v for m, changed in self.missing_postprocessing.items()
                   for k, v in changed.items()}}

    def to_stored(self) -> dict:
        """The dicts a weights file keeps (lists, so they read back the same from JSON or torch)."""
        def plain(d):
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

        def needed(d, own=None):  # an unset STORED_WHEN_SET key is left out where it changes nothing
            own = own or {}
            return {k: v for k, v in d.items() if not (k in STORED_WHEN_SET and v is None and own.get(k) is None)}

        post = asdict(self.postprocessing)
        stored = {"preprocessing": plain(asdict(self.preprocessing)), "postprocessing": plain(needed(post))}
        missing = {m: needed(changed, post) for m, changed in self.missing_postprocessing.items()}
        if any(missing.values()):
            stored["postprocessing_missing"] = {m: changed for m, changed in missing.items() if changed}
        return stored
