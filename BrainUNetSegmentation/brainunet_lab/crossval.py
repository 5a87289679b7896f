"""Cross-validation of a training recipe over real labelled cases: the one way models are chosen here.

``brainunet cv`` trains one model per fold (5 by default: folds by patient, stratified by institution and
tumour size, ``realdata.institution_folds``), each on the other folds' cases, and scores it on the cases it
never saw, through the inference path: every sequence, and without T2W and without T1CE (the missing
sequence becomes the zero channel inference gives it; the case is prepared once with every sequence, where
inference prepares it from those present, so the crop and normalisation can differ slightly). Held-out class probabilities are kept, so
post-processing rules are chosen by the same cross-validation (``brainunet cv-postprocess``, with
``--condition`` for a missing sequence) without retraining. ``brainunet cv-report`` prints the tables (per
region, per institution, per condition, mean and spread over folds) that MODEL_CARD.md copies.

Run folder: ``recipe.json``, ``folds.json``, ``fold<i>/`` (the training run, resumable), ``fold<i>/heldout/``
(probabilities; ``heldout/<condition>/`` without a sequence), ``cases.csv`` (one row per held-out case and
condition), optional ``final/`` (the recipe on every case: the model that ships).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from brainunet.errors import InputError
from brainunet.labels import ALL_REGIONS
from brainunet.settings import PREPROCESSING_KEYS, missing_condition

#: scoring conditions: every sequence, and each sequence old protocols lack (fed as inference feeds it)
CONDITIONS = {"all": None, **{missing_condition(m): m for m in ("t2w", "t1c")}}
REGION_KEYS = [r.key for r in ALL_REGIONS]
CASE_FIELDS = ["fold", "case", "institution", "condition"] + [f"dice_{k}" for k in REGION_KEYS] + \
    [f"hd95_{k}" for k in REGION_KEYS]


def recipe_config(base_model, steps: int, scratch: bool, device: str, seed: int, overrides: dict | None):
    """The TrainConfig of a recipe: ``base_model``'s network, spacing and preprocessing, its weights as the
    starting point unless ``scratch``, then the recipe's settings."""
    from .training import TrainConfig, finetune_config

    overrides = dict(overrides or {})
    config = finetune_config(base_model, steps, device=device, seed=seed, overrides=overrides)
    if scratch:
        config = TrainConfig(**{**config.to_dict(), "init_weights": None})
    return config


def load_cases(data_dir, config, cache=True, progress=None):
    from .realdata import load_labelled_cases
    from .training import MODALITIES

    return load_labelled_cases(data_dir, [config.spacing_mm] * 3, MODALITIES, config.clip_percentiles,
                               bias_correction=config.bias_correction, cache=cache, progress=progress)


def _training_record(path: Path) -> dict | None:
    """What a model.pt records of its training (steps, finished, ...), or None when there is none to read."""
    import torch

    if not Path(path).is_file():
        return None
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True)["extra"]["training"])
    except Exception:
        return None


def _finished_weights(run_dir: Path, steps: int) -> Path | None:
    """A run folder's model.pt when it holds a finished training of ``steps`` steps (e.g. brought back
    from the GPU machine without its checkpoint)."""
    path = Path(run_dir) / "model.pt"
    if (Path(run_dir) / "checkpoint.pt").exists():
        return None
    training = _training_record(path)
    return path if training and training.get("finished") and int(training.get("steps", -1)) == int(steps) else None


def _saved_folds(output_dir: Path, case_names, folds: int) -> list[list[str]] | None:
    """The held-out names of each fold of a run that has its folds already, checked against the cases given now:
    the split depends on every case (dealt by institution and size), so another set of cases would re-split
    them, and the fold models already trained would be scored on cases they learned from."""
    path = Path(output_dir) / "folds.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    held = [list(saved.get(f"fold{i}", [])) for i in range(folds)]
    before, now = sorted(n for names in held for n in names), sorted(case_names)
    if len(saved) != folds or before != now:
        extra, missing = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        detail = "; ".join(part for part in (
            f"{len(extra)} not in it ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})" if extra else "",
            f"{len(missing)} of its cases missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            if missing else "") if part)
        raise InputError(f"{output_dir} was split into folds over other cases "
                         f"({path}: {detail or 'another number of folds'}); its fold models learned from cases that "
                         "would now be held out. Resume with the same cases, or start another output folder.")
    return held


def _write_json(path: Path, obj) -> None:
    """Written whole or not at all: jobs of other folds (``--fold``) read and write the same run files."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_cv(data_dir, output_dir, base_model=None, steps: int = 300, folds: int = 5, scratch: bool = False,
           overrides: dict | None = None, device: str = "auto", seed: int = 0, resume: bool = False,
           final: bool = False, progress: bool = True, time_limit_s: float | None = None,
           only_folds=None, log=print, pack=None, train_only: bool = False, threads: int | None = None,
           final_only: bool = False):
    """Train and score every fold (skipping folds already scored), then optionally the final model.
    ``final_only``: only the final model, no fold (a job beside the jobs of the folds: ``only_folds``
    jobs never train it).
    ``pack``: train from a case pack (``brainunet cv-pack``) instead of ``data_dir``; scoring needs the
    cases' files, so with a pack pass ``train_only`` and score later here with ``--data ... --resume``
    (finished fold models are then scored, not retrained).
    ``threads``: torch CPU threads of this process instead of the recipe's; how a job runs, not what it
    learns, so a run resumes with another count (only the order of floating-point sums changes).
    Returns True when everything asked for is done, False when the time limit stopped it (resume later)."""
    from .realdata import check_fold_count, find_labelled_cases, institution_folds, load_packed_cases, patient
    from .training import TrainConfig, check_not_learned, train

    deadline = time.monotonic() + time_limit_s if time_limit_s else None
    output_dir = Path(output_dir)
    if pack is None:
        case_names = [c.name for c in find_labelled_cases(data_dir)]  # a bad folder is reported before loading
    elif not (train_only or final_only):
        raise InputError("Held-out cases are scored from their files: with --pack, pass --train-only and score "
                         "later with --data DIR --resume.")
    else:
        packed = load_packed_cases(pack)
        case_names = [c.name for c in packed]
    check_fold_count(len({patient(n) for n in case_names}), folds)  # before anything is loaded or written
    config = recipe_config(base_model, steps, scratch, device, seed, overrides)
    if threads:
        config = TrainConfig(**{**config.to_dict(), "threads": int(threads)})
    if config.init_weights:  # before anything is written: a refused run leaves no folder
        check_not_learned(config.init_weights, case_names, log)
    recipe = {"data": str(Path(data_dir or pack).resolve()), "base_model": None if scratch else str(config.init_weights),
              "scratch": scratch, "steps": steps, "folds": folds, "overrides": overrides or {}, "seed": seed}
    recipe_path = output_dir / "recipe.json"
    if recipe_path.exists():
        saved = json.loads(recipe_path.read_text(encoding="utf-8"))
        if not resume:
            raise InputError(f"{output_dir} already holds a cross-validation run; pass --resume to continue it, "
                             "or choose another output folder.")
        if {k: saved.get(k) for k in ("steps", "folds", "overrides", "scratch", "seed")} != \
                {k: recipe[k] for k in ("steps", "folds", "overrides", "scratch", "seed")}:
            raise InputError(f"{output_dir} was started with another recipe ({recipe_path}); resume it with the "
                             "same settings, or choose another output folder.")
    saved_folds = _saved_folds(output_dir, case_names, folds)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(recipe_path, recipe)

    t = time.perf_counter()
    if pack is not None:
        cases = packed
    else:
        cases = load_cases(data_dir, config, progress=(lambda f, m: None) if not progress else None)
    log(f"{len(cases)} cases preprocessed or read from the cache in {time.perf_counter() - t:.0f} s")
    names = [c.name for c in cases]
    if saved_folds is None:
        splits = institution_folds(names, [c.wt_volume_ml for c in cases], folds)
        _write_json(output_dir / "folds.json", {f"fold{i}": [names[j] for j in s] for i, s in enumerate(splits)})
    else:  # the split the fold models were trained on, whatever the split of these cases would be now
        index = {n: j for j, n in enumerate(names)}
        splits = [[index[n] for n in held] for held in saved_folds]

    def remaining():
        return None if deadline is None else max(1.0, deadline - time.monotonic())

    for i, held in enumerate(splits):
        if final_only or (only_folds is not None and i not in only_folds):
            continue
        fold_dir = output_dir / f"fold{i}"
        if (fold_dir / "scores.csv").exists():
            continue
        if deadline is not None and time.monotonic() >= deadline:
            return False
        weights = _finished_weights(fold_dir, steps)
        if weights is None:
            fold_config = TrainConfig(**{**config.to_dict(), "name": f"{config.name}-fold{i}"})
            train_cases = [c for j, c in enumerate(cases) if j not in held]
            result = train(fold_config, fold_dir, resume=(fold_dir / "checkpoint.pt").exists(), progress=progress,
                           data=train_cases, validation_data=[], time_limit_s=remaining())
            if not result.finished:
                return False
            weights = result.weights
        if train_only:
            continue
        rows = score_fold(weights, [cases[j] for j in held], i, fold_dir / "heldout", device,
                          keep_conditions=tuple(CONDITIONS))
        _write_rows(rows, fold_dir / "scores.csv")
        log(f"fold {i}: " + "  ".join(f"{k} {np.mean([r[f'dice_{k}'] for r in rows if r['condition'] == 'all']):.3f}"
                                      for k in REGION_KEYS))
    done = [output_dir / f"fold{i}" / "scores.csv" for i in range(folds)]
    if not train_only and not final_only and all(p.exists() for p in done):
        rows = [r for p in done for r in _read_rows(p)]
        _write_rows(rows, output_dir / "cases.csv")
        log(format_report(output_dir))
    if (final_only or (final and only_folds is None)) and _finished_weights(output_dir / "final", steps) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        final_config = TrainConfig(**config.to_dict())
        result = train(final_config, output_dir / "final", resume=(output_dir / "final" / "checkpoint.pt").exists(),
                       progress=progress, data=cases, validation_data=[], time_limit_s=remaining())
        if not result.finished:
            return False
        log(f"final model (every case): {result.weights}")
    return True


def score_fold(weights, held_cases, fold: int, keep_dir, device: str = "auto",
               settings: dict | None = None, tta=False, keep_conditions=("all",)) -> list[dict]:
    """Segment each held-out case from its files as inference does, for every condition; Dice and HD95 on
    the case's own 1 mm grid. The probabilities of the ``keep_conditions`` are kept (float16, crop grid;
    ``keep_dir/<case>.npz`` for all sequences, ``keep_dir/<condition>/<case>.npz`` for the others) for
    choosing post-processing, unless ``keep_dir`` is None. ``settings`` override the model's stored
    post-processing (as a registry entry's settings do; ``no-t2w.tumour_threshold`` applies without T2W);
    ``tta``: test-time augmentation (``inference.tta_flips``)."""
    from brainunet import pipeline, postprocess
    from brainunet.imageio import find_case_files
    from brainunet.inference import predict_probabilities, resolve_device

    from .evaluation import evaluate_case, find_reference
    from .realdata import institution, read_labels
    from .training import check_held_out

    check_held_out(weights, [c.name for c in held_cases])
    device = resolve_device(device)
    loaded = pipeline.load_model(weights, device=device)
    model_settings = loaded.settings.with_overrides(settings, "--set")
    loaded = dataclasses.replace(loaded, settings=model_settings)  # preprocessing overrides reach prepare_inputs
    if keep_dir is not None:
        keep_dir = Path(keep_dir)
        keep_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in held_cases:
        files = find_case_files(case.path)
        volumes = pipeline.load_inputs({m: files.get(m) for m in loaded.modalities})
        _, prepared = pipeline.prepare_inputs(volumes, loaded)
        reference, _ = read_labels(find_reference(case.path), case.name)
        spacing = volumes["t1c"].spacing
        crop_ref = _crop_reference(reference, prepared)
        for condition, dropped in CONDITIONS.items():
            image = prepared.image
            if dropped:
                image = image.copy()
                image[list(loaded.modalities).index(dropped)] = 0.0  # what inference feeds for a missing sequence
            probs = predict_probabilities(loaded.network, image, model_settings.preprocessing.patch_size,
                                          tta=tta, device=device, precision="fp32")
            probs = prepared.restore_channels(probs)
            if condition in keep_conditions and keep_dir is not None:
                folder = keep_dir if condition == "all" else keep_dir / condition
                folder.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(folder / f"{case.name}.npz", probs=probs.astype(np.float16),
                                    mask=prepared.crop_mask, reference=crop_ref,
                                    spacing=np.asarray(prepared.native_spacing))
            labels = postprocess.apply(probs, prepared.crop_mask,
                                       model_settings.postprocessing_for((dropped,) if dropped else ()),
                                       voxel_mm3=float(np.prod(prepared.native_spacing)))
            full = prepared.restore_labels(labels)
            rows.append({"fold": fold, "case": case.name, "institution": institution(case.name),
                         "condition": condition, **evaluate_case(full, reference, spacing)})
    return rows


def _crop_reference(reference, prepared):
    from nibabel import orientations as ornt

    return np.ascontiguousarray(ornt.apply_orientation(reference, prepared.to_ras)[prepared.crop], np.uint8)


def _write_rows(rows, path):
    """Written whole or not at all: a fold's scores.csv marks it done."""
    from .evaluation import write_metrics_csv

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_metrics_csv(rows, tmp, CASE_FIELDS)
    os.replace(tmp, path)


def _read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in CASE_FIELDS[4:]:
            r[k] = float(r[k])
        r["fold"] = int(r["fold"])
    return rows


def rescore(run_dir, data_dir, settings: dict, tag: str, device: str = "auto", log=print, tta=False,
            keep: bool = False) -> Path:
    """Score every fold model again on its held-out cases, every condition, with post-processing
    ``settings`` (the ones chosen by ``sweep_postprocess``, as the shipped model applies them) and
    test-time augmentation ``tta``; writes ``cases-<tag>.csv`` beside ``cases.csv``. ``keep``: also keep
    the missing-sequence conditions' probabilities in ``fold<i>/heldout/<condition>/`` (runs scored before
    ``brainunet cv`` kept them), for ``cv-postprocess --condition``."""
    from types import SimpleNamespace

    from brainunet.inference import tta_flips

    from .realdata import find_labelled_cases

    if keep and len(tta_flips(tta)) > 1:
        raise InputError("The probabilities kept for choosing post-processing are those of plain inference, as "
                         "brainunet cv keeps them: rescore with --keep and without --tta.")
    if keep and set(settings or {}) & set(PREPROCESSING_KEYS):
        raise InputError("With --keep, --set only post-processing settings: the kept probabilities must be those of "
                         "the model as brainunet cv scored it.")
    run_dir = Path(run_dir)
    folds_file = run_dir / "folds.json"
    if not folds_file.is_file():
        raise InputError(f"{run_dir} is not a cross-validation run (no folds.json).")
    paths = {p.name: p for p in find_labelled_cases(data_dir)}
    steps = json.loads((run_dir / "recipe.json").read_text(encoding="utf-8"))["steps"] \
        if (run_dir / "recipe.json").is_file() else None
    rows = []
    for i, names in enumerate(json.loads(folds_file.read_text(encoding="utf-8")).values()):
        weights = run_dir / f"fold{i}" / "model.pt"
        training = _training_record(weights)
        if training is None or not training.get("finished") or \
                (steps is not None and int(training.get("steps", -1)) != int(steps)):
            if training is not None and training.get("finished"):
                raise InputError(f"{weights} is a training of {training.get('steps')} steps, not of the run's {steps} "
                                 f"({run_dir / 'recipe.json'}): put back the run's own fold model.")
            state = "missing" if not weights.is_file() else "not a finished training" + (
                f" of {steps} steps" if steps is not None else "")
            raise InputError(f"{weights} is {state}; finish the cross-validation first (brainunet cv ... --resume).")
        missing = [n for n in names if n not in paths]
        if missing:
            raise InputError(f"{data_dir} lacks {len(missing)} of fold {i}'s held-out cases "
                             f"({', '.join(missing[:3])}); give the folder the run was made from.")
        held = [SimpleNamespace(name=n, path=paths[n]) for n in names]
        rows += score_fold(weights, held, i, run_dir / f"fold{i}" / "heldout" if keep else None, device, settings,
                           tta, keep_conditions=tuple(c for c in CONDITIONS if c != "all"))
        log(f"fold {i} rescored")
    out = run_dir / f"cases-{tag}.csv"
    _write_rows(rows, out)
    return out


def read_cases(run_dir, tag: str | None = None) -> list[dict]:
    run_dir = Path(run_dir)
    if tag:
        path = run_dir / f"cases-{tag}.csv"
        if not path.is_file():
            raise InputError(f"{path} does not exist; make it with brainunet cv-rescore --tag {tag}.")
        return _read_rows(path)
    if (run_dir / "cases.csv").exists():
        return _read_rows(run_dir / "cases.csv")
    parts = sorted(run_dir.glob("fold*/scores.csv"))
    if not parts:
        raise InputError(f"{run_dir} holds no scored fold yet (fold*/scores.csv); run brainunet cv first.")
    return [r for p in parts for r in _read_rows(p)]


def summarise(rows: list[dict], condition: str = "all", group: str | None = None) -> dict:
    """{key: (mean over cases, SD of the fold means, number of cases)} per region, for one condition,
    optionally within one institution."""
    sel = [r for r in rows if r["condition"] == condition and (group is None or r["institution"] == group)]
    out = {}
    for k in REGION_KEYS:
        values = [r[f"dice_{k}"] for r in sel]
        fold_means = [np.mean([r[f"dice_{k}"] for r in sel if r["fold"] == f]) for f in sorted({r["fold"] for r in sel})]
        out[k] = (float(np.mean(values)) if values else float("nan"),
                  float(np.std(fold_means, ddof=1)) if len(fold_means) > 1 else float("nan"), len(values))
    return out


def format_report(run_dir, tag: str | None = None) -> str:
    """Markdown tables: Dice per region (mean over held-out cases ± SD over fold means, the SD once there are two
    folds) and the five-region mean, per condition, per fold and per institution; HD95 for all sequences.
    ``tag``: the rescored cases (cv-rescore) instead."""
    rows = read_cases(run_dir, tag)
    folds = sorted({r["fold"] for r in rows})

    def table(title: str) -> list[str]:
        return ["", f"| {title} | n | " + " | ".join(REGION_KEYS) + " | mean |",
                "|---|---|" + "---|" * (len(REGION_KEYS) + 1)]

    def row(label, s: dict, spread: bool = False) -> str:
        cells = [f"{m:.3f}" + (f" ± {sd:.3f}" if spread else "") for m, sd, _ in s.values()]
        return (f"| {label} | {s[REGION_KEYS[0]][2]} | " + " | ".join(cells)
                + f" | {np.mean([m for m, _, _ in s.values()]):.4f} |")

    lines = [f"Cross-validation {run_dir}{f' ({tag})' if tag else ''}: {len({r['case'] for r in rows})} held-out "
             f"cases, folds {folds}"] + table("condition")
    for condition in CONDITIONS:
        s = summarise(rows, condition)
        if s[REGION_KEYS[0]][2]:
            lines.append(row(condition, s, spread=len(folds) > 1))
    if len(folds) > 1:  # the figures screening and adoption rules compare fold by fold
        lines += table("fold (all sequences)")
        lines += [row(fold, summarise([r for r in rows if r["fold"] == fold], "all")) for fold in folds]
    lines += table("institution (all sequences)")
    lines += [row(inst, summarise(rows, "all", inst)) for inst in sorted({r["institution"] for r in rows})]
    sel = [r for r in rows if r["condition"] == "all"]
    lines += ["", "HD95 (mm, all sequences, median over cases): " +
              "  ".join(f"{k} {np.median([r[f'hd95_{k}'] for r in sel]):.1f}" for k in REGION_KEYS)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# post-processing chosen by cross-validation


POSTPROCESS_STAGES = (
    # P(tumour) threshold instead of argmax: corrects a systematic over- or under-segmentation
    ("tumour_threshold", (None, 0.55, 0.65, 0.75, 0.85, 0.9, 0.95)),
    # whole-tumour components smaller than this (1 mm voxels, mm³) are dropped, never the largest; capped at
    # 3 mL: a second lesion of a multifocal glioma is often larger, and these 29 cases have few of them
    ("min_component_voxels", (0, 50, 200, 1000, 3000)),
    # whole-tumour components without any core (FLAIR hyperintensity away from the tumour) dropped
    ("components_need_core", (False, True)),
    # lesion-wise small ET components become NETC; all ET becomes NETC when the whole ET is tiny
    (("min_et_component_voxels", "et_to_netc_below_voxels"), ((0, 0), (20, 0), (100, 0), (0, 100), (0, 500),
                                                              (20, 100), (100, 500))),
)
#: Region decoding (``cv-postprocess --region-decoding``), searched right after the P(tumour) threshold: which
#: subregion a tumour voxel is by its share of core, then a core voxel by its share of ET (as BraTS scores:
#: whole tumour, core inside it, ET inside the core), instead of the argmax over the three subregions.
REGION_DECODING_STAGES = (
    ("core_threshold", (None, 0.3, 0.4, 0.5, 0.6, 0.7)),
    ("et_threshold", (None, 0.3, 0.4, 0.5, 0.6, 0.7)),
)
RULE_KEYS = ("tumour_threshold", "core_threshold", "et_threshold", "min_component_voxels", "components_need_core",
             "min_et_component_voxels", "et_to_netc_below_voxels")


def rule_settings(rule: dict) -> dict:
    """A rule's settings to print and to register: every key, but the region-decoding ones only when set
    (unset, they change nothing, and a model registered without them loads in older releases)."""
    from brainunet.settings import STORED_WHEN_SET

    return {k: rule[k] for k in RULE_KEYS if not (k in STORED_WHEN_SET and rule[k] is None)}


def postprocess_stages(region_decoding: bool = False) -> tuple:
    """The post-processing search's stages, in order; with ``region_decoding`` the core and ET thresholds
    follow the P(tumour) threshold."""
    if not region_decoding:
        return POSTPROCESS_STAGES
    return POSTPROCESS_STAGES[:1] + REGION_DECODING_STAGES + POSTPROCESS_STAGES[1:]


def _no_rule() -> dict:
    """The search's starting point: argmax, nothing removed (``settings.Postprocessing``'s defaults)."""
    from brainunet.settings import Postprocessing

    return {k: getattr(Postprocessing(), k) for k in RULE_KEYS}


def _case_dice(cases, rule: dict) -> list[dict]:
    """Dice per region of each case under one post-processing rule."""
    from brainunet import postprocess
    from brainunet.settings import Postprocessing

    from .evaluation import dice

    rows = []
    for probs, mask, ref, voxel_mm3 in cases:
        labels = postprocess.apply(probs, mask, Postprocessing(**rule), voxel_mm3)
        rows.append({r.key: dice(r.mask(labels), r.mask(ref)) for r in ALL_REGIONS})
    return rows


def _mean_row(per_case: list[dict]) -> dict:
    means = {f"dice_{k}": float(np.mean([c[k] for c in per_case])) for k in REGION_KEYS}
    return {**means, "mean": float(np.mean(list(means.values()))), "cases": len(per_case)}


def _score_rules(cases, rules) -> list[dict]:
    return [{**rule, **_mean_row(_case_dice(cases, rule))} for rule in rules]


def _heldout_files(run_dirs, condition: str = "all") -> list[tuple[str, Path]]:
    """(fold name, file) of every kept held-out case of the runs, scored under ``condition``."""
    if condition not in CONDITIONS:
        raise InputError(f"Unknown condition {condition}; one of {', '.join(CONDITIONS)}.")
    pattern, depth = ("fold*/heldout/*.npz", 1) if condition == "all" else (f"fold*/heldout/{condition}/*.npz", 2)
    splits = {Path(d): (Path(d) / "folds.json").read_text(encoding="utf-8") for d in run_dirs
              if (Path(d) / "folds.json").is_file()}
    if len({json.dumps({f: sorted(names) for f, names in json.loads(t).items()}, sort_keys=True)
            for t in splits.values()}) > 1:
        raise InputError("These runs split the cases into folds differently (folds.json): pooled, a fold's rule could "
                         "be chosen on its own cases. Pool runs made over the same cases and folds.")
    # a fold's probabilities count once it is scored (scores.csv): an interrupted scoring leaves a partial set
    files = [(p.parents[depth].name, p) for d in run_dirs for p in sorted(Path(d).glob(pattern))
             if (p.parents[depth] / "scores.csv").is_file()]
    if not files:
        raise InputError(f"No kept held-out probabilities ({pattern}); " +
                         ("run brainunet cv first." if condition == "all" else
                          "run brainunet cv-rescore RUN --data DIR --tag TAG --keep first "
                          "(runs of brainunet cv keep them)."))
    return files


def load_heldout(run_dirs, condition: str = "all", ensemble: bool = False) -> list[tuple[str, tuple]]:
    """(fold name, (probabilities, mask, reference, voxel mm³)) of every kept held-out case of the runs (pooled), or with
    ``ensemble`` of every case once, its probabilities averaged over the runs: runs of the same folds, whose
    average is what an ensemble of their models would give each held-out case. Read once, then given to the
    searches below."""
    if not ensemble:
        cases = []
        for fold, path in _heldout_files(run_dirs, condition):
            with np.load(path) as z:
                cases.append((fold, (z["probs"].astype(np.float32), z["mask"], z["reference"], _voxel_mm3(z))))
        return cases
    per_run = [{(fold, path.name): path for fold, path in _heldout_files([d], condition)} for d in run_dirs]
    if len(per_run) < 2 or any(set(files) != set(per_run[0]) for files in per_run):
        raise InputError("--ensemble averages runs of the same folds: give two or more runs whose folds hold the "
                         "same held-out cases.")
    cases = []
    for key in sorted(per_run[0]):
        total = None
        for files in per_run:
            with np.load(files[key]) as z:
                probs = z["probs"].astype(np.float32)
                if total is None:
                    total, mask, reference, voxel_mm3 = probs, z["mask"], z["reference"], _voxel_mm3(z)
                elif probs.shape != total.shape or not np.array_equal(z["reference"], reference):
                    raise InputError(f"{files[key]} does not match the first run's {key[1]}: the runs prepared the "
                                     "case differently, so their probabilities cannot be averaged.")
                else:
                    total += probs
        cases.append((key[0], (total / len(per_run), mask, reference, voxel_mm3)))
    return cases


def _voxel_mm3(stored) -> float:
    """The volume of a kept case's voxel (its native grid; 1 mm³ for files kept without their spacing)."""
    return float(np.prod(stored["spacing"])) if "spacing" in stored else 1.0


#: A post-processing stage changes the rule only if it raises the five-region mean Dice of the held-out
#: cases by at least this much: smaller gains are within the spread between folds, and every step kept is
#: one more way to fail on cases unlike these (a component rule can remove a multifocal tumour's satellite).
MIN_POSTPROCESS_GAIN = 0.005


def _choose_postprocess(cases, start: dict | None, min_gain: float = MIN_POSTPROCESS_GAIN,
                        stages: tuple | None = None) -> tuple[list[dict], dict]:
    chosen = {**_no_rule(), **(start or {})}
    stages = POSTPROCESS_STAGES if stages is None else stages
    scored, known = [], {}  # a stage's starting rule is the previous stage's winner: scored once

    def score(rule):
        key = tuple(rule[k] for k in RULE_KEYS)
        if key not in known:
            known[key] = _score_rules(cases, [rule])[0]
        return dict(known[key])

    for keys, values in stages:
        keys = keys if isinstance(keys, tuple) else (keys,)
        rules = [{**chosen, **dict(zip(keys, v if isinstance(v, tuple) else (v,)))} for v in values]
        rows = [score(rule) for rule in rules]
        scored += rows
        best = max(rows, key=lambda r: r["mean"])
        if best["mean"] >= score(chosen)["mean"] + min_gain:
            chosen = {k: best[k] for k in RULE_KEYS}
    return scored, chosen


def sweep_postprocess(heldout, start: dict | None = None, min_gain: float = MIN_POSTPROCESS_GAIN,
                      stages: tuple | None = None) -> tuple[list[dict], dict]:
    """Post-processing chosen by cross-validation: stage by stage (threshold, whole-tumour components,
    ET rules), each stage keeps the rule with the best mean of the five regions' held-out Dice if it beats
    the stage's starting rule by ``min_gain``, the earlier stages' choices fixed. Returns (every rule
    scored, the chosen rule). ``start``: the settings the first stage starts from (default: argmax,
    nothing removed). ``heldout``: ``load_heldout``'s cases; ``stages``: ``postprocess_stages()``."""
    return _choose_postprocess([case for _, case in heldout], start, min_gain, stages)


def sweep_condition_postprocess(every, without, min_gain: float = MIN_POSTPROCESS_GAIN,
                                stages: tuple | None = None):
    """Post-processing for when one sequence is missing: the search of ``sweep_postprocess`` on the held-out
    cases scored without the sequence (``without``), starting from the rule the same search chooses on
    ``every`` (the cases scored with every sequence: the rule to register for them), so a stage departs from
    it only for a gain of ``min_gain``. Returns (every rule scored, the rule chosen with every sequence, the
    rule chosen without the sequence)."""
    _, shared = sweep_postprocess(every, min_gain=min_gain, stages=stages)
    cases = [case for _, case in without]
    rows, chosen = _choose_postprocess(cases, shared, min_gain, stages)
    if not any(all(r[k] == shared[k] for k in RULE_KEYS) for r in rows):  # a starting value no stage lists
        rows = _score_rules(cases, [shared]) + rows
    return rows, shared, chosen


def nested_condition_postprocess(every, without, min_gain: float = MIN_POSTPROCESS_GAIN,
                                 stages: tuple | None = None):
    """``nested_postprocess`` for a missing sequence: each fold's held-out cases, scored without the
    sequence, get (a) the rule chosen with every sequence on the other folds and (b) that rule refined on
    the other folds' cases scored without the sequence. Returns (mean row of a, mean row of b,
    {fold: rule b}). ``every``, ``without``: ``load_heldout``'s cases with every sequence and without it."""
    cases = without
    shared_case, own_case, rules = [], [], {}
    for fold in sorted({name for name, _ in cases}):
        _, shared = _choose_postprocess([c for name, c in every if name != fold], None, min_gain, stages)
        _, rules[fold] = _choose_postprocess([c for name, c in cases if name != fold], shared, min_gain, stages)
        held = [c for name, c in cases if name == fold]
        shared_case += _case_dice(held, shared)
        own_case += _case_dice(held, rules[fold])
    return _mean_row(shared_case), _mean_row(own_case), rules


def condition_settings(condition: str, chosen: dict) -> dict:
    """The ``--set`` settings that give ``condition`` its own rule: every key of the rule, so that it is the
    rule that was scored whatever the model's every-sequence rule is or later becomes."""
    return {f"{condition}.{k}": chosen[k] for k in RULE_KEYS}


def nested_postprocess(heldout, start: dict | None = None, min_gain: float = MIN_POSTPROCESS_GAIN,
                       stages: tuple | None = None) -> tuple[dict, dict]:
    """What the post-processing search is worth on cases it did not see: each fold's held-out cases are
    scored with the rule chosen (as ``sweep_postprocess`` chooses) on the other folds' cases. The rule
    chosen on all cases is scored on those same cases, so its figures are a little optimistic; this
    one is not. Returns (the mean row over every case, {fold: the rule chosen without it})."""
    cases = heldout
    per_case, rules = [], {}
    for fold in sorted({name for name, _ in cases}):
        _, rules[fold] = _choose_postprocess([c for name, c in cases if name != fold], start, min_gain, stages)
        per_case += _case_dice([c for name, c in cases if name == fold], rules[fold])
    return _mean_row(per_case), rules


def volume_errors(run_dirs, far_mm: float = 10.0) -> list[dict]:
    """Per kept held-out case (argmax labels): reference and predicted whole-tumour volume, Dice, and the
    share of the false-positive volume more than ``far_mm`` from the reference tumour (far false
    positives are other FLAIR hyperintensities; near ones, a boundary disagreement). Worst ratio first."""
    from scipy import ndimage

    from brainunet import postprocess
    from brainunet.settings import Postprocessing

    from .evaluation import dice

    rows = []
    for fold, path in _heldout_files(run_dirs):
        with np.load(path) as z:
            probs, mask, reference = z["probs"].astype(np.float32), z["mask"], z["reference"]
            spacing = np.asarray(z["spacing"], float) if "spacing" in z else np.ones(3)
        ref = reference > 0
        pred = postprocess.apply(probs, mask, Postprocessing()) > 0
        voxel_ml = float(np.prod(spacing)) / 1000.0
        false = pred & ~ref
        far = 0.0
        if false.any() and ref.any():
            distance = ndimage.distance_transform_edt(~ref, sampling=spacing)
            far = float((distance[false] > far_mm).mean())
        ref_ml, pred_ml = float(ref.sum()) * voxel_ml, float(pred.sum()) * voxel_ml
        rows.append({"fold": fold, "case": path.stem, "reference_ml": ref_ml,
                     "predicted_ml": pred_ml, "ratio": pred_ml / ref_ml if ref_ml else float("inf"),
                     "dice_WT": dice(pred, ref), "false_positive_far": far})
    return sorted(rows, key=lambda r: -r["ratio"])


def pack_cases(data_dir, pack_dir, base_model=None, overrides: dict | None = None, margin_mm: float = 24.0,
               log=print) -> list[Path]:
    """Preprocess every case in ``data_dir`` as the recipe would and write a compact pack of each."""
    from .realdata import pack_case

    config = recipe_config(base_model, 1, False, "cpu", 0, overrides)
    paths = [pack_case(case, Path(pack_dir) / f"{case.name}.npz", margin_mm) for case in load_cases(data_dir, config)]
    total = sum(p.stat().st_size for p in paths) / 2**20
    log(f"{len(paths)} cases packed into {pack_dir} ({total:.1f} MiB, spacing {config.spacing_mm} mm)")
    return paths
