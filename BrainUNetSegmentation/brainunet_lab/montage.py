"""``brainunet montage``: look at how realistic the synthetic-glioma data engine is.

Writes, for real case folder(s) next to N engine cases:

- ``montage.png``: one row per case (real first), columns T1CE, T2W, FLAIR through the tumour
  centre, the tumour labels and the tissue classes used for the histograms; every column shares
  one intensity window so brightness differences are real differences.
- ``histograms.png``: per tissue and modality, the density of the z-scored intensities the network
  sees, real against synthetic.
- ``tissue_intensities.csv``: median, quartiles, voxel and case counts per (tissue, modality,
  source), so contrast orderings (FLAIR: SNFH > WM, CSF dark, ...) can be checked by number.

Every case weighs the same in the densities and quantiles (one large tumour must not stand for
the engine); a case counts for a tissue when it has at least MIN_VOXELS voxels of it.

Real cases go through the inference preprocessing (align to T1CE, RAS, crop, z-score, resample
to the engine's spacing). Their healthy tissues are an approximation: BraTS cases are in SRI24
space, the grid of the engine's tissue maps, so the atlas GM/WM/CSF probabilities are read
voxel-for-voxel (no registration) and a voxel outside the tumour labels counts as a tissue where
its probability exceeds 0.6: the atlas probability itself (``atlas``), or, by default, the
posterior of a Gaussian mixture on the case's own intensities with the atlas as prior
(``posterior``), because the affine-registered atlas misses individual sulci and ventricles.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from brainunet.errors import InputError
from brainunet.labels import ET, NETC, SNFH, to_brats2023

MODALITIES = ("t1c", "t2w", "t2f")  # the engine's channel order
MODALITY_LABELS = {"t1c": "T1CE", "t2w": "T2W", "t2f": "FLAIR"}
TISSUES = ("WM", "GM", "CSF", "SNFH", "NETC", "ET")
HEALTHY_CODES = {"GM": 1, "WM": 2, "CSF": 3}  # the engine's ``case.tissue`` coding
TUMOUR_LABELS = {"SNFH": SNFH.label, "NETC": NETC.label, "ET": ET.label}
TISSUE_COLORS = {"GM": (0.55, 0.55, 0.55), "WM": (0.93, 0.93, 0.93), "CSF": (0.30, 0.85, 0.85),
                 "SNFH": SNFH.color, "NETC": NETC.color, "ET": ET.color}
ATLAS_THRESHOLD = 0.6
MIN_VOXELS = 20  # of a tissue, for a case to count in that tissue's statistics
#: How the real cases' GM/WM/CSF masks are made, per ``--real-tissue`` method (shown in the PNGs and CSV).
REAL_TISSUE_NOTES = {
    "atlas": f"real GM/WM/CSF: SRI24 atlas probability > {ATLAS_THRESHOLD} - unregistered (approximate)",
    "posterior": f"real GM/WM/CSF: SRI24 atlas prior x Gaussian mixture of the case - posterior > "
                 f"{ATLAS_THRESHOLD} (approximate)",
}


@dataclass
class Sample:
    """One case on its working grid, RAS voxel order."""

    name: str
    source: str  # "real" or "synthetic"
    image: np.ndarray  # (3, X, Y, Z) float32 z-scores in MODALITIES order
    labels: np.ndarray  # (X, Y, Z) uint8, BraTS 2023 values; zeros when the case has none
    tissue: np.ndarray  # (X, Y, Z) uint8: 0 none, 1 GM, 2 WM, 3 CSF
    mask: np.ndarray  # (X, Y, Z) bool brain
    spacing: tuple[float, float, float]
    tissue_note: str = "engine tissue map"  # how ``tissue`` was made

    @cached_property
    def tissue_masks(self) -> dict[str, np.ndarray]:
        """Tissue name -> bool mask, in TISSUES order; healthy classes exclude the tumour."""
        healthy = self.mask & (self.labels == 0)
        masks = {k: healthy & (self.tissue == code) for k, code in HEALTHY_CODES.items()}
        masks.update({k: self.mask & (self.labels == v) for k, v in TUMOUR_LABELS.items()})
        return {k: masks[k] for k in TISSUES}


# ---------------------------------------------------------------- real cases

def load_real(case_dir, anatomy, labels_path=None, tissue_method: str = "posterior") -> Sample:
    """A BraTS-layout folder, preprocessed as inference does, at ``anatomy``'s spacing."""
    from .evaluation import find_reference
    from brainunet.imageio import find_case_files, load_volume
    from brainunet.preprocessing import align_to_reference, prepare

    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(f"--real {case_dir} is not a folder; give a case folder with BraTS file names.")
    files = find_case_files(case_dir)
    missing = [MODALITY_LABELS[m] for m in MODALITIES if m not in files]
    if missing:
        raise InputError(f"No case in {case_dir}: {', '.join(missing)} not found (expected BraTS names such as "
                         "*-t1c.nii.gz, *-t2w.nii.gz, *-t2f.nii.gz or *_t1ce/_t2/_flair.nii.gz).")
    volumes = {m: load_volume(files[m], MODALITY_LABELS[m]) for m in MODALITIES}
    reference = volumes["t1c"]
    prepared = prepare(align_to_reference(volumes, "t1c"), reference, MODALITIES, anatomy.spacing)

    labels_path = labels_path or find_reference(case_dir)
    labels = np.zeros(prepared.mask.shape, np.uint8)
    if labels_path is not None:
        labels = _to_working_grid(_read_labels(labels_path, reference), prepared).astype(np.uint8)
        labels[~prepared.mask] = 0
    tissue = real_tissue(prepared.image, prepared.mask, labels, _atlas_probabilities(anatomy, prepared), tissue_method)
    return Sample(case_dir.name, "real", prepared.image, labels, tissue, prepared.mask,
                  tuple(prepared.working_spacing), REAL_TISSUE_NOTES[tissue_method])


def _read_labels(path, reference) -> np.ndarray:
    """Labels resampled (nearest neighbour) onto the reference (T1CE) grid, BraTS 2023 values."""
    import nibabel as nib

    from brainunet.imageio import Volume
    from brainunet.preprocessing import resample_to_grid

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Label file not found: {path}.")
    try:
        img = nib.load(str(path))
        values = to_brats2023(np.squeeze(np.asanyarray(img.dataobj)))
    except ValueError as exc:
        raise InputError(f"{path.name}: not a BraTS label map ({exc}).") from exc
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path.name} cannot be read as an image ({type(exc).__name__}).") from exc
    moving = Volume(values.astype(np.float32), np.asarray(img.affine, float), path.name)
    return resample_to_grid(moving, reference.data.shape, reference.affine, order=0)


def _to_working_grid(volume: np.ndarray, prepared) -> np.ndarray:
    """A reference-grid volume through the same reorient / crop / resample as the image (nearest)."""
    import torch
    import torch.nn.functional as F
    from nibabel import orientations as ornt_mod

    cropped = ornt_mod.apply_orientation(volume, prepared.to_ras)[prepared.crop]
    target = tuple(prepared.mask.shape)
    if cropped.shape == target:
        return cropped
    t = torch.from_numpy(np.ascontiguousarray(cropped, dtype=np.float32))[None, None]
    return F.interpolate(t, size=target, mode="nearest")[0, 0].numpy()


def _atlas_probabilities(anatomy, prepared) -> np.ndarray | None:
    """GM/WM/CSF atlas probabilities on the working grid, read voxel-for-voxel: the real case is
    assumed to lie in the atlas space (BraTS = SRI24), so both grids span the same field of view.
    None (with a warning) when the fields of view differ."""
    from scipy import ndimage

    native_shape = [prepared.reference_shape[a] for a in prepared.ras_axes]
    native_mm = np.multiply(native_shape, prepared.native_spacing)
    atlas_mm = np.multiply(anatomy.shape, anatomy.spacing)
    if np.any(np.abs(native_mm - atlas_mm) > np.maximum(anatomy.spacing, 0.02 * atlas_mm)):
        print(f"warning: the real image spans {np.round(native_mm)} mm, the {anatomy.source} tissue maps "
              f"{np.round(atlas_mm)} mm: not in atlas space, so no GM/WM/CSF for it.", file=sys.stderr)
        return None
    # working index -> crop index (align_corners=False, as prepare resamples) -> native -> atlas index
    axes = []
    for a, (t, c, sl) in enumerate(zip(prepared.mask.shape, prepared.crop_shape, prepared.crop)):
        crop_idx = (np.arange(t) + 0.5) * c / t - 0.5
        axes.append((sl.start + crop_idx + 0.5) * anatomy.shape[a] / native_shape[a] - 0.5)
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return np.stack([ndimage.map_coordinates(p, coords, order=1, mode="nearest")
                     for p in anatomy.tissues.cpu().numpy()])


def real_tissue(image, mask, labels, atlas, method: str = "posterior") -> np.ndarray:
    """GM/WM/CSF codes for a real case: where the class probability exceeds ATLAS_THRESHOLD, outside
    the tumour. ``atlas``: the atlas probabilities alone. ``posterior``: the atlas as the prior of a
    three-class Gaussian mixture fitted to this case's (T1CE, T2W, FLAIR) values, as atlas-based
    tissue segmentation does; affine-registered atlases miss individual sulci and ventricles, so
    atlas-only "CSF" in a BraTS case is mostly GM-like partial volume."""
    tissue = np.zeros(mask.shape, np.uint8)
    if atlas is None:
        return tissue
    healthy = mask & (labels == 0)
    prob = atlas[:, healthy]
    if method == "posterior":
        prob = _mixture_posterior(image[:, healthy].T.astype(np.float64), prob)
    codes = np.array([HEALTHY_CODES[k] for k in ("GM", "WM", "CSF")], np.uint8)  # the anatomy's channel order
    tissue[healthy] = np.where(prob.max(0) > ATLAS_THRESHOLD, codes[prob.argmax(0)], 0)
    return tissue


def _mixture_posterior(x: np.ndarray, prior: np.ndarray, iterations: int = 15) -> np.ndarray:
    """EM for a Gaussian mixture (full covariance) whose mixing weights are per-voxel priors.
    x: (N, C) intensities; prior: (K, N). Returns the (K, N) posterior."""
    prior = (prior + 1e-3) / (prior + 1e-3).sum(0)
    post = prior
    for _ in range(iterations):
        log_like = []
        for r in post:
            mean = r @ x / r.sum()
            d = x - mean
            cov = (r[:, None] * d).T @ d / r.sum() + 1e-3 * np.eye(x.shape[1])
            log_like.append(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) - 0.5 * np.linalg.slogdet(cov)[1])
        log_post = np.stack(log_like) + np.log(prior)
        post = np.exp(log_post - log_post.max(0))
        post /= post.sum(0)
    return post


# ---------------------------------------------------------------- synthetic cases

def synthetic_samples(n: int, seed: int, anatomy, device: str = "cpu") -> list[Sample]:
    from .engine import generate_case

    out = []
    for i in range(n):
        case = generate_case(seed + i, anatomy, device=device)
        out.append(Sample(f"synthetic seed {seed + i}", "synthetic", case.image.cpu().numpy().astype(np.float32),
                          case.labels.cpu().numpy().astype(np.uint8), case.tissue.cpu().numpy().astype(np.uint8),
                          case.mask.cpu().numpy().astype(bool), tuple(float(s) for s in case.spacing)))
    return out


# ---------------------------------------------------------------- statistics

def tissue_statistics(samples: list[Sample]) -> list[dict]:
    """Per tissue, modality and source: case-weighted median and quartiles, voxel and case counts."""
    rows = []
    for tissue in TISSUES:
        for ch, modality in enumerate(MODALITIES):
            for source in ("real", "synthetic"):
                values, weights, cases = _pooled(samples, source, tissue, ch)
                q = _weighted_percentiles(values, weights, (50, 25, 75)) if cases else (np.nan,) * 3
                how = "labels" if tissue in TUMOUR_LABELS else _tissue_note(samples, source)
                rows.append({"tissue": tissue, "modality": MODALITY_LABELS[modality], "source": source,
                             "median": q[0], "p25": q[1], "p75": q[2], "n": int(values.size), "cases": cases,
                             "mask": how})
    return rows


def _pooled(samples, source, tissue, channel) -> tuple[np.ndarray, np.ndarray, int]:
    """Values of one tissue over a source's cases, weights giving each case the same total, case count."""
    parts = [s.image[channel][s.tissue_masks[tissue]] for s in samples if s.source == source]
    parts = [p for p in parts if p.size >= MIN_VOXELS]
    if not parts:
        return np.zeros(0, np.float32), np.zeros(0), 0
    return np.concatenate(parts), np.concatenate([np.full(p.size, 1.0 / p.size) for p in parts]), len(parts)


def _weighted_percentiles(values, weights, percentiles) -> np.ndarray:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    position = (np.cumsum(w) - w / 2) / w.sum()  # each value at the middle of its weight
    return np.interp(np.asarray(percentiles) / 100.0, position, v)


def _tissue_note(samples, source) -> str:
    return "; ".join(sorted({s.tissue_note for s in samples if s.source == source}))


def write_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and np.isnan(v) else
                                 f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})


def median_gaps(rows: list[dict]) -> list[tuple[str, str, float]]:
    """(tissue, modality, synthetic median - real median), largest gap first."""
    med = {(r["tissue"], r["modality"], r["source"]): r["median"] for r in rows}
    gaps = [(t, m, med[t, m, "synthetic"] - med[t, m, "real"])
            for (t, m, s) in med if s == "real" and np.isfinite(med[t, m, "synthetic"] - med[t, m, "real"])]
    return sorted(gaps, key=lambda g: -abs(g[2]))


# ---------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _centre(sample: Sample) -> tuple[int, int, int]:
    """Tumour centre of mass (the brain's when there are no labels)."""
    where = np.argwhere(sample.labels > 0) if sample.labels.any() else np.argwhere(sample.mask)
    return tuple(int(round(c)) for c in where.mean(0))


def _view(volume: np.ndarray, centre, plane: str) -> np.ndarray:
    """A 2D slice for imshow(origin='lower'), radiological: patient right on the left."""
    sl = volume[:, :, centre[2]] if plane == "axial" else volume[:, centre[1], :]
    return sl.T[:, ::-1]


def _rgba(codes: np.ndarray, colours: dict[int, tuple], alpha: float) -> np.ndarray:
    out = np.zeros((*codes.shape, 4), np.float32)
    for value, colour in colours.items():
        out[codes == value] = (*colour, alpha)
    return out


def plot_montage(samples: list[Sample], path, coronal: bool = False) -> None:
    plt = _pyplot()
    planes = ("axial", "coronal") if coronal else ("axial",)
    # One window per modality for every row, so real and synthetic brightness compare directly.
    windows = [np.percentile(np.concatenate([s.image[c][s.mask] for s in samples]), (0.5, 99.5))
               for c in range(len(MODALITIES))]
    label_colours = {v: TISSUE_COLORS[k] for k, v in TUMOUR_LABELS.items()}
    titles = [*(MODALITY_LABELS[m] for m in MODALITIES), "labels on FLAIR", "tissue classes"]
    grey = plt.get_cmap("gray").with_extremes(bad="black")  # outside the brain: NaN -> black
    rows = [(s, p) for s in samples for p in planes]
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.3 * len(titles), 2.5 * len(rows)), squeeze=False)
    for r, (s, plane) in enumerate(rows):
        centre = _centre(s)
        aspect = (s.spacing[2] if plane == "coronal" else s.spacing[1]) / s.spacing[0]
        brain = np.where(s.mask, s.image, np.nan)
        for c in range(len(MODALITIES)):
            axes[r, c].imshow(_view(brain[c], centre, plane), cmap=grey, origin="lower", aspect=aspect,
                              vmin=windows[c][0], vmax=windows[c][1], interpolation="nearest")
        axes[r, 3].imshow(_view(brain[2], centre, plane), cmap=grey, origin="lower", aspect=aspect,
                          vmin=windows[2][0], vmax=windows[2][1], interpolation="nearest")
        axes[r, 3].imshow(_rgba(_view(s.labels, centre, plane), label_colours, 0.55), origin="lower", aspect=aspect,
                          interpolation="nearest")
        classes = np.zeros(s.labels.shape, np.uint8)
        for k, m in enumerate(s.tissue_masks.values(), start=1):
            classes[m] = k
        axes[r, 4].imshow(_rgba(_view(classes, centre, plane), {k: TISSUE_COLORS[t] for k, t in
                                                               enumerate(TISSUES, start=1)}, 1.0),
                          origin="lower", aspect=aspect, interpolation="nearest")
        axes[r, 4].set_facecolor("black")
        axes[r, 0].set_ylabel(f"{s.name}\n{s.source}, {plane}", fontsize=8)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=TISSUE_COLORS[t]) for t in TISSUES]
    fig.legend(handles, TISSUES, loc="lower center", ncol=len(TISSUES), fontsize=8, frameon=False)
    fig.suptitle("Real (top) vs synthetic: same z-score window per column; radiological view (patient right on "
                 f"the left)\n{_tissue_note(samples, 'real')}", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    fig.savefig(path, dpi=80, facecolor="white")
    plt.close(fig)


def plot_histograms(samples: list[Sample], rows: list[dict], path) -> None:
    plt = _pyplot()
    med = {(r["tissue"], r["modality"], r["source"]): r["median"] for r in rows}
    fig, axes = plt.subplots(len(TISSUES), len(MODALITIES), figsize=(11, 2.0 * len(TISSUES)), squeeze=False)
    styles = {"real": dict(color="black", lw=1.6), "synthetic": dict(color="tab:orange", lw=1.6, ls="--")}
    for c, modality in enumerate(MODALITIES):
        everything = np.concatenate([s.image[c][s.mask] for s in samples])
        bins = np.linspace(everything.min(), everything.max(), 61)  # bounded: normalise clips at percentiles
        for r, tissue in enumerate(TISSUES):
            ax = axes[r, c]
            for source, style in styles.items():
                values, weights, cases = _pooled(samples, source, tissue, c)
                if cases:
                    density, edges = np.histogram(values, bins=bins, weights=weights, density=True)
                    ax.plot((edges[:-1] + edges[1:]) / 2, density, label=source, **style)
                    ax.axvline(med[tissue, MODALITY_LABELS[modality], source], **{**style, "lw": 0.8})
            gap = med[tissue, MODALITY_LABELS[modality], "synthetic"] - med[tissue, MODALITY_LABELS[modality], "real"]
            gap_text = f"  Δmedian {gap:+.2f}" if np.isfinite(gap) else "  (no real voxels)"
            ax.set_title(f"{MODALITY_LABELS[modality]} · {tissue}{gap_text}", fontsize=9,
                         color=TISSUE_COLORS[tissue] if tissue in TUMOUR_LABELS else "black")
            ax.set_yticks([])
            ax.tick_params(labelsize=7)
        axes[-1, c].set_xlabel("z-score (as the network sees it)", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    n_real = sum(s.source == "real" for s in samples)
    fig.suptitle(f"Intensity densities per tissue: {n_real} real (solid) vs {len(samples) - n_real} synthetic "
                 f"(dashed), each case weighted equally; vertical lines = medians\n{_tissue_note(samples, 'real')}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=80, facecolor="white")
    plt.close(fig)


# ---------------------------------------------------------------- command line

def make_montage(real_dirs, synthetic: int, seed: int, output_dir, spacing: float = 2.0, anatomy: str = "sri24",
                 real_labels=(), coronal: bool = False, device: str = "cpu",
                 real_tissue_method: str = "posterior") -> tuple[dict[str, Path], list[dict]]:
    """Everything ``brainunet montage`` does; returns the written files by kind and the CSV rows."""
    from .engine import load_anatomy, phantom_anatomy

    real_dirs, real_labels = list(real_dirs or []), list(real_labels or [])
    if synthetic < 0:
        raise InputError(f"--synthetic must be 0 or more, not {synthetic}.")
    if not real_dirs and synthetic == 0:
        raise InputError("Nothing to show: give at least one --real case folder or --synthetic N above 0.")
    if len(real_labels) > len(real_dirs):
        raise InputError(f"{len(real_labels)} --real-labels files for {len(real_dirs)} --real folders; "
                         "give one label file per --real, in the same order.")
    if spacing <= 0:
        raise InputError(f"--spacing must be positive, not {spacing}.")
    atlas = phantom_anatomy(spacing) if anatomy == "phantom" else load_anatomy(spacing, source=anatomy)
    real_labels += [None] * (len(real_dirs) - len(real_labels))
    samples = [load_real(d, atlas, lab, real_tissue_method) for d, lab in zip(real_dirs, real_labels)]
    samples += synthetic_samples(synthetic, seed, atlas, device)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"montage": out / "montage.png", "histograms": out / "histograms.png",
             "csv": out / "tissue_intensities.csv"}
    rows = tissue_statistics(samples)
    write_csv(rows, files["csv"])
    plot_montage(samples, files["montage"], coronal)
    plot_histograms(samples, rows, files["histograms"])
    return files, rows


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("montage", help="real vs synthetic cases side by side: montage, tissue histograms, CSV")
    p.add_argument("--real", action="append", default=[], metavar="DIR", help="a BraTS-layout case folder (repeatable)")
    p.add_argument("--real-labels", action="append", default=[], metavar="FILE",
                   help="label file for the matching --real (default: its *_seg / *-seg file, if any)")
    p.add_argument("--synthetic", type=int, default=4, metavar="N", help="number of engine cases (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first engine case")
    p.add_argument("--output-dir", default="montage", help="where to write montage.png, histograms.png, CSV")
    p.add_argument("--spacing", type=float, default=2.0, help="working spacing in mm (the engine's)")
    p.add_argument("--anatomy", default="sri24", choices=["sri24", "phantom"], help="engine anatomy")
    p.add_argument("--coronal", action="store_true", help="add a coronal row per case")
    p.add_argument("--real-tissue", default="posterior", choices=sorted(REAL_TISSUE_NOTES),
                   help="real GM/WM/CSF masks: atlas probability alone, or atlas-prior Gaussian mixture (default)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where the engine runs")
    p.set_defaults(func=run)


def run(args) -> int:
    from brainunet.inference import resolve_device

    files, rows = make_montage(args.real, args.synthetic, args.seed, args.output_dir, args.spacing, args.anatomy,
                               args.real_labels, args.coronal, resolve_device(args.device), args.real_tissue)
    gaps = median_gaps(rows)[:5]
    if gaps:
        print("largest median gaps (synthetic - real, z-units): "
              + ", ".join(f"{m} {t} {g:+.2f}" for t, m, g in gaps))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0
