"""Speed and peak memory of the whole BrainUNet pipeline on one case, and of each stage.

Whole pipeline = what a user runs: ``brainunet segment`` in a fresh process (Python and torch imports,
model load, NIfTI read, preprocessing, inference, label map, .seg.nrrd, statistics CSV), timed from
outside; peak RSS is that of the process. Stages are timed inside one fresh process per run, in order,
so each stage's time is what it costs in the real pipeline.

    python benchmarks/pipeline.py                 # real dev case, 5 runs
    python benchmarks/pipeline.py --smoke         # runnable check on a tiny synthetic case

With the real dev case, the runs also take turns with the same command on the raw clinical case's
``native/`` scan when it is there (skull on, 5.5 mm slices, T2W and FLAIR moved): what a clinic's export
costs on top of a BraTS-preprocessed case (brain extraction, registration, a larger grid).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STAGES = ["import_s", "model_load_s", "load_s", "preprocess_s", "inference_s", "label_map_s", "seg_nrrd_s",
          "statistics_s", "total_s"]


def cli_argv(files: dict, out_dir: Path, threads: int, model: str | None = None, precision: str | None = None) -> list[str]:
    """The user's command: labels + .seg.nrrd + statistics CSV."""
    argv = [sys.executable, "-m", "brainunet", "segment", "--t1c", str(files["t1c"]), "--t2w", str(files["t2w"]),
            "--t2f", str(files["t2f"]), "--output", str(out_dir / "labels.nii.gz"),
            "--seg-nrrd", str(out_dir / "labels.seg.nrrd"), "--stats", str(out_dir / "statistics.csv"),
            "--progress", "none", "--threads", str(threads), "--device", "cpu"]
    return argv + (["--model", model] if model else []) + (["--precision", precision] if precision else [])


def child_stages(case: Path, model: str | None):
    """One run of the pipeline, stage by stage, with the same calls ``pipeline.run`` makes."""
    t0 = time.perf_counter()
    import numpy as np  # noqa: F401
    import torch  # noqa: F401

    from brainunet import pipeline, postprocess, statistics
    from brainunet.inference import predict_probabilities, resolve_precision

    common.child_setup()
    t = {"import_s": time.perf_counter() - t0}
    files = common.case_files(case)
    s = time.perf_counter()
    loaded = pipeline.load_model(model, device="cpu")
    t["model_load_s"] = time.perf_counter() - s
    s = time.perf_counter()
    volumes = pipeline.load_inputs({k: files[k] for k in ("t1c", "t2w", "t2f")})
    t["load_s"] = time.perf_counter() - s
    s = time.perf_counter()
    ref_key = pipeline.reference_key(volumes)
    aligned, prepared = pipeline.prepare_inputs(volumes, loaded)
    t["preprocess_s"] = time.perf_counter() - s
    s = time.perf_counter()
    probs = predict_probabilities(loaded.network, prepared.image, loaded.preprocessing.patch_size)
    t["inference_s"] = time.perf_counter() - s
    t["precision"] = resolve_precision(None, "cpu")
    s = time.perf_counter()
    probs = prepared.restore_channels(probs)
    crop_labels = postprocess.apply(probs, prepared.crop_mask, loaded.postprocessing,  # every sequence is given
                                    voxel_mm3=float(np.prod(prepared.native_spacing)))
    labels = prepared.restore_labels(crop_labels)
    t["label_map_s"] = time.perf_counter() - s
    with tempfile.TemporaryDirectory() as tmp:
        s = time.perf_counter()
        pipeline.write_seg_nrrd(labels, volumes[ref_key].affine, Path(tmp) / "labels.seg.nrrd")
        t["seg_nrrd_s"] = time.perf_counter() - s
        s = time.perf_counter()
        rows = statistics.region_statistics(labels, volumes[ref_key].affine, aligned)
        statistics.write_csv(rows, Path(tmp) / "statistics.csv")
        t["statistics_s"] = time.perf_counter() - s
    t["total_s"] = time.perf_counter() - t0
    t["working_shape"] = list(prepared.image.shape[1:])
    t["model"] = loaded.entry_name
    common.child_report(t)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or weights file (default: bundled model)")
    parser.add_argument("--child", action="store_true", help=argparse_hidden())
    args = parser.parse_args(argv)
    case = common.resolve_case(args)
    if args.child:
        return child_stages(case, args.model)
    repeats = 1 if args.smoke else args.repeats
    files = common.case_files(case)
    clinic = common.CLINIC_CASE if case == common.DEV_CASE and common.CLINIC_CASE.is_dir() else None
    clinic_files = common.case_files(clinic) if clinic is not None else None
    whole_runs, fp32_runs, stage_runs, clinic_runs = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # interleaved so that machine noise hits all alike
            whole_runs.append(common.measure(cli_argv(files, Path(tmp), args.threads, args.model), args.threads))
            if clinic is not None:
                clinic_runs.append(common.measure(cli_argv(clinic_files, Path(tmp), args.threads, args.model),
                                                  args.threads))
            fp32_runs.append(common.measure(cli_argv(files, Path(tmp), args.threads, args.model, "fp32"), args.threads))
            child = [sys.executable, __file__, "--child", "--case", str(case)] + (["--model", args.model] if args.model else [])
            stage_runs.append(common.measure(child, args.threads))
    import statistics as st

    whole = {"wall_s": st.median(r["wall_s"] for r in whole_runs),
             "peak_rss_gb": st.median(r["peak_rss_gb"] for r in whole_runs),
             "max_peak_rss_gb": max(r["peak_rss_gb"] for r in whole_runs),
             "runs_wall_s": [r["wall_s"] for r in whole_runs]}
    fp32 = {"wall_s": st.median(r["wall_s"] for r in fp32_runs),
            "peak_rss_gb": st.median(r["peak_rss_gb"] for r in fp32_runs),
            "runs_wall_s": [r["wall_s"] for r in fp32_runs]}
    clinic_whole = {"case": str(clinic), "wall_s": st.median(r["wall_s"] for r in clinic_runs),
                    "peak_rss_gb": st.median(r["peak_rss_gb"] for r in clinic_runs),
                    "max_peak_rss_gb": max(r["peak_rss_gb"] for r in clinic_runs),
                    "runs_wall_s": [r["wall_s"] for r in clinic_runs]} if clinic_runs else None
    stages = {k: st.median(r["child"][k] for r in stage_runs) for k in STAGES}
    precision = stage_runs[0]["child"].get("precision")
    rows = [[f"whole pipeline (`brainunet segment`, fresh process; precision auto = {precision} here)",
             whole["wall_s"], whole["peak_rss_gb"], len(whole_runs)],
            ["whole pipeline, `--precision fp32` (what a CPU without native bf16 runs)", fp32["wall_s"],
             fp32["peak_rss_gb"], len(fp32_runs)]]
    if clinic_whole:
        rows.append(["whole pipeline on a clinic's export (`raw_clinical_case/native`: skull on, 5.5 mm slices, "
                     "T2W and FLAIR moved)", clinic_whole["wall_s"], clinic_whole["peak_rss_gb"], len(clinic_runs)])
    names = {"import_s": "Python + torch + brainunet imports", "model_load_s": "model load (fp16 file → fp32)",
             "load_s": "read 3 NIfTI files", "preprocess_s": "align, reorient, crop, bias-correct (N4), normalise, resample to 2 mm",
             "inference_s": f"network inference ({precision})", "label_map_s": "probabilities → label map on the T1CE grid",
             "seg_nrrd_s": "write .seg.nrrd (slicerio)", "statistics_s": "region statistics + CSV",
             "total_s": "sum of stages (in-process)"}
    rows += [[f"stage: {names[k]}", stages[k], "", len(stage_runs)] for k in STAGES]
    table = common.md_table(["what", "median wall s", "peak RSS GB", "runs"], rows)
    payload = {"case": str(case), "model": stage_runs[0]["child"].get("model"), "threads": args.threads,
               "working_shape": stage_runs[0]["child"].get("working_shape"), "whole": whole, "whole_fp32": fp32,
               "whole_clinic_export": clinic_whole,
               "precision_auto": precision,
               "stages_median": stages, "stage_runs": [r["child"] for r in stage_runs],
               "stage_process_peak_rss_gb": [r["peak_rss_gb"] for r in stage_runs]}
    common.save("pipeline", args, payload, table)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
