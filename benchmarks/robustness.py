"""Robustness to older scanners: Dice on a labelled real case after simulated degradations, against
the clean result.

Each degradation writes degraded copies of the case's NIfTI files and runs the normal pipeline on them,
so the pipeline sees what a clinician's files would look like:

- ``3 mm slices`` / ``5 mm slices``: every sequence re-acquired with thick axial slices (boxcar slice
  profile over n 1-mm slices, every n-th slice kept, the file's spacing says n mm). The labels come out
  on the thick grid and are put back on the 1 mm reference grid (nearest neighbour) for scoring.
- ``low SNR``: Rician noise with sigma = brain median / 5 (SNR 5) in each sequence.
- ``motion``, ``ghosting``, ``bias field``: torchio's RandomMotion / RandomGhosting / RandomBiasField
  with torchio's default ranges, a fixed seed per sequence; torchio's k-space artefacts spread into the
  background, which is masked again as the skull-stripped input was. The bias field's strength is
  recorded as the 95th/5th percentile ratio of the multiplicative field inside the brain.
- ``missing T2W`` / ``missing T1CE``: the sequence is not given (the bundled model was trained with
  modality dropout).
- ``old scanner``: 5 mm slices + SNR 10 + bias field together.

    python benchmarks/robustness.py              # dev case, bundled model
    python benchmarks/robustness.py --smoke
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REGIONS = ["ET", "NETC", "SNFH", "TC", "WT"]
SEQUENCES = ("t1c", "t2w", "t2f")
DEGRADATIONS = ["clean", "3 mm slices", "5 mm slices", "low SNR", "motion", "ghosting", "bias field",
                "missing T2W", "missing T1CE", "old scanner"]


def slice_axis(affine) -> int:
    """The voxel axis closest to superior-inferior: axial slices are stacked along it."""
    import nibabel as nib

    return int(next(i for i, c in enumerate(nib.aff2axcodes(affine)) if c in "SI"))


def thick_slices(data: np.ndarray, affine: np.ndarray, mm: float):
    """Average the slices within each ``mm`` slab (boxcar slice profile) and keep one per slab."""
    axis = slice_axis(affine)
    n = max(1, int(round(mm / float(np.linalg.norm(affine[:3, axis])))))
    count = data.shape[axis] // n
    moved = np.moveaxis(data[(slice(None),) * axis + (slice(0, count * n),)], axis, -1)
    thick = moved.reshape(*moved.shape[:-1], count, n).mean(axis=-1)
    thick = np.moveaxis(thick, -1, axis).astype(np.float32)
    new_affine = affine.copy()
    new_affine[:3, axis] = affine[:3, axis] * n
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (n - 1) / 2.0  # slab centre
    return thick, new_affine


def rician(data: np.ndarray, snr: float, rng: np.random.Generator) -> np.ndarray:
    brain = data != 0
    sigma = float(np.median(data[brain])) / snr
    real = data + rng.normal(0, sigma, data.shape)
    imag = rng.normal(0, sigma, data.shape)
    return np.where(brain, np.sqrt(real ** 2 + imag ** 2), 0).astype(np.float32)


def torchio_artefact(data: np.ndarray, kind: str, seed: int) -> np.ndarray:
    import torch
    import torchio as tio

    transform = {"motion": tio.RandomMotion(), "ghosting": tio.RandomGhosting(),
                 "bias field": tio.RandomBiasField()}[kind]
    torch.manual_seed(seed)
    out = transform(tio.ScalarImage(tensor=torch.from_numpy(data.astype(np.float32))[None])).data[0].numpy()
    return np.where(data != 0, out, 0).astype(np.float32)  # skull-stripped input: background stays empty


def field_spread(before: np.ndarray, after: np.ndarray) -> float:
    """How strong a multiplicative artefact is: 95th / 5th percentile of after/before in the brain."""
    brain = (before > 0) & (after > 0)
    ratio = after[brain] / before[brain]
    lo, hi = np.percentile(ratio, (5, 95))
    return float(hi / lo)


def degrade(volumes: dict, kind: str, seed: int = 0, notes: dict | None = None) -> dict:
    """{key: (data, affine)} -> degraded {key: (data, affine)}; a missing sequence is left out.
    ``notes`` collects the measured bias-field spread per sequence."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (key, (data, affine)) in enumerate(volumes.items()):
        data = data.astype(np.float32)
        if kind.startswith("missing "):
            if {"missing T2W": "t2w", "missing T1CE": "t1c"}[kind] == key:
                continue
        elif kind in ("3 mm slices", "5 mm slices"):
            data, affine = thick_slices(data, affine, int(kind[0]))
        elif kind == "low SNR":
            data = rician(data, 5.0, rng)
        elif kind in ("motion", "ghosting", "bias field"):
            before = data
            data = torchio_artefact(data, kind, seed * 10 + i)
            if kind == "bias field" and notes is not None:
                notes[f"bias_spread_p95_p5_{key}"] = field_spread(before, data)
        elif kind == "old scanner":
            data, affine = thick_slices(data, affine, 5)
            data = rician(data, 10.0, rng)
            data = torchio_artefact(data, "bias field", seed * 10 + i)
        elif kind != "clean":
            raise ValueError(kind)
        out[key] = (data, affine)
    return out


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or weights file (default: bundled model)")
    parser.add_argument("--degradations", default=",".join(DEGRADATIONS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import nibabel as nib
    import torch

    torch.set_num_threads(args.threads)
    from brainunet import pipeline
    from brainunet_lab.evaluation import dice
    from brainunet.imageio import Volume
    from brainunet.labels import REGIONS_BY_KEY
    from brainunet.preprocessing import resample_to_grid

    case = common.resolve_case(args)
    files, reference, ref_img = common.labelled_case(case, "robustness")
    volumes = {}
    for key in SEQUENCES:
        img = nib.load(str(files[key]))
        volumes[key] = (np.asarray(img.dataobj, dtype=np.float32), img.affine)
    loaded = pipeline.load_model(args.model)
    kinds = [k.strip() for k in args.degradations.split(",") if k.strip()]
    if "clean" not in kinds:
        kinds.insert(0, "clean")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            folder = Path(tmp) / kind.replace(" ", "_")
            folder.mkdir()
            paths = {}
            notes = {}
            for key, (data, affine) in degrade(volumes, kind, args.seed, notes).items():
                paths[key] = folder / f"{key}.nii.gz"
                nib.save(nib.Nifti1Image(data, affine), str(paths[key]))
            result = pipeline.run(paths, folder / "labels.nii.gz", device="cpu", loaded_model=loaded)
            labels = result.labels
            if labels.shape != reference.shape or not np.allclose(result.reference.affine, ref_img.affine, atol=1e-3):
                labels = resample_to_grid(Volume(labels.astype(np.float32), result.reference.affine), reference.shape,
                                          ref_img.affine, order=0).astype(np.uint8)
            results[kind] = {k: dice(REGIONS_BY_KEY[k].mask(labels), REGIONS_BY_KEY[k].mask(reference)) for k in REGIONS}
            results[kind]["seconds"] = result.timings["total_s"]
            results[kind].update(notes)
            print(f"{kind}: WT {results[kind]['WT']:.3f} TC {results[kind]['TC']:.3f} ET {results[kind]['ET']:.3f}")
    clean = results["clean"]
    rows = [[k] + [results[k][r] for r in REGIONS] + [f"{results[k]['WT'] - clean['WT']:+.3f}"] for k in kinds]
    table = common.md_table(["degradation"] + [f"Dice {r}" for r in REGIONS] + ["Δ WT vs clean"], rows)
    out = common.save("robustness", args, {"case": str(case), "model": loaded.entry_name, "seed": args.seed,
                                           "results": results}, table)
    plot(results, kinds, out / "robustness.png", loaded.entry_name, case.name)
    return 0


def plot(results, kinds, path, model, case):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["WT", "TC", "ET"]
    x = np.arange(len(kinds))
    fig, ax = plt.subplots(figsize=(11, 4))
    for i, region in enumerate(shown):
        ax.bar(x + (i - 1) * 0.27, [results[k][region] for k in kinds], 0.27, label=region)
        ax.axhline(results["clean"][region], color=f"C{i}", ls="--", lw=0.8)
    ax.set_xticks(x, kinds, rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(f"{model} on {case}: Dice after simulated degradations (dashed: clean)")
    ax.legend(ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
