"""Shared harness for the benchmark scripts.

Every measurement runs in a fresh Python process (``measure``) so that its wall time includes what a
user pays (imports, model load) where the task says so, and its peak memory is its own: the parent polls
the resident set size of the child *and all its descendants* (nnU-Net forks workers) every 20 ms and
keeps the peak of the sum. Threads are pinned to ``--threads`` (2 = this machine's cores) through the
usual environment variables and ``torch.set_num_threads`` in the child.

Results are JSON under ``benchmarks/results/`` plus a Markdown table per script; BENCHMARKS.md quotes
those tables with the command that wrote them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "BrainUNetSegmentation"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
RESULTS = ROOT / "benchmarks" / "results"
REAL_DATA = ROOT.parent / "shared" / "data" / "real"
DEV_CASE = REAL_DATA / "BraTS2021_00006"
# a scan as a clinic exports it (skull on, 5.5 mm slices, T2W and FLAIR moved): what our users load
CLINIC_CASE = REAL_DATA / "raw_clinical_case" / "native"
CHILD_MARK = "BENCH_RESULT_JSON="


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--case", type=Path, default=None,
                   help=f"BraTS-layout case folder (default: {DEV_CASE.relative_to(ROOT.parent)} when present)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median is reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every contender")
    p.add_argument("--output", type=Path, default=RESULTS, help="folder for <name>.json and <name>.md")
    p.add_argument("--smoke", action="store_true",
                   help="tiny synthetic case and one run of everything: only checks that the script works")
    return p


def resolve_case(args) -> Path:
    """The case to benchmark: --case, else the real dev case, else (--smoke) a small synthetic case."""
    if args.case:
        return Path(args.case)
    if args.smoke:
        return smoke_case()
    if DEV_CASE.is_dir():
        return DEV_CASE
    raise SystemExit(f"No case: {DEV_CASE} is absent; pass --case DIR (a BraTS-layout folder) or --smoke.")


def smoke_case() -> Path:
    """A small synthetic case in BraTS 2023 layout with all four sequences (cached per process)."""
    from brainunet import synthetic

    # its own parent folder, so that scripts taking a folder of cases (accuracy) see this case only
    folder = Path(tempfile.gettempdir()) / f"brainunet-bench-smoke-{os.getpid()}" / "BrainUNet-Smoke-00000"
    if not (folder / "BrainUNet-Smoke-00000-seg.nii.gz").exists():
        paths = synthetic.write_case(folder, case_id="BrainUNet-Smoke-00000", seed=3, shape=(64, 72, 56),
                                     spacing=(2.0, 2.0, 2.0))
        if "t1n" not in paths:  # nnU-Net's BraTS layout has four channels; T1 stands in as a copy of T1CE
            import shutil

            shutil.copy(paths["t1c"], folder / "BrainUNet-Smoke-00000-t1n.nii.gz")
    return folder


def case_files(case_dir: Path) -> dict[str, Path]:
    """Modality key -> file, plus 'seg' when the case is labelled."""
    from brainunet_lab.evaluation import find_reference
    from brainunet.imageio import find_case_files

    files = dict(find_case_files(case_dir))
    ref = find_reference(Path(case_dir))
    if ref is not None:
        files["seg"] = ref
    return files


def labelled_case(case_dir: Path, purpose: str):
    """(files, reference labels in BraTS 2023 values, the label image) of a labelled case; stops with
    a message when the case has no ``*seg*`` file."""
    import nibabel as nib
    import numpy as np

    from brainunet.labels import to_brats2023

    files = case_files(case_dir)
    if "seg" not in files:
        raise SystemExit(f"{case_dir} has no reference labels (*seg*): {purpose} needs a labelled case.")
    image = nib.load(str(files["seg"]))
    return files, to_brats2023(np.asarray(image.dataobj)), image


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    env["BENCH_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    if not env.get("BRAINUNET_MODEL"):  # empty: the registry default (the bundled model)
        env.pop("BRAINUNET_MODEL", None)
    return env


def child_setup():
    """Call first in a measured child: pin torch's threads like the environment."""
    import torch

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def child_report(payload: dict):
    """A measured child's answer to the parent (one line on stdout)."""
    print(CHILD_MARK + json.dumps(payload), flush=True)


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(argv: list[str], threads: int = 2, timeout: float | None = None, env_extra: dict | None = None) -> dict:
    """Run ``argv`` once; wall seconds, peak RSS (GB: process tree, and main process) and the child's JSON."""
    import psutil

    env = thread_env(threads)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=ROOT)
    proc = psutil.Process(popen.pid)
    peak = 0
    import threading

    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda: out_chunks.append(popen.stdout.read())),
               threading.Thread(target=lambda: err_chunks.append(popen.stderr.read()))]
    for r in readers:
        r.start()
    peak_main = 0
    while popen.poll() is None:
        peak = max(peak, _tree_rss(proc))
        try:
            peak_main = max(peak_main, proc.memory_info().rss)
        except psutil.Error:
            pass
        if timeout and time.perf_counter() - t0 > timeout:
            popen.kill()
            raise TimeoutError(f"{argv} ran over {timeout} s")
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    for r in readers:
        r.join()
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    if popen.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({popen.returncode}):\n{stderr[-4000:]}")
    reported = {}
    for line in stdout.splitlines():
        if line.startswith(CHILD_MARK):
            reported = json.loads(line[len(CHILD_MARK):])
    # peak_rss_gb sums the whole process tree (what the machine must hold; pages that worker processes
    # share are counted in each); peak_main_rss_gb is the measured process alone
    return {"wall_s": wall, "peak_rss_gb": peak / 1e9, "peak_main_rss_gb": peak_main / 1e9, "child": reported}


def repeat(argv: list[str], repeats: int, threads: int = 2, **kw) -> dict:
    """``repeats`` runs of ``measure``: every run, and the medians of wall time, peak RSS and child timings."""
    runs = [measure(argv, threads, **kw) for _ in range(max(1, repeats))]
    out = {"runs": runs, "wall_s": statistics.median(r["wall_s"] for r in runs),
           "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs)}
    keys = set().union(*(r["child"] for r in runs))
    for k in sorted(keys):
        vals = [r["child"][k] for r in runs if isinstance(r["child"].get(k), (int, float))]
        if vals:
            out[k] = statistics.median(vals)
    return out


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def save(name: str, args, payload: dict, table: str) -> Path:
    """Write ``<output>/<name>.json`` and ``<name>.md`` (smoke runs go to a temporary folder by default)."""
    out = Path(args.output)
    if args.smoke and out == RESULTS:
        out = Path(tempfile.mkdtemp(prefix="brainunet-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if ROOT in script.parents else Path(sys.argv[0])
    command = " ".join(["python", str(shown), *sys.argv[1:]])
    payload = {"command": command, "machine": machine(), **payload}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{name}.md").write_text(f"<!-- written by: {command} -->\n{table}\n")
    print(table)
    print(f"-> {out / (name + '.json')}")
    return out


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
