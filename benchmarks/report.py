"""Refresh BENCHMARKS.md from benchmarks/results/: every block between ``<!-- table:NAME -->`` and
``<!-- /table -->`` is replaced by ``results/NAME.md`` (which names the command that wrote it), and the
``bars`` block is computed from the JSON results. Prose around the blocks is written by hand.

    python benchmarks/report.py            # after the benchmark scripts (make bench runs it last)
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DOC = common.ROOT / "BENCHMARKS.md"


def bars(results: Path) -> str:
    """The issue's bars, checked against the measured JSON (nothing typed by hand)."""
    pipe = json.loads((results / "pipeline.json").read_text())
    peers = json.loads((results / "peers.json").read_text())["contenders"]
    ours = peers["brainunet"]["wall_s"]
    ours_fp32 = peers.get("brainunet_fp32", {}).get("wall_s")
    rows = []

    def row(bar, measured, ok):
        rows.append([bar, measured, "met" if ok else "**not met**"])

    w, m = pipe["whole"]["wall_s"], pipe["whole"]["peak_rss_gb"]
    row("whole pipeline ≤ 8 s median (bundled model, 2 cores; issue 12)", f"{w:.1f} s (precision {pipe.get('precision_auto')})", w <= 8)
    if "whole_fp32" in pipe:
        w32 = pipe["whole_fp32"]["wall_s"]
        row("same, fp32 (a CPU without native bf16)", f"{w32:.1f} s", w32 <= 8)
    row("peak RSS ≤ 1.5 GB (issue 12)", f"{m:.2f} GB", m <= 1.5)
    nn = peers.get("nnunet_1fold")
    if nn:
        row("≥ 10× faster than nnU-Net 1 fold, no mirroring (same run; issue 4)", f"{nn['wall_s'] / ours:.1f}×", nn["wall_s"] / ours >= 10)
        if ours_fp32:
            row("same, against BrainUNet fp32", f"{nn['wall_s'] / ours_fp32:.1f}×", nn["wall_s"] / ours_fp32 >= 10)
    seg = peers.get("monai_whole")
    if seg:
        row("faster than SegResNet, one whole-volume window (same run; issue 4)", f"{seg['wall_s'] / ours:.1f}×", seg["wall_s"] > ours)
        if ours_fp32:
            row("same, against BrainUNet fp32", f"{seg['wall_s'] / ours_fp32:.1f}×", seg["wall_s"] > ours_fp32)
    return common.md_table(["bar", "measured", ""], rows)


def render(text: str, results: Path) -> str:
    """``text`` with every table block refilled from ``results``."""
    def replace(match):
        name = match.group(1)
        if name == "bars":
            body = bars(results)
        else:
            path = results / f"{name}.md"
            body = path.read_text().strip() if path.exists() else f"*(not run: `{name}` has no results yet)*"
        return f"<!-- table:{name} -->\n{body}\n<!-- /table -->"

    return re.sub(r"<!-- table:([a-z_/]+) -->.*?<!-- /table -->", replace, text, flags=re.S)


def main(argv=None):
    DOC.write_text(render(DOC.read_text(), common.RESULTS))
    print(f"{DOC} refreshed from {common.RESULTS}")


if __name__ == "__main__":
    main()
