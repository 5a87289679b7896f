"""Procedural gliomas in deformed healthy anatomy, rendered as T1CE, T2W and FLAIR.

One case is a pure function of (seed, anatomy, config): every random number comes from a numpy
Generator or a CPU torch Generator seeded with ``seed``, so a case is the same on any machine and
device. The work is torch tensor operations, so on a GPU machine cases are generated on the fly
next to the training step.

The order of operations:
1. mass effect: the anatomy is pushed radially away from the tumour centre;
2. tumour in that space: a lobulated core (NETC inside an ET rim of varying thickness and
   completeness, or solid ET, or no enhancement), SNFH grown from the core through white matter
   (geodesic dilation; cortex, CSF and the midline stop it, the corpus callosum lets it cross),
   sometimes several foci; enhancing distractors (choroid plexus, vessels, dura) labelled background;
   since engine 1.4, labelled oedema that fades towards its border and faint FLAIR hyperintensity
   left unlabelled (a tail past the border, cortex and sulci near the tumour, periventricular caps);
   since engine 1.5, white-matter hyperintensities away from the tumour, left unlabelled too;
3. one random affine + elastic warp of anatomy and tumour together (no two brains alike);
4. rendering with random per-tissue intensities that keep the real contrast orderings, texture;
5. scanner degradations: partial-volume blur, thick slices, bias field, Rician noise, gamma,
   and torchio's motion and ghosting artefacts;
6. skull-stripped background, crop to the brain and the same normalisation as inference.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from brainunet.labels import ET, NETC, SNFH
from .templates import Anatomy

ENGINE_VERSION = "1.5"
MODALITIES = ("t1c", "t2w", "t2f")


@dataclass
class EngineConfig:
    # healthy-anatomy variation
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.88, 1.12)
    translation_mm: float = 8.0
    elastic_mm: float = 5.0
    # tumour morphology
    tumour_radius_mm: tuple[float, float] = (10.0, 55.0)  # whole tumour, log-uniform
    core_fraction: tuple[float, float] = (0.4, 0.95)  # core radius / whole-tumour radius
    p_in_white_matter: float = 0.85
    p_no_core: float = 0.05  # oedema-like lesion only
    p_solid: float = 0.15  # enhancing core without necrosis
    p_no_enhancement: float = 0.12  # core without ET
    p_incomplete_rim: float = 0.35
    rim_mm: tuple[float, float] = (1.5, 7.0)
    p_multifocal: float = 0.12
    p_mass_effect: float = 0.7
    mass_effect: tuple[float, float] = (0.1, 0.5)
    oedema_reach: tuple[float, float] = (0.1, 1.3)  # beyond the core, in whole-tumour radii
    # contrast
    p_fluid_bright_netc: float = 0.65  # necrosis / cyst bright on T2W (and FLAIR unless suppressed)
    # cyst-like NETC dark on FLAIR: rare, and at 8 % (engine 1.2) the network took FLAIR-dark
    # ventricles for necrosis on the unlabelled real case
    p_flair_suppressed_netc: float = 0.02
    p_distractors: float = 0.85
    # faint oedema (engine 1.4). Real oedema fades inside its labelled border (0.70 of its FLAIR contrast
    # in the last 2 mm) and real brains hold faint FLAIR hyperintensity that nobody labels: a tail past the
    # border, cortex and sulci next to the tumour, periventricular caps. Engine 1.3 oedema was uniform to
    # its border with nothing faint around it, and the network labelled any faint brightness near a tumour
    # (benchmarks/error_analysis.py: 21.9 mL false SNFH on the dev case, FLAIR z 0.6). False: engine 1.3
    # cases, bit for bit (these draws come from their own random stream).
    faint_oedema: bool = True
    oedema_edge_mm: tuple[float, float] = (2.0, 4.0)  # labelled oedema fades over this depth ...
    oedema_edge_level: tuple[float, float] = (0.6, 0.9)  # ... from this share of its contrast at the border
    p_faint_tail: float = 0.8
    faint_tail_mm: tuple[float, float] = (2.0, 10.0)  # unlabelled tail past the border, fading to nothing
    # share of the oedema contrast just past the border. Engine 1.4 drew 0.05-0.3, brighter than the
    # pseudo-labelled real case (0.18 of the contrast 0-2 mm outside, 0.03 at 2-4 mm; error_analysis.py)
    faint_tail_level: tuple[float, float] = (0.03, 0.2)
    p_faint_patches: float = 0.5  # unlabelled patches in cortex and sulci near the tumour
    faint_patch_level: tuple[float, float] = (0.15, 0.4)
    # unlabelled periventricular caps and bands (small-vessel disease, CSF seepage). On the pseudo-labelled
    # real case they are nearly as bright as oedema, and models trained on engine 1.4 (0.1-0.4, p 0.3)
    # labelled them SNFH. Engine 1.5 draws them more often and brighter.
    p_periventricular: float = 0.5
    periventricular_level: tuple[float, float] = (0.15, 0.7)
    # unlabelled white-matter hyperintensities away from the tumour (engine 1.5): common in the older
    # patients gliomas come with; on the pseudo-labelled case, 18.6 mL of a stage-2 model's false whole
    # tumour lay more than 10 mm from the algorithm's, in such mottled brightness
    p_white_matter_lesions: float = 0.5
    white_matter_lesion_level: tuple[float, float] = (0.25, 0.7)
    white_matter_lesion_share: tuple[float, float] = (0.005, 0.04)  # of the white matter, roughly
    white_matter_lesion_clearance_mm: float = 10.0  # from the labelled tumour
    # degradations
    blur_voxels: tuple[float, float] = (0.0, 0.8)
    p_thick_slices: float = 0.3
    thick_factor: tuple[float, float] = (1.5, 3.0)
    bias_strength: tuple[float, float] = (0.0, 0.4)
    noise: tuple[float, float] = (0.01, 0.08)  # sigma / white-matter intensity
    p_gamma: float = 0.4
    gamma: tuple[float, float] = (0.7, 1.5)
    p_motion: float = 0.08
    p_ghosting: float = 0.08
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "EngineConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            from brainunet.errors import InputError

            raise InputError(f"Unknown engine setting(s): {', '.join(sorted(unknown))}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class SyntheticCase:
    image: torch.Tensor  # (3, X, Y, Z) float32, t1c/t2w/t2f, normalised like preprocessing.normalise
    labels: torch.Tensor  # (X, Y, Z) uint8, BraTS 2023 (1 NETC, 2 SNFH, 3 ET)
    mask: torch.Tensor  # (X, Y, Z) bool brain
    tissue: torch.Tensor  # (X, Y, Z) uint8 dominant healthy tissue: 0 bg, 1 GM, 2 WM, 3 CSF
    spacing: tuple[float, float, float]
    raw: torch.Tensor | None = None  # (3, X, Y, Z) before normalisation (montage, tests)
    meta: dict = field(default_factory=dict)


class _Random:
    """Scalar draws from numpy, fields from a CPU torch Generator: both seeded, device-independent."""

    def __init__(self, seed: int, device):
        self.np = np.random.default_rng(seed)
        self.torch = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        self.device = device

    def uniform(self, lo_hi) -> float:
        return float(self.np.uniform(*lo_hi))

    def chance(self, p: float) -> bool:
        return bool(self.np.random() < p)

    def field(self, shape, grid: int = 6, channels: int = 1) -> torch.Tensor:
        """Smooth noise (channels, *shape), unit-ish std, from a coarse Gaussian grid."""
        coarse = torch.randn((1, channels, grid, grid, grid), generator=self.torch).to(self.device)
        return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _mm_grid(shape, spacing, device) -> torch.Tensor:
    """(3, X, Y, Z) voxel positions in mm."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) * s for n, s in zip(shape, spacing)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _sample(volume: torch.Tensor, positions_mm: torch.Tensor, spacing, mode="bilinear") -> torch.Tensor:
    """Sample (C, X, Y, Z) at (3, X', Y', Z') mm positions (zero outside)."""
    shape = volume.shape[1:]
    norm = [positions_mm[i] / spacing[i] / max(shape[i] - 1, 1) * 2 - 1 for i in range(3)]
    # grid_sample wants (x, y, z) = (last, middle, first) axis
    grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1)[None]
    return F.grid_sample(volume[None], grid, mode=mode, padding_mode="zeros", align_corners=True)[0]


def _rotation(angles) -> torch.Tensor:
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def _blur(volume: torch.Tensor, sigma_vox) -> torch.Tensor:
    """Separable Gaussian blur of (C, X, Y, Z); sigma per axis in voxels."""
    out = volume[None]
    for axis, sigma in enumerate(sigma_vox):
        if sigma < 0.2:
            continue
        radius = max(1, int(math.ceil(2.5 * sigma)))
        x = torch.arange(-radius, radius + 1, device=volume.device, dtype=torch.float32)
        kernel = torch.exp(-x * x / (2 * sigma * sigma))
        kernel = (kernel / kernel.sum()).view(1, 1, -1, 1, 1).permute(0, 1, *[2 + ((i - axis) % 3) for i in range(3)])
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        kernel = kernel.reshape(shape).repeat(out.shape[1], 1, 1, 1, 1)
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, kernel, padding=tuple(padding), groups=out.shape[1])
    return out[0]


def _lobulated(pos, centre, radius_mm, axes_ratio, rotation, bumps, amplitude) -> torch.Tensor:
    """Level function of a rotated, stretched ellipsoid with smooth bumps: < 1 inside."""
    d = pos - centre.view(3, 1, 1, 1)
    d = torch.einsum("ij,jxyz->ixyz", rotation.to(pos.device), d) / (radius_mm * axes_ratio.view(3, 1, 1, 1))
    return d.norm(dim=0) + amplitude * bumps


def _grow(seed: torch.Tensor, passable: torch.Tensor, steps: int, ramp: bool = False) -> torch.Tensor:
    """Geodesic dilation of a 0/1 volume through 0/1 ``passable``, one voxel per step. With ``ramp``:
    instead, 1 - j / (steps + 1) for a voxel reached at step j (1 in ``seed``, 0 never reached)."""
    current = seed[None, None]
    total = torch.zeros_like(seed)
    for _ in range(steps):
        grown = F.max_pool3d(current, 3, stride=1, padding=1) * passable
        current = torch.maximum(current, grown)
        if ramp:
            total = total + current[0, 0]
    return (seed + total) / (steps + 1) if ramp else current[0, 0]


def _depth(region: torch.Tensor, steps: int) -> torch.Tensor:
    """0 on the border voxels of a 0/1 region rising to 1 at ``steps`` voxels inside (0 outside)."""
    current, total = region[None, None], torch.zeros_like(region)
    for _ in range(steps):
        current = -F.max_pool3d(-current, 3, stride=1, padding=1)  # erosion
        total = total + current[0, 0]
    return total / max(steps, 1)


def _faint_oedema(rnd: "_Random", config: EngineConfig, oedema, core, brain, gm, wm, csf, ventricles, crossing,
                  pos, centre, radius_wt, spacing, meta) -> tuple[torch.Tensor, torch.Tensor]:
    """(labelled-oedema intensity share, unlabelled faint hyperintensity share), both 0..1 of the oedema's
    contrast; the first is 1 deep in the oedema, the second is 0 inside it."""
    faint_meta = {}
    edge_steps = max(1, int(round(rnd.uniform(config.oedema_edge_mm) / spacing[0])))
    edge_level = rnd.uniform(config.oedema_edge_level)
    # the core is not oedema's border: measure depth in oedema + core
    inner = (edge_level + (1 - edge_level) * _depth(torch.maximum(oedema, core), edge_steps)) * oedema
    faint = torch.zeros_like(oedema)
    outside = (1 - torch.maximum(oedema, core)) * (brain > 0.3).float()
    if rnd.chance(config.p_faint_tail):
        steps = max(1, int(round(rnd.uniform(config.faint_tail_mm) / spacing[0])))
        level = rnd.uniform(config.faint_tail_level)
        # through any brain tissue on the tumour's side (sulci included), fading with the distance
        ramp = _grow(torch.maximum(oedema, core), (brain > 0.3).float() * crossing, steps, ramp=True)
        faint = torch.maximum(faint, level * ramp * outside)
        faint_meta["tail"] = [round(steps * spacing[0], 1), round(level, 2)]
    if rnd.chance(config.p_faint_patches):
        level = rnd.uniform(config.faint_patch_level)
        r = (pos - centre.view(3, 1, 1, 1)).norm(dim=0)
        near = torch.exp(-(r / (radius_wt * rnd.uniform((1.2, 2.0)))) ** 2)
        blobs = (rnd.field(oedema.shape, grid=18)[0] - rnd.uniform((0.3, 0.9))).clamp(0, 1)
        cortex_and_sulci = (gm + csf * (1 - ventricles)).clamp(0, 1)
        faint = torch.maximum(faint, level * blobs.clamp(0, 0.5) * 2 * near * cortex_and_sulci * outside)
        faint_meta["patches"] = round(level, 2)
    if rnd.chance(config.p_periventricular):
        level = rnd.uniform(config.periventricular_level)
        width = max(1, int(round(rnd.uniform((2.0, 6.0)) / spacing[0])))
        grown = _grow((ventricles > 0.5).float(), (brain > 0.3).float(), width)
        caps = grown * (1 - ventricles).clamp(0, 1) * (0.6 + 0.4 * rnd.field(oedema.shape, grid=8)[0]).clamp(0, 1)
        faint = torch.maximum(faint, level * caps * outside)
        faint_meta["periventricular"] = round(level, 2)
    if rnd.chance(config.p_white_matter_lesions):
        level = rnd.uniform(config.white_matter_lesion_level)
        share = rnd.uniform(config.white_matter_lesion_share)
        clearance = max(1, int(round(config.white_matter_lesion_clearance_mm / spacing[0])))
        near_tumour = _grow(torch.maximum(oedema, core).gt(0.5).float(), torch.ones_like(oedema), clearance)
        deep_wm = (wm > 0.5).float() * (1 - near_tumour)
        # small blobs (about 2-6 mm): the top ``share`` of a fine random field inside deep white matter
        spots = rnd.field(oedema.shape, grid=max(8, int(oedema.shape[0] * spacing[0] / 5)))[0]
        if deep_wm.sum() > 0:
            cut = torch.quantile(spots[deep_wm > 0], 1 - share)
            soft = ((spots - cut) / 0.3 + 0.5).clamp(0, 1)
            faint = torch.maximum(faint, level * soft * deep_wm * outside)
            faint_meta["white_matter_lesions"] = [round(level, 2), round(share, 3)]
    meta["faint_oedema"] = {"edge": [round(edge_steps * spacing[0], 1), round(edge_level, 2)], **faint_meta}
    return inner, faint


def _torchio_artefacts(image: torch.Tensor, rnd: _Random, config: EngineConfig, meta: dict) -> torch.Tensor:
    """Motion and ghosting (k-space artefacts of older scanners), per channel, from torchio."""
    import torchio as tio

    transforms = []
    if rnd.chance(config.p_motion):
        transforms.append(tio.RandomMotion(degrees=5, translation=5, num_transforms=2))
    if rnd.chance(config.p_ghosting):
        transforms.append(tio.RandomGhosting(num_ghosts=(2, 6), intensity=(0.2, 0.6)))
    if not transforms:
        return image
    meta["artefacts"] = [type(t).__name__ for t in transforms]
    channel = int(rnd.np.integers(0, image.shape[0]))  # one sequence of the protocol is hit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rnd.np.integers(0, 2**31)))
        sub = tio.ScalarImage(tensor=image[channel:channel + 1].detach().cpu())
        for t in transforms:
            sub = t(sub)
    image = image.clone()
    image[channel] = sub.data[0].to(image.device, torch.float32).abs()
    return image


def normalise(image: torch.Tensor, mask: torch.Tensor, percentiles=(0.5, 99.5)) -> torch.Tensor:
    """Per channel: clip to percentiles inside ``mask``, z-score inside ``mask``, zero outside.
    The torch twin of ``preprocessing.normalise`` (a test keeps them equal)."""
    out = torch.zeros_like(image)
    q = torch.tensor([p / 100.0 for p in percentiles], device=image.device, dtype=torch.float64)
    for c in range(image.shape[0]):
        values = image[c][mask].double()
        lo, hi = torch.quantile(values, q).tolist()
        clipped = image[c].clamp(lo, hi)
        inside = clipped[mask].double()
        std = float(inside.std(unbiased=False))
        out[c] = (clipped - float(inside.mean())) / (std if std > 1e-6 else 1.0)
        out[c][~mask] = 0.0
    return out


def _intensities(rnd: _Random, config: EngineConfig, meta: dict) -> dict[str, dict[str, float]]:
    """Mean intensity per tissue and sequence, relative to white matter, with real orderings:
    T1CE: ET bright, NETC and CSF dark, oedema slightly below WM; T2W: fluid brightest, oedema
    bright; FLAIR: oedema brightest, CSF dark. NETC is fluid-bright on T2W in most gliomas and
    bright on FLAIR unless it is a suppressed cyst."""
    u = rnd.uniform
    fluid_netc = rnd.chance(config.p_fluid_bright_netc)
    suppressed = rnd.chance(config.p_flair_suppressed_netc)
    meta.update(fluid_bright_netc=fluid_netc, flair_suppressed_netc=suppressed)
    t1c_csf = u((0.4, 0.7))
    t2_csf = u((1.6, 2.6))
    t2_oedema = u((1.8, 2.7))
    flair_oedema = u((1.8, 2.8))
    return {
        # necrosis is as dark as CSF or darker on T1CE; oedema sits near CSF, well below white matter
        # (the unlabelled real case: oedema -1.1 z below white matter, necrosis another -0.65 z)
        "t1c": {"wm": 1.0, "gm": u((0.76, 0.92)), "csf": t1c_csf, "snfh": t1c_csf + u((-0.15, 0.35)) * (1 - t1c_csf),
                "netc": u((0.6, 1.05)) * t1c_csf, "et": u((1.6, 3.0)), "distractor": u((1.2, 2.4))},
        "t2w": {"wm": 1.0, "gm": u((1.04, 1.3)), "csf": t2_csf, "snfh": t2_oedema,
                "netc": u((1.0, 1.25)) * t2_csf if fluid_netc else u((1.3, 2.0)),
                "et": u((1.5, 2.4)), "distractor": u((0.4, 1.0))},
        "t2f": {"wm": 1.0, "gm": u((1.0, 1.2)), "csf": u((0.5, 0.9)), "snfh": flair_oedema,
                "netc": u((0.35, 0.9)) if suppressed else u((0.6, 1.05)) * flair_oedema,
                "et": u((1.15, 1.9)), "distractor": u((0.8, 1.3))},
    }


@dataclass
class _Brain:
    """One case's anatomy on its grid: tissue fractions and structures (as the tumour pushes them)."""
    tissues: torch.Tensor  # grey matter, white matter, CSF fractions
    structures: torch.Tensor  # ventricles, midline, cortex ribbon
    pos: torch.Tensor  # voxel positions (mm)
    spacing: tuple
    midline_mm: float

    @property
    def brain(self) -> torch.Tensor:
        return self.tissues.sum(0)


@dataclass
class _Tumour:
    netc: torch.Tensor
    et: torch.Tensor
    snfh: torch.Tensor
    oedema: torch.Tensor  # grown oedema, before the core is cut out of it
    crossing: torch.Tensor  # where oedema may spread: the tumour's hemisphere and the midline structures


def _brain(anatomy: Anatomy, rnd: _Random, device) -> _Brain:
    tissues = anatomy.tissues.to(device)
    tissues = tissues / tissues.sum(0, keepdim=True).clamp_min(1.0)
    structures = anatomy.structures.to(device)
    if rnd.chance(0.5):  # left-right mirror: the atlas is one brain
        tissues, structures = tissues.flip(1), structures.flip(1)
    pos = _mm_grid(anatomy.shape, anatomy.spacing, device)
    brain = tissues.sum(0)
    return _Brain(tissues, structures, pos, anatomy.spacing, float((pos[0] * brain).sum() / brain.sum()))


def _place_tumour(b: _Brain, rnd: _Random, config: EngineConfig, meta: dict, device) -> tuple:
    """(centre in mm, whole-tumour radius, core radius); the mass effect pushes ``b``'s tissue outward."""
    gm, wm, _ = b.tissues
    brain = b.brain
    in_wm = rnd.chance(config.p_in_white_matter)
    candidates = torch.nonzero((wm > 0.6) if in_wm else ((gm > 0.5) & (brain > 0.9)))
    if len(candidates) == 0:
        candidates = torch.nonzero(brain > 0.5)
    centre_vox = candidates[int(rnd.np.integers(0, len(candidates)))].float()
    centre = centre_vox * torch.tensor(b.spacing, device=device)
    log_lo, log_hi = (math.log(r) for r in config.tumour_radius_mm)
    radius_wt = math.exp(rnd.uniform((log_lo, log_hi)))
    radius_core = radius_wt * rnd.uniform(config.core_fraction)
    meta.update(centre_mm=[round(float(c), 1) for c in centre], radius_wt_mm=round(radius_wt, 1),
                in_white_matter=in_wm)
    if rnd.chance(config.p_mass_effect):
        strength = rnd.uniform(config.mass_effect)
        d = b.pos - centre.view(3, 1, 1, 1)
        r = d.norm(dim=0, keepdim=True)
        # sample closer to the centre -> tissue is pushed outward; monotonic for strength < 1
        source = centre.view(3, 1, 1, 1) + d * (1 - strength * torch.exp(-(r / (2 * radius_core)) ** 2))
        warped = _sample(torch.cat([b.tissues, b.structures]), source, b.spacing)
        b.tissues, b.structures = warped[:3], warped[3:]
        meta["mass_effect"] = round(strength, 2)
    return centre, radius_wt, radius_core


def _core_parts(rnd: _Random, config: EngineConfig, core, level, rc: float, focus: int, kind: str, shape) -> tuple:
    """(ET, NETC, kind) of one focus's core. The first focus draws the tumour's kind (solid, non-enhancing
    or ring); a ring's rim varies in thickness and may be open."""
    rim = rnd.uniform(config.rim_mm) * (1 + 0.4 * rnd.field(shape, grid=8)[0]).clamp(0.3, 2.0)
    inner = (level < 1 - rim / rc).float() * core
    roll = rnd.np.random()
    if focus == 0:
        kind = ("solid" if roll < config.p_solid else
                "non-enhancing" if roll < config.p_solid + config.p_no_enhancement else "ring")
        if rc < 5 and kind == "ring":
            kind = "solid"  # small lesions rarely have a visible necrotic centre
    if kind == "solid":
        return core, torch.zeros_like(core), kind
    if kind == "non-enhancing":
        return torch.zeros_like(core), core, kind
    et_part, netc_part = core - inner, inner
    if rnd.chance(config.p_incomplete_rim):
        gap = (rnd.field(shape, grid=4)[0] > rnd.uniform((-0.3, 0.5))).float()
        netc_part = netc_part + et_part * gap
        et_part = et_part * (1 - gap)
    return et_part, netc_part, kind


def _grow_tumour(b: _Brain, rnd: _Random, config: EngineConfig, meta: dict, centre, radius_wt: float,
                 radius_core: float, device) -> _Tumour:
    """Each focus's core (ET / NETC) and the oedema grown from it, mostly through white matter."""
    shape, spacing, pos = tuple(b.pos.shape[1:]), b.spacing, b.pos
    gm, wm, csf = b.tissues
    brain = b.brain
    netc = torch.zeros(shape, device=device)
    et = torch.zeros(shape, device=device)
    oedema = torch.zeros(shape, device=device)
    foci = 1 + (int(rnd.np.integers(1, 3)) if rnd.chance(config.p_multifocal) else 0)
    hemisphere = 1.0 if float(centre[0]) > b.midline_mm else -1.0
    same_side = ((pos[0] - b.midline_mm) * hemisphere > -spacing[0]).float()
    crossing = torch.maximum(same_side, (b.structures[1] > 0.5).float())
    cortex = b.structures[2]
    # white matter carries oedema; grey matter a little; cortex ribbon, CSF and midline stop it
    permeability = (wm + 0.3 * gm * (1 - cortex)) * (1 - csf.clamp(0, 1)) * crossing
    pass_noise = rnd.field(shape, grid=10)[0]
    passable = ((permeability * (1.0 + 0.35 * pass_noise)) > rnd.uniform((0.35, 0.55))).float()
    kind = "ring"
    for focus in range(foci):
        if focus == 0:
            c, rc = centre, radius_core
        else:
            other = torch.nonzero(wm > 0.6)
            c = other[int(rnd.np.integers(0, len(other)))].float() * torch.tensor(spacing, device=device)
            rc = radius_core * rnd.uniform((0.3, 0.8))
        axes_ratio = torch.tensor([rnd.uniform((0.7, 1.3)) for _ in range(3)], device=device)
        rotation = _rotation([rnd.uniform((-math.pi, math.pi)) for _ in range(3)])
        bumps = rnd.field(shape, grid=int(rnd.np.integers(5, 12)))[0]
        level = _lobulated(pos, c, rc, axes_ratio, rotation, bumps, rnd.uniform((0.08, 0.3)))
        core = ((level < 1) & (brain > 0.3)).float()
        if focus == 0 and rnd.chance(config.p_no_core):
            kind = "oedema-only"
            seed_region = ((level < 0.5) & (brain > 0.3)).float()
        else:
            seed_region = core
            et_part, netc_part, kind = _core_parts(rnd, config, core, level, rc, focus, kind, shape)
            et = torch.maximum(et, et_part)
            netc = torch.maximum(netc, netc_part)
        reach_mm = radius_wt * rnd.uniform(config.oedema_reach) + spacing[0]
        steps = max(1, int(round(reach_mm / spacing[0])))
        grown = _grow(seed_region, passable, steps)
        # infiltration right around the core, whatever the tissue
        halo = _grow(seed_region, (brain > 0.5).float(), max(1, int(round(2.0 / spacing[0]))))
        oedema = torch.maximum(oedema, torch.maximum(grown, halo))
    if kind == "oedema-only":
        netc.zero_(), et.zero_()
    et = et * (1 - netc).clamp(0, 1)
    snfh = (oedema * (1 - torch.maximum(et, netc))).clamp(0, 1)
    meta["kind"], meta["foci"] = kind, foci
    return _Tumour(netc, et, snfh, oedema, crossing)


def _distractors(b: _Brain, rnd: _Random, config: EngineConfig, oedema, meta: dict, device):
    """Enhancing structures labelled background: choroid plexus, vessels, dura."""
    shape = tuple(b.pos.shape[1:])
    if not rnd.chance(config.p_distractors):
        return torch.zeros(shape, device=device)
    brain, wm = b.brain, b.tissues[1]
    plexus = b.structures[0] * (rnd.field(shape, grid=14)[0] > 1.0).float()
    sheet_a, sheet_b = rnd.field(shape, grid=16, channels=2)
    vessels = ((sheet_a.abs() < 0.05) & (sheet_b.abs() < 0.05)).float() * (brain > 0.3).float()
    shell = ((brain > 0.1) & (brain < 0.6)).float() * (rnd.field(shape, grid=10)[0] > 0.6).float()
    meta["distractors"] = True
    return torch.clamp(plexus + vessels * (1 - wm) + shell, 0, 1) * (1 - oedema)


def _warp(b: _Brain, rnd: _Random, config: EngineConfig, volumes: list, device) -> list:
    """One random affine + elastic warp applied to every volume together."""
    shape, spacing = tuple(b.pos.shape[1:]), b.spacing
    angles = [math.radians(rnd.uniform((-config.rotation_deg, config.rotation_deg))) for _ in range(3)]
    scales = torch.tensor([rnd.uniform(config.scale_range) for _ in range(3)], device=device)
    shift = torch.tensor([rnd.uniform((-config.translation_mm, config.translation_mm)) for _ in range(3)],
                         device=device)
    centre_of_grid = torch.tensor([(n - 1) * s / 2 for n, s in zip(shape, spacing)], device=device)
    d = b.pos - centre_of_grid.view(3, 1, 1, 1)
    matrix = _rotation(angles).to(device) / scales.view(3, 1)
    source = torch.einsum("ij,jxyz->ixyz", matrix, d) + centre_of_grid.view(3, 1, 1, 1) + shift.view(3, 1, 1, 1)
    source = source + config.elastic_mm * rnd.field(shape, grid=5, channels=3) / 1.5
    return list(_sample(torch.stack(volumes), source, spacing))


def _render(rnd: _Random, config: EngineConfig, meta: dict, gm, wm, csf, netc, et, distractor, oedema_share):
    """T1CE, T2W and FLAIR from tissue and tumour fractions, with random intensities and texture."""
    shape = tuple(gm.shape)
    means = _intensities(rnd, config, meta)
    channels = []
    healthy_texture = 0.08 * rnd.uniform((0.0, 1.0))
    tumour_texture = rnd.uniform((0.15, 0.4))
    tex = rnd.field(shape, grid=24, channels=3)
    # density varies within the oedema; with faint oedema less so, so labelled oedema stays brighter than the
    # unlabelled faint signal (a first 1.4 draft let both overlap, and the network labelled faint brightness more)
    density_spread = 0.15 if config.faint_oedema else 0.25
    oedema_grade = (1 - density_spread + density_spread * rnd.field(shape, grid=8)[0].clamp(-1, 1)) * oedema_share
    for ci, name in enumerate(MODALITIES):
        m = means[name]
        healthy = (gm * m["gm"] + wm * m["wm"] + csf * m["csf"]) * (1 + healthy_texture * tex[ci])
        img = healthy * (1 - oedema_grade) + oedema_grade * m["snfh"] * (1 + tumour_texture * tex[(ci + 1) % 3])
        core_weight = (netc + et).clamp(0, 1)
        tumour = (netc * m["netc"] * (1 + tumour_texture * tex[ci]) + et * m["et"] * (1 + tumour_texture * tex[(ci + 2) % 3]))
        tumour = tumour / core_weight.clamp_min(1e-3)
        img = img * (1 - core_weight) + core_weight * tumour
        img = img * (1 - distractor) + distractor * m["distractor"]
        channels.append(img.clamp_min(0))
    return torch.stack(channels)


def _degrade(image, rnd: _Random, config: EngineConfig, meta: dict, device):
    """Scanner degradations: partial-volume blur, thick slices, bias field, Rician noise, gamma, artefacts."""
    shape = tuple(image.shape[1:])
    sigma = rnd.uniform(config.blur_voxels)
    image = _blur(image, (sigma, sigma, sigma))
    if rnd.chance(config.p_thick_slices):
        axis = int(rnd.np.integers(0, 3))
        factor = rnd.uniform(config.thick_factor)
        low = list(shape)
        low[axis] = max(2, int(round(shape[axis] / factor)))
        image = F.interpolate(F.interpolate(image[None], size=low, mode="area"), size=shape,
                              mode="trilinear", align_corners=False)[0]
        meta["thick_slices"] = {"axis": axis, "factor": round(factor, 2)}
    strength = rnd.uniform(config.bias_strength)
    image = image * torch.exp(strength * rnd.field(shape, grid=3, channels=3))
    noise_sigma = rnd.uniform(config.noise)
    n1, n2 = torch.randn((2, *image.shape), generator=rnd.torch).to(device) * noise_sigma
    image = torch.sqrt((image + n1) ** 2 + n2 ** 2)  # Rician, as in magnitude images
    if rnd.chance(config.p_gamma):
        g = rnd.uniform(config.gamma)
        peak = image.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        image = (image / peak) ** g * peak
        meta["gamma"] = round(g, 2)
    return _torchio_artefacts(image, rnd, config, meta)


def generate_case(seed: int, anatomy: Anatomy, config: EngineConfig | None = None, device="cpu",
                  keep_raw: bool = False) -> SyntheticCase:
    """One case, a pure function of its arguments; the stages in the order the module docstring lists."""
    config = config or EngineConfig()
    device = torch.device(device)
    rnd = _Random(seed, device)
    meta: dict = {"seed": int(seed), "engine_version": ENGINE_VERSION}
    b = _brain(anatomy, rnd, device)
    # 1-2. tumour centre and mass effect; tumour, oedema, distractors
    centre, radius_wt, radius_core = _place_tumour(b, rnd, config, meta, device)
    t = _grow_tumour(b, rnd, config, meta, centre, radius_wt, radius_core, device)
    distractor = _distractors(b, rnd, config, t.oedema, meta, device)
    gm, wm, csf = b.tissues
    if config.faint_oedema:
        # its own random stream, so that faint_oedema False gives engine 1.3 cases exactly
        oedema_share, faint = _faint_oedema(_Random(seed + 1_000_003, device), config, t.snfh,
                                            torch.maximum(t.et, t.netc), b.brain, gm, wm, csf, b.structures[0],
                                            t.crossing, b.pos, centre, radius_wt, b.spacing, meta)
        distractor = distractor * (1 - faint)
        oedema_share = oedema_share + faint
    else:
        oedema_share = t.snfh
    # 3. one warp of everything
    gm, wm, csf, netc, et, snfh, distractor, brain, oedema_share = _warp(
        b, rnd, config, [gm, wm, csf, t.netc, t.et, t.snfh, distractor, b.brain, oedema_share], device)
    labels = torch.zeros(tuple(anatomy.shape), dtype=torch.uint8, device=device)
    labels[snfh > 0.5] = SNFH.label
    labels[netc > 0.5] = NETC.label
    labels[(et > 0.5) & (et >= netc)] = ET.label
    mask = (brain > 0.5) | (labels > 0)
    # 4-5. rendering and degradations
    image = _render(rnd, config, meta, gm, wm, csf, netc, et, distractor, oedema_share)
    image = _degrade(image, rnd, config, meta, device) * mask  # skull-stripped
    # 6. crop to the brain and normalise as inference does
    idx = [torch.nonzero(mask.any(dim=tuple(a for a in range(3) if a != ax))).flatten() for ax in range(3)]
    crop = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
    image, labels, mask = image[(slice(None),) + crop], labels[crop], mask[crop]
    tissue = torch.stack([gm, wm, csf])[(slice(None),) + crop]
    tissue = ((tissue.argmax(0) + 1) * ((tissue.amax(0) > 0.5) & mask)).to(torch.uint8)
    mask = mask & (image != 0).any(0)  # inference's foreground: any channel non-zero
    normalised = normalise(image, mask, config.clip_percentiles)
    return SyntheticCase(normalised, labels, mask, tissue, tuple(anatomy.spacing), image if keep_raw else None, meta)


def write_case(folder, seed: int = 0, anatomy: Anatomy | None = None, case_id: str = "BrainUNet-Demo-00000"):
    """An engine case on disk in BraTS 2023 layout (``<id>-t1c/-t2w/-t2f/-seg.nii.gz``), raw
    (un-normalised) intensities as int16: the built-in demo case. Default anatomy: the phantom
    at 1.5 mm, so it needs no templates. Returns {modality or "seg": path}."""
    from pathlib import Path

    import nibabel as nib

    from brainunet.synthetic import default_affine
    from .templates import phantom_anatomy

    anatomy = anatomy or phantom_anatomy(1.5)
    case = generate_case(seed, anatomy, keep_raw=True)
    affine = default_affine(tuple(case.labels.shape), case.spacing)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = case.raw.cpu().numpy()
    scale = 1000.0 / max(float(np.percentile(raw[raw > 0], 99)), 1e-6)  # scanner-like integer range
    paths = {}
    for i, modality in enumerate(MODALITIES):
        paths[modality] = folder / f"{case_id}-{modality}.nii.gz"
        nib.save(nib.Nifti1Image(np.round(raw[i] * scale).astype(np.int16), affine), str(paths[modality]))
    paths["seg"] = folder / f"{case_id}-seg.nii.gz"
    nib.save(nib.Nifti1Image(case.labels.cpu().numpy().astype(np.uint8), affine), str(paths["seg"]))
    return paths
