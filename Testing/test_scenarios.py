"""The scenarios that Slicer's in-app self-test runs, here on a real slicer-core scene."""
import re
import sys

from conftest import ROOT

from BrainUNetSegmentationLib import scenarios


def test_segmentation_from_labels(scene):
    scenarios.scenario_segmentation_from_labels(scene)


def test_background_run_imports_segmentation_and_table(scene, tmp_path):
    seg, table = scenarios.scenario_background_run(scene, sys.executable, str(tmp_path))
    sh = scene.GetSubjectHierarchyNode()
    ref = scene.GetFirstNodeByName("Case_T1CE")
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == sh.GetItemParent(sh.GetItemByDataNode(ref))
    assert seg.GetName().startswith("Case_T1CE BrainUNet")
    assert list(tmp_path.iterdir()) == []  # temp files cleaned


def test_background_run_lands_on_the_tumour_of_an_oblique_left_handed_case_under_a_transform(scene, tmp_path):
    import numpy as np
    from test_geometry import oblique_affine

    shape = (40, 48, 36)
    affine = oblique_affine(spacing=(1.6, 1.6, 1.6), angles=(10, -5, 15), left_handed=True)
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2)  # the synthetic brain is centred on the origin
    scenarios.scenario_background_run(scene, sys.executable, str(tmp_path), affine=affine,
                                      parent_translation=(25.0, -10.0, 5.0))
    assert list(tmp_path.iterdir()) == []


def test_cancel_leaves_scene_unchanged(scene, tmp_path):
    scenarios.scenario_cancel(scene, sys.executable, str(tmp_path))


def test_second_run_does_not_overwrite_first(scene, tmp_path):
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions

    nodes, _ = scenarios.load_synthetic_case(scene, seed=6)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    first, _ = logic.segment(logic.guess_inputs(), RunOptions(device="cpu"), timeout=300)
    second, _ = logic.segment(logic.guess_inputs(), RunOptions(device="cpu"), timeout=300)
    assert first.GetID() != second.GetID() and first.GetName() != second.GetName()
    assert first.GetSegmentation().GetNumberOfSegments() == 3
    # ... unless the user chose the existing node as output.
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    assert run.wait(300) == "done"
    again, _ = logic.import_results(run, segmentation_node=first)
    assert again is first and first.GetSegmentation().GetNumberOfSegments() == 3


def test_a_result_replaced_by_another_patients_is_renamed_after_that_patient(scene, tmp_path):
    """Patient A's result chosen as the output of patient B's run: its name (and its table's) says B
    afterwards, unless the user had named it."""
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions

    a, _ = scenarios.load_synthetic_case(scene, seed=6)
    for node in a.values():
        node.SetName(f"PatientA {node.GetName()}")
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    result, table = logic.segment(dict(a), RunOptions(device="cpu"), timeout=300)
    assert result.GetName() == f"{a['t1c'].GetName()} BrainUNet"
    b, _ = scenarios.load_synthetic_case(scene, seed=8)
    for node in b.values():
        node.SetName(f"PatientB {node.GetName()}")
    assert logic.made_from_another_volume(result, dict(b)) is a["t1c"]
    assert logic.made_from_another_volume(result, dict(a)) is None
    run = logic.start(dict(b), RunOptions(device="cpu"), segmentation_node=result)
    assert run.wait(300) == "done"
    again, again_table = logic.import_results(run, segmentation_node=result, table_node=table)
    assert again is result and again_table is table
    assert result.GetName() == f"{b['t1c'].GetName()} BrainUNet"
    assert table.GetName() == f"{b['t1c'].GetName()} BrainUNet statistics"
    # the table gone (deleted, or left to a copy): the new one is named after the new patient too
    run = logic.start(dict(a), RunOptions(device="cpu"), segmentation_node=result)
    assert run.wait(300) == "done"
    _, new_table = logic.import_results(run, segmentation_node=result, table_node=None)
    # (the scene numbers a name it generated before: "..._1")
    assert re.fullmatch(re.escape(f"{a['t1c'].GetName()} BrainUNet") + r"(_\d+)?", result.GetName())
    assert new_table.GetName() == f"{result.GetName()} statistics"
    for own in ("tumour, as corrected by Dr N", f"{a['t1c'].GetName()} BrainUNet, checked by Dr N"):
        result.SetName(own)  # a name of the user's own stays, even one that starts like BrainUNet's
        run = logic.start(dict(b), RunOptions(device="cpu"), segmentation_node=result)
        assert run.wait(300) == "done"
        logic.import_results(run, segmentation_node=result, table_node=table)
        assert result.GetName() == own


def test_logic_rejects_missing_and_bad_inputs_without_touching_scene(scene, tmp_path):
    import numpy as np
    import pytest

    from BrainUNetSegmentationLib import mrml
    from brainunet.errors import InputError
    from brainunet.imageio import Volume
    from BrainUNetSegmentationLib.logic import BrainUNetLogic

    nodes, _ = scenarios.load_synthetic_case(scene, seed=7)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    count = scene.GetNumberOfNodes()
    inputs = dict(logic.guess_inputs())
    inputs["t2w"] = inputs["t2f"] = None
    with pytest.raises(InputError, match="Select the T2W, FLAIR volumes"):
        logic.start(inputs)
    assert scene.GetNumberOfNodes() == count and list(tmp_path.iterdir()) == []
    flat = mrml.add_volume_node(scene, Volume(np.ones((8, 8, 8), np.float32), np.eye(4), "flat"))
    count = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="constant"):
        logic.start(dict(logic.guess_inputs(), t2f=flat))
    assert scene.GetNumberOfNodes() == count
    assert list(tmp_path.iterdir()) == []


def test_failed_process_reports_its_error(scene, tmp_path):
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions

    scenarios.load_synthetic_case(scene, seed=8)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu", model=str(tmp_path / "missing.pt")))
    assert run.wait(120) == "failed"
    assert "not found" in run.error
    run.cleanup()


def test_one_missing_sequence_is_decided_by_the_model(scene, tmp_path):
    """The baseline needs all three: the background process says which one is missing."""
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions

    scenarios.load_synthetic_case(scene, seed=9)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    count = scene.GetNumberOfNodes()
    run = logic.start(dict(logic.guess_inputs(), t2w=None), RunOptions(device="cpu", model="intensity-baseline"))
    assert run.wait(120) == "failed"
    assert "Missing input: T2W" in run.error
    assert scene.GetNumberOfNodes() == count


def test_every_segment_terminology_entry_resolves_in_the_shipped_context():
    """Slicer's terminology logic (slicer-core) loads Resources/Terminology/BrainUNet.term.json, and each
    segment's TerminologyEntry names a context, category and type that the loaded terminology holds."""
    import json

    import slicer

    from brainunet.labels import SUBREGIONS, TERMINOLOGY_CONTEXT, terminology_context

    path = ROOT / "BrainUNetSegmentation" / "Resources" / "Terminology" / "BrainUNet.term.json"
    assert json.loads(path.read_text()) == terminology_context()  # the file is labels.py's, not a copy to drift
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(path)) == TERMINOLOGY_CONTEXT
    category = slicer.vtkSlicerTerminologyCategory()
    assert logic.GetNthCategoryInTerminology(TERMINOLOGY_CONTEXT, 0, category)
    for region in SUBREGIONS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(region.terminology_entry(), entry)
        assert entry.GetTerminologyContextName() == TERMINOLOGY_CONTEXT
        assert entry.GetCategoryObject().GetCodeValue() == category.GetCodeValue()
        held = []
        for i in range(logic.GetNumberOfTypesInTerminologyCategory(TERMINOLOGY_CONTEXT, category)):
            t = slicer.vtkSlicerTerminologyType()
            logic.GetNthTypeInTerminologyCategory(TERMINOLOGY_CONTEXT, category, i, t)
            held.append((t.GetCodingSchemeDesignator(), t.GetCodeValue(), t.GetCodeMeaning()))
        assert region.snomed_type in held, (region.key, held)


def test_all_scenarios_run_one_after_another_in_one_scene(scene, tmp_path):
    """As Slicer's self-test runs them: each gets a fresh scene, so the second case's volumes do not meet
    the first's (same names) in auto-selection."""
    scenarios.run_all_scenarios(scene, sys.executable, str(tmp_path))


def test_a_failed_check_says_what_failed():
    import pytest

    with pytest.raises(scenarios.ScenarioFailure, match="the run is 'done' after Cancel"):
        scenarios.check(False, "the run is 'done' after Cancel")


def test_what_the_worker_did_reaches_the_log_and_the_table_notes(scene, tmp_path):
    """A head with a scalp-like rim: the worker extracts the brain, and the panel's log and the statistics
    table's notes say so."""
    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions
    from brainunet import synthetic
    from test_brain_extraction import head_with_scalp

    volumes, _ = synthetic.make_case(seed=0, shape=(96, 112, 80), spacing=(1.6, 1.6, 1.6), modalities=("t1c", "t2w", "t2f"))
    head, _ = head_with_scalp(volumes)
    nodes = {role: mrml.add_volume_node(scene, vol, name) for (role, vol), name in
             zip(head.items(), ("Head_T1CE", "Head_T2", "Head_FLAIR"))}
    logic = BrainUNetLogic(scene, python_executable=sys.executable, temp_root=str(tmp_path))
    run = logic.start(nodes, RunOptions(device="cpu"))
    assert run.wait(timeout=300) == "done", run.error
    assert any(line.startswith("Note: brain extracted") for line in run.log)
    _, table = logic.import_results(run)
    assert table.GetDescription().startswith("brain extracted (deepbet)")
    assert table.GetAttribute(mrml.NOTES_ATTRIBUTE) == table.GetDescription()


def test_the_panel_lists_the_models_of_the_workers_registry(tmp_path, monkeypatch):
    """Inside Slicer the panel's process has no BRAINUNET_HOME: the logic reads the user's registry where
    the worker will (its user_home), so a registered model shows up and a bundled one of the same name yields."""
    import json

    from BrainUNetSegmentationLib.logic import model_choices

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "registry.json").write_text(json.dumps({"models": [
        {"name": "intensity-baseline", "kind": "baseline", "description": "the user's copy"},
        {"name": "mine", "kind": "network", "description": "mine", "file": "mine.pt"}]}))
    monkeypatch.setenv("BRAINUNET_MODEL", "mine")
    choices = model_choices(str(tmp_path))
    from brainunet import weights

    bundled_name = weights.load_registry(weights.REGISTRY_PATH)[0].name
    assert [c.name for c in choices] == ["mine", bundled_name, "intensity-baseline"]
    assert [c.default for c in choices] == [True, False, False]
    assert choices[2].description == "the user's copy" and choices[0].sequences == ()
    bundled = choices[1]
    assert bundled.sequences == ("t1c", "t2w", "t2f") and bundled.one_may_be_missing is True
    assert bundled.accuracy and bundled.licence


def test_statistics_are_computed_again_from_the_edited_segments(scene, tmp_path):
    """Unedited, the recomputed table equals the worker's and nothing is noted; with ET erased (as in
    Segment Editor), ET is 0 mL and the tumour core shrinks by ET's volume, and the notes say so. An input
    on another grid is resampled, unless the worker registered it (then its intensities are left out, and
    the note says so). Without the volume it was made on, it says why and leaves the table alone."""
    import numpy as np
    import pytest

    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RECOMPUTED_NOTE, RunOptions
    from brainunet.errors import InputError

    nodes, _ = scenarios.load_synthetic_case(scene, seed=3)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    seg, table = logic.segment(logic.guess_inputs(), RunOptions(device="cpu"), timeout=300)
    worker = {r["region"]: r for r in mrml.table_to_rows(table)}
    # the Tables module shows units and what each column is
    assert table.GetColumnUnitLabel("volume_ml") == "mL" and table.GetColumnUnitLabel("max_diameter_mm") == "mm"
    assert "FLAIR" in table.GetColumnDescription("median_FLAIR")
    assert worker["ET"]["voxels"] > 0
    assert logic.update_statistics(seg, table) is False  # nothing edited: nothing changes, nothing noted
    assert (table.GetAttribute(mrml.NOTES_ATTRIBUTE) or "") == ""

    segmentation = seg.GetSegmentation()
    segmentation.RemoveSegment("ET")  # a correction: no enhancing tumour after all
    assert logic.update_statistics(seg, table) is True
    edited = {r["region"]: r for r in mrml.table_to_rows(table)}
    assert edited["ET"]["voxels"] == 0
    assert edited["TC"]["voxels"] == worker["TC"]["voxels"] - worker["ET"]["voxels"]
    assert edited["SNFH"]["voxels"] == worker["SNFH"]["voxels"]
    assert edited["SNFH"]["mean_FLAIR"] == pytest.approx(worker["SNFH"]["mean_FLAIR"], rel=1e-4)
    assert table.GetAttribute(mrml.NOTES_ATTRIBUTE).startswith(RECOMPUTED_NOTE)

    # FLAIR on a grid of its own (2 mm off): resampled through world coordinates ...
    origin = list(nodes["t2f"].GetOrigin())
    nodes["t2f"].SetOrigin(origin[0] + 2.0, origin[1], origin[2])
    logic.update_statistics(seg, table)
    moved = {r["region"]: r for r in mrml.table_to_rows(table)}
    assert np.isfinite(moved["SNFH"]["mean_FLAIR"])
    assert moved["SNFH"]["mean_FLAIR"] != pytest.approx(edited["SNFH"]["mean_FLAIR"], rel=1e-6)
    # ... unless the run registered it: its registration lives in the worker, so it is left out, and said
    table.SetAttribute(mrml.NOTES_ATTRIBUTE, "FLAIR registered to T1CE (the patient moved: 2.0 mm, 0.0°)")
    assert logic.update_statistics(seg, table) is True
    rows = mrml.table_to_rows(table)
    assert "mean_FLAIR" not in rows[0] and "mean_T2W" in rows[0]
    notes = table.GetAttribute(mrml.NOTES_ATTRIBUTE).splitlines()
    assert notes[0].startswith("FLAIR registered") and notes[1].startswith(RECOMPUTED_NOTE) and len(notes) == 2
    assert "FLAIR are left out" in notes[1]

    scene.RemoveNode(nodes["t1c"])
    before = mrml.table_to_rows(table)
    with pytest.raises(InputError, match="no longer in the scene"):
        logic.update_statistics(seg, table)
    assert repr(mrml.table_to_rows(table)) == repr(before)  # unchanged (repr: NaN equals NaN)


def test_the_scene_changing_during_a_run_loses_nothing_and_misplaces_nothing(scene, tmp_path):
    """While the worker runs the user may delete the chosen output segmentation (a new one is made) or
    move the reference volume (the result is refused with a message, not drawn in the wrong place)."""
    import numpy as np
    import pytest

    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions
    from brainunet.errors import InputError

    nodes, _ = scenarios.load_synthetic_case(scene, seed=2)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Chosen output")
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    scene.RemoveNode(chosen)
    assert run.wait(300) == "done"
    seg, table = logic.import_results(run, segmentation_node=chosen)
    assert seg is not chosen and seg.GetScene() is scene and seg.GetSegmentation().GetNumberOfSegments() == 3
    assert table.GetScene() is scene

    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    moved = np.array(mrml.ijk_to_ras(nodes["t1c"]))
    moved[:3, 3] += 12.0
    nodes["t1c"].SetIJKToRASMatrix(mrml._numpy_to_matrix(moved))
    assert run.wait(300) == "done"
    count = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="was moved, transformed or changed while BrainUNet ran"):
        logic.import_results(run)
    assert scene.GetNumberOfNodes() == count and not run.workdir.exists()
    moved[:3, 3] -= 12.0  # back in place: the next run has nothing to register
    nodes["t1c"].SetIJKToRASMatrix(mrml._numpy_to_matrix(moved))

    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    kept = nodes["t1c"].GetImageData()
    nodes["t1c"].SetAndObserveImageData(None)  # its image emptied (another module, a failed reload)
    assert run.wait(300) == "done", run.error
    with pytest.raises(InputError, match="lost its image data while BrainUNet ran; load the image again"):
        logic.import_results(run)
    assert scene.GetNumberOfNodes() == count and not run.workdir.exists()
    nodes["t1c"].SetAndObserveImageData(kept)

    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    scene.RemoveNode(nodes["t1c"])  # the reference itself deleted: nothing to draw the result on
    assert run.wait(300) == "done", run.error
    count = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="was removed from the scene while BrainUNet ran; load it again"):
        logic.import_results(run)
    assert scene.GetNumberOfNodes() == count and not run.workdir.exists()


def test_an_input_removed_during_a_run_is_noted_and_update_statistics_keeps_its_figures(scene, tmp_path):
    """T2W deleted while the worker runs: the result comes in with a note; Update statistics on the
    segments as made changes nothing, and after a correction it says T2W's intensities are left out."""
    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, INPUT_VOLUME_REFERENCE, RECOMPUTED_NOTE, RunOptions

    nodes, _ = scenarios.load_synthetic_case(scene, seed=2)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    scene.RemoveNode(nodes["t2w"])
    assert run.wait(300) == "done"
    seg, table = logic.import_results(run)
    notes = (table.GetAttribute(mrml.NOTES_ATTRIBUTE) or "").split("\n")
    assert any(n.startswith("T2W was removed from the scene while BrainUNet ran") for n in notes), notes
    before = mrml.table_to_rows(table)
    assert any("T2W" in column for column in before[0])
    assert logic.update_statistics(seg, table) is False
    assert repr(mrml.table_to_rows(table)) == repr(before)
    seg.SetNodeReferenceID(INPUT_VOLUME_REFERENCE + "t2w", None)  # as a saved scene, opened again, has it
    assert logic.update_statistics(seg, table) is False
    seg.GetSegmentation().RemoveSegment("ET")
    assert logic.update_statistics(seg, table) is True
    notes = (table.GetAttribute(mrml.NOTES_ATTRIBUTE) or "").split("\n")
    recomputed = next(n for n in notes if n.startswith(RECOMPUTED_NOTE))
    assert "the intensities of T2W are left out (no longer in the scene)" in recomputed


def test_a_volume_node_whose_image_holds_no_voxels_is_refused_with_what_to_do(scene, tmp_path):
    import pytest
    import vtk

    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions
    from brainunet.errors import InputError

    nodes, _ = scenarios.load_synthetic_case(scene, seed=2)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty FLAIR")
    image = vtk.vtkImageData()
    image.SetDimensions(10, 10, 10)  # a size, but no voxel values
    empty.SetAndObserveImageData(image)
    count = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="has no image data. Load the image again"):
        logic.start({**logic.guess_inputs(), "t2f": empty}, RunOptions(device="cpu"))
    assert scene.GetNumberOfNodes() == count



def test_a_native_t1_the_worker_left_out_is_not_linked_and_stays_out_of_recomputed_statistics(scene, tmp_path):
    import numpy as np

    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, INPUT_VOLUME_REFERENCE, RunOptions

    nodes, _ = scenarios.load_synthetic_case(scene, seed=3)
    elsewhere = np.array(mrml.ijk_to_ras(nodes["t1n"]))
    elsewhere[2, 3] += 400.0  # a T1 of another study: no overlap
    nodes["t1n"].SetIJKToRASMatrix(mrml._numpy_to_matrix(elsewhere))
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    seg, table = logic.segment(logic.guess_inputs(), RunOptions(device="cpu"), timeout=300)
    notes = (table.GetAttribute(mrml.NOTES_ATTRIBUTE) or "").split("\n")
    assert any(n.startswith("T1 left out of the statistics:") for n in notes), notes
    assert seg.GetNodeReference(INPUT_VOLUME_REFERENCE + "t1n") is None
    assert seg.GetNodeReference(INPUT_VOLUME_REFERENCE + "t1c") is nodes["t1c"]
    assert logic.update_statistics(seg, table) is False  # unedited: the same figures, and no error


def test_a_native_t1_the_panel_cannot_read_is_left_out_with_a_note_not_a_refusal(scene, tmp_path):
    import numpy as np

    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, INPUT_VOLUME_REFERENCE, RunOptions
    from brainunet.imageio import Volume

    nodes, _ = scenarios.load_synthetic_case(scene, seed=3)
    blank = mrml.add_volume_node(scene, Volume(np.zeros((40, 48, 36), np.float32), mrml.ijk_to_ras(nodes["t1n"])),
                                 "Blank T1")
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    inputs = {**logic.guess_inputs(), "t1n": blank}
    seg, table = logic.segment(inputs, RunOptions(device="cpu"), timeout=300)
    notes = (table.GetAttribute(mrml.NOTES_ATTRIBUTE) or "").split("\n")
    assert any(n.startswith("T1 left out of the statistics:") and "constant" in n for n in notes), notes
    assert seg.GetNodeReference(INPUT_VOLUME_REFERENCE + "t1n") is None
    assert seg.GetSegmentation().GetNumberOfSegments() == 3


def test_an_import_that_fails_half_way_leaves_the_scene_as_it_was(scene, tmp_path, monkeypatch):
    """A re-run into a corrected segmentation that fails after its segments were replaced (here: the
    table cannot be written) puts the corrected segments and the table back, and adds no node."""
    import pytest

    from BrainUNetSegmentationLib import logic as logic_module
    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions

    scenarios.load_synthetic_case(scene, seed=3)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    seg, table = logic.segment(logic.guess_inputs(), RunOptions(device="cpu"), timeout=300)
    seg.GetSegmentation().RemoveSegment("NETC")  # a correction in Segment Editor
    rows = mrml.table_to_rows(table)
    description = table.GetDescription()
    ids = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]

    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    assert run.wait(300) == "done"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mrml, "statistics_table", fail)
    with pytest.raises(OSError, match="disk full"):
        logic.import_results(run, segmentation_node=seg, table_node=table)
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == ids
    segmentation = seg.GetSegmentation()
    assert sorted(segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())) == ["ET", "SNFH"]
    assert mrml.table_to_rows(table) == rows and table.GetDescription() == description
    # failing at the last step, after references, attributes and the place in the Data module were written
    monkeypatch.undo()
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "Study")
    sh.CreateItem(study, scene.GetFirstNodeByName("Case_T1CE"))  # (slicer-core makes no items by itself)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Reviewed")
    sh.CreateItem(folder, seg)
    seg.SetAttribute("Reviewer", "AB")
    attributes = {name: seg.GetAttribute(name) for name in seg.GetAttributeNames()}
    reference_id = seg.GetNodeReferenceID(logic_module.REFERENCE_VOLUME_REFERENCE)
    ids = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    assert run.wait(300) == "done"
    monkeypatch.setattr(BrainUNetLogic, "provenance", staticmethod(fail))
    with pytest.raises(OSError, match="disk full"):
        logic.import_results(run, segmentation_node=seg, table_node=table)
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == ids
    assert {name: seg.GetAttribute(name) for name in seg.GetAttributeNames()} == attributes
    assert seg.GetNodeReferenceID(logic_module.REFERENCE_VOLUME_REFERENCE) == reference_id
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == folder
    assert segmentation.GetNumberOfSegments() == 2 and mrml.table_to_rows(table) == rows
    assert table.GetColumnUnitLabel("volume_ml") == "mL"
    # into a new segmentation: the half-made segmentation is removed again
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"))
    assert run.wait(300) == "done"
    with pytest.raises(OSError, match="disk full"):
        logic.import_results(run)
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == ids


def test_a_result_names_its_model_and_earlier_results_on_the_volume_are_hidden(scene, tmp_path):
    import os

    import brainunet
    from BrainUNetSegmentationLib import logic as logic_module
    from BrainUNetSegmentationLib.logic import BrainUNetLogic, RunOptions

    scenarios.load_synthetic_case(scene, seed=4)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    first, first_table = logic.segment(logic.guess_inputs(), RunOptions(device="cpu"), timeout=300)
    for node in (first, first_table):
        assert node.GetAttribute(logic_module.PROVENANCE_MODEL) == os.environ["BRAINUNET_MODEL"]  # conftest's
        assert node.GetAttribute(logic_module.PROVENANCE_QUALITY) == "standard"
        assert node.GetAttribute(logic_module.PROVENANCE_VERSION) == brainunet.__version__
        assert node.GetAttribute(logic_module.PROVENANCE_DATE)
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "a user's own segmentation")
    other.CreateDefaultDisplayNodes()
    second, _ = logic.segment(logic.guess_inputs(), RunOptions(device="cpu", tta=True), timeout=300)
    assert second.GetAttribute(logic_module.PROVENANCE_QUALITY) == "test-time augmentation (8 passes)"
    assert logic.hide_other_results(second) == [first.GetName()]
    assert not first.GetDisplayNode().GetVisibility() and second.GetDisplayNode().GetVisibility()
    assert other.GetDisplayNode().GetVisibility()  # not a result on this volume: left alone
    assert first.GetSegmentation().GetNumberOfSegments() == 3  # hidden, not changed


def test_edits_made_to_the_chosen_output_while_the_worker_runs_are_kept(scene, tmp_path):
    """The result goes into a new segmentation when the one it was to replace was edited during the run
    (a voxel painted, a segment renamed): the edits stay, a note says where the result went. Showing or
    hiding it is no edit: then the result replaces it as asked."""
    import numpy as np

    from BrainUNetSegmentationLib import mrml
    from BrainUNetSegmentationLib.logic import EDITED_DURING_RUN_NOTE, BrainUNetLogic, RunOptions

    nodes, _ = scenarios.load_synthetic_case(scene, seed=3)
    logic = BrainUNetLogic(scene, sys.executable, str(tmp_path))
    first, first_table = logic.segment(logic.guess_inputs(), RunOptions(device="cpu"), timeout=300)

    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"), segmentation_node=first)
    snfh = mrml.segment_mask(first, "SNFH", nodes["t1c"])
    painted = np.zeros_like(snfh)
    painted[2:6, 2:6, 2:6] = True  # a corner of the image, far from any tumour
    import slicer
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml._oriented_image(snfh | painted, mrml.ijk_to_ras(nodes["t1c"])), first, "SNFH",
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    edited = mrml.segmentation_contents(first)
    assert run.wait(300) == "done", run.error
    seg, table = logic.import_results(run, segmentation_node=first, table_node=first_table)
    assert seg is not first and table is not first_table
    assert mrml.segmentation_contents(first) == edited  # the painted voxels are still there
    assert mrml.segment_mask(first, "SNFH", nodes["t1c"])[2:6, 2:6, 2:6].all()
    (note,) = [note for note in run.notes if EDITED_DURING_RUN_NOTE in note]
    assert note.startswith(f'"{first.GetName()}" {EDITED_DURING_RUN_NOTE}') and f'"{seg.GetName()}"' in note
    assert note in (table.GetAttribute(mrml.NOTES_ATTRIBUTE) or "") and run.kept_output is first
    assert logic.hide_other_results(seg, keep=[run.kept_output]) == []  # the one being corrected stays shown
    assert first.GetDisplayNode().GetVisibility()

    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"), segmentation_node=seg)
    seg.GetSegmentation().GetSegment("ET").SetName("Enhancing (checked)")
    assert run.wait(300) == "done", run.error
    renamed, _ = logic.import_results(run, segmentation_node=seg, table_node=table)
    assert renamed is not seg and seg.GetSegmentation().GetSegment("ET").GetName() == "Enhancing (checked)"

    count = scene.GetNumberOfNodes()
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"), segmentation_node=renamed)
    renamed.GetDisplayNode().SetVisibility(False)
    renamed.GetDisplayNode().SetSegmentVisibility("SNFH", False)
    assert run.wait(300) == "done", run.error
    replaced, _ = logic.import_results(run, segmentation_node=renamed)
    assert replaced is renamed and not any(EDITED_DURING_RUN_NOTE in note for note in run.notes)
    assert scene.GetNumberOfNodes() == count + 1  # its table only: no new segmentation

    # segments that cannot be read at the end count as changed: the result goes beside them, not over them
    run = logic.start(logic.guess_inputs(), RunOptions(device="cpu"), segmentation_node=replaced)
    assert run.wait(300) == "done", run.error
    original = mrml.segmentation_contents
    mrml.segmentation_contents = lambda node: 1 / 0
    try:
        beside, _ = logic.import_results(run, segmentation_node=replaced)
    finally:
        mrml.segmentation_contents = original
    assert beside is not replaced and replaced.GetSegmentation().GetNumberOfSegments() == 3


def test_segmentation_contents_see_voxel_name_and_surface_edits_not_display_changes(scene):
    import numpy as np
    import slicer
    import vtk

    from BrainUNetSegmentationLib import mrml

    scenarios.load_synthetic_case(scene, seed=1)
    reference = scene.GetFirstNodeByName("Case_T1CE")
    shape = reference.GetImageData().GetDimensions()
    labels = np.zeros(shape, np.uint8)
    labels[10:14, 10:14, 10:14] = 1
    labels[14:18, 10:14, 10:14] = 2
    labels[18:20, 10:14, 10:14] = 3
    seg = mrml.create_segmentation(scene, labels, reference)
    seg.GetSegmentation().CollapseBinaryLabelmaps(False)  # segments share one layer, as Segment Editor leaves them
    before = mrml.segmentation_contents(seg)
    seg.GetDisplayNode().SetSegmentOpacity3D("ET", 0.2)
    seg.GetDisplayNode().SetVisibility(False)
    assert mrml.segmentation_contents(seg) == before
    grown = labels == 2
    grown[14, 14, 10] = True  # one voxel painted
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml._oriented_image(grown, mrml.ijk_to_ras(reference)), seg, "SNFH",
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    painted = mrml.segmentation_contents(seg)
    assert painted != before
    seg.GetDisplayNode().SetVisibility(True)
    seg.CreateClosedSurfaceRepresentation()  # a derived representation, made to show it in 3D: no edit
    assert mrml.segmentation_contents(seg) == painted
    seg.GetSegmentation().GetSegment("NETC").SetColor(0.1, 0.2, 0.3)
    coloured = mrml.segmentation_contents(seg)
    assert coloured != painted
    seg.GetSegmentation().SeparateSegmentLabelmap("ET")  # moved to a layer of its own, voxels unchanged
    separated = mrml.segmentation_contents(seg)
    assert separated != coloured
    slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(seg.GetSegmentation().GetSegment("ET"), 2)
    flagged = mrml.segmentation_contents(seg)  # marked Completed in Segment Editor's status column
    assert flagged != separated
    seg.GetSegmentation().GetSegment("ET").SetTag("TerminologyEntry", "Segmentation category and type - 3D "
                                                   "Slicer General Anatomy list~SCT^49755003^Morphologically "
                                                   "Altered Structure~SCT^4147007^Mass~^^~^^~^^")
    assert mrml.segmentation_contents(seg) != flagged

    surfaces = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")  # a model imported as segments
    surfaces.GetSegmentation().SetSourceRepresentationName("Closed surface")
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    ball = surfaces.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [1.0, 0.0, 0.0])
    drawn = mrml.segmentation_contents(surfaces)
    surfaces.CreateBinaryLabelmapRepresentation()  # derived from the surfaces: no edit
    assert mrml.segmentation_contents(surfaces) == drawn
    sphere.SetRadius(3.0)
    sphere.Update()
    surfaces.GetSegmentation().GetSegment(ball).GetRepresentation("Closed surface").DeepCopy(sphere.GetOutput())
    assert mrml.segmentation_contents(surfaces) != drawn
