"""End-to-end scenarios on a real MRML scene, shared by the pytest suite and Slicer's self-test.

Each function raises ScenarioFailure (an AssertionError, so test runners report it) with a message
saying what went wrong. ``run_all_scenarios`` runs each in a fresh scene: they add volumes with the same
names, and auto-selection must see one case at a time.
"""
from __future__ import annotations

import numpy as np

from brainunet import synthetic
from . import mrml
from brainunet.labels import SUBREGIONS
from brainunet.statistics import dice
from .logic import BrainUNetLogic, RunOptions

class ScenarioFailure(AssertionError):
    """A scenario's check failed; the message says which and how."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailure(message)


CASE_NAMES = {"t1c": "Case_T1CE", "t2w": "Case_T2", "t2f": "Case_FLAIR", "t1n": "Case_T1"}


def bundled_model_name() -> str:
    from brainunet import weights

    return weights.load_registry(weights.REGISTRY_PATH)[0].name


def load_synthetic_case(scene, seed: int = 0, shape=(40, 48, 36), affine=None):
    volumes, labels = synthetic.make_case(seed=seed, shape=shape, affine=affine)
    nodes = {role: mrml.add_volume_node(scene, vol, CASE_NAMES[role]) for role, vol in volumes.items()}
    return nodes, labels


def scenario_segmentation_from_labels(scene):
    """Label map -> segmentation node -> label map is lossless, names/colours/terminology come from labels.py."""
    nodes, labels = load_synthetic_case(scene, seed=1)
    seg = mrml.create_segmentation(scene, labels, nodes["t1c"])
    segmentation = seg.GetSegmentation()
    check(segmentation.GetNumberOfSegments() == len(SUBREGIONS), f"{segmentation.GetNumberOfSegments()} segments, expected {len(SUBREGIONS)}")
    for region in SUBREGIONS:
        segment = segmentation.GetSegment(region.key)
        check(segment is not None, f"segment {region.key} is missing")
        check(segment.GetName() == region.name, f"segment {region.key} is named {segment.GetName()!r}")
        check(np.allclose(segment.GetColor(), region.color, atol=1e-6), f"segment {region.key} has colour {segment.GetColor()}")
        entry = segment.GetTerminology() if hasattr(segment, "GetTerminology") else segment.GetTag("TerminologyEntry")
        check(region.snomed_type[1] in entry, f"segment {region.key} has terminology {entry!r}")
    count = scene.GetNumberOfNodes()
    back = mrml.segmentation_to_labels(seg, nodes["t1c"])
    check(np.array_equal(back, labels), "the segmentation does not round-trip the label map")
    check(scene.GetNumberOfNodes() == count, f"reading the segments back left {scene.GetNumberOfNodes() - count} "
          "node(s) in the scene")
    return seg


def scenario_background_run(scene, python_executable=None, tmp_root=None, affine=None, parent_translation=None):
    """Auto-selected inputs -> background process -> segmentation + statistics table, over the tumour;
    inputs untouched. ``affine`` (e.g. oblique, left-handed) places the case's voxels; ``parent_translation``
    (mm) puts every input under a linear transform, as a clinician's registration would."""
    nodes, labels = load_synthetic_case(scene, seed=2, affine=affine)
    if parent_translation is not None:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Registration")
        matrix = np.eye(4)
        matrix[:3, 3] = parent_translation
        transform.SetMatrixTransformToParent(mrml._numpy_to_matrix(matrix))
        for node in nodes.values():
            node.SetAndObserveTransformNodeID(transform.GetID())
    before = {role: mrml.volume_from_node(n).data.copy() for role, n in nodes.items()}
    logic = BrainUNetLogic(scene, python_executable=python_executable, temp_root=tmp_root)
    inputs = logic.guess_inputs()
    check({r: n.GetID() for r, n in inputs.items()} == {r: n.GetID() for r, n in nodes.items()},
          "auto-selection did not pick the case's volumes")
    seen = []
    # the bundled model, whatever the user's default: the location check below is calibrated on it
    seg, table = logic.segment(inputs, RunOptions(device="cpu", model=bundled_model_name()), timeout=300,
                               on_progress=lambda f, m: seen.append(f))
    check(bool(seen) and max(seen) == 1.0, "no progress was reported")
    check(seg.GetSegmentation().GetNumberOfSegments() == 3, "the result does not hold the three segments")
    rows = mrml.table_to_rows(table)
    check([r["region"] for r in rows] == ["ET", "NETC", "SNFH", "TC", "WT"], f"statistics rows {rows}")
    result = mrml.segmentation_to_labels(seg, nodes["t1c"])
    wt_rows = next(r for r in rows if r["region"] == "WT")
    check(int(float(wt_rows["voxels"])) == int((result > 0).sum()), "the WT voxel count disagrees with the segmentation")
    # where the segments land: a result flipped, transposed or shifted on its way through the worker and
    # back would score far lower (the bundled model scores about 0.9 here; shifted 4 voxels, the truth 0.66)
    overlap = dice(result > 0, labels > 0)
    check(overlap >= 0.8, f"the segments are not over the tumour: whole-tumour Dice {overlap:.2f} against the "
                          "synthetic case's truth (expected 0.8 or more)")
    for role, node in nodes.items():
        check(np.array_equal(mrml.volume_from_node(node).data, before[role]), f"input {role} was modified")
    return seg, table


def scenario_cancel(scene, python_executable=None, tmp_root=None):
    """Cancel right after start: nothing is added to the scene and the temp folder is gone."""
    nodes, _ = load_synthetic_case(scene, seed=3)
    count = scene.GetNumberOfNodes()
    logic = BrainUNetLogic(scene, python_executable=python_executable, temp_root=tmp_root)
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    run.cancel()
    check(run.state == "cancelled", f"the run is {run.state!r} after Cancel")
    check(not run.workdir.exists(), "the temporary folder was left behind")
    check(scene.GetNumberOfNodes() == count, "Cancel changed the scene")


def run_all_scenarios(scene, python_executable=None, tmp_root=None):
    """Every scenario, each in a fresh scene (the scene is cleared before each)."""
    for scenario in (scenario_segmentation_from_labels, scenario_cancel, scenario_background_run):
        scene.Clear(0)
        if scenario is scenario_segmentation_from_labels:
            scenario(scene)
        else:
            scenario(scene, python_executable, tmp_root)
