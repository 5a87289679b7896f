"""Our own inference variants on one case, side by side: fp32 eager, channels-last, bf16, torch.compile,
ONNX Runtime fp32 and int8, and the paper-size network (23 M parameters) at 2 mm and at the paper's
1 mm with 128³ windows.

Each variant runs in its own fresh process on the same preprocessed input: ``setup_s`` is what the
variant costs once per process (compile, ONNX export + session, quantisation), ``first_s`` the first
inference call, ``median_s`` the median of the next ``--repeats`` calls. Every variant's label map is
compared with the fp32 eager one (agreement Dice: a faster variant must give the same answer) and, on a
labelled case, with the reference labels.

    python benchmarks/variants.py                 # real dev case
    python benchmarks/variants.py --smoke         # runnable check on a tiny synthetic case
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BUNDLED_VARIANTS = ["fp32", "channels_last", "bf16", "compile", "onnx", "onnx_int8"]
PAPER_VARIANTS = ["paper_2mm", "paper_1mm"]
#: The bundled network on a finer working grid: what a 1.5 mm model would cost (its weights are the 2 mm
#: model's, so only the time is meaningful).
GRID_VARIANTS = ["grid_1p5mm", "grid_1p5mm_bf16"]
TIMING_ONLY = tuple(PAPER_VARIANTS + GRID_VARIANTS)
DESCRIPTION = {
    "fp32": "bundled model, fp32 eager (what ships)",
    "channels_last": "bundled, channels-last-3d memory format",
    "bf16": "bundled, bf16 autocast on CPU",
    "compile": "bundled, torch.compile (inductor)",
    "onnx": "bundled, ONNX Runtime fp32",
    "onnx_int8": "bundled, ONNX Runtime int8 (static QDQ, calibrated on engine cases)",
    "paper_2mm": "paper-size network (random weights), 2 mm, one window",
    "paper_1mm": "paper-size network (random weights), 1 mm, 128³ windows, overlap 0.5",
    "grid_1p5mm": "bundled network on a 1.5 mm grid (timing only: 2 mm weights), fp32",
    "grid_1p5mm_bf16": "bundled network on a 1.5 mm grid (timing only: 2 mm weights), bf16 autocast",
}


class _Runner:
    """What ``inference.predict_probabilities`` needs from a model: ``.config``, ``.to``, ``.eval``, call."""

    def __init__(self, config, forward):
        self.config = config
        self._forward = forward

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, x):
        return self._forward(x)


def _calibration_images(n, shape, spacing_mm, seed=1000):
    """Engine cases (never the evaluation case) cropped/padded to the network input shape."""
    from brainunet_lab.engine import generate_case, load_anatomy

    try:
        anatomy = load_anatomy(float(spacing_mm))
    except Exception:  # SRI24 cache absent (fresh machine, no `brainunet templates`): procedural brain
        anatomy = load_anatomy(float(spacing_mm), source="phantom")
    out = []
    for i in range(n):
        case = generate_case(seed + i, anatomy)
        img = case.image.cpu().numpy().astype(np.float32)
        canvas = np.zeros((img.shape[0], *shape), np.float32)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(img.shape[1:], shape))
        canvas[(slice(None),) + sl] = img[(slice(None),) + sl]
        out.append(canvas[None])
    return out


def build_runner(variant: str, net, example: np.ndarray, threads: int, work: Path):
    """A model-like object for ``variant`` and its input shape; returns (runner, setup seconds)."""
    import torch

    cfg = net.config
    t0 = time.perf_counter()
    if variant in ("fp32", "paper_2mm", "paper_1mm", "grid_1p5mm"):
        runner = _Runner(cfg, net)
    elif variant == "channels_last":
        net = net.to(memory_format=torch.channels_last_3d)
        runner = _Runner(cfg, lambda x: net(x.contiguous(memory_format=torch.channels_last_3d)))
    elif variant in ("bf16", "grid_1p5mm_bf16"):
        def forward(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x).float()
        runner = _Runner(cfg, forward)
    elif variant == "compile":
        compiled = torch.compile(net)
        runner = _Runner(cfg, compiled)
    elif variant in ("onnx", "onnx_int8"):
        import onnxruntime as ort

        path = work / "brainunet.onnx"
        torch.onnx.export(net, (torch.from_numpy(example),), str(path), input_names=["image"],
                          output_names=["logits"], opset_version=17, dynamo=False)
        if variant == "onnx_int8":
            path = _quantise(path, example.shape, work)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def forward(x):
            return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        runner = _Runner(cfg, forward)
    else:
        raise ValueError(f"unknown variant {variant}")
    return runner, time.perf_counter() - t0


def _quantise(fp32_path: Path, shape, work: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spacing = float(__import__("os").environ.get("BENCH_SPACING", "2.0"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(_calibration_images(4, shape[2:], spacing))

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"image": item}

    pre = work / "pre.onnx"
    quant_pre_process(str(fp32_path), str(pre))
    out = work / "brainunet-int8.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return out


def child(args):
    """One variant in this process: prepare the case, build, time, save the label map."""
    import torch

    from brainunet import pipeline, postprocess
    from brainunet.inference import predict_probabilities, window_plan
    from brainunet.network import PAPER_CONFIG, BrainUNet, count_parameters

    common.child_setup()
    torch.manual_seed(0)
    files = common.case_files(args.case_dir)
    loaded = pipeline.load_model(args.model, device="cpu")
    net = loaded.network
    if args.child.startswith("paper"):
        net = BrainUNet(PAPER_CONFIG).eval()  # random weights: timing only
    grid_mm = 1.0 if args.child == "paper_1mm" else 1.5 if args.child.startswith("grid_1p5mm") else None
    if grid_mm:
        loaded.settings = dataclasses.replace(
            loaded.settings, preprocessing=dataclasses.replace(loaded.preprocessing, spacing_mm=(grid_mm,) * 3))
    patch = loaded.preprocessing.patch_size
    volumes = pipeline.load_inputs({k: files[k] for k in ("t1c", "t2w", "t2f")})
    _, prepared = pipeline.prepare_inputs(volumes, loaded)
    padded, eff_patch, origins = window_plan(prepared.image.shape[1:], patch, net.config.divisor)
    example = np.zeros((1, prepared.image.shape[0], *eff_patch), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["BENCH_SPACING"] = str(loaded.preprocessing.spacing_mm[0])
        runner, setup_s = build_runner(args.child, net, example, int(os.environ.get("BENCH_THREADS", "2")), Path(tmp))
        times = []
        for _ in range(1 + args.inner_repeats):
            t = time.perf_counter()
            probs = predict_probabilities(runner, prepared.image, patch, precision="fp32")  # variants set their own
            times.append(time.perf_counter() - t)
    probs = prepared.restore_channels(probs)
    labels = prepared.restore_labels(postprocess.apply(probs, prepared.crop_mask, loaded.postprocessing,
                                                       voxel_mm3=float(np.prod(prepared.native_spacing))))
    np.save(args.labels_out, labels.astype(np.uint8))
    common.child_report({"setup_s": setup_s, "first_s": times[0],
                         "median_s": float(np.median(times[1:] if len(times) > 1 else times)),
                         "parameters_m": count_parameters(net) / 1e6, "windows": len(origins),
                         "window": list(eff_patch), "working_shape": list(prepared.image.shape[1:])})


def region_dice(pred, ref) -> dict:
    from brainunet_lab.evaluation import dice
    from brainunet.labels import ALL_REGIONS

    return {r.key: dice(r.mask(pred), r.mask(ref)) for r in ALL_REGIONS}


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or weights file (default: bundled model)")
    parser.add_argument("--variants", default=",".join(BUNDLED_VARIANTS + PAPER_VARIANTS),
                        help="comma-separated subset of: " + ", ".join(BUNDLED_VARIANTS + PAPER_VARIANTS + GRID_VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--case-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inner-repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    case = common.resolve_case(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "fp32" not in variants:
        variants.insert(0, "fp32")  # the reference every other variant is compared with
    files = common.case_files(case)
    reference = None
    if "seg" in files:
        import nibabel as nib

        from brainunet.labels import to_brats2023

        reference = to_brats2023(np.asarray(nib.load(str(files["seg"])).dataobj))
    results, labels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            inner = 0 if (args.smoke or v == "paper_1mm") else args.repeats
            out = Path(tmp) / f"{v}.npy"
            argv_child = [sys.executable, __file__, "--child", v, "--case-dir", str(case), "--labels-out", str(out),
                          "--inner-repeats", str(inner)] + (["--model", args.model] if args.model else [])
            # torch.compile keeps compiled kernels on disk: a fresh cache folder times the cold compile a
            # user's first case pays (a warm cache made the first call 4.9 s instead of 17 s here)
            env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / f"inductor-{v}")}
            try:
                m = common.measure(argv_child, args.threads, env_extra=env)
            except RuntimeError as error:  # a variant that does not run here is a result, not a crash
                results[v] = {"error": str(error).strip().splitlines()[-1][:300]}
                print(f"{v}: FAILED {results[v]['error']}")
                continue
            results[v] = {**m["child"], "process_wall_s": m["wall_s"], "peak_rss_gb": m["peak_rss_gb"]}
            labels[v] = np.load(out)
            print(f"{v}: {results[v]['median_s']:.2f} s median inference, {m['peak_rss_gb']:.2f} GB")
    base = results.get("fp32", {}).get("median_s")
    rows = []
    for v in variants:
        r = results[v]
        if "error" in r:
            rows.append([v, DESCRIPTION[v], "failed", "", "", "", "", "", "", r["error"][:80]])
            continue
        if v in labels and "fp32" in labels and v not in TIMING_ONLY:
            agree = region_dice(labels[v], labels["fp32"])
            r["agreement_with_fp32"] = agree
            agree_txt = f"{agree['WT']:.4f} / {agree['TC']:.4f} / {agree['ET']:.4f}"
        else:
            agree_txt = ("n/a (random weights)" if v.startswith("paper") else
                         "n/a (2 mm weights)" if v in GRID_VARIANTS else "")
        if reference is not None and v not in TIMING_ONLY:
            d = region_dice(labels[v], reference)
            r["dice_vs_reference"] = d
            dice_txt = f"{d['WT']:.3f} / {d['TC']:.3f} / {d['ET']:.3f}"
        else:
            dice_txt = "n/a"
        rows.append([v, DESCRIPTION[v], f"{r['parameters_m']:.1f}", r["setup_s"], r["first_s"], r["median_s"],
                     f"{r['median_s'] / base:.2f}" if base else "", r["peak_rss_gb"], agree_txt, dice_txt])
    table = common.md_table(["variant", "what", "params M", "setup s", "first call s", "median s",
                             "× fp32 time", "peak RSS GB", "agreement with fp32 (WT/TC/ET Dice)",
                             "Dice vs reference (WT/TC/ET)"], rows)
    common.save("variants", args, {"case": str(case), "threads": args.threads, "results": results}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
