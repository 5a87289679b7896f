"""Training BrainUNet on the synthetic data engine (and fine-tuning on real labelled cases).

One process normally; under ``torchrun`` (WORLD_SIZE > 1) each rank trains a DistributedDataParallel
replica on its own disjoint seeds and rank 0 alone writes files.

The data stream is a pure function of (config.seed, rank, step): step ``s`` belongs to chunk
``s // crops_per_case``; a chunk is ``batch_size`` freshly generated cases with ``crops_per_case``
crops each, one crop of every case per step (so a batch always mixes different cases while each
expensive case is used several times). A resumed run therefore sees exactly the batches the
uninterrupted run would have seen, whatever the number of DataLoader workers.

Outputs in ``output_dir``: config.json, checkpoint.pt (resumable), history.csv, curves.png and
model.pt (the fp16 weights file the CLI and the Slicer module load).
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainunet.errors import Cancelled, InputError
from brainunet.labels import ALL_REGIONS, CLASS_LABELS
from brainunet.outputs import signals_held
from brainunet.settings import POSTPROCESSING_KEYS, ModelSettings, Postprocessing, Preprocessing

SEED_STRIDE = 1_000_003  # training case seed = config.seed * SEED_STRIDE + case index
VALIDATION_SEED_BASE = 10**12  # validation seeds live far above any training seed
MODALITIES = ("t1c", "t2w", "t2f")
REGION_KEYS = [r.key for r in ALL_REGIONS]


def _default_network() -> dict:
    return {"features": [16, 32, 64, 128], "blocks_per_level": 1, "attention": True, "dropout": 0.0}


def read_json(path, what: str = "Settings file"):
    """A JSON settings file, or an InputError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} not found.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}.") from exc


@dataclass
class TrainConfig:
    name: str = ""  # model name in the weights file (default: the output folder's name)
    network: dict = field(default_factory=_default_network)  # NetworkConfig fields
    engine: dict = field(default_factory=dict)  # EngineConfig fields (defaults when empty)
    anatomy: str = "sri24"  # engine anatomy: "sri24" (real templates, cached) or "phantom" (tests)
    spacing_mm: float = 2.0  # isotropic working spacing of the engine and of the saved model
    patch_size: list = field(default_factory=lambda: [64, 64, 64])
    inference_patch_size: list = field(default_factory=lambda: [128, 128, 128])  # stored in model.pt
    batch_size: int = 2
    crops_per_case: int = 2  # crops taken from each generated case (cases are expensive)
    tumour_crop_fraction: float = 0.8  # crops centred on a voxel of a random tumour class
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # "cosine" (after linear warmup) or "constant"
    warmup_steps: int = 100
    grad_clip: float = 12.0
    loss: dict = field(default_factory=lambda: {"alpha": 0.3, "beta": 0.7, "ce_weight": 1.0, "smooth": 1.0})
    deep_supervision: bool = True  # overrides network.deep_supervision
    modality_dropout: float = 0.1  # probability that one input channel of a crop is zeroed (never all)
    # which channel (t1c, t2w, t2f) is dropped: T1CE and T2W most often, the sequences real studies
    # lack most (no contrast given, no T2W acquired); the pipeline then feeds a zero channel
    modality_dropout_weights: list = field(default_factory=lambda: [0.4, 0.4, 0.2])
    amp: bool = True  # mixed precision on CUDA only: bf16 where supported, else fp16 with a GradScaler
    cpu_bf16: bool = False  # bf16 autocast of the forward pass on a CPU (benchmarks/training_step.py: speed)
    checkpoint_every: int = 250
    validate_every: int = 250  # 0: never (a final validation still runs when there are validation cases)
    validation_cases: int = 4  # fixed synthetic cases, seeds disjoint from training seeds
    validation_data: str | None = None  # optional folder of real labelled cases to validate on too
    engine_fraction: float = 1.0  # with real training data: share of batch slots from the engine
    # real cases are few (often one to a handful per clinic): each use of one is a new random affine
    # and elastic warp, sometimes thick slices, blur and noise (torchio), so steps do not repeat it
    real_augmentation: bool = True
    init_weights: str | None = None  # weights file to start from (fine-tuning)
    min_component_voxels: int = 50  # stored in model.pt: inference's post-processing (in 1 mm³ voxels, any grid)
    # the rest of the post-processing stored in model.pt (settings.Postprocessing fields): a fine-tuned
    # model keeps its base model's (e.g. the tumour_threshold chosen for it by cross-validation)
    postprocessing: dict = field(default_factory=dict)
    # stored in model.pt: N4 bias-field correction of real inputs (inference and real training cases);
    # engine cases are rendered with their own bias fields and are not corrected
    bias_correction: bool = False
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes generating cases (each with 1 torch thread)
    threads: int = 0  # torch CPU threads of the training process (0: torch's default)
    device: str = "auto"
    engine_device: str = "auto"  # where cases are generated; auto: training device without workers, else CPU

    @classmethod
    def from_dict(cls, d: dict, source: str = "training config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a JSON object of settings.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"{source}: unknown setting(s) {', '.join(unknown)}. Known settings: {', '.join(sorted(known))}.")
        config = cls(**d)
        try:
            config.validate(source)
        except (TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{source}: a setting has the wrong type or shape ({exc}).") from exc
        return config

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        return cls.from_dict(read_json(path, "Training config"), str(path))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def clip_percentiles(self) -> list:
        """Intensity clipping of the engine's normalisation, stored in model.pt for inference."""
        from .engine import EngineConfig

        return [float(p) for p in EngineConfig.from_dict(self.engine).clip_percentiles]

    def network_config(self):
        from brainunet.network import NetworkConfig

        return NetworkConfig.from_dict({**self.network, "deep_supervision": self.deep_supervision})

    def validate(self, source: str = "training config"):
        from brainunet.network import NetworkConfig

        def fail(msg):
            raise InputError(f"{source}: {msg}")

        unknown = sorted(set(self.network) - set(NetworkConfig.__dataclass_fields__))
        if unknown:
            fail(f"unknown network setting(s) {', '.join(unknown)}.")
        unknown = sorted(set(self.loss) - {"alpha", "beta", "ce_weight", "smooth"})
        if unknown:
            fail(f"unknown loss setting(s) {', '.join(unknown)}; use alpha, beta, ce_weight, smooth.")
        unknown = sorted(set(self.postprocessing) - set(POSTPROCESSING_KEYS))
        if unknown:
            fail(f"unknown post-processing setting(s) {', '.join(unknown)}; use {', '.join(POSTPROCESSING_KEYS)}.")
        if len(self.network.get("features", [])) < 2:
            fail("network.features needs at least two levels, e.g. [16, 32, 64, 128].")
        divisor = self.network_config().divisor
        for key in ("patch_size", "inference_patch_size"):
            value = getattr(self, key)
            if len(value) != 3 or any(int(p) < divisor or int(p) % divisor for p in value):
                fail(f"{key} {value} must be three multiples of {divisor} (2 ^ (levels - 1)).")
        if self.anatomy not in ("sri24", "phantom"):
            fail(f"anatomy '{self.anatomy}' is unknown; use sri24 or phantom.")
        if self.schedule not in ("cosine", "constant"):
            fail(f"schedule '{self.schedule}' is unknown; use cosine or constant.")
        for key in ("tumour_crop_fraction", "modality_dropout", "engine_fraction"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                fail(f"{key} must lie between 0 and 1.")
        for key in ("batch_size", "crops_per_case", "steps", "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                fail(f"{key} must be at least 1.")
        if len(self.modality_dropout_weights) != len(MODALITIES) or min(self.modality_dropout_weights) < 0 \
                or sum(self.modality_dropout_weights) <= 0:
            fail("modality_dropout_weights needs three non-negative weights (t1c, t2w, t2f).")
        if str(self.engine_device).startswith("cuda") and self.num_workers > 0:
            fail("engine_device cuda needs num_workers 0 (CUDA does not work in forked DataLoader workers).")
        if self.spacing_mm <= 0 or self.lr <= 0:
            fail("spacing_mm and lr must be positive.")


@dataclass
class TrainResult:
    output_dir: Path
    weights: Path
    step: int
    steps: int
    history: list
    seconds: float

    @property
    def finished(self) -> bool:
        return self.step >= self.steps


# --------------------------------------------------------------------------------------------------
# data


def crop_patch(image, labels, mask, patch, rng: np.random.Generator, tumour_fraction: float):
    """A ``patch``-sized crop (zero-padded where the volume is smaller), centred on a tumour voxel
    of a randomly chosen present class with probability ``tumour_fraction``, else on a brain voxel."""
    shape = labels.shape
    pad = [max(0, p - s) for p, s in zip(patch, shape)]
    if any(pad):
        spec = []
        for p in reversed(pad):  # F.pad lists the last dimension first
            spec += [p // 2, p - p // 2]
        image = F.pad(image, spec)
        labels = F.pad(labels, spec)
        mask = F.pad(mask, spec)
        shape = labels.shape
    centre = None
    if rng.random() < tumour_fraction:
        present = [c for c in (1, 2, 3) if bool((labels == c).any())]
        if present:
            voxels = torch.nonzero(labels == present[int(rng.integers(len(present)))])
            centre = voxels[int(rng.integers(len(voxels)))].tolist()
    if centre is None:
        # the other crops are centred in the brain, where every false positive lies, not in the empty margin
        brain = torch.nonzero(mask > 0)
        centre = brain[int(rng.integers(len(brain)))].tolist() if len(brain) else [int(rng.integers(s)) for s in shape]
    start = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, patch, shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return image[(slice(None),) + sl], labels[sl], mask[sl]


def augment(image, labels, mask, rng: np.random.Generator, config: TrainConfig):
    """Random flips, a small intensity scale/shift inside the brain, modality dropout.

    Light on purpose: the engine already randomises anatomy, contrast, noise and artefacts.
    """
    dims = [d for d in range(3) if rng.random() < 0.5]
    if dims:
        image = image.flip([d + 1 for d in dims])
        labels, mask = labels.flip(dims), mask.flip(dims)
    scale = torch.as_tensor(rng.uniform(0.9, 1.1, image.shape[0]), dtype=image.dtype, device=image.device)
    shift = torch.as_tensor(rng.uniform(-0.1, 0.1, image.shape[0]), dtype=image.dtype, device=image.device)
    image = (image * scale.view(-1, 1, 1, 1) + shift.view(-1, 1, 1, 1)) * mask
    if rng.random() < config.modality_dropout:
        w = np.asarray(config.modality_dropout_weights, float)
        image = image.clone()
        image[int(rng.choice(len(w), p=w / w.sum()))] = 0
    return image, labels, mask


def augment_real(image, labels, mask, spacing, rng: np.random.Generator):
    """A real case, spatially and in quality re-drawn: random affine (±12°, scale 0.85-1.15), elastic
    warp half the time, and sometimes what older or poorer scanners add: thick slices, blur, noise,
    a bias field, a gamma change, motion and ghosting (torchio). Labels and mask follow by nearest
    neighbour; outside the warped brain stays 0, as inference's normalisation leaves it. Each channel
    is z-scored inside the brain again afterwards, as inference normalises a scan after its artefacts.
    Deterministic given ``rng``."""
    import torchio as tio

    transforms = [tio.RandomAffine(scales=(0.85, 1.15), degrees=12, translation=0, default_pad_value=0.0)]
    if rng.random() < 0.5:
        transforms.append(tio.RandomElasticDeformation(num_control_points=7, max_displacement=3 * float(spacing[0])))
    if rng.random() < 0.2:
        transforms.append(tio.RandomAnisotropy(downsampling=(1.5, 3.0), image_interpolation="linear",
                                               include=["image"]))  # labels keep the annotator's resolution
    intensity = []  # on positive intensities (a bias field and a gamma change act on signal, not z-scores)
    if rng.random() < 0.3:
        intensity.append(tio.RandomBiasField(coefficients=0.4))
    if rng.random() < 0.3:
        intensity.append(tio.RandomGamma(log_gamma=(-0.3, 0.3)))
    if rng.random() < 0.1:
        intensity.append(tio.RandomMotion(degrees=4, translation=4, num_transforms=1))
    if rng.random() < 0.1:
        intensity.append(tio.RandomGhosting(num_ghosts=(2, 6), intensity=(0.2, 0.5)))
    if rng.random() < 0.2:
        intensity.append(tio.RandomBlur(std=(0.0, 0.5 * float(spacing[0]))))
    if rng.random() < 0.2:
        intensity.append(tio.RandomNoise(std=(0.0, 0.1)))
    # a margin, so a brain scaled up or rotated is not cut at the edges of its brain-tight crop
    margin = [max(4, int(0.1 * n)) for n in labels.shape]
    pad = [m for m in reversed(margin) for _ in (0, 1)]  # F.pad lists the last dimension first
    image, labels, mask = F.pad(image, pad), F.pad(labels, pad), F.pad(mask, pad)
    brain = mask > 0
    if intensity:
        low = torch.stack([image[c][brain].min() if brain.any() else image[c].min() for c in range(image.shape[0])])
        image = torch.where(brain, image - low.view(-1, 1, 1, 1) + 0.5, torch.zeros_like(image))
    affine = np.diag([*map(float, spacing), 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=image.float(), affine=affine),
                          labels=tio.LabelMap(tensor=labels[None].to(torch.int16), affine=affine),
                          mask=tio.LabelMap(tensor=mask[None].to(torch.int16), affine=affine))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(0, 2**31)))
        subject = tio.Compose(transforms + intensity)(subject)
    mask = subject["mask"].data[0] > 0
    labels = (subject["labels"].data[0].to(torch.uint8)) * mask
    image = subject["image"].data.float()
    if intensity and mask.any():
        inside = image[:, mask]
        image = (image - inside.mean(1).view(-1, 1, 1, 1)) / inside.std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    image = image * mask
    return image, labels, mask


def training_seed(config: TrainConfig, case_index: int) -> int:
    return int(config.seed) * SEED_STRIDE + int(case_index)


def validation_seeds(config: TrainConfig) -> list[int]:
    return [VALIDATION_SEED_BASE + int(config.seed) * 1000 + i for i in range(config.validation_cases)]


class ChunkStream(torch.utils.data.IterableDataset):
    """Iterable of chunks ``(first_step, images (G, B, C, *P), labels (G, B, *P))``, G = crops_per_case.

    ``real`` (LabelledCase list) makes each batch slot a real crop with probability
    1 - ``engine_fraction``; with ``real_augmentation`` each such slot warps its real case anew.
    """

    def __init__(self, config: TrainConfig, anatomy, real=None, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, engine_device: str = "cpu"):
        self.config, self.anatomy, self.real = config, anatomy, list(real or [])
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.engine_device = engine_device

    def chunk_count(self) -> int:
        return math.ceil(self.config.steps / self.config.crops_per_case)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        first = self.start_step // self.config.crops_per_case
        for chunk in range(first + worker, self.chunk_count(), workers):
            yield self.make_chunk(chunk)

    def _engine_case(self, chunk: int, slot: int):
        from .engine import EngineConfig, generate_case

        c = self.config
        index = (chunk * self.world_size + self.rank) * c.batch_size + slot
        case = generate_case(training_seed(c, index), self.anatomy, EngineConfig.from_dict(c.engine),
                             device=self.engine_device)
        return case.image, case.labels, case.mask

    def _real_case(self, rng):
        case = self.real[int(rng.integers(len(self.real)))]
        image, labels, mask = torch.from_numpy(case.image), torch.from_numpy(case.labels), torch.from_numpy(case.mask)
        if self.config.real_augmentation:
            image, labels, mask = augment_real(image, labels, mask, case.spacing, rng)
        return image, labels, mask

    def make_chunk(self, chunk: int):
        c = self.config
        rng = np.random.default_rng([c.seed, self.rank, chunk])
        engine_slot = [not self.real or rng.random() < c.engine_fraction for _ in range(c.batch_size)]
        # one generated or augmented case per slot, shared by its crops (both cost far more than a crop)
        cases = [self._engine_case(chunk, b) if engine_slot[b] else self._real_case(rng) for b in range(c.batch_size)]
        # on the engine's device: with the engine on the GPU, batches never leave it
        images = torch.zeros((c.crops_per_case, c.batch_size, len(MODALITIES), *c.patch_size), device=self.engine_device)
        labels = torch.zeros((c.crops_per_case, c.batch_size, *c.patch_size), dtype=torch.uint8, device=self.engine_device)
        for g in range(c.crops_per_case):
            for b in range(c.batch_size):
                img, lab, msk = cases[b]
                img, lab, msk = crop_patch(img, lab, msk.to(img.dtype), c.patch_size, rng, c.tumour_crop_fraction)
                img, lab, _ = augment(img, lab, msk, rng, c)
                images[g, b], labels[g, b] = img, lab
        return chunk * c.crops_per_case, images, labels


def _worker_init(_):
    torch.set_num_threads(1)  # workers share the cores with the training process


# --------------------------------------------------------------------------------------------------
# validation


def predict_labels(model, image: np.ndarray, mask: np.ndarray, patch_size, device, tta: bool = False) -> np.ndarray:
    from brainunet.inference import predict_probabilities

    probs = predict_probabilities(model, image, patch_size, device=device, precision="fp32", tta=tta)
    labels = np.asarray(CLASS_LABELS, np.uint8)[probs.argmax(0)]
    labels[~mask] = 0
    return labels


def mean_dice(model, cases, patch_size, device, tta: bool = False) -> dict:
    """Mean Dice per region over ``cases`` [(image, labels, mask) numpy] on the working grid (fp32; ``tta``:
    mirroring test-time augmentation)."""
    from .evaluation import dice

    scores = {k: [] for k in REGION_KEYS}
    for image, labels, mask in cases:
        pred = predict_labels(model, image, mask, patch_size, device, tta=tta)
        for region in ALL_REGIONS:
            scores[region.key].append(dice(region.mask(pred), region.mask(labels)))
    return {k: float(np.mean(v)) for k, v in scores.items()}


# --------------------------------------------------------------------------------------------------
# outputs

HISTORY_FIELDS = ["step", "loss", "lr", "seconds"] + [f"val_dice_{k}" for k in REGION_KEYS] + \
    [f"real_dice_{k}" for k in REGION_KEYS]


def write_history(history: list[dict], path: Path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_history(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(history: list[dict], path: Path, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in history])
    loss = np.array([r["loss"] for r in history], float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if len(steps):
        w = max(1, min(50, len(loss) // 10))
        a1.plot(steps, loss, color="0.75" if w > 1 else "C0", lw=0.6, label="loss")
        if w > 1:
            a1.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"), color="C0", label=f"mean of {w}")
        a1.legend()
    a1.set_xlabel("step")
    a1.set_title("Training loss")
    for prefix, style, name in (("val_dice_", "-", "synthetic"), ("real_dice_", "--", "real")):
        rows = [r for r in history if r.get(f"{prefix}WT") is not None]
        for region in ALL_REGIONS:
            if rows:
                a2.plot([r["step"] for r in rows], [r[f"{prefix}{region.key}"] for r in rows], style, marker=".",
                        color=region.color, label=f"{region.key} ({name})")
    a2.set_ylim(0, 1)
    a2.set_xlabel("step")
    a2.set_title("Validation Dice")
    if a2.lines:
        a2.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _atomic_save(obj, path: Path):
    """An interruption while saving never leaves a truncated checkpoint; the data reach the disk before the
    rename, so a power cut (a clinic's machine, a preempted node) cannot leave an empty one either."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hardware(device, world_size: int) -> str:
    if str(device).startswith("cuda"):
        return f"{world_size} x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    return f"{world_size} x CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------------
# the loop


def _lr_factor(config: TrainConfig):
    def factor(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _setup_distributed(device: str):
    """(rank, world_size, device, created): initialises the process group under torchrun.

    ``created`` says this call made the group, so the caller must destroy it when training ends: a gloo group
    left to interpreter shutdown can abort a rank ("terminate called without an active exception") while the
    other rank is already gone, and torchrun then reports the whole run as failed."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device, created


def _check_resumable(saved: dict, config: TrainConfig, output_dir: Path):
    old = TrainConfig(**saved)
    for what, a, b in (("network", old.network_config().to_dict(), config.network_config().to_dict()),
                       ("spacing_mm", old.spacing_mm, config.spacing_mm)):
        if a != b:
            raise InputError(f"Cannot resume {output_dir}: its checkpoint was trained with {what} {a}, the config "
                             f"now says {b}. Use the original config or another --output folder.")


def train(config: TrainConfig, output_dir, resume: bool = False, progress: bool = True, data=None,
          validation_data=None, stop_after_step: int | None = None, time_limit_s: float | None = None) -> TrainResult:
    """Train (or continue) a run in ``output_dir``.

    data: LabelledCase list of real training cases (mixed with engine cases by config.engine_fraction).
    validation_data: LabelledCase list to validate on (default: config.validation_data's folder).
    stop_after_step / time_limit_s: end early with a checkpoint (time-boxed jobs); resume later.
    """
    from brainunet.inference import resolve_device

    config.validate()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    rank, world, device, owns_process_group = _setup_distributed(resolve_device(config.device))
    try:
        return _train(config, Path(output_dir), resume, progress, data, validation_data, stop_after_step,
                      time_limit_s, rank, world, device)
    finally:
        # also when a bad checkpoint, config or data folder stops the run before its first step
        if owns_process_group:
            torch.distributed.destroy_process_group()


def _load_checkpoint(config: TrainConfig, output_dir: Path, resume: bool) -> dict | None:
    checkpoint_path = output_dir / "checkpoint.pt"
    if not checkpoint_path.exists():
        return None
    if not resume:
        raise InputError(f"{output_dir} already holds a training run (checkpoint.pt); pass --resume to continue "
                         "it, or choose another output folder.")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    _check_resumable(checkpoint["config"], config, output_dir)
    return checkpoint


def _initial_model(config: TrainConfig, checkpoint: dict | None):
    """A new network, or ``config.init_weights`` (transfer learning) when not resuming."""
    from brainunet import weights as weights_mod
    from brainunet.network import BrainUNet

    torch.manual_seed(config.seed)
    model = BrainUNet(config.network_config())
    if config.init_weights and checkpoint is None:
        base, _ = weights_mod.load_weights(Path(config.init_weights))
        shape_of = lambda net: {k: v for k, v in net.config.to_dict().items() if k != "deep_supervision"}  # noqa: E731
        if shape_of(base) != shape_of(model):
            raise InputError(f"init_weights {config.init_weights} is a network {shape_of(base)}, but the config "
                             f"asks for {shape_of(model)}.")
        model.load_state_dict(base.state_dict())
    return model


def model_settings(config: TrainConfig) -> ModelSettings:
    """What inference must do for a network trained with ``config``."""
    return ModelSettings(
        Preprocessing(modalities=MODALITIES, spacing_mm=(config.spacing_mm,) * 3,
                      patch_size=config.inference_patch_size, clip_percentiles=config.clip_percentiles,
                      bias_correction=config.bias_correction,
                      # lets the pipeline accept a case with one sequence missing (zero channel)
                      modality_dropout=config.modality_dropout > 0),
        Postprocessing(**{**config.postprocessing, "min_component_voxels": config.min_component_voxels}))


class _Optimisation:
    """The network, optimiser, schedule, mixed-precision scaler and loss of one run, and its step count."""

    def __init__(self, config: TrainConfig, checkpoint: dict | None, device: str, world: int):
        from .losses import build_loss

        self.model = _initial_model(config, checkpoint).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(config))
        self.use_amp = bool(config.amp) and device.startswith("cuda")
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.cpu_bf16 = bool(config.cpu_bf16) and not device.startswith("cuda")
        self.loss_fn = build_loss(**config.loss)
        self.grad_clip = config.grad_clip
        self.world = world
        self.step, self.history, self.elapsed_before = 0, [], 0.0
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if checkpoint["scaler"] and self.scaler.is_enabled():  # empty when saved by a CPU / bf16 run
                self.scaler.load_state_dict(checkpoint["scaler"])
            self.step, self.history, self.elapsed_before = checkpoint["step"], checkpoint["history"], checkpoint["seconds"]
        self.net = self.model
        if world > 1:
            # without deep supervision the coarser heads get no gradient, which DDP must be told
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.startswith("cuda") else None,
                find_unused_parameters=not config.deep_supervision)

    def train_step(self, x, y, then=None) -> tuple[float, float]:
        """One optimiser step on a batch; returns (loss averaged over the ranks, the step's learning rate).
        ``then(loss, lr)`` (recording the step) runs before a cancel can land."""
        if self.cpu_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = self.net(x)
            outputs = _as_float(outputs)  # the loss in fp32: soft Dice sums lose digits in bf16
        else:
            with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.use_amp):
                outputs = self.net(x)
        loss = self.loss_fn(outputs, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        # A cancel (SIGTERM, Ctrl-C) waits until the weights, the step count and the history agree: raised
        # inside AdamW's per-parameter loop it would leave a checkpoint one update ahead of its step count.
        with signals_held():
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            value = loss.detach()
            if self.world > 1:
                torch.distributed.all_reduce(value)
                value /= self.world
            self.step += 1
            value = float(value)
            if then is not None:
                then(value, lr)
        return value, lr

    def checkpoint(self, config: TrainConfig, seconds: float) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "history": self.history, "config": config.to_dict(), "seconds": seconds}


def _as_float(outputs):
    """A network's output (a tensor, or deep supervision's list of them) in fp32."""
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(o.float() for o in outputs)
    return outputs.float()


def _engine_anatomy(config: TrainConfig, data, device: str):
    """The engine's anatomy (None when the run uses no engine case) and the device engine cases are made on."""
    engine_device = config.engine_device
    if engine_device == "auto":
        engine_device = device if config.num_workers == 0 else "cpu"
    if data is not None and config.engine_fraction <= 0 and config.validation_cases <= 0:
        return None, engine_device
    from .engine import load_anatomy

    return load_anatomy(config.spacing_mm, source=config.anatomy).to(engine_device), engine_device


def _validation_sets(config: TrainConfig, anatomy, engine_device: str, validation_data) -> tuple[list, list]:
    """(held-out engine cases, real validation cases), each as (image, labels, mask) arrays."""
    synthetic_val = []
    if config.validation_cases > 0:
        from .engine import EngineConfig, generate_case

        for s in validation_seeds(config):
            case = generate_case(s, anatomy, EngineConfig.from_dict(config.engine), device=engine_device)
            synthetic_val.append((case.image.cpu().numpy(), case.labels.cpu().numpy(), case.mask.cpu().numpy()))
    if validation_data is None and config.validation_data:
        from .realdata import load_labelled_cases

        validation_data = load_labelled_cases(config.validation_data, [config.spacing_mm] * 3, MODALITIES,
                                              config.clip_percentiles, bias_correction=config.bias_correction)
    return synthetic_val, [(c.image, c.labels, c.mask) for c in validation_data or []]


def _train(config: TrainConfig, output_dir: Path, resume: bool, progress: bool, data, validation_data,
           stop_after_step: int | None, time_limit_s: float | None, rank: int, world: int, device: str) -> TrainResult:
    from brainunet import weights as weights_mod

    checkpoint_path = output_dir / "checkpoint.pt"
    is_main = rank == 0
    checkpoint = _load_checkpoint(config, output_dir, resume)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    opt = _Optimisation(config, checkpoint, device, world)
    model, history = opt.model, opt.history
    anatomy, engine_device = _engine_anatomy(config, data, device)
    synthetic_val, real_val = _validation_sets(config, anatomy, engine_device, validation_data) if is_main else ([], [])
    stream = ChunkStream(config, anatomy, data, opt.step, rank, world, engine_device)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers,
                                         worker_init_fn=_worker_init if config.num_workers else None,
                                         pin_memory=device.startswith("cuda") and engine_device == "cpu",
                                         persistent_workers=False)

    def validate(at_step) -> dict:
        row = {}
        for prefix, cases in (("val", synthetic_val), ("real", real_val)):
            if cases:
                row.update({f"{prefix}_dice_{k}": v for k, v in
                            mean_dice(model, cases, config.inference_patch_size, device).items()})
        model.to(device).train()  # predict_probabilities falls back to the CPU on a CUDA out-of-memory error
        if row and bar is not None:
            bar.write(f"step {at_step}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
        return row

    # what the start model learned from travels on, so that a held-out case it saw can be refused later;
    # read when the run starts and kept in the checkpoint (a resumed run may not have the start file)
    if checkpoint is not None and "learned_cases" in checkpoint:
        learned_names = set(checkpoint["learned_cases"]["names"])
        learned_unnamed = int(checkpoint["learned_cases"]["unnamed"])
    elif config.init_weights and Path(config.init_weights).is_file():
        learned_names, learned_unnamed = learned_cases(config.init_weights)
    else:
        learned_names, learned_unnamed = set(), 0

    def save(final: bool):
        if not is_main:
            return
        from .engine import ENGINE_VERSION

        seconds = opt.elapsed_before + time.perf_counter() - t_start
        state = opt.checkpoint(config, seconds)
        # with the cases trained on so far: a run resumed on other cases still records all it learned from
        state["learned_cases"] = {"names": sorted(learned_names | {c.name for c in data or []}),
                                  "unnamed": learned_unnamed}
        _atomic_save(state, checkpoint_path)
        write_history(history, output_dir / "history.csv")
        plot_curves(history, output_dir / "curves.png", f"{config.name or output_dir.name}: step {opt.step} of {config.steps}")
        training = {"engine_version": ENGINE_VERSION, "seed": config.seed, "steps": opt.step,
                    "planned_steps": config.steps, "finished": final, "hardware": _hardware(device, world),
                    "wall_time_s": round(seconds, 1), "patch_size": list(config.patch_size), "anatomy": config.anatomy,
                    "init_weights": config.init_weights, "real_cases": len(data or []),
                    "real_case_names": sorted(learned_names | {c.name for c in data or []}),
                    "unnamed_real_cases": learned_unnamed}
        weights_mod.save_weights(output_dir / "model.pt", model, config.name or output_dir.name,
                                 model_settings(config), extra={"training": training})

    def barrier():
        if world > 1:
            torch.distributed.barrier()

    def stopping() -> bool:
        return opt.step >= config.steps or (stop_after_step is not None and opt.step >= stop_after_step)

    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=opt.step, unit="step", desc=config.name or output_dir.name,
                   dynamic_ncols=True)
    t_start = time.perf_counter()
    last_saved = opt.step

    def record(loss, lr):
        history.append({"step": opt.step, "loss": loss, "lr": lr,
                        "seconds": round(opt.elapsed_before + time.perf_counter() - t_start, 2)})

    model.train()
    try:
        for first, images, labels in (loader if opt.step < config.steps else []):
            for g in range(images.shape[0]):
                if first + g < opt.step:
                    continue  # resumed in the middle of a chunk
                if stopping():
                    break
                opt.train_step(images[g].to(device, non_blocking=True),
                               labels[g].to(device, non_blocking=True).long(), then=record)
                step, row = opt.step, history[-1]
                validation_due = bool(config.validate_every) and step % config.validate_every == 0 and step < config.steps
                if is_main and validation_due:
                    row.update(validate(step))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                if step % config.checkpoint_every == 0 and step < config.steps:
                    save(final=False)
                    last_saved = step
                if validation_due or last_saved == step:
                    barrier()  # the other ranks wait while rank 0 validates or writes (same steps on every rank)
                if time_limit_s is not None:
                    over = torch.tensor([float(time.perf_counter() - t_start > time_limit_s)], device=device)
                    if world > 1:
                        torch.distributed.broadcast(over, 0)  # every rank stops at the same step
                    if over.item():
                        stop_after_step = step
            if stopping():
                break
        finished = opt.step >= config.steps
        validated = history and ("val_dice_WT" in history[-1] or "real_dice_WT" in history[-1])
        if finished and is_main and history and not validated:
            history[-1].update(validate(opt.step))  # every finished run ends with a validation
        save(final=finished)
        barrier()
    except BaseException as exc:
        # Ctrl-C, SIGTERM (preemption) or an error: keep what was learnt since the last checkpoint
        if opt.step > last_saved:
            save(final=False)
        if isinstance(exc, (KeyboardInterrupt, Cancelled)):
            raise Cancelled(f"Training stopped at step {opt.step} of {config.steps}; {checkpoint_path} keeps it: "
                            "run the same command with --resume to continue.") from exc
        raise
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(output_dir, output_dir / "model.pt", opt.step, config.steps, history,
                       opt.elapsed_before + time.perf_counter() - t_start)


# --------------------------------------------------------------------------------------------------
# fine-tuning on real labelled cases


def learned_cases(weights_file) -> tuple[set[str], int]:
    """The real labelled cases a trained network has learned from, as far as they are on record: the names
    its training recorded (its own cases and those of the models it started from), or the ``training_cases``
    of a registry entry with the same weights (which lists them all); and how many more it learned from
    whose names nobody recorded."""
    from brainunet import weights as weights_mod
    from brainunet.errors import WeightsError

    path = Path(weights_file)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        training = payload.get("extra", {}).get("training", {})
    except Exception as exc:
        raise WeightsError(f"{path} cannot be read as BrainUNet weights ({type(exc).__name__}); give the model.pt "
                           "of a training run.") from exc
    if "real_case_names" in training:
        names, unnamed = set(training["real_case_names"]), int(training.get("unnamed_real_cases", 0))
    else:
        names, unnamed = set(), int(training.get("real_cases", 0))
    digest = weights_mod.sha256_of(path)
    for entry in weights_mod.load_registry():
        if entry.sha256 == digest and "training_cases" in entry.extra:
            return names | set(entry.extra["training_cases"]), int(entry.extra.get("unnamed_training_cases", 0))
    return names, unnamed


def _learned_among(weights_file, case_names) -> tuple[list[str], str, int]:
    """(the cases of ``case_names`` the weights learned from, the first of them as text, how many cases they
    learned from without a name on record)."""
    seen, unnamed = learned_cases(weights_file)
    overlap = sorted(seen & set(case_names))
    return overlap, ", ".join(overlap[:3]) + (", ..." if len(overlap) > 3 else ""), unnamed


def check_not_learned(weights_file, case_names, log=print) -> None:
    """Refuse to cross-validate from a start model that learned from any of the cases to be held out: their
    scores would not be held-out scores. Cases learned from without a name on record get a note."""
    overlap, listed, unnamed = _learned_among(weights_file, case_names)
    if overlap:
        raise InputError(f"{Path(weights_file).name} has learned from {len(overlap)} of these cases ({listed}), so "
                         "their held-out scores would not be held out. Start from a model that has not seen them "
                         "(--model; the bundled recipe starts from brainunet-2mm-transfer, see MODEL_CARD.md) or "
                         "with --scratch.")
    if unnamed:
        log(f"Note: {Path(weights_file).name} has learned from {unnamed} real case(s) whose names it does not "
            "record; if any of them is among these cases, its scores are not held out.")


def check_held_out(weights, held_names) -> None:
    """Refuse to score a model on cases it learned from (a model copied into the wrong fold folder, a run
    resumed over other cases): the figures would not be held-out figures."""
    seen, listed, _ = _learned_among(weights, held_names)
    if seen:
        raise InputError(f"{weights} has learned from {len(seen)} of the cases it would be scored on ({listed}): "
                         "its scores would not be held out. Check that each fold folder holds its own fold's model "
                         "(folds.json), and resume a run only with the cases it started with.")


def resolve_network(model):
    """The weights file and registry settings of a trained network named by ``model`` (weights.resolve_model)."""
    from brainunet import weights as weights_mod

    resolved = weights_mod.resolve_model(model)
    if resolved.kind != "network":
        raise InputError(f"Model '{resolved.name}' is not a trained network and cannot be fine-tuned; pass --model "
                         "with a BrainUNet weights file (for example the model.pt of `brainunet train`).")
    return resolved


def finetune_config(base_model, steps: int, lr: float | None = None, engine_fraction: float | None = None,
                    device: str = "auto", seed: int = 0, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig that continues ``base_model``: same network, spacing and patch, lower LR."""
    from brainunet import weights as weights_mod

    resolved = resolve_network(base_model)
    path = resolved.path
    net, payload = weights_mod.load_weights(path, resolved.sha256)
    stored = ModelSettings.from_stored(payload, resolved.settings, source=str(path))
    pp = stored.preprocessing
    trained = payload.get("extra", {}).get("training", {})
    if list(pp.modalities) != list(MODALITIES):
        raise InputError(f"{path} uses inputs {list(pp.modalities)}; fine-tuning supports {list(MODALITIES)}.")
    spacing = pp.spacing_mm[0]
    network = net.config.to_dict()
    network.pop("deep_supervision")
    settings = {"name": f"{payload.get('name', path.stem)}-finetuned", "network": network, "spacing_mm": spacing,
                "patch_size": trained.get("patch_size", [64, 64, 64]), "anatomy": trained.get("anatomy", "sri24"),
                "inference_patch_size": list(pp.patch_size),
                "min_component_voxels": stored.postprocessing.min_component_voxels,
                # a missing sequence's own rule is not carried over: it was chosen for the old network's
                # probabilities, and the new model's cross-validation chooses again
                "postprocessing": {k: v for k, v in asdict(stored.postprocessing).items() if k != "min_component_voxels"},
                "bias_correction": pp.bias_correction,
                "steps": int(steps), "lr": 2e-4, "warmup_steps": 20, "device": device, "seed": seed,
                "init_weights": str(path.resolve())}
    settings.update(overrides or {})  # a settings file, then the explicit arguments, win
    settings.update({k: v for k, v in (("lr", lr), ("engine_fraction", engine_fraction)) if v is not None})
    if device != "auto" or "device" not in (overrides or {}):
        settings["device"] = device
    settings["steps"] = int(steps)
    given = set(overrides or {}) | ({"engine_fraction"} if engine_fraction is not None else set())
    if not _anatomy_available(settings["spacing_mm"], settings["anatomy"]):
        # no templates: real cases only (an explicit engine_fraction > 0 fails later, saying how to get them)
        settings.setdefault("engine_fraction", 0.0)
        if "validation_cases" not in given:
            settings["validation_cases"] = 0
    elif "engine_fraction" not in given:
        settings["engine_fraction"] = 0.25
    return TrainConfig.from_dict(settings, "fine-tuning settings")


def _anatomy_available(spacing_mm: float, source: str) -> bool:
    from .engine import load_anatomy

    try:
        load_anatomy(spacing_mm, source=source)
        return True
    except Exception:  # templates not fetched: InputError / WeightsError / OSError
        return False


FOLD_FIELDS = ["fold", "cases", "n"] + [f"dice_{k}" for k in REGION_KEYS] + [f"hd95_{k}" for k in REGION_KEYS]


def finetune(base_model, data_dir, output_dir, steps: int, folds: int | None = None, lr: float | None = None,
             engine_fraction: float | None = None, device: str = "auto", resume: bool = False,
             progress: bool = True, seed: int = 0, overrides: dict | None = None,
             time_limit_s: float | None = None, label_pattern: str | None = None) -> TrainResult:
    """Fine-tune ``base_model`` (weights file or registry name) on the labelled cases in ``data_dir``.

    With ``folds=K``: K models, each trained without one fold and scored on it (``fold<i>/``,
    ``folds.csv``), then the final model on every case in ``output_dir``. ``label_pattern``: a glob
    naming each case's label file instead of ``*-seg`` / ``*_seg`` (e.g. pseudo-labels from another
    algorithm).
    """
    from .evaluation import write_metrics_csv, write_results
    from .realdata import (check_fold_count, evaluate_model, find_labelled_cases, institution_folds,
                           load_labelled_cases, patient)

    deadline = time.monotonic() + time_limit_s if time_limit_s else None

    def remaining():
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    case_names = [c.name for c in find_labelled_cases(data_dir, label_pattern)]  # a bad folder is reported first
    if folds:
        check_fold_count(len({patient(n) for n in case_names}), int(folds))  # too few: say so before loading
    config = finetune_config(base_model, steps, lr, engine_fraction, device, seed, overrides)
    if folds:
        check_not_learned(config.init_weights, case_names, print)
    cases = load_labelled_cases(data_dir, [config.spacing_mm] * 3, MODALITIES, config.clip_percentiles,
                                bias_correction=config.bias_correction, label_pattern=label_pattern)
    output_dir = Path(output_dir)
    if folds:
        # the folds of `brainunet cv`: by institution, then tumour size
        splits = institution_folds([c.name for c in cases], [c.wt_volume_ml for c in cases], int(folds))
        summary = []
        for i, held in enumerate(splits):
            held_cases = [cases[j] for j in held]
            train_cases = [c for j, c in enumerate(cases) if j not in held]
            fold_dir = output_dir / f"fold{i}"
            fold_config = TrainConfig(**{**config.to_dict(), "name": f"{config.name}-fold{i}"})
            result = train(fold_config, fold_dir, resume, progress, data=train_cases, validation_data=held_cases,
                           time_limit_s=remaining())
            if not result.finished:
                return result
            if int(os.environ.get("RANK", "0")) != 0:
                continue  # under torchrun rank 0 alone scores the folds and writes
            check_held_out(result.weights, [c.name for c in held_cases])
            rows = evaluate_model(result.weights, [c.path for c in held_cases], device=_eval_device(device),
                                  label_pattern=label_pattern)
            mean = write_results(rows, fold_dir / "heldout.csv")
            summary.append({"fold": i, "cases": ";".join(c.name for c in held_cases), "n": len(held_cases),
                            **{k: mean[k] for k in FOLD_FIELDS[3:]}})
    if folds and summary:
        overall = {"fold": "mean", "cases": "", "n": len(cases),
                   **{k: float(np.mean([s[k] for s in summary])) for k in FOLD_FIELDS[3:]}}
        write_metrics_csv([*summary, overall], output_dir / "folds.csv", FOLD_FIELDS)
    return train(config, output_dir, resume, progress, data=cases, time_limit_s=remaining())


def _eval_device(device: str) -> str:
    from brainunet.inference import resolve_device

    return resolve_device(device)
