"""The whole job: input files -> label map on the T1CE grid (+ .seg.nrrd, statistics CSV, PNG overlay).

Used by the command line, by the Slicer module's background process and by the tests.
"""
from __future__ import annotations

import logging
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .imageio import MODALITY_NAMES, Volume, load_volume, save_label_nifti
from .protocol import LEFT_OUT_NOTE
from .outputs import SEG_NRRD_FIELD, SIGNATURE, OutputSet, check_outputs, label_mark
from .labels import SUBREGIONS
from .settings import ModelSettings
from . import plausibility
from . import weights as weights_mod

log = logging.getLogger(__name__)

REQUIRED_MODALITIES = ("t1c", "t2w", "t2f")


@dataclass
class LoadedModel:
    entry_name: str
    kind: str  # "network" or "baseline"
    settings: ModelSettings
    network: object | None = None  # torch module for kind == "network"
    description: str = ""

    @property
    def preprocessing(self):
        return self.settings.preprocessing

    @property
    def postprocessing(self):
        return self.settings.postprocessing

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.settings.preprocessing.modalities


def load_model(model: str | Path | None = None, device: str = "cpu", progress=None) -> LoadedModel:
    """``model``: None ($BRAINUNET_MODEL, else the model registered last, else the bundled one), a registry
    name, or a path to a weights file."""
    resolved = weights_mod.resolve_model(model, progress=progress)
    if resolved.kind == "baseline":
        return LoadedModel(resolved.name, "baseline", ModelSettings(), None, resolved.description)
    net, payload = weights_mod.load_weights(resolved.path, resolved.sha256, device=device)
    # the registry entry's settings (e.g. bias_correction) override those stored with the weights
    settings = ModelSettings.from_stored(payload, resolved.settings, source=f"model '{resolved.name}'")
    name = payload.get("name", resolved.name) if resolved.from_file else resolved.name
    return LoadedModel(name, "network", settings, net, resolved.description)


@dataclass
class SegmentationResult:
    labels: np.ndarray  # reference voxel order, BraTS 2023 values
    reference: Volume
    aligned: dict[str, np.ndarray]  # raw intensities on the reference grid
    statistics: list[dict]
    model_name: str
    timings: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was done to the input ("brain extracted ...")


def load_inputs(paths: dict[str, str | Path | None], notes: list | None = None) -> dict[str, Volume]:
    """Load the given images. Two of T1CE, T2W and FLAIR are the least any model can use; whether
    the model at hand copes with one missing is checked by ``check_modalities``. With ``notes``, an
    unreadable native T1 (statistics only) is left out with a note there instead of stopping the run."""
    missing = [MODALITY_NAMES[m] for m in REQUIRED_MODALITIES if not paths.get(m)]
    if len(missing) > 1:
        raise InputError(f"Missing input: {', '.join(missing)}. BrainUNet needs T1CE, T2W and FLAIR "
                         "(models trained with modality dropout can do without one of them).")
    volumes = {}
    for m, p in paths.items():
        if not p:
            continue
        try:
            volumes[m] = load_volume(p, MODALITY_NAMES.get(m, m))
        except InputError as exc:
            if notes is None or m in REQUIRED_MODALITIES:
                raise
            notes.append(f"{MODALITY_NAMES.get(m, m)} {LEFT_OUT_NOTE}: {exc}")
    return volumes


def check_modalities(volumes: dict, model: LoadedModel) -> list[str]:
    """The model's modalities that are missing (allowed only for a model trained with modality
    dropout, one at most); raises InputError otherwise."""
    missing = [m for m in model.modalities if m not in volumes]
    if not missing:
        return []
    names = ", ".join(MODALITY_NAMES.get(m, m) for m in missing)
    if not model.preprocessing.modality_dropout or len(missing) > 1:
        needs = ", ".join(MODALITY_NAMES.get(m, m) for m in model.modalities)
        raise InputError(f"Missing input: {names}. The model '{model.entry_name}' needs {needs}.")
    return missing


def reference_key(volumes: dict) -> str:
    """The grid the output lives on: T1CE when present, else FLAIR, else T2W."""
    return next(k for k in ("t1c", "t2f", "t2w") + tuple(volumes) if k in volumes)


def extract_brain_if_needed(aligned: dict[str, np.ndarray], reference: Volume, ref_key: str,
                            notes: list) -> np.ndarray | None:
    """Zero everything outside the brain (in place) when the reference sequence still holds the head;
    returns the brain mask (None when the image held no more than the brain)."""
    from .brainmask import check_and_extract

    extraction = check_and_extract(aligned[ref_key], reference.affine, reference.spacing)
    if not extraction.needed:
        return None
    for key in aligned:
        aligned[key] = np.where(extraction.mask, aligned[key], 0).astype(np.float32)
    notes.append(f"brain extracted (deepbet): {extraction.brain_ml:.0f} mL of brain kept from a "
                 f"{extraction.head_ml:.0f} mL head, because {extraction.reason}")
    return extraction.mask


def register_same_grid_sequences_that_moved(volumes: dict, aligned: dict, ref_key: str, brain, notes: list,
                                            before_registering=None) -> dict:
    """Sequences stored on the reference's grid are taken as lined up, but a patient who moved between two
    series of one planning (a native T1 and the T1CE after contrast) leaves them apart: one that shares
    less anatomy with the reference than one head's sequences do is registered (on its stored voxels, then
    masked like the rest). Returns each sequence's shared information, measured again where one moved.
    A required sequence whose match is refused keeps its place: the warning of ``patient_warnings`` says
    it may be another patient's. ``before_registering(key)`` hears of each registration (seconds each)."""
    from .preprocessing import same_grid
    from .registration import register_if_it_moved

    reference = volumes[ref_key]
    information = plausibility.shared_information(aligned, ref_key, reference.spacing)
    for key, shared in list(information.items()):
        if shared >= plausibility.SAME_PATIENT_MIN_INFORMATION or key not in volumes \
                or not same_grid(volumes[key], reference.data.shape, reference.affine):
            continue
        stored, said = aligned[key], list(notes)
        if before_registering:
            before_registering(key)
        if not register_if_it_moved(volumes, aligned, key, ref_key, notes):
            continue
        if brain is not None:
            aligned[key] = np.where(brain, aligned[key], 0).astype(np.float32)
        after = plausibility.shared_information({ref_key: aligned[ref_key], key: aligned[key]}, ref_key,
                                                reference.spacing).get(key, 0.0)
        if after < plausibility.SAME_PATIENT_MIN_INFORMATION:
            # moved, it still does not share one head's anatomy: not the patient moving, another patient
            aligned[key] = stored
            notes[:] = said
        else:
            information[key] = after
    return information


def optional_inputs(volumes: dict, model: LoadedModel) -> list[str]:
    """Sequences the network does not read (the native T1 feeds the statistics only): one that cannot be
    used is left out with a note (``leave_out``) and never stops the segmentation."""
    return [k for k in volumes if k not in model.modalities and k != reference_key(volumes)]


def leave_out(key: str, reason, notes: list, aligned: dict | None = None) -> None:
    """Drop an optional sequence (``optional_inputs``) and say why; a note that it was registered goes too."""
    name = MODALITY_NAMES.get(key, key)
    if aligned is not None:
        aligned.pop(key, None)
    notes[:] = [n for n in notes if not n.startswith(f"{name} registered to")]
    notes.append(f"{name} {LEFT_OUT_NOTE}: {reason}")


def prepare_inputs(volumes: dict[str, Volume], model: LoadedModel, allow_missing: bool = False,
                   notes: list | None = None, report=None):
    """(raw intensities on the reference grid, the network's input) as the model's settings say: sequences
    that moved are registered to the reference (rigid, mutual information), the brain is extracted when
    the image is not skull-stripped (detected from the image); what was done is appended to ``notes``.
    ``report(fraction of this stage, message)`` hears of each step (on a raw scan they take tens of seconds)."""
    from . import preprocessing
    from .registration import check_full_series, register_to_reference

    report = report or (lambda fraction, message: None)
    ref_key = reference_key(volumes)
    notes = notes if notes is not None else []
    reference = volumes[ref_key]
    extra = optional_inputs(volumes, model)
    for key in [k for k in volumes if k not in extra]:  # the ones that move are checked again before registering
        check_full_series(MODALITY_NAMES.get(key, key), volumes[key].data.shape)
    aligned = preprocessing.align_to_reference({k: v for k, v in volumes.items() if k not in extra}, ref_key)
    for key in extra:
        try:
            aligned[key] = preprocessing.resample_to_grid(volumes[key], reference.data.shape, reference.affine)
        except InputError as exc:
            leave_out(key, exc, notes)
    report(0.1, f"Registering to {MODALITY_NAMES.get(ref_key, ref_key)} what moved")
    register_to_reference({k: volumes[k] for k in aligned}, aligned, ref_key, notes, optional=extra,
                          on_optional_failure=lambda key, exc: leave_out(key, exc, notes, aligned))
    report(0.5, "Removing the skull, if there")
    brain = extract_brain_if_needed(aligned, reference, ref_key, notes)
    report(0.7, "Checking the sequences")
    information = register_same_grid_sequences_that_moved(
        volumes, aligned, ref_key, brain, notes,
        before_registering=lambda key: report(0.8, f"Registering {MODALITY_NAMES.get(key, key)}, which moved"))
    notes += plausibility.coverage_notes({k: v for k, v in aligned.items() if k not in extra}, ref_key)
    for key in [k for k in extra if k in aligned]:
        try:
            notes += plausibility.coverage_notes({ref_key: aligned[ref_key], key: aligned[key]}, ref_key)
        except InputError as exc:
            leave_out(key, exc, notes, aligned)
            information.pop(key, None)
    notes += plausibility.contrast_warnings(aligned)
    notes += plausibility.patient_warnings(aligned, ref_key, reference.spacing, information)
    pp = model.preprocessing
    prepared = preprocessing.prepare(aligned, volumes[ref_key], model.modalities, pp.spacing_mm,
                                     pp.clip_percentiles, allow_missing=allow_missing,
                                     bias_correction=pp.bias_correction)
    return aligned, prepared


def segment(volumes: dict[str, Volume], model: LoadedModel, device: str = "cpu", tta: bool = False,
            progress=None, should_cancel=None, precision: str | None = None,
            notes: list[str] | None = None) -> SegmentationResult:
    """``notes``: what was already said about the inputs (e.g. by ``load_inputs``), kept first."""
    from . import postprocess, statistics
    from .errors import Cancelled

    def report(fraction, message):
        if progress:
            progress(float(fraction), message)
        if should_cancel and should_cancel():
            raise Cancelled()

    timings = {}
    t0 = time.perf_counter()
    notes: list[str] = list(notes or [])
    volumes = dict(volumes)
    extra = optional_inputs(volumes, model)
    plausibility.check_images({k: v for k, v in volumes.items() if k not in extra})
    for key in extra:
        try:
            plausibility.check_images(volumes)  # the others passed: any refusal now is this one's
        except InputError as exc:
            del volumes[key]
            leave_out(key, exc, notes)
    missing = check_modalities(volumes, model)
    ref_key = reference_key(volumes)
    if missing:
        names = ", ".join(MODALITY_NAMES.get(m, m) for m in missing)
        # a note, not only a log line: it stays with the statistics (table, CSV) the result is read from
        if "t1c" in missing:  # cross-validated ET Dice without T1CE is below 0.1 (MODEL_CARD.md): a guess
            notes.append(f"{names} missing: segmented without it. Without contrast, the enhancing tumour (ET) and the "
                         "tumour core (ET + NETC) cannot be told apart: their segments and volumes are not reliable; "
                         "read the whole tumour (WT) only.")
        else:
            notes.append(f"{names} missing: segmented without it, with lower accuracy.")
    report(0.02, f"Aligning inputs to the {MODALITY_NAMES.get(ref_key, ref_key)} grid")
    aligned, prepared = prepare_inputs(volumes, model, allow_missing=bool(missing), notes=notes,
                                       report=lambda f, message: report(0.02 + 0.08 * f, message))
    for note in notes:
        log.info(note)
    timings["preprocess_s"] = time.perf_counter() - t0
    report(0.10, f"Running {model.entry_name}")
    t1 = time.perf_counter()
    if model.kind == "baseline":
        from .baseline import intensity_rule

        probs = intensity_rule(prepared.image, prepared.mask, model.modalities)
    else:
        from .inference import predict_probabilities

        def window_progress(f, msg):
            report(0.10 + 0.80 * f, msg)

        probs = predict_probabilities(model.network, prepared.image, model.preprocessing.patch_size,
                                      tta=tta, device=device, progress=window_progress, precision=precision,
                                      should_cancel=should_cancel)
    timings["inference_s"] = time.perf_counter() - t1
    report(0.92, "Post-processing")
    t2 = time.perf_counter()
    probs = prepared.restore_channels(probs)
    crop_labels = postprocess.apply(probs, prepared.crop_mask, model.settings.postprocessing_for(missing),
                                    voxel_mm3=float(np.prod(prepared.native_spacing)))
    labels = prepared.restore_labels(crop_labels)
    ref = volumes[ref_key]
    stats = statistics.region_statistics(labels, ref.affine, aligned)
    voxel_ml = float(np.prod(ref.spacing)) / 1000.0
    notes += plausibility.size_warnings(float((labels > 0).sum()) * voxel_ml, float(prepared.crop_mask.sum()) * voxel_ml)
    timings["postprocess_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    report(1.0, "Done")
    return SegmentationResult(labels, ref, aligned, stats, model.entry_name, timings, notes=notes)


#: seg.nrrd header fields that keep how a result was made with it (one line each, as NRRD needs).
SEG_NRRD_MODEL_FIELD = "BrainUNet_Model"
SEG_NRRD_NOTES_FIELD = "BrainUNet_Notes"


def segmentation_dict(labels: np.ndarray, affine_ras: np.ndarray, model_name: str | None = None,
                      notes=()) -> dict:
    """A slicerio segmentation (one layer, label values 1/2/3) with names, colours and terminology; the
    model and the run's notes (a registration, a warning) go into header fields, so the file keeps them."""
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    segments = []
    for region in SUBREGIONS:
        mask = labels == region.label
        if mask.any():
            idx = np.nonzero(mask)
            extent = [int(v) for axis in idx for v in (axis.min(), axis.max())]
        else:
            extent = [0, -1, 0, -1, 0, -1]
        segments.append({
            "id": region.key, "name": region.name, "color": list(region.color), "labelValue": region.label,
            "layer": 0, "extent": extent, "nameAutoGenerated": False, "colorAutoGenerated": False,
            "tags": {"TerminologyEntry": region.terminology_entry(), "Segmentation.Status": "inprogress"},
        })
    provenance = {}
    if model_name:
        provenance[SEG_NRRD_MODEL_FIELD] = model_name
    if notes:  # an NRRD header is ASCII
        text = " | ".join(" ".join(str(n).split()) for n in notes).replace("°", " deg").replace("×", "x")
        provenance[SEG_NRRD_NOTES_FIELD] = text.encode("ascii", "replace").decode("ascii")
    return {"voxels": labels.astype(np.uint8), "ijkToLPS": ijk_to_lps, "segments": segments,
            "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap",
            SEG_NRRD_FIELD: label_mark(labels), **provenance}


def write_seg_nrrd(labels: np.ndarray, affine_ras: np.ndarray, path, model_name: str | None = None,
                   notes=()) -> Path:
    import slicerio

    slicerio.write_segmentation(str(path), segmentation_dict(labels, affine_ras, model_name, notes))
    return Path(path)


def overlay_views(result: SegmentationResult, background: str = "t2f") -> list[tuple]:
    """(title, image slice, label slice, aspect, sides) for the axial, coronal and sagittal slices through the
    tumour centre, as a radiologist reads them (and Slicer shows them): the patient's right on the image's
    left, anterior on the left of the sagittal view. Slices are indexed [x (left to right), y (bottom to
    top)]; ``sides`` names the patient's side at the image's (left, right, bottom, top); ``aspect`` (height /
    width of a pixel) draws a thick-slice scan (0.9 x 0.9 x 5.5 mm) in true proportions."""
    from nibabel import orientations as o

    to_ras = o.ornt_transform(o.io_orientation(result.reference.affine), o.axcodes2ornt("RAS"))
    img = o.apply_orientation(result.aligned.get(background, result.reference.data), to_ras)
    lab = o.apply_orientation(result.labels, to_ras)
    centre = np.argwhere(lab > 0).mean(axis=0).round().astype(int) if lab.any() else np.array(lab.shape) // 2
    ras_axes = [int(np.flatnonzero(np.asarray(to_ras)[:, 0] == a)[0]) for a in range(3)]
    size = [float(result.reference.spacing[i]) for i in ras_axes]  # voxel size along R, A, S
    # in RAS order the first index runs towards the patient's right (anterior, in the sagittal view):
    # reversed, it runs from the patient's right to left across the image
    return [("Axial", img[::-1, :, centre[2]], lab[::-1, :, centre[2]], size[1] / size[0], ("R", "L", "P", "A")),
            ("Coronal", img[::-1, centre[1], :], lab[::-1, centre[1], :], size[2] / size[0], ("R", "L", "I", "S")),
            ("Sagittal", img[centre[0], ::-1, :], lab[centre[0], ::-1, :], size[2] / size[1], ("A", "P", "I", "S"))]


def write_overlay_png(result: SegmentationResult, path, background: str = "t2f") -> Path:
    """Axial, coronal and sagittal slices through the tumour centre with the labels over FLAIR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    views = overlay_views(result, background)
    img = result.aligned.get(background, result.reference.data)
    colours = np.zeros((4, 4))
    for region in SUBREGIONS:
        colours[region.label] = (*region.color, 0.55)
    cmap = ListedColormap(colours)
    lo, hi = np.percentile(img[img != 0], (1, 99)) if np.any(img) else (0, 1)
    # the run's notes (a registration, a warning) printed under the views: the picture keeps them
    lines = [line for note in result.notes for line in textwrap.wrap(f"Note: {note}", 150)]
    notes_in = 0.19 * len(lines) + (0.1 if lines else 0)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4 + notes_in), facecolor="black")
    bottom = notes_in / (4.4 + notes_in)
    for ax, (title, im, lb, aspect, sides) in zip(axes, views):
        ax.imshow(im.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        ax.imshow(lb.T, cmap=cmap, origin="lower", vmin=0, vmax=3, interpolation="nearest", aspect=aspect)
        ax.set_title(title, color="white")
        ax.axis("off")
        # the patient's sides on the image's edges, so that no one reads a right-sided tumour as left
        width, height = im.shape
        for (x, y, ha, va), side in zip(((0, 0.5, "left", "center"), (1, 0.5, "right", "center"),
                                         (0.5, 0, "center", "bottom"), (0.5, 1, "center", "top")), sides):
            ax.text(x * width - 0.5, y * height - 0.5, side, ha=ha, va=va, color="yellow", fontsize=11,
                    fontweight="bold")  # on the image's own edges, whatever its proportions
    handles = [plt.Rectangle((0, 0), 1, 1, color=r.color) for r in SUBREGIONS]
    fig.legend(handles, [f"{r.key}: {r.name}" for r in SUBREGIONS], loc="lower center", ncol=3,
               facecolor="black", labelcolor="white", frameon=False, bbox_to_anchor=(0.5, bottom))
    if lines:
        fig.text(0.01, bottom - 0.01, "\n".join(lines), color="#dddddd", fontsize=8, va="top", ha="left")
    fig.suptitle(f"BrainUNet ({result.model_name})", color="white")
    fig.tight_layout(rect=(0, bottom + 0.08 * (1 - bottom), 1, 1 - 0.3 / (4.4 + notes_in)))  # room for the title
    # the name may be a temporary one, hence the format
    fig.savefig(path, dpi=90, facecolor="black", format="png", metadata={"Software": f"{SIGNATURE} (matplotlib)"})
    plt.close(fig)
    return Path(path)


def output_kind(path) -> str:
    name = str(path).lower()
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    if name.endswith((".nii.gz", ".nii")):
        return "nifti"
    raise InputError(f"Output {path} must end in .nii.gz, .nii or .seg.nrrd.")


def run(paths: dict, output, stats_csv=None, overlay_png=None, model: str | Path | None = None,
        device: str = "auto", tta: bool = False, progress=None, should_cancel=None,
        loaded_model: LoadedModel | None = None, seg_nrrd=None, precision: str | None = None) -> SegmentationResult:
    """Check outputs, load inputs and model, segment, write every requested output.

    ``output`` is a .nii.gz / .nii / .seg.nrrd label file; ``seg_nrrd`` optionally adds a .seg.nrrd copy.
    """
    from .inference import resolve_device
    from .statistics import write_csv

    outputs = {"labels": output, "seg_nrrd": seg_nrrd, "stats": stats_csv, "overlay": overlay_png}
    plausibility.check_distinct_files(paths)
    outputs = {k: Path(v) for k, v in outputs.items() if v}
    kind = output_kind(outputs["labels"])  # the names' kinds first: a wrong ending is the message to give
    if "seg_nrrd" in outputs and not str(outputs["seg_nrrd"]).lower().endswith(".seg.nrrd"):
        raise InputError(f"The Slicer segmentation {outputs['seg_nrrd']} must end in .seg.nrrd.")
    if "overlay" in outputs and not str(outputs["overlay"]).lower().endswith(".png"):
        raise InputError(f"The overlay {outputs['overlay']} is a PNG picture: give a file name ending in .png.")
    outputs = check_outputs(outputs, [p for p in paths.values() if p])
    input_notes: list[str] = []
    volumes = load_inputs(paths, input_notes)
    device = resolve_device(device)
    t = time.perf_counter()
    loaded = loaded_model or load_model(model, device=device, progress=progress)
    load_s = time.perf_counter() - t
    result = segment(volumes, loaded, device=device, tta=tta, progress=progress, should_cancel=should_cancel,
                     precision=precision, notes=input_notes)
    result.timings["model_load_s"] = load_s
    writers = {
        "labels": (lambda p: write_seg_nrrd(result.labels, result.reference.affine, p, result.model_name,
                                            result.notes)) if kind == "seg.nrrd"
        else (lambda p: save_label_nifti(result.labels, result.reference, p)),
        "seg_nrrd": lambda p: write_seg_nrrd(result.labels, result.reference.affine, p, result.model_name,
                                             result.notes),
        "stats": lambda p: write_csv(result.statistics, p),
        "overlay": lambda p: write_overlay_png(result, p),
    }
    with OutputSet(outputs, replace_only_results=True) as out:
        for key in outputs:
            out.write(key, writers[key])
            if should_cancel and should_cancel():
                from .errors import Cancelled

                raise Cancelled()
        result.outputs = out.commit()
    return result
