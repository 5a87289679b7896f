"""The benchmark scripts stay runnable: each one, in --smoke mode (tiny synthetic case, one run), writes
its JSON and Markdown with sane contents. No timing is asserted: speed lives in BENCHMARKS.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_smoke(script: str, tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ)
    env.pop("BRAINUNET_MODEL", None)  # benchmarks measure the bundled model, not the tests' baseline
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--output", str(tmp_path), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = script.removesuffix(".py")
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.md").read_text().count("|") > 10
    assert payload["command"].startswith("python ") and "--smoke" in payload["command"]
    return payload


@pytest.mark.bench
def test_pipeline_smoke(tmp_path):
    out = run_smoke("pipeline.py", tmp_path)
    assert out["whole"]["wall_s"] > 0 and out["whole"]["peak_rss_gb"] > 0.1
    stages = out["stages_median"]
    assert stages["inference_s"] > 0
    parts = sum(v for k, v in stages.items() if k != "total_s")
    assert parts <= stages["total_s"] * 1.001  # the stages are disjoint pieces of one run


@pytest.mark.bench
def test_variants_smoke(tmp_path):
    import onnxruntime  # noqa: F401  (the bench extra: missing, this must fail)
    out = run_smoke("variants.py", tmp_path, "--variants", "fp32,channels_last,bf16,onnx,paper_2mm,grid_1p5mm")
    results = out["results"]
    assert set(results) == {"fp32", "channels_last", "bf16", "onnx", "paper_2mm", "grid_1p5mm"}
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["median_s"] > 0
    # exact formats must give the fp32 answer; the paper-size network is bigger
    assert results["onnx"]["agreement_with_fp32"]["WT"] > 0.99
    assert results["channels_last"]["agreement_with_fp32"]["WT"] > 0.99
    assert results["paper_2mm"]["parameters_m"] > 3 * results["fp32"]["parameters_m"]
    # a finer grid: more voxels for the same network, and no label comparison (its weights are 2 mm's)
    grid = results["grid_1p5mm"]
    assert grid["parameters_m"] == results["fp32"]["parameters_m"] and "agreement_with_fp32" not in grid
    assert np.prod(grid["working_shape"]) > 2 * np.prod(results["fp32"]["working_shape"])


@pytest.mark.bench
def test_accuracy_smoke(tmp_path):
    import brats_evaluation  # noqa: F401  (the bench extra: missing, this must fail)
    out = run_smoke("accuracy.py", tmp_path, "--models", "intensity-baseline")
    (row,) = out["results"]
    assert row["reference"] == "ground truth"
    # the official package's whole-image Dice must equal ours on the same label maps
    for region in ("ET", "TC", "WT"):
        assert row["lesionwise"][region]["global_dice"] == pytest.approx(row[f"dice_{region}"], abs=1e-6)


@pytest.mark.bench
def test_robustness_smoke(tmp_path):
    import torchio  # noqa: F401  (the bench extra: missing, this must fail)
    out = run_smoke("robustness.py", tmp_path, "--degradations", "clean,5 mm slices,low SNR,missing T2W")
    assert set(out["results"]) == {"clean", "5 mm slices", "low SNR", "missing T2W"}
    assert all(0 <= r["WT"] <= 1 for r in out["results"].values())
    assert (tmp_path / "robustness.png").stat().st_size > 1000


@pytest.mark.bench
def test_where_time_goes_smoke(tmp_path):
    out = run_smoke("where_time_goes.py", tmp_path)
    assert out["flops"] > 1e9 and out["gemm_peak_gflops_fp32"] > 1
    assert out["floor_s"] > 0 and out["inference_s"] > 0  # no timing compared: a loaded machine can upset it


def test_thick_slices_keep_geometry():
    """The thick-slice simulation keeps the physical extent: the slab centres sit where they should."""
    import numpy as np

    sys.path.insert(0, str(BENCH))
    from robustness import thick_slices

    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    data = np.arange(10, dtype=np.float32)[None, None, :].repeat(2, 0).repeat(2, 1)
    thick, new_affine = thick_slices(data, affine, 5)
    assert thick.shape == (2, 2, 2)
    assert thick[0, 0].tolist() == [2.0, 7.0]  # means of slices 0-4 and 5-9
    centre_first = new_affine @ np.array([0, 0, 0, 1.0])
    assert centre_first[2] == pytest.approx(2.0)  # centre of slices 0..4 in mm


def test_benchmarks_md_quotes_the_committed_results():
    """BENCHMARKS.md's tables are exactly what benchmarks/results/ says (run report.py after a bench)."""
    sys.path.insert(0, str(BENCH))
    import common
    import report

    text = (ROOT / "BENCHMARKS.md").read_text()
    assert report.render(text, common.RESULTS) == text
    assert text.count("<!-- table:") >= 7 and "not run" not in text


@pytest.mark.bench
def test_error_analysis_smoke(tmp_path):
    out = run_smoke("error_analysis.py", tmp_path)
    assert set(out["resolution_ceiling"]) == {"ET", "NETC", "SNFH", "TC", "WT"}
    assert out["resolution_ceiling"]["WT"] > 0.8  # down to 2 mm and back keeps most of a tumour
    errors = out["errors"]
    # the distance bands partition the errors
    assert sum(errors["fp_by_distance_mm"].values()) == pytest.approx(errors["fp_ml"], abs=1e-6)
    assert sum(errors["fn_by_depth_mm"].values()) == pytest.approx(errors["fn_ml"], abs=1e-6)
    assert errors["reference_wt_ml"] > 0
    assert len(out["border_profile"]["cases"]) == 2  # the case and one engine case


@pytest.mark.bench
def test_gui_thread_smoke(tmp_path):
    out = run_smoke("gui_thread.py", tmp_path)
    assert set(out["results"]) == {"t1c", "t2w", "t2f"}
    for r in out["results"].values():
        assert r["now_copy_native_s"] > 0 and r["before_app_thread_s"] > 0 and r["nii_native_mb"] > 0
    chosen = json.loads((tmp_path / "gui_thread_output.json").read_text())["results"]
    assert [r["layers"] for r in chosen.values()] == [1, 3, 1]
    assert all(r["read_s"] > 0 and r["layer_voxels"] > 0 for r in chosen.values())
    whole_brain = chosen["SNFH over the whole brain, one shared layer"]["layer_voxels"]
    assert whole_brain > chosen["tumour-sized, one shared layer"]["layer_voxels"]


@pytest.mark.bench
def test_training_step_smoke(tmp_path):
    """Both forward passes take real optimiser steps: a finite loss and a time each."""
    out = run_smoke("training_step.py", tmp_path)
    assert set(out["median_s"]) == {"fp32", "bf16"} and all(v > 0 for v in out["median_s"].values())
    assert out["bf16_speedup"] == pytest.approx(out["median_s"]["fp32"] / out["median_s"]["bf16"], rel=0.01)
