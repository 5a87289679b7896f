"""What Apply costs Slicer's application thread before the worker starts (issue 14, defect 6).

Before: each input was copied to float32 (``mrml.volume_from_node``) and written as gzip NIfTI
(``.nii.gz``) on the application's thread, which froze the panel meanwhile. Now that thread only takes a
checked copy in the node's own voxel type (``mrml.voxels_from_node``); a thread of the run writes the
copies uncompressed (``mrml.save_volume_nifti`` to ``.nii``) and then starts the worker. The volumes are
read into a headless slicer-core scene with Slicer's own storage node, as File > Add Data does.

    python benchmarks/gui_thread.py                  # the real dev case (three sequences)
    python benchmarks/gui_thread.py --smoke
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    repeats = 1 if args.smoke else args.repeats
    from BrainUNetSegmentationLib import mrml
    from brainunet.imageio import find_case_files

    files = {role: path for role, path in find_case_files(common.resolve_case(args)).items()
             if role in ("t1c", "t2w", "t2f")}
    scene = mrml.new_headless_scene()
    nodes = {role: mrml.load_volume_file(scene, path, role) for role, path in files.items()}
    out = Path(tempfile.mkdtemp(prefix="brainunet-bench-gui-"))
    rows, results = [], {}
    for role, node in nodes.items():
        image = node.GetImageData()
        float_volume = mrml.volume_from_node(node)
        native = mrml.voxels_from_node(node)
        r = {
            "dims": list(image.GetDimensions()),
            "voxel_type": image.GetScalarTypeAsString(),
            "before_copy_float32_s": timed(lambda: mrml.volume_from_node(node), repeats),
            "before_write_gz_float32_s": timed(lambda: mrml.save_volume_nifti(float_volume, out / f"{role}.nii.gz"),
                                               repeats),
            "now_copy_native_s": timed(lambda: mrml.voxels_from_node(node), repeats),
            "now_write_nii_native_s": timed(lambda: mrml.save_volume_nifti(native, out / f"{role}.nii"), repeats),
            "write_gz_native_s": timed(lambda: mrml.save_volume_nifti(native, out / f"{role}-native.nii.gz"),
                                       repeats),
            "nii_native_mb": (out / f"{role}.nii").stat().st_size / 2**20,
            "gz_float32_mb": (out / f"{role}.nii.gz").stat().st_size / 2**20,
        }
        r["before_app_thread_s"] = r["before_copy_float32_s"] + r["before_write_gz_float32_s"]
        results[role] = r
        rows.append([role, "x".join(map(str, r["dims"])), r["voxel_type"], r["before_app_thread_s"],
                     r["now_copy_native_s"], r["now_write_nii_native_s"], r["write_gz_native_s"],
                     r["nii_native_mb"], r["gz_float32_mb"]])
    total_before = sum(r["before_app_thread_s"] for r in results.values())
    total_now = sum(r["now_copy_native_s"] for r in results.values())
    rows.append(["all", "", "", total_before, total_now, sum(r["now_write_nii_native_s"] for r in results.values()),
                 sum(r["write_gz_native_s"] for r in results.values()), "", ""])
    table = common.md_table(
        ["input", "voxels", "type", "before: app thread (s)", "now: app thread (s)", "now: writer thread .nii (s)",
         "writer as .nii.gz (s)", ".nii MB", "before .nii.gz MB"], rows)
    common.save("gui_thread", args, {"repeats": repeats, "results": results,
                                     "app_thread_before_s": total_before, "app_thread_now_s": total_now}, table)
    chosen_output(args, scene, nodes["t1c"], repeats)


def chosen_output(args, scene, reference, repeats: int) -> None:
    """A result chosen as output is read once at Apply and once at import (``mrml.segmentation_contents``),
    so that changes made to it during the run are kept: its cost on the application thread for segments on
    this case's grid. A labelmap layer holds only its segments' bounding box, so the cost follows the
    voxels the layers hold: tumour-sized segments in one shared layer (as imported) and in a layer each (as
    Segment Editor leaves segments allowed to overlap), and one segment over the whole brain."""
    import numpy as np

    from BrainUNetSegmentationLib import mrml

    image = mrml.voxels_from_node(reference).data.astype(np.float32)
    brain = image[image > 0]
    # three nested regions of the brightest voxels (sizes like a tumour's; their contents do not matter here)
    tumour = np.zeros(image.shape, np.uint8)
    for label, quantile in ((2, 0.95), (1, 0.98), (3, 0.99)):
        tumour[image > np.quantile(brain, quantile)] = label
    whole_brain = np.where(image > 0, 2, tumour).astype(np.uint8)
    rows, results = [], {}
    for layout, labels, separate in (("tumour-sized, one shared layer", tumour, False),
                                     ("tumour-sized, a layer each", tumour, True),
                                     ("SNFH over the whole brain, one shared layer", whole_brain, False)):
        segmentation = mrml.create_segmentation(scene, labels, reference)
        if separate:
            for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
                segmentation.GetSegmentation().SeparateSegmentLabelmap(
                    segmentation.GetSegmentation().GetNthSegmentID(index))
        layers = [segmentation.GetSegmentation().GetLayerDataObject(i)
                  for i in range(segmentation.GetSegmentation().GetNumberOfLayers())]
        held = sum(int(np.prod(layer.GetDimensions())) for layer in layers)
        seconds = timed(lambda: mrml.segmentation_contents(segmentation), repeats)
        results[layout] = {"layers": len(layers), "layer_voxels": held, "read_s": seconds}
        rows.append([layout, "x".join(map(str, labels.shape)), len(layers), f"{held / 1e6:.2f} M", seconds,
                     2 * seconds])
        scene.RemoveNode(segmentation)
    table = common.md_table(["chosen output's segments", "grid", "layers", "voxels the layers hold",
                             "read once (s)", "app thread per run: Apply + import (s)"], rows)
    common.save("gui_thread_output", args, {"repeats": repeats, "results": results}, table)


if __name__ == "__main__":
    main()
