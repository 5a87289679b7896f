"""Command line: ``brainunet segment | batch | demo | models``.

Exit status 0 on success; 2 with a one-line ``error: ...`` on bad input; 3 on missing/corrupt
weights; 130 when cancelled. ``--progress machine`` prints ``BRAINUNET_PROGRESS <fraction> <text>``
lines, which the Slicer module's background process reads.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--progress", default="bar", choices=["bar", "machine", "none"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainunet", description="Glioma segmentation (ET, NETC, SNFH) on MRI.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment one case")
    p.add_argument("--t1c", required=True, help="T1 contrast-enhanced (reference grid of the output)")
    p.add_argument("--t2w", required=True, help="T2-weighted")
    p.add_argument("--t2f", required=True, help="T2-FLAIR")
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
    p.add_argument("--data", required=True, help="folder of BraTS-layout case folders with a *_seg / *-seg file")
    p.add_argument("--output-dir", default="evaluation", help="where to write metrics.csv and metrics.png")
    _add_model_args(p)

    sub.add_parser("models", help="list registered models and which one is the default")
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
                             device=args.device, tta=args.tta, progress=case_progress, loaded_model=loaded)
            except InputError as exc:
                failures += 1
                _say(args, f"{case.name}: skipped: {exc}")
    finally:
        progress.close()
    print(f"{len(cases) - failures} of {len(cases)} cases segmented into {out_dir}")
    return 0 if failures == 0 else 1


def cmd_demo(args) -> int:
    from . import synthetic

    out = Path(args.output_dir)
    case = synthetic.write_case(out / "demo_case")
    _say(args, f"Built-in synthetic case written to {out / 'demo_case'}")
    common = ["--t1c", str(case["t1c"]), "--t2w", str(case["t2w"]), "--t2f", str(case["t2f"]),
              "--t1n", str(case["t1n"]), "--device", args.device, "--progress", args.progress]
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

    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir} is not a folder of case folders.")
    cases = [c for c in sorted(data_dir.iterdir()) if c.is_dir() and evaluation.find_reference(c)]
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

            result = pipeline.run({k: files.get(k) for k in ("t1c", "t2w", "t2f")}, pred, device=args.device,
                                  tta=args.tta, progress=case_progress, loaded_model=loaded)
            ref = to_brats2023(np.asarray(nib.load(str(evaluation.find_reference(case))).dataobj))
            if ref.shape != result.labels.shape:
                raise InputError(f"{case.name}: reference labels {ref.shape} are not on the T1CE grid {result.labels.shape}.")
            rows.append({"case": case.name, **evaluation.evaluate_case(result.labels, ref, result.reference.spacing)})
    finally:
        progress.close()
    mean = evaluation.write_results(rows, out_dir / "metrics.csv", out_dir / "metrics.png")
    summary = "  ".join(f"{k[5:]} {mean[k]:.3f}" for k in mean if k.startswith("dice_"))
    print(f"{loaded.entry_name} on {len(rows)} case(s): Dice {summary} -> {out_dir / 'metrics.csv'}")
    return 0


def cmd_models(args) -> int:
    from . import weights

    entries = weights.load_registry()
    default = weights.default_model(entries)
    for e in entries:
        path = e.path()
        state = "baseline" if e.kind == "baseline" else ("installed" if path and path.exists() else "not installed")
        mark = "*" if e.name == default.name else " "
        print(f"{mark} {e.name:28s} {state:14s} {e.description}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # The Slicer module cancels by terminating the process: exit cleanly, leaving no partial output.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(Cancelled()))
    handlers = {"segment": cmd_segment, "batch": cmd_batch, "demo": cmd_demo, "models": cmd_models,
                "evaluate": cmd_evaluate}
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
