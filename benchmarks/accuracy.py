"""Accuracy on every labelled real case: per-region Dice and HD95 (``brainunet_lab.evaluation``) and the
BraTS lesion-wise metrics from the official ``brats-evaluation`` package (panoptica, glioma config).

Cases with a ``*seg*`` file are scored against ground truth. With ``--agreement GLOB`` (default
``algo_segmentation*``) a case whose only labels are another algorithm's output is scored against that
output too, in a separate table: agreement with a peer, not accuracy.

Lesion-wise columns, as the official package reports them: lesions are connected components matched
one-to-one (max bipartite matching on Dice); ``TP/FP/FN`` count lesions, ``F1`` is panoptica's
recognition quality, ``lesion Dice`` is the mean Dice of the matched lesions (panoptica ``sq_dsc``,
the official parser's ``lesionwise_dsc_mean``), ``PQ`` = F1 × lesion Dice. ``global Dice`` is panoptica's
whole-image Dice, a cross-check of our own. (Panoptica's whole-image HD95 is left out: in 2.1.7 it
ignores the voxel spacing — half our value on a 2 mm case — while its lesion HD95 honours it.) ``BraTS-2023 LW Dice`` is
derived from the same counts as the 2023 challenge defined it: sum of matched-lesion Dice over
TP + FP + FN (each unmatched lesion scores 0).

    python benchmarks/accuracy.py                       # ../shared/data/real, bundled model + baseline
    python benchmarks/accuracy.py --smoke
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REGIONS = ["ET", "NETC", "SNFH", "TC", "WT"]


def lesion_metrics(pred: np.ndarray, ref: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Official BraTS glioma evaluation (panoptica with the package's bundled config) of two label maps
    in BraTS 2023 values. Returns {region: {metric: value}}."""
    import io
    import contextlib

    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
        results = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8),
                                     voxelspacing=tuple(float(v) for v in spacing))
    out = {}
    for key, result in results.items():
        if key.upper() not in REGIONS:
            continue
        d = result.to_dict(True)
        tp, fp, fn = d.get("tp", 0), d.get("fp", 0), d.get("fn", 0)
        sq = d.get("sq_dsc")
        lw2023 = (sq * tp / (tp + fp + fn)) if (tp + fp + fn) and sq == sq and sq is not None else float("nan")
        if tp + fp + fn == 0:
            lw2023 = 1.0  # both empty: the 2023 rules score 1
        out[key.upper()] = {"tp": tp, "fp": fp, "fn": fn, "f1": d.get("rq"), "lesion_dice": sq,
                            "lesion_hd95": d.get("sq_hd95"), "pq": d.get("pq_dsc"), "lw_dice_2023": lw2023,
                            "global_dice": float(d.get("global_bin_dsc")), "global_hd95": float(d.get("global_bin_hd95"))}
    return out


def score_case(case: Path, reference: Path, loaded, out_dir: Path) -> dict:
    import nibabel as nib

    from brainunet import pipeline
    from brainunet_lab import evaluation
    from brainunet.imageio import find_case_files
    from brainunet.labels import to_brats2023

    files = find_case_files(case)
    pred_path = out_dir / f"{case.name}-{loaded.entry_name}.nii.gz"
    result = pipeline.run({k: files.get(k) for k in ("t1c", "t2w", "t2f")}, pred_path, device="cpu",
                          loaded_model=loaded)
    ref = to_brats2023(np.asarray(nib.load(str(reference)).dataobj))
    row = evaluation.evaluate_case(result.labels, ref, result.reference.spacing)
    row["lesionwise"] = lesion_metrics(result.labels, ref, result.reference.spacing)
    return row


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of case folders (default ../shared/data/real)")
    parser.add_argument("--models", default="default,intensity-baseline",
                        help="comma-separated registry names; 'default' = the bundled default model")
    parser.add_argument("--agreement", default="algo_segmentation*", help="glob of another algorithm's output")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from brainunet import pipeline
    from brainunet_lab.evaluation import find_reference

    data = args.data or (common.resolve_case(args).parent if args.smoke else common.REAL_DATA)
    if not data.is_dir():
        raise SystemExit(f"No data folder {data}; pass --data DIR or --smoke.")
    cases = sorted(c for c in data.iterdir() if c.is_dir())
    jobs = []  # (case, reference file, kind)
    for case in cases:
        if find_reference(case):
            jobs.append((case, find_reference(case), "ground truth"))
        elif args.agreement and find_reference(case, args.agreement):
            jobs.append((case, find_reference(case, args.agreement), "algorithm output (agreement)"))
    if not jobs:
        raise SystemExit(f"No labelled case in {data}.")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            loaded = pipeline.load_model(None if name == "default" else name)
            for case, ref, kind in jobs:
                row = score_case(case, ref, loaded, Path(tmp))
                results.append({"case": case.name, "model": loaded.entry_name, "reference": kind,
                                "reference_file": ref.name, **row})
                print(f"{loaded.entry_name} on {case.name} ({kind}): WT Dice {row['dice_WT']:.3f}")
    tables = []
    for kind in ("ground truth", "algorithm output (agreement)"):
        rows = [r for r in results if r["reference"] == kind]
        if not rows:
            continue
        head = ["case", "model"] + [f"Dice {k}" for k in REGIONS] + [f"HD95 {k} mm" for k in REGIONS]
        body = [[r["case"], r["model"]] + [r[f"dice_{k}"] for k in REGIONS] + [r[f"hd95_{k}"] for k in REGIONS]
                for r in rows]
        tables.append(f"**Voxel-wise, against {kind}**\n\n" + common.md_table(head, body))
        head = ["case", "model", "region", "lesions TP/FP/FN", "F1", "lesion Dice", "lesion HD95 mm", "PQ",
                "BraTS-2023 LW Dice", "global Dice"]
        body = []
        for r in rows:
            for k in REGIONS:
                m = r["lesionwise"][k]
                body.append([r["case"], r["model"], k, f"{m['tp']}/{m['fp']}/{m['fn']}", m["f1"], m["lesion_dice"],
                             m["lesion_hd95"], m["pq"], m["lw_dice_2023"], m["global_dice"]])
        tables.append(f"**Lesion-wise (official brats-evaluation / panoptica, glioma config), against {kind}**\n\n"
                      + common.md_table(head, body))
    common.save("accuracy", args, {"data": str(data), "results": results}, "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
