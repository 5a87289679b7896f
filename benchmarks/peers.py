"""BrainUNet next to its peers on one case, on CPU, in the same run.

Contenders (each one a fresh child process, so that wall time includes imports and model loading and the
peak resident memory is its own, workers included):

* **BrainUNet**: the whole pipeline through its command line (``python -m brainunet segment``).
* **nnU-Net v2**: its own predictor (``nnUNetPredictor.predict_from_files``, file in / file out) with the
  ``3d_fullres`` configuration that nnU-Net's default planner (``ExperimentPlanner``, PlainConvUNet) makes for
  a BraTS-like dataset: four channels (T1, T1CE, T2, FLAIR), BraTS regions as in nnU-Net's own BraTS 2021
  conversion, random weights (timing does not depend on them). The dataset that is planned is fake but has
  the geometry of the benchmarked case (size, spacing, nonzero box), so the plans (patch size, network depth
  and width, number of sliding windows) are those nnU-Net would make for that data.
  Measured: 1 fold without and with mirroring; 5 folds are measured with ``--five-folds``, otherwise
  extrapolated from the 1-fold run (5 x the network part + the rest once).
* **MONAI SegResNet** as in MONAI's BraTS bundle (4.7 M parameters, random weights) with
  ``sliding_window_inference``: (a) one window over the whole volume (240 x 240 x 160 for BraTS), (b) 128^3
  windows with overlap 0.5. End to end: load NIfTI, normalise, infer, threshold, save NIfTI.

Usage::

    python benchmarks/peers.py                    # real dev case, 3 repeats, 1 mirrored nnU-Net run
    python benchmarks/peers.py --repeats 1 --skip-mirroring
    python benchmarks/peers.py --five-folds       # also measure the 5-fold ensemble (slow)
    python benchmarks/peers.py --smoke            # tiny synthetic case, every contender once

The nnU-Net fake dataset, its plans and the random checkpoints are cached under
``~/.cache/brainunet-bench/nnunet/<geometry key>/`` (``--nnunet-cache``), outside the repository.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Light imports only at module level: nnU-Net spawns workers that re-import this file as __mp_main__.
from common import base_parser, case_files, child_report, child_setup, md_table, measure, resolve_case, save

NNUNET_DATASET_ID = 990
NNUNET_DATASET_NAME = f"Dataset{NNUNET_DATASET_ID:03d}_BraTSLikeBench"
NNUNET_CONFIGURATION = "3d_fullres"
NNUNET_TRAINER = "nnUNetTrainer"
NNUNET_FOLDS = (0, 1, 2, 3, 4)
NNUNET_FAKE_CASES = 5
# nnU-Net's channel order for BraTS (Dataset137_BraTS2021) and the case-file keys that fill it.
NNUNET_CHANNELS = {"T1": "t1n", "T1CE": "t1c", "T2": "t2w", "FLAIR": "t2f"}
# BraTS as nnU-Net trains it: overlapping regions (sigmoid outputs), not mutually exclusive labels.
NNUNET_BRATS_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
MONAI_SEGRESNET = dict(blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), init_filters=16, in_channels=4,
                       out_channels=3, dropout_prob=0.2)
SEGRESNET_DIVISOR = 8  # three down-samplings: every input side must be a multiple of 2**3


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "brainunet-bench" / "nnunet"


def parse_args(argv=None):
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--mirror-repeats", type=int, default=1,
                   help="timed runs of nnU-Net with mirroring test-time augmentation (about 6x slower)")
    p.add_argument("--skip-mirroring", action="store_true", help="do not run nnU-Net with mirroring")
    p.add_argument("--five-folds", action="store_true",
                   help="measure nnU-Net's 5-fold ensemble (no mirroring, --repeats runs of ~5x the 1-fold "
                        "time) instead of extrapolating it")
    p.add_argument("--nnunet-cache", type=Path, default=default_cache(),
                   help="folder for the fake nnU-Net dataset, its plans and random checkpoints (reused)")
    p.add_argument("--nnunet-single-process", action="store_true",
                   help="nnU-Net's single-process predict_from_files_sequential instead of predict_from_files "
                        "(nnUNetv2_predict's path, with a preprocessing and an export worker process)")
    p.add_argument("--monai-window", type=int, default=128,
                   help="side of MONAI's cubic sliding windows (the bundle's 128; --smoke uses 64)")
    # Internal: the measured children.
    p.add_argument("--child", choices=("nnunet", "monai"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--folds", default="0", help=argparse.SUPPRESS)
    p.add_argument("--mirroring", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--single-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--roi", default=None, help=argparse.SUPPRESS)
    p.add_argument("--overlap", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def channel_files(files: dict[str, Path]) -> list[Path]:
    """The case's four inputs in nnU-Net's BraTS order; T1CE stands in for a missing native T1."""
    return [files.get(key) or files["t1c"] for key in NNUNET_CHANNELS.values()]


def nnunet_env(root: Path) -> dict[str, str]:
    return {"nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
            "nnUNet_results": str(root / "nnUNet_results")}


# ----------------------------------------------------------------------------------------------- nnU-Net setup

def case_geometry(inputs: list[Path]) -> dict:
    """Grid and nonzero box of the case: all that nnU-Net's planner looks at besides intensities."""
    import nibabel as nib
    import numpy as np

    first = nib.load(str(inputs[0]))
    nonzero = np.zeros(first.shape, bool)
    for path in inputs:
        nonzero |= np.asarray(nib.load(str(path)).dataobj) != 0
    index = np.nonzero(nonzero)
    return {"shape": [int(s) for s in first.shape],
            "spacing": [round(float(z), 4) for z in first.header.get_zooms()[:3]],
            "affine": first.affine.tolist(),
            "box_lo": [int(i.min()) for i in index], "box_hi": [int(i.max()) for i in index]}


def geometry_key(geometry: dict) -> str:
    from importlib.metadata import version  # nnU-Net's version is in the key: plans change between releases

    def joined(values):
        return "x".join(f"{v:g}" for v in values)

    crop = [hi - lo + 1 for lo, hi in zip(geometry["box_lo"], geometry["box_hi"])]
    return (f"{joined(geometry['shape'])}_{joined(geometry['spacing'])}mm_crop{joined(crop)}"
            f"_n{NNUNET_FAKE_CASES}_nnunetv2-{version('nnunetv2')}")


def write_fake_dataset(raw: Path, geometry: dict):
    """nnU-Net raw dataset of BraTS-like cases: an ellipsoid 'brain' filling the case's nonzero box (so
    nnU-Net crops exactly as it would the real case) with noise intensities and a nested tumour."""
    import nibabel as nib
    import numpy as np

    shape, affine = geometry["shape"], np.asarray(geometry["affine"])
    lo, hi = np.asarray(geometry["box_lo"], float), np.asarray(geometry["box_hi"], float)
    centre, radii = (lo + hi) / 2, (hi - lo) / 2 + 0.5
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    brain_distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    brain = brain_distance <= 1
    tumour_radius = 0.2 * radii.min()
    tumour_distance = np.sqrt(sum((g - c - 0.3 * r) ** 2 for g, c, r in zip(grid, centre, radii))) / tumour_radius
    labels = np.zeros(shape, np.uint8)
    for value, extent in ((1, 1.0), (2, 0.6), (3, 0.35)):
        labels[(tumour_distance <= extent) & brain] = value
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in range(NNUNET_FAKE_CASES):
        rng = np.random.default_rng(case)
        name = f"BraTSLike_{case:03d}"
        for channel in range(len(NNUNET_CHANNELS)):
            image = np.zeros(shape, np.int16)
            # >= 1 inside the brain: nnU-Net's crop and normalisation mask is "any channel nonzero"
            image[brain] = np.clip(rng.normal(300 + 100 * channel, 60, int(brain.sum())), 1, None)
            image[labels > 0] += 200
            nib.save(nib.Nifti1Image(image, affine), str(raw / "imagesTr" / f"{name}_{channel:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(raw / "labelsTr" / f"{name}.nii.gz"))
    dataset_json = {"channel_names": {str(i): name for i, name in enumerate(NNUNET_CHANNELS)},
                    "labels": NNUNET_BRATS_LABELS, "regions_class_order": [1, 2, 3],
                    "numTraining": NNUNET_FAKE_CASES, "file_ending": ".nii.gz",
                    "name": "BraTS-like fake data for the BrainUNet peers benchmark (geometry only)"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


def prepare_nnunet_model(inputs: list[Path], cache: Path, threads: int) -> dict:
    """Plan nnU-Net on a fake dataset shaped like the case and write a 5-fold model folder with random
    weights in nnUNetTrainer's checkpoint format; cached per case geometry. Returns the model summary."""
    geometry = case_geometry(inputs)
    root = Path(cache) / geometry_key(geometry)
    summary_file = root / "model.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if all((Path(summary["model_dir"]) / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in NNUNET_FOLDS):
            print(f"nnU-Net model (cached): {summary['model_dir']}", flush=True)
            return summary
    if root.exists():
        shutil.rmtree(root)
    env = nnunet_env(root)
    os.environ.update(env)  # nnunetv2.paths reads these at import time
    print(f"Planning nnU-Net for {geometry_key(geometry)} in {root} ...", flush=True)
    t0 = time.perf_counter()
    write_fake_dataset(Path(env["nnUNet_raw"]) / NNUNET_DATASET_NAME, geometry)

    import torch
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(root / "planning.log", "w") as log, contextlib.redirect_stdout(log):
        extract_fingerprint_dataset(NNUNET_DATASET_ID, num_processes=threads, check_dataset_integrity=True,
                                    clean=True, verbose=False, show_progress_bar=False)
        plans, plans_identifier = plan_experiment_dataset(NNUNET_DATASET_ID, ExperimentPlanner)

    dataset_json = json.loads((Path(env["nnUNet_raw"]) / NNUNET_DATASET_NAME / "dataset.json").read_text())
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(NNUNET_CONFIGURATION)
    model_dir = (Path(env["nnUNet_results"]) / NNUNET_DATASET_NAME
                 / f"{NNUNET_TRAINER}__{plans_identifier}__{NNUNET_CONFIGURATION}")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    num_inputs = determine_num_input_channels(plans_manager, configuration, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    for fold in NNUNET_FOLDS:
        torch.manual_seed(fold)
        # The trainer's own builder (deep supervision on, as in training): the checkpoint is what
        # nnUNetTrainer.save_checkpoint would write after training, minus the optimiser state.
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, num_inputs, num_outputs,
                                                           enable_deep_supervision=True)
        checkpoint = {"network_weights": network.state_dict(),
                      "init_args": {"plans": plans, "configuration": NNUNET_CONFIGURATION, "fold": fold,
                                    "dataset_json": dataset_json, "device": "cpu"},
                      "trainer_name": NNUNET_TRAINER,
                      "inference_allowed_mirroring_axes": (0, 1, 2),  # nnUNetTrainer's choice for 3D data
                      "current_epoch": 0}
        (model_dir / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, model_dir / f"fold_{fold}" / "checkpoint_final.pth")
    inference_network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, num_inputs,
                                                                 num_outputs, enable_deep_supervision=False)
    parameters = sum(p.numel() for p in inference_network.parameters())
    summary = {"model_dir": str(model_dir), "planner": ExperimentPlanner.__name__,
               "plans_identifier": plans_identifier, "configuration": NNUNET_CONFIGURATION,
               "trainer": NNUNET_TRAINER, "network_class": configuration.network_arch_class_name,
               "features_per_stage": configuration.network_arch_init_kwargs.get("features_per_stage"),
               "patch_size": list(configuration.patch_size), "spacing": list(configuration.spacing),
               "median_image_size_in_voxels": list(configuration.median_image_size_in_voxels),
               "use_mask_for_norm": list(configuration.use_mask_for_norm),
               "parameters": parameters, "weights_bytes_per_fold": 4 * parameters,
               "geometry": {k: v for k, v in geometry.items() if k != "affine"}, "env": env,
               "planning_s": round(time.perf_counter() - t0, 1)}
    summary_file.write_text(json.dumps(summary, indent=2))
    print(f"nnU-Net planned in {summary['planning_s']} s: patch {summary['patch_size']}, "
          f"{parameters / 1e6:.1f} M parameters", flush=True)
    return summary


# ------------------------------------------------------------------------------------------- measured children

def child_nnunet(args):
    """nnU-Net v2's file-in/file-out prediction of the case with the given folds: as nnUNetv2_predict does it
    (with one preprocessing and one export worker process), or all in this process (--single-process)."""
    t0 = time.perf_counter()
    child_setup()
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    t_import = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(args.mirroring),
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    folds = tuple(int(f) for f in args.folds.split(","))
    predictor.initialize_from_trained_model_folder(str(args.model_dir), use_folds=folds,
                                                   checkpoint_name="checkpoint_final.pth")
    t_init = time.perf_counter()

    # Time the network part (all folds' sliding windows) apart from preprocessing and export.
    network_part = {}
    predict_logits = predictor.predict_logits_from_preprocessed_data

    def timed_predict_logits(data):
        start = time.perf_counter()
        logits = predict_logits(data)
        network_part["inference_s"] = time.perf_counter() - start
        network_part["preprocessed_shape"] = list(data.shape[1:])
        return logits

    predictor.predict_logits_from_preprocessed_data = timed_predict_logits
    inputs = [str(p) for p in channel_files(case_files(args.case))]
    if args.single_process:
        predictor.predict_from_files_sequential([inputs], [str(args.out / "pred")], save_probabilities=False,
                                                overwrite=True)
    else:
        predictor.predict_from_files([inputs], [str(args.out / "pred")], save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
    t_done = time.perf_counter()
    if not (args.out / "pred.nii.gz").is_file():
        raise SystemExit("nnU-Net wrote no prediction")
    patch = predictor.configuration_manager.patch_size
    padded = [max(s, p) for s, p in zip(network_part["preprocessed_shape"], patch)]  # nnU-Net pads up to a patch
    steps = compute_steps_for_sliding_window(padded, patch, predictor.tile_step_size)
    child_report({"import_s": t_import - t0, "init_s": t_init - t_import, "predict_s": t_done - t_init,
                  "inference_s": network_part["inference_s"], "windows": math.prod(map(len, steps)),
                  "folds": len(folds),
                  "preprocessed_shape": network_part["preprocessed_shape"],
                  "parameters": sum(p.numel() for p in predictor.network.parameters()),
                  "torch_threads": torch.get_num_threads()})


def child_monai(args):
    """MONAI's BraTS-bundle SegResNet with random weights, end to end from NIfTI to NIfTI."""
    t0 = time.perf_counter()
    child_setup()
    import nibabel as nib
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet
    from monai.transforms import NormalizeIntensity

    t_import = time.perf_counter()
    torch.manual_seed(0)
    model = SegResNet(**MONAI_SEGRESNET).eval()
    t_init = time.perf_counter()
    images = [nib.load(str(p)) for p in channel_files(case_files(args.case))]
    volume = torch.from_numpy(np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in images]))
    volume = NormalizeIntensity(nonzero=True, channel_wise=True)(volume)
    t_loaded = time.perf_counter()
    roi = tuple(int(s) for s in args.roi.split("x"))
    with torch.inference_mode():
        logits = sliding_window_inference(volume[None], roi_size=roi, sw_batch_size=1, predictor=model,
                                          overlap=args.overlap)
    t_inferred = time.perf_counter()
    tumour_core, whole_tumour, enhancing = (torch.sigmoid(logits[0]) > 0.5).numpy()  # the bundle's TC, WT, ET
    labels = np.zeros(volume.shape[1:], np.uint8)  # BraTS 2023 labels: 1 NETC, 2 SNFH, 3 ET
    labels[whole_tumour] = 2
    labels[tumour_core] = 1
    labels[enhancing] = 3
    nib.save(nib.Nifti1Image(labels, images[1].affine), str(args.out / "pred.nii.gz"))  # on T1CE's grid
    t_done = time.perf_counter()
    child_report({"import_s": t_import - t0, "init_s": t_init - t_import, "load_s": t_loaded - t_init,
                  "inference_s": t_inferred - t_loaded, "save_s": t_done - t_inferred,
                  "parameters": sum(p.numel() for p in model.parameters()), "roi": list(roi),
                  "torch_threads": torch.get_num_threads()})


# ------------------------------------------------------------------------------------------------ orchestration

def brainunet_model() -> tuple[str, int | None]:
    """Name and parameter count of the model the CLI picks by default (as the measured runs see it)."""
    from brainunet import weights

    entry = weights.default_model()
    if entry.kind != "network":
        return entry.name, None
    model, _ = weights.load_weights(weights.ensure_weights(entry))
    return entry.name, sum(p.numel() for p in model.parameters())


def whole_volume_roi(shape) -> tuple[int, ...]:
    """The smallest SegResNet-compatible window covering the volume (240 x 240 x 160 for BraTS)."""
    return tuple(-(-s // SEGRESNET_DIVISOR) * SEGRESNET_DIVISOR for s in shape)


def summarize(runs: list[dict]) -> dict:
    """Medians of wall time, peak RSS and the numeric child timings, like common.repeat."""
    out = {"runs": runs, "wall_s": statistics.median(r["wall_s"] for r in runs),
           "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
           "peak_main_rss_gb": statistics.median(r["peak_main_rss_gb"] for r in runs)}
    for key in sorted(set().union(*(r["child"] for r in runs))):
        values = [r["child"][key] for r in runs if isinstance(r["child"].get(key), (int, float))]
        if values:
            out[key] = statistics.median(values)
    return out


def extrapolate_folds(one_fold: dict, folds: int, weights_bytes: int) -> dict:
    """A ``folds``-fold ensemble from a 1-fold run: the network part ``folds`` times, the rest (start-up,
    preprocessing, export) once; memory grows by the extra folds' weights, which the predictor keeps."""
    return {"wall_s": one_fold["wall_s"] + (folds - 1) * one_fold["inference_s"],
            "peak_rss_gb": one_fold["peak_rss_gb"] + (folds - 1) * weights_bytes / 1e9,
            "peak_main_rss_gb": one_fold["peak_main_rss_gb"] + (folds - 1) * weights_bytes / 1e9,
            "inference_s": folds * one_fold["inference_s"], "extrapolated_from": "1 fold, same mirroring"}


@dataclass
class Contender:
    key: str
    label: str
    argv: list[str]  # without the output argument, which is a fresh folder per run
    parameters: int | None  # None: the child reports it
    timed_runs: int
    runs: list[dict] = field(default_factory=list)

    def output_args(self, folder: Path) -> list[str]:
        return ["--output", str(folder / "pred.nii.gz")] if self.key.startswith("brainunet") else ["--out", str(folder)]


def contenders_for(args, case: Path, files: dict[str, Path], nnunet_model: dict) -> list[Contender]:
    import nibabel as nib

    brainunet_name, brainunet_parameters = brainunet_model()
    whole_roi = "x".join(map(str, whole_volume_roi(nib.load(str(files["t1c"])).shape)))
    window_roi = "x".join([str(args.monai_window)] * 3)
    script = [sys.executable, str(Path(__file__).resolve())]
    nnunet = script + ["--child", "nnunet", "--case", str(case), "--model-dir", nnunet_model["model_dir"]]
    if args.nnunet_single_process:
        nnunet.append("--single-process")
    monai = script + ["--child", "monai", "--case", str(case)]
    nnunet_label, nnunet_parameters = f"nnU-Net v2 {NNUNET_CONFIGURATION}", nnunet_model["parameters"]
    all_folds = ",".join(map(str, NNUNET_FOLDS))
    brainunet = [sys.executable, "-m", "brainunet", "segment", "--t1c", str(files["t1c"]), "--t2w", str(files["t2w"]),
                 "--t2f", str(files["t2f"]), "--progress", "none", "--threads", str(args.threads)]
    return [
        Contender("brainunet", f"BrainUNet CLI ({brainunet_name}, precision auto)", brainunet,
                  brainunet_parameters, args.repeats),
        # what a CPU without native bf16 runs (auto picks bf16 only where the CPU has it)
        Contender("brainunet_fp32", f"BrainUNet CLI ({brainunet_name}, --precision fp32)",
                  brainunet + ["--precision", "fp32"], brainunet_parameters, args.repeats),
        Contender("nnunet_1fold", f"{nnunet_label}, 1 fold, no mirroring",
                  nnunet + ["--folds", "0", "--mirroring", "0"], nnunet_parameters, args.repeats),
        Contender("nnunet_1fold_mirroring", f"{nnunet_label}, 1 fold, mirroring (8 passes)",
                  nnunet + ["--folds", "0", "--mirroring", "1"], nnunet_parameters,
                  0 if args.skip_mirroring else args.mirror_repeats),
        Contender("nnunet_5folds", f"{nnunet_label}, 5 folds, no mirroring",
                  nnunet + ["--folds", all_folds, "--mirroring", "0"], nnunet_parameters,
                  args.repeats if args.five_folds else 0),
        Contender("monai_whole", f"MONAI SegResNet, one {whole_roi} window", monai + ["--roi", whole_roi],
                  None, args.repeats),
        Contender("monai_windows", f"MONAI SegResNet, {window_roi} windows, overlap 0.5",
                  monai + ["--roi", window_roi, "--overlap", "0.5"], None, args.repeats),
    ]


def run_interleaved(contenders: list[Contender], threads: int, env_extra: dict):
    """Round r runs every contender that still wants a run, so that drifting machine load hits all alike."""
    for round_index in range(max(c.timed_runs for c in contenders)):
        for contender in contenders:
            if round_index >= contender.timed_runs:
                continue
            folder = Path(tempfile.mkdtemp(prefix=f"brainunet-peers-{contender.key}-"))
            print(f"[round {round_index + 1}] {contender.label} ...", flush=True)
            try:
                result = measure(contender.argv + contender.output_args(folder), threads, env_extra=env_extra)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"    {result['wall_s']:.1f} s, {result['peak_rss_gb']:.2f} GB", flush=True)
            contender.runs.append(result)


def results_table(results: dict[str, dict]) -> str:
    reference_wall = results["brainunet"]["wall_s"]
    rows = []
    for r in results.values():
        extrapolated = "extrapolated_from" in r
        rows.append([r["label"] + (" (extrapolated)" if extrapolated else ""),
                     f"{r['parameters'] / 1e6:.1f}" if r["parameters"] else "-",
                     r["wall_s"], r["peak_main_rss_gb"], r["peak_rss_gb"],
                     "extrapolated" if extrapolated else len(r["runs"]), f"{r['wall_s'] / reference_wall:.1f}x"])
    return md_table(["contender", "parameters (M)", "wall s (median)", "peak RSS GB, main process",
                     "peak RSS GB, all processes", "runs", "ratio to BrainUNet"], rows)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return {"nnunet": child_nnunet, "monai": child_monai}[args.child](args)
    if args.smoke:  # only checks that everything runs: once each, the slow variants off; the smoke case
        # is at 2 mm, so 64-voxel windows cover the same 128 mm as the bundle's 128-voxel windows at 1 mm
        args.repeats, args.skip_mirroring, args.five_folds, args.monai_window = 1, True, False, 64

    case = resolve_case(args)
    files = case_files(case)
    nnunet_model = prepare_nnunet_model(channel_files(files), args.nnunet_cache, args.threads)
    contenders = contenders_for(args, case, files, nnunet_model)
    run_interleaved(contenders, args.threads, env_extra=nnunet_model["env"])

    results = {}
    for c in contenders:
        if c.runs:
            measured = summarize(c.runs)
            results[c.key] = {"label": c.label, "parameters": c.parameters or measured.get("parameters"), **measured}
    weights_bytes = nnunet_model["weights_bytes_per_fold"]
    for one_fold, five_folds, mirroring in (("nnunet_1fold", "nnunet_5folds", "no mirroring"),
                                            ("nnunet_1fold_mirroring", "nnunet_5folds_mirroring", "mirroring")):
        if one_fold in results and five_folds not in results:
            label = f"nnU-Net v2 {NNUNET_CONFIGURATION}, 5 folds, {mirroring}"
            results[five_folds] = {"label": label, "parameters": nnunet_model["parameters"],
                                   **extrapolate_folds(results[one_fold], len(NNUNET_FOLDS), weights_bytes)}
    order = ("brainunet", "brainunet_fp32", "nnunet_1fold", "nnunet_1fold_mirroring", "nnunet_5folds", "nnunet_5folds_mirroring",
             "monai_whole", "monai_windows")
    results = {key: results[key] for key in order if key in results}

    nnunet_path = ("predict_from_files_sequential (one process)" if args.nnunet_single_process else
                   "predict_from_files with 1 preprocessing and 1 export worker process")
    shape = "x".join(map(str, nnunet_model["geometry"]["shape"]))
    table = results_table(results) + (
        f"\n\nCase {case.name}, {shape} voxels, CPU, {args.threads} threads, contenders interleaved per repeat. "
        f"nnU-Net: {nnunet_model['planner']} plans, {nnunet_model['network_class'].rsplit('.', 1)[-1]}, patch "
        f"{'x'.join(map(str, nnunet_model['patch_size']))}, {results['nnunet_1fold']['windows']:.0f} sliding "
        f"window(s) over the case, random weights, {nnunet_path}; extrapolated 5-fold rows: 5x the measured "
        "network part + the rest once. MONAI: BraTS-bundle SegResNet, random weights.")
    payload = {"case": str(case), "threads": args.threads, "repeats": args.repeats, "nnunet_path": nnunet_path,
               "nnunet_model": nnunet_model, "contenders": results}
    save("peers", args, payload, table)


if __name__ == "__main__":
    main()
