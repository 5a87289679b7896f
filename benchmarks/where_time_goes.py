"""Where the time goes in one CPU run, and how far inference is from this CPU's limit.

1. ``cProfile`` of one whole ``pipeline.run`` (after imports and model load): the functions that take
   the time, by cumulative seconds.
2. ``torch.profiler`` of the network's forward pass: the operators, by self CPU time.
3. The floor: the forward pass's FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) divided by this
   CPU's measured peak (the best of several large GEMMs on ``--threads`` threads), against the measured
   inference time, in fp32 and with bf16 autocast.
The profiled forward pass (2) is fp32.

    python benchmarks/where_time_goes.py
    python benchmarks/where_time_goes.py --smoke
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def gemm_peak_gflops(dtype_name: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    from brainunet import pipeline
    from brainunet.inference import predict_probabilities, resolve_precision, window_plan

    precision_auto = resolve_precision(None, "cpu")
    case = common.resolve_case(args)
    files = common.case_files(case)
    inputs = {k: files[k] for k in ("t1c", "t2w", "t2f")}
    loaded = pipeline.load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline.run(inputs, Path(tmp) / "warm.nii.gz", device="cpu", loaded_model=loaded)  # warm caches
        profiler = cProfile.Profile()
        t = time.perf_counter()
        profiler.enable()
        result = pipeline.run(inputs, Path(tmp) / "labels.nii.gz", device="cpu", loaded_model=loaded)
        profiler.disable()
        whole_s = time.perf_counter() - t
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative")
    func_rows = []
    for func, (cc, nc, tt, ct, callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3]):
        filename, line, name = func
        if "brainunet" not in filename and not name.startswith("<built-in method torch"):
            continue
        label = f"{Path(filename).name}:{name}" if filename != "~" else name
        func_rows.append([label, nc, ct, ct / whole_s])
        if len(func_rows) >= args.top:
            break

    # the network alone, on the prepared input exactly as the pipeline feeds it
    _, prepared = pipeline.prepare_inputs(pipeline.load_inputs(inputs), loaded)
    patch = loaded.preprocessing.patch_size
    padded, eff_patch, origins = window_plan(prepared.image.shape[1:], patch, loaded.network.config.divisor)
    net = loaded.network.eval()
    x = torch.zeros((1, prepared.image.shape[0], *eff_patch))
    with torch.inference_mode():
        net(x)
        with FlopCounterMode(display=False) as counter:
            net(x)
        flops_per_window = counter.get_total_flops()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            net(x)
    op_rows = []
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in events) or 1
    for e in events[: args.top]:
        op_rows.append([e.key, e.count, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total_self])
    def median_inference(precision):
        times = []
        for _ in range(1 if args.smoke else args.repeats):
            t = time.perf_counter()
            predict_probabilities(net, prepared.image, patch, precision=precision)
            times.append(time.perf_counter() - t)
        return float(np.median(times)), times

    inference_s, times = median_inference("fp32")
    inference_bf16_s, times_bf16 = median_inference("bf16")
    flops = flops_per_window * len(origins)
    # the smoke run checks that it works: a small product (a 2048 one in bf16 takes many minutes where the CPU
    # emulates bf16)
    gemm_size = 512 if args.smoke else 2048
    peak32 = max(gemm_peak_gflops("float32", gemm_size) for _ in range(2))
    try:
        peak16 = max(gemm_peak_gflops("bfloat16", gemm_size) for _ in range(2))
    except RuntimeError:
        peak16 = float("nan")
    floor_s = flops / (peak32 * 1e9)
    floor16_s = flops / (peak16 * 1e9)
    summary = [["network input (C, X, Y, Z) per window", f"{tuple(x.shape[1:])} × {len(origins)} window(s)"],
               ["forward FLOPs (whole case)", f"{flops / 1e9:.1f} GFLOP"],
               ["measured fp32 GEMM peak, this CPU, {} threads".format(args.threads), f"{peak32:.1f} GFLOP/s"],
               ["measured bf16 GEMM peak, same", f"{peak16:.1f} GFLOP/s"],
               ["fp32: floor at GEMM peak / measured inference (median)", f"{floor_s:.2f} s / {inference_s:.2f} s "
                f"({flops / inference_s / 1e9:.1f} GFLOP/s = {100 * floor_s / inference_s:.0f} % of peak)"],
               ["bf16 autocast: floor / measured", f"{floor16_s:.2f} s / {inference_bf16_s:.2f} s "
                f"({flops / inference_bf16_s / 1e9:.1f} GFLOP/s = {100 * floor16_s / inference_bf16_s:.0f} % of peak)"],
               [f"whole pipeline.run under cProfile (precision {precision_auto})", f"{whole_s:.2f} s"]]
    table = ("**Floor**\n\n" + common.md_table(["what", "value"], summary)
             + "\n\n**Whole run (cProfile, cumulative, brainunet functions and torch calls)**\n\n"
             + common.md_table(["function", "calls", "cumulative s", "share of run"], func_rows)
             + "\n\n**Network forward (torch.profiler, self CPU time)**\n\n"
             + common.md_table(["operator", "calls", "self s", "share"], op_rows))
    payload = {"case": str(case), "model": loaded.entry_name, "flops": flops, "windows": len(origins),
               "window": list(eff_patch), "gemm_peak_gflops_fp32": peak32, "gemm_bf16_gflops": peak16,
               "floor_s": floor_s, "inference_s": inference_s, "inference_runs_s": times, "whole_run_s": whole_s,
               "floor_bf16_s": floor16_s, "inference_bf16_s": inference_bf16_s, "inference_bf16_runs_s": times_bf16,
               "precision_auto": precision_auto,
               "timings": result.timings}
    common.save("where_time_goes", args, payload, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
