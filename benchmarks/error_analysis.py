"""Where the model's whole-tumour errors are on a labelled case, and how the engine's oedema border
compares with real ones: to choose what to build next, not to tune anything on the case.

1. Resolution ceiling: the reference labels taken down to the model's working spacing (area
   average) and back up (trilinear, argmax), scored like a prediction. What a perfect 2 mm model
   could reach.
2. False-positive whole tumour by distance outside the reference border, false negatives by depth
   inside it (mL, on the case's native grid).
3. False positives by healthy tissue (GM / WM / CSF: ``brainunet montage``'s atlas-prior mixture, on
   the working grid) and their median FLAIR z-score next to normal tissue and the reference oedema.
4. FLAIR across the whole-tumour border, as a fraction of the oedema's contrast (0 = median healthy
   WM, 1 = median SNFH; medians of non-CSF voxels per 2 mm band of signed distance; negative =
   inside) on the case, on a pseudo-labelled case and on engine cases.

    python benchmarks/error_analysis.py                  # dev case, bundled model
    python benchmarks/error_analysis.py --model runs/x/model.pt
    python benchmarks/error_analysis.py --smoke
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REGIONS = ["ET", "NETC", "SNFH", "TC", "WT"]
OUTSIDE_BANDS_MM = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 10), (10, 20), (20, 1000)]
INSIDE_BANDS_MM = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 1000)]
PROFILE_BANDS_MM = [(-6, -4), (-4, -2), (-2, 0), (0, 2), (2, 4), (4, 6), (6, 8), (8, 12), (12, 20)]
PSEUDO_CASE = common.REAL_DATA / "unlabelled_demo_case"
PSEUDO_LABELS = "algo_segmentation*.nii.gz"


def resolution_ceiling(reference: np.ndarray, spacing_native, spacing_mm: float) -> dict:
    import torch
    import torch.nn.functional as F

    from brainunet_lab.evaluation import dice
    from brainunet.labels import REGIONS_BY_KEY

    onehot = torch.from_numpy(np.stack([reference == k for k in (0, 1, 2, 3)]).astype(np.float32))[None]
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(reference.shape, spacing_native)]
    low = F.interpolate(onehot, size=size, mode="area")
    up = F.interpolate(low, size=reference.shape, mode="trilinear", align_corners=False)[0]
    labels = np.array([0, 1, 2, 3], np.uint8)[up.argmax(0).numpy()]
    return {k: dice(REGIONS_BY_KEY[k].mask(labels), REGIONS_BY_KEY[k].mask(reference)) for k in REGIONS}


def error_bands(pred: np.ndarray, reference: np.ndarray, spacing) -> dict:
    from scipy import ndimage

    wt, pwt = reference > 0, pred > 0
    ml = float(np.prod(spacing)) / 1000.0
    outside = ndimage.distance_transform_edt(~wt, sampling=spacing)
    inside = ndimage.distance_transform_edt(wt, sampling=spacing)
    fp, fn = pwt & ~wt, wt & ~pwt
    return {"reference_wt_ml": float(wt.sum()) * ml, "predicted_wt_ml": float(pwt.sum()) * ml,
            "fp_ml": float(fp.sum()) * ml, "fn_ml": float(fn.sum()) * ml,
            "fp_by_distance_mm": {f"{a}-{b}": float((fp & (outside > a) & (outside <= b)).sum()) * ml
                                  for a, b in OUTSIDE_BANDS_MM},
            "fn_by_depth_mm": {f"{a}-{b}": float((fn & (inside > a) & (inside <= b)).sum()) * ml
                               for a, b in INSIDE_BANDS_MM}}


def border_profile(sample) -> list[float | None]:
    """Median FLAIR per band of signed distance to the whole-tumour border, as a fraction of the
    oedema's contrast over healthy white matter."""
    from scipy import ndimage

    from brainunet_lab.montage import HEALTHY_CODES

    wt = sample.labels > 0
    snfh = sample.labels == 2
    healthy_wm = sample.mask & ~wt & (sample.tissue == HEALTHY_CODES["WM"])
    if snfh.sum() < 20 or healthy_wm.sum() < 20:
        return [None] * len(PROFILE_BANDS_MM)
    step = sample.spacing[0]
    signed = np.where(wt, -ndimage.distance_transform_edt(wt, sampling=sample.spacing) + step / 2,
                      ndimage.distance_transform_edt(~wt, sampling=sample.spacing) - step / 2)
    flair = sample.image[2]
    low, high = np.median(flair[healthy_wm]), np.median(flair[snfh])
    fraction = (flair - low) / (high - low)
    # oedema and healthy non-CSF tissue: the core and the ventricles have their own intensities
    eligible = sample.mask & (sample.tissue != HEALTHY_CODES["CSF"]) & (snfh | ~wt)
    out = []
    for a, b in PROFILE_BANDS_MM:
        band = eligible & (signed > a) & (signed <= b)
        out.append(float(np.median(fraction[band])) if band.sum() > 20 else None)
    return out


def fp_tissue(case: Path, pred_path: Path, anatomy) -> dict:
    """False-positive voxels on the working grid by healthy tissue, and FLAIR z-scores."""
    from brainunet_lab import montage

    truth = montage.load_real(case, anatomy)
    predicted = montage.load_real(case, anatomy, pred_path)
    wt = truth.labels > 0
    fp = (predicted.labels > 0) & ~wt
    flair = truth.image[2]
    by_tissue = {name: int((fp & (truth.tissue == code)).sum()) for name, code in montage.HEALTHY_CODES.items()}
    by_tissue["unclassified"] = int(fp.sum()) - sum(by_tissue.values())
    normal = truth.mask & ~wt
    return {"fp_voxels": int(fp.sum()), "fp_by_tissue": by_tissue, "tissue_note": truth.tissue_note,
            "flair_z_median": {"false positive": float(np.median(flair[fp])) if fp.any() else None,
                               "normal tissue": float(np.median(flair[normal])),
                               "reference SNFH": float(np.median(flair[truth.labels == 2]))}}


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or weights file (default: bundled model)")
    parser.add_argument("--engine-cases", type=int, default=8, help="engine cases in the border profile")
    parser.add_argument("--engine-seed", type=int, default=500)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from brainunet import pipeline
    from brainunet_lab import montage
    from brainunet_lab.engine import load_anatomy, phantom_anatomy

    case = common.resolve_case(args)
    files, reference, ref_img = common.labelled_case(case, "error analysis")
    spacing = tuple(float(s) for s in ref_img.header.get_zooms()[:3])
    loaded = pipeline.load_model(args.model)
    spacing_mm = loaded.preprocessing.spacing_mm[0]
    try:
        anatomy = load_anatomy(spacing_mm)
    except Exception:  # templates not fetched (CI, --smoke): the phantom; real cases get no tissue classes
        anatomy = phantom_anatomy(4.0 if args.smoke else spacing_mm)
    engine_cases = 1 if args.smoke else args.engine_cases

    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(tmp) / "labels.nii.gz"
        result = pipeline.run({k: files.get(k) for k in loaded.modalities}, pred_path, device="cpu",
                              loaded_model=loaded)
        if result.labels.shape != reference.shape:
            raise SystemExit(f"The prediction ({result.labels.shape}) is not on the reference grid ({reference.shape}).")
        payload = {"case": str(case), "model": loaded.entry_name, "working_spacing_mm": spacing_mm,
                   "resolution_ceiling": resolution_ceiling(reference, spacing, spacing_mm),
                   "errors": error_bands(result.labels, reference, spacing),
                   "false_positives": fp_tissue(case, pred_path, anatomy)}

    profiles = {case.name: border_profile(montage.load_real(case, anatomy))}
    if PSEUDO_CASE.is_dir() and not args.smoke:
        labels = sorted(PSEUDO_CASE.glob(PSEUDO_LABELS))
        if labels:
            profiles[f"{PSEUDO_CASE.name} (algorithm labels)"] = border_profile(
                montage.load_real(PSEUDO_CASE, anatomy, labels[0]))
    for sample in montage.synthetic_samples(engine_cases, args.engine_seed, anatomy):
        profiles[sample.name] = border_profile(sample)
    payload["border_profile"] = {"bands_mm": [list(b) for b in PROFILE_BANDS_MM], "cases": profiles}

    errors, fps = payload["errors"], payload["false_positives"]
    tables = [
        "Resolution ceiling (reference -> working grid -> back), Dice:\n",
        common.md_table(["spacing"] + REGIONS, [[f"{spacing_mm:g} mm"] + [payload["resolution_ceiling"][r] for r in REGIONS]]),
        f"\nWhole-tumour errors of {loaded.entry_name} (mL): reference {errors['reference_wt_ml']:.1f}, predicted "
        f"{errors['predicted_wt_ml']:.1f}, false positive {errors['fp_ml']:.1f}, false negative {errors['fn_ml']:.1f}.\n",
        common.md_table(["false positives, mm outside the border"] + list(errors["fp_by_distance_mm"]),
                        [["mL"] + list(errors["fp_by_distance_mm"].values())]),
        "\n" + common.md_table(["false negatives, mm inside the border"] + list(errors["fn_by_depth_mm"]),
                               [["mL"] + list(errors["fn_by_depth_mm"].values())]),
        f"\nFalse positives on the working grid by tissue ({fps['tissue_note']}):\n",
        common.md_table(["voxels"] + list(fps["fp_by_tissue"]), [[fps["fp_voxels"]] + list(fps["fp_by_tissue"].values())]),
        "\n" + common.md_table(["FLAIR z, median"] + list(fps["flair_z_median"]), [[""] + list(fps["flair_z_median"].values())]),
        "\nFLAIR across the whole-tumour border, fraction of the oedema contrast (negative mm = inside):\n",
        common.md_table(["case"] + [f"{a} to {b} mm" for a, b in PROFILE_BANDS_MM],
                        [[name] + ["-" if v is None else v for v in values] for name, values in profiles.items()]),
    ]
    common.save("error_analysis", args, payload, "\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
