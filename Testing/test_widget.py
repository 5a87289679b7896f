"""The module widget (BrainUNetSegmentation.py) with its real .ui file, offscreen under PySide6.

Slicer's C++ widgets and Python modules are replaced by the test-only stand-ins of widget_harness.py;
the scene, the MRML nodes and the background segmentation process are real. These tests prove the
module's wiring (names, signals, parameter node, run/cancel/import flow), not the C++ widgets.
"""
from __future__ import annotations

import ast
import logging
import sys
import time
import types
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

import PySide6.QtUiTools  # noqa: E402,F401  (a test dependency: missing, the suite must fail, not skip)

import widget_harness  # noqa: E402
from widget_harness import MODULE_FILE, UI_FILE, WidgetHarness, process_events  # noqa: E402

RUN_TIMEOUT_S = 120
# the bundled model as the registry lists it: the panel shows what the registry says, whichever model ships
from brainunet import weights as _weights  # noqa: E402

BUNDLED_ENTRY = _weights.load_registry(_weights.REGISTRY_PATH)[0]
BUNDLED = BUNDLED_ENTRY.name
SHAPE = (40, 48, 36)


@pytest.fixture
def harness(tmp_path):
    with WidgetHarness() as h:
        h.widget.logic.python_executable = sys.executable
        h.widget.logic.temp_root = str(tmp_path)
        h.dependency_checks = []

        def no_install(askConfirmation=True):
            h.dependency_checks.append(askConfirmation)
            return True

        h.widget.logic.ensureDependencies = no_install  # never install packages from a test
        yield h


def add_case(h, names=("Case_T1CE", "Case_T2", "Case_FLAIR"), seed=0):
    from brainunet import synthetic
    from BrainUNetSegmentationLib import mrml

    volumes, _ = synthetic.make_case(seed=seed, shape=SHAPE)
    return {role: mrml.add_volume_node(h.scene, volumes[role], name)
            for role, name in zip(("t1c", "t2w", "t2f"), names)}


def apply_on_a_case(h) -> None:
    """A synthetic case segmented through the panel on the CPU, without the 3D surface."""
    add_case(h)
    h.widget.enter()
    h.ui.deviceComboBox.setCurrentIndex(1)  # cpu
    h.ui.show3DCheckBox.setChecked(False)
    h.ui.applyButton.click()
    h.wait_until(lambda: h.widget._run is None, RUN_TIMEOUT_S)


def text(widget) -> str:
    return widget.text()


def nothing_runs(run) -> bool:
    """No worker process is left: none was started (Cancel while the inputs were written) or it ended."""
    return run.process is None or run.process.poll() is not None


# ---------------------------------------------------------------------------------------------
# (a) the .ui file
# ---------------------------------------------------------------------------------------------

EXPECTED_WIDGETS = {
    "inputsCollapsibleButton": "ctkCollapsibleButton",
    "outputsCollapsibleButton": "ctkCollapsibleButton",
    "advancedCollapsibleButton": "ctkCollapsibleButton",
    "resultsCollapsibleButton": "ctkCollapsibleButton",
    "t1cSelector": "qMRMLNodeComboBox",
    "t2wSelector": "qMRMLNodeComboBox",
    "t2fSelector": "qMRMLNodeComboBox",
    "t1nSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "segmentationShow3DButton": "qMRMLSegmentationShow3DButton",
    "autoDetectButton": "QPushButton",
    "modelComboBox": "QComboBox",
    "modelInfoLabel": "QLabel",
    "addModelButton": "QPushButton",
    "deviceComboBox": "QComboBox",
    "qualityComboBox": "QComboBox",
    "show3DCheckBox": "QCheckBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit",
    "resultsTableView": "QTableWidget",
    "exportCsvButton": "QPushButton",
    "updateStatisticsButton": "QPushButton",
}


def test_ui_file_declares_slicer_widgets_and_scene_connections():
    root = ElementTree.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "BrainUNetSegmentation"
    declared = {cw.findtext("class"): (cw.findtext("extends"), cw.findtext("header"))
                for cw in root.iter("customwidget")}
    assert declared["qMRMLNodeComboBox"] == ("QWidget", "qMRMLNodeComboBox.h")
    assert declared["ctkCollapsibleButton"] == ("QWidget", "ctkCollapsibleButton.h")
    assert declared["qMRMLWidget"] == ("QWidget", "qMRMLWidget.h")
    assert declared["qMRMLSegmentationShow3DButton"] == ("ctkMenuButton", "qMRMLSegmentationShow3DButton.h")
    used = {w.get("class") for w in root.iter("widget")}
    qt_classes = {"QLabel", "QPushButton", "QComboBox", "QCheckBox", "QProgressBar", "QPlainTextEdit", "QTableWidget"}
    assert used - qt_classes <= set(declared), "a custom widget is used without a <customwidget> declaration"
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {receiver for sender, signal, receiver, slot in widget_harness.ui_connections(UI_FILE)
                 if sender == "BrainUNetSegmentation" and signal == "mrmlSceneChanged(vtkMRMLScene*)"
                 and slot == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors == connected


def test_ui_loads_with_expected_widgets(harness):
    ui = harness.ui
    for name, cls in EXPECTED_WIDGETS.items():
        widget = getattr(ui, name, None)
        assert widget is not None, f"{name} missing from the .ui file"
        assert widget.metaObject().className() == cls or type(widget).__name__ == cls, name
    # selectors: types and flags as Slicer modules set them; each got the scene through the .ui connections
    for name in ("t1cSelector", "t2wSelector", "t2fSelector", "t1nSelector"):
        sel = getattr(ui, name)
        assert sel.property("nodeTypes") == ["vtkMRMLScalarVolumeNode"]
        assert sel.property("showChildNodeTypes") is False  # label maps are not MRI inputs
        assert sel.property("addEnabled") is False and sel.property("removeEnabled") is False
        assert sel.mrmlScene() is harness.scene
    assert ui.t1nSelector.property("noneEnabled") is True
    out = ui.outputSegmentationSelector
    assert out.property("nodeTypes") == ["vtkMRMLSegmentationNode"]
    assert out.property("noneEnabled") is True and out.property("addEnabled") is False
    assert out.property("noneDisplay") == "Create new segmentation"
    assert out.mrmlScene() is harness.scene
    assert ui.segmentationShow3DButton.segmentationNode() is None
    assert [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count())] == ["auto", "cpu", "cuda"]
    assert [ui.qualityComboBox.itemText(i) for i in range(ui.qualityComboBox.count())] == [
        "Standard", "Test-time augmentation (8 passes)"]
    assert ui.logTextEdit.isReadOnly()
    assert text(ui.applyButton) == "Apply"
    assert not ui.exportCsvButton.isEnabled() and not ui.updateStatisticsButton.isEnabled()
    assert ui.inputsCollapsibleButton.property("text") == "Inputs"
    assert ui.advancedCollapsibleButton.property("collapsed") is True


def test_module_description_and_light_imports(harness):
    parent = types.SimpleNamespace()
    harness.module.BrainUNetSegmentation(parent)
    assert parent.title == "BrainUNet Segmentation"
    assert parent.categories == ["Segmentation"]
    assert parent.contributors and parent.helpText.strip() and parent.acknowledgementText.strip()
    # Slicer imports every module at start-up: nothing heavy at module scope.
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    allowed = {"logging", "os", "time", "traceback", "qt", "ctk", "slicer", "vtk", "slicer.ScriptedLoadableModule", "slicer.util",
               "slicer.parameterNodeWrapper", "slicer.i18n"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert {a.name for a in node.names} <= allowed, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.module in allowed, ast.unparse(node)
    # the logic class: both bases, built on first use
    from BrainUNetSegmentationLib.logic import BrainUNetLogic

    cls = harness.module.BrainUNetSegmentationLogic
    assert issubclass(cls, BrainUNetLogic)
    assert issubclass(cls, sys.modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleLogic)
    assert isinstance(harness.widget.logic, cls) and harness.widget.logic.scene is harness.scene
    assert harness.module.BrainUNetSegmentationTest  # the in-app self-test exists


def test_the_self_test_skips_without_pytorch_and_neither_asks_nor_installs(harness, monkeypatch):
    """Extension build machines run the in-app self-test without PyTorch and without anyone to answer a
    dialog: it must skip the scenarios, not ask or install; with everything installed it runs them."""
    import slicer.util
    from BrainUNetSegmentationLib import scenarios

    asked, ran, shown = [], [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: asked.append(a) or False, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: asked.append(a), raising=False)
    monkeypatch.setattr(scenarios, "run_all_scenarios", lambda scene, **k: ran.append(scene))

    class TorchLogic:
        installed = False

        def torchInstalled(self):
            return TorchLogic.installed

        def installTorch(self, **kwargs):
            asked.append(kwargs)

    def self_test():
        test = harness.module.BrainUNetSegmentationTest()
        test.delayDisplay = lambda message, *args: shown.append(message)
        test.test_BrainUNetScenarios()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension not installed
    self_test()
    assert "the PyTorch extension" in shown[-1] and "Skipped" in shown[-1]
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=TorchLogic))
    self_test()
    assert "Skipped: torch" in shown[-1]
    assert asked == [] and ran == []
    TorchLogic.installed = True  # the test environment has the Python packages and a recent torch
    self_test()
    assert asked == [] and len(ran) == 1 and shown[-1] == "Test passed"


def test_an_install_that_fails_offline_says_how_to_go_on_and_apply_works_again(harness, monkeypatch):
    """No internet on the first Apply: the PyTorch extension's installer (or pip) fails; the message says to
    connect or to install from a folder of wheels, nothing is added, and Apply can be pressed again."""
    import subprocess

    import slicer.util

    ui, widget = harness.ui, harness.widget
    pip_failure = subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", "light-the-torch>=0.5"])

    installs = []

    class OfflineTorchLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, **kwargs):
            installs.append(kwargs)
            raise pip_failure

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=OfflineTorchLogic))
    del widget.logic.ensureDependencies  # the real one, with the PyTorch extension's installer failing
    add_case(harness)
    widget.enter()
    count = harness.scene.GetNumberOfNodes()
    # one question first, saying what the download costs; declined, nothing is installed or run
    harness.answers[:] = [False]
    ui.applyButton.click()
    (question,) = harness.questions
    assert "about 200 MB" in question and "Slicer does not respond" in question and installs == []
    assert ui.statusLabel.text().startswith("BrainUNet needs PyTorch") and harness.errors() == []
    harness.answers[:] = [True]
    ui.applyButton.click()
    assert len(harness.questions) == 2 and len(installs) == 1 and installs[0]["askConfirmation"] is False
    (message,) = harness.errors()
    assert "Installing torch" in message and "light-the-torch" in message
    assert "connect and press Apply again" in message and "--no-index --find-links FOLDER torch" in message
    assert harness.scene.GetNumberOfNodes() == count and widget._run is None
    assert text(ui.applyButton) == "Apply" and ui.applyButton.isEnabled()
    # PyTorch there, a Python package missing and pip offline: the same advice, naming that package
    monkeypatch.setattr(OfflineTorchLogic, "torchInstalled", lambda self: True)
    monkeypatch.setattr(type(widget.logic), "missingPythonPackages", lambda self: ["slicerio"])
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: (_ for _ in ()).throw(pip_failure),
                        raising=False)
    with pytest.raises(Exception, match="Installing slicerio failed .*--find-links FOLDER slicerio"):
        widget.logic.ensureDependencies(askConfirmation=False)


def test_a_pytorch_that_fails_to_load_says_how_to_repair_it(harness, monkeypatch):
    """A half-installed PyTorch (on Windows, a DLL that fails to load) makes the PyTorch extension's check
    raise; Apply says it cannot be loaded and how to reinstall it, adds nothing, and can be pressed again."""
    ui, widget = harness.ui, harness.widget

    class DamagedTorchLogic:
        def torchInstalled(self):
            raise OSError("[WinError 126] The specified module could not be found. Error loading c10.dll")

        def installTorch(self, **kwargs):
            raise AssertionError("nothing is installed over a damaged PyTorch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=DamagedTorchLogic))
    del widget.logic.ensureDependencies  # the real one
    add_case(harness)
    widget.enter()
    count = harness.scene.GetNumberOfNodes()
    ui.applyButton.click()
    (message,) = harness.errors()
    assert "PyTorch is installed but cannot be loaded" in message and "c10.dll" in message
    assert "PyTorch Utils" in message and "Uninstall, restart Slicer" in message
    assert harness.questions == [] and harness.scene.GetNumberOfNodes() == count and widget._run is None
    assert text(ui.applyButton) == "Apply" and ui.applyButton.isEnabled()
    from brainunet.errors import BrainUNetError

    with pytest.raises(BrainUNetError, match="cannot be loaded"):  # the self-test's check says the same
        widget.logic.missingDependencies()


def test_on_a_computer_with_an_nvidia_gpu_the_question_offers_the_small_cpu_build(harness, monkeypatch):
    """The PyTorch extension installs the 2-3 GB CUDA build wherever an NVIDIA driver is found; the first
    Apply's question says so, OK installs the 200 MB CPU-only build, and Cancel says where the other is."""
    widget = harness.widget
    installs = []

    class TorchLogic:
        def torchInstalled(self):
            return False

        def installTorch(self, **kwargs):
            installs.append(kwargs)
            return types.SimpleNamespace(__version__="2.5.0")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=TorchLogic))
    monkeypatch.setattr(type(widget.logic), "missingPythonPackages", lambda self: [])
    del widget.logic.ensureDependencies  # the real one
    for nvidia, backend in ((True, "cpu"), (False, None)):
        monkeypatch.setattr(type(widget.logic), "nvidiaDriverPresent", staticmethod(lambda nvidia=nvidia: nvidia))
        harness.answers[:] = [True]
        assert widget.logic.ensureDependencies() is True
        assert installs[-1]["forceComputationBackend"] == backend and installs[-1]["askConfirmation"] is False
    gpu_question, plain_question = harness.questions
    assert "NVIDIA GPU" in gpu_question and "2 to 3 GB" in gpu_question and "CPU-only build" in gpu_question
    assert "PyTorch Utils" in gpu_question and "about 200 MB" in gpu_question
    assert "NVIDIA" not in plain_question and "about 200 MB" in plain_question
    harness.answers[:] = [False]  # declined: nothing installed
    assert widget.logic.ensureDependencies() is False and len(installs) == 2


def test_an_nvidia_driver_is_found_by_its_nvidia_smi_on_the_path(harness, monkeypatch, tmp_path):
    """The check light-the-torch makes before it picks a CUDA build: nvidia-smi on the PATH."""
    detect = type(harness.widget.logic).nvidiaDriverPresent
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect() is False
    tool = tmp_path / ("nvidia-smi.exe" if sys.platform == "win32" else "nvidia-smi")
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert detect() is True


#: Calls whose text arguments the user reads (windowTitle="BrainUNet", the product's name, excepted).
USER_TEXT_CALLS = {"_setStatus", "setText", "setToolTip", "errorDisplay", "warningDisplay", "infoDisplay",
                   "confirmOkCancelDisplay", "tryWithErrorDisplay", "cancelRun", "getSaveFileName", "addItem",
                   "BrainUNetError", "InputError", "_onLog", "appendPlainText"}


def _untranslated_texts(node) -> list:
    """Text literals (words, f-strings, concatenations) in an argument expression that no _() wraps."""
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) and any(c.isalpha() for c in node.value) else []
    if isinstance(node, ast.JoinedStr):
        return [ast.unparse(node)]
    if isinstance(node, ast.IfExp):
        return _untranslated_texts(node.body) + _untranslated_texts(node.orelse)
    if isinstance(node, ast.BinOp):
        return _untranslated_texts(node.left) + _untranslated_texts(node.right)
    return []


def test_user_visible_texts_go_through_translation():
    """As the anchors do: every text the user reads is wrapped in _() (slicer.i18n.tr), with a literal
    argument that Qt's lupdate can extract (values come in through .format, never an f-string)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    shipped = [n for n in tree.body if not (isinstance(n, ast.ClassDef) and n.name.endswith("Test"))]
    found = []
    for top in shipped:
        for node in ast.walk(top):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name == "_":
                    assert len(node.args) == 1 and isinstance(node.args[0], ast.Constant), ast.unparse(node)
                if name in USER_TEXT_CALLS:
                    arguments = node.args + [k.value for k in node.keywords if k.arg != "windowTitle"]
                    found += [(name, text) for a in arguments for text in _untranslated_texts(a)]
            elif isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) in (
                    "self.parent.title", "self.parent.helpText", "self.parent.acknowledgementText"):
                value = node.value
                assert isinstance(value, ast.Call) and getattr(value.func, "id", "") == "_", ast.unparse(node)
            elif isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "self.parent.categories":
                assert all(isinstance(e, ast.Call) and e.func.id == "translate" for e in node.value.elts)
    assert not found, f"texts shown without _(): {found}"


def test_the_bridges_messages_go_through_translation_too():
    """The bridge's InputError texts reach the panel's message boxes and status line: wrapped in _() as well
    (Slicer's tr inside Slicer, the text itself under slicer-core)."""
    lib = MODULE_FILE.parent / "BrainUNetSegmentationLib"
    found = []
    for path in (lib / "logic.py", lib / "mrml.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_":
                assert len(node.args) == 1 and isinstance(node.args[0], ast.Constant), ast.unparse(node)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("InputError", "BrainUNetError"):
                found += [(path.name, text) for a in node.args for text in _untranslated_texts(a)]
    assert not found, f"texts shown without _(): {found}"


# ---------------------------------------------------------------------------------------------
# (b) auto-fill on enter
# ---------------------------------------------------------------------------------------------


def test_enter_auto_fills_selectors_from_volume_names(harness):
    ui = harness.ui
    nodes = add_case(harness)
    # the selectors list the new volumes but (noneEnabled) do not pick one by themselves
    assert ui.t2wSelector.currentNode() is None
    harness.widget.enter()
    assert ui.t1cSelector.currentNode() is nodes["t1c"]
    assert ui.t2wSelector.currentNode() is nodes["t2w"]
    assert ui.t2fSelector.currentNode() is nodes["t2f"]
    assert ui.t1nSelector.currentNode() is None
    p = harness.widget.logic.getParameterNode()
    assert (p.t1c, p.t2w, p.t2f, p.t1n) == (nodes["t1c"], nodes["t2w"], nodes["t2f"], None)
    # a choice made by the user is kept on the next enter; Auto-detect overrides it
    ui.t2wSelector.setCurrentNode(nodes["t2f"])
    harness.widget.exit()
    harness.widget.enter()
    assert ui.t2wSelector.currentNode() is nodes["t2f"]
    ui.autoDetectButton.click()
    assert ui.t2wSelector.currentNode() is nodes["t2w"]
    assert "Case_T2" in ui.statusLabel.text()
    # GUI -> parameter node for the other settings
    ui.deviceComboBox.setCurrentIndex(1)
    ui.qualityComboBox.setCurrentIndex(1)
    ui.show3DCheckBox.setChecked(False)
    assert (p.device, p.tta, p.show3D) == ("cpu", True, False)


def test_an_input_the_user_emptied_stays_empty_and_a_new_volume_is_offered(harness):
    ui, widget = harness.ui, harness.widget
    nodes = add_case(harness)
    widget.enter()
    ui.t2wSelector.setCurrentNode(None)  # to run without a poor T2W
    widget.exit()
    widget.enter()  # back from Segment Editor
    assert ui.t2wSelector.currentNode() is None and ui.t1cSelector.currentNode() is nodes["t1c"]
    from brainunet import synthetic
    from BrainUNetSegmentationLib import mrml

    volumes, _ = synthetic.make_case(seed=1, shape=SHAPE)
    t1 = mrml.add_volume_node(harness.scene, volumes["t1c"], "Case_T1")  # loaded later: offered on the next enter
    widget.exit()
    widget.enter()
    assert ui.t1nSelector.currentNode() is t1 and ui.t2wSelector.currentNode() is None
    # loaded while the panel is shown: offered without leaving it
    ui.t1nSelector.setCurrentNode(None)
    flair2 = mrml.add_volume_node(harness.scene, volumes["t2f"], "Second FLAIR")
    harness.wait_until(lambda: ui.t1nSelector.currentNode() is None)  # emptied by the user: stays so
    ui.t2fSelector.setCurrentNode(None)
    harness.scene.RemoveNode(nodes["t2f"])
    harness.scene.RemoveNode(flair2)
    flair3 = mrml.add_volume_node(harness.scene, volumes["t2f"], "Case_FLAIR_new")
    harness.wait_until(lambda: ui.t2fSelector.currentNode() is flair3, 5)
    # a vector volume (an RGB screenshot) named like a sequence is no candidate
    harness.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Case_FLAIR screenshot")
    assert widget.logic.ambiguous_inputs() == {}


def test_a_volume_filled_in_alone_is_emptied_when_a_second_one_matches_and_a_saved_choice_is_kept(harness):
    from brainunet import synthetic
    from BrainUNetSegmentationLib import mrml

    ui, widget = harness.ui, harness.widget
    widget.enter()
    volumes, _ = synthetic.make_case(seed=2, shape=SHAPE)
    axial = mrml.add_volume_node(harness.scene, volumes["t1c"], "AX T1 POST GD")
    harness.wait_until(lambda: ui.t1cSelector.currentNode() is axial, 5)
    mrml.add_volume_node(harness.scene, volumes["t1c"], "SAG T1 POST GD")  # the same loader, a moment later
    harness.wait_until(lambda: ui.t1cSelector.currentNode() is None, 5)
    assert "Several volumes now look like T1CE" in ui.statusLabel.text()
    # chosen by hand, it stays
    ui.t1cSelector.setCurrentNode(axial)
    mrml.add_volume_node(harness.scene, volumes["t1c"], "COR T1 POST GD")
    process_events(0.5)
    assert ui.t1cSelector.currentNode() is axial

    # a scene opened with BrainUNet's choices saved (T2W left empty on purpose): T2W stays empty
    t2 = mrml.add_volume_node(harness.scene, volumes["t2w"], "AX T2")
    harness.wait_until(lambda: ui.t2wSelector.currentNode() is t2, 5)
    ui.t2wSelector.setCurrentNode(None)
    widget._autoFilled = {}  # as in a new session
    harness.scene.StartState(harness.scene.ImportState)
    harness.scene.EndState(harness.scene.ImportState)
    assert ui.t2wSelector.currentNode() is None and ui.t1cSelector.currentNode() is axial


def test_an_input_chosen_in_a_saved_scene_is_kept_when_a_second_volume_matches(harness):
    from brainunet import synthetic
    from BrainUNetSegmentationLib import mrml

    ui, widget = harness.ui, harness.widget
    nodes = add_case(harness)
    widget.enter()
    assert ui.t1cSelector.currentNode() is nodes["t1c"]  # filled in by the panel, then saved with the scene
    widget._autoFilled, widget._chosenByUser = {}, set()  # the scene opened again, in a new session
    harness.scene.StartState(harness.scene.ImportState)
    harness.scene.EndState(harness.scene.ImportState)
    volumes, _ = synthetic.make_case(seed=2, shape=SHAPE)
    mrml.add_volume_node(harness.scene, volumes["t1c"], "SAG T1 POST GD")
    process_events(0.5)
    assert ui.t1cSelector.currentNode() is nodes["t1c"]
    assert harness.errors() == []


def test_a_second_click_while_apply_installs_starts_nothing_more(harness):
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()
    ui.deviceComboBox.setCurrentIndex(1)  # cpu

    def slow_install(askConfirmation=True):  # pip runs Qt's event loop: the user clicks Apply again
        harness.dependency_checks.append(askConfirmation)
        assert not ui.applyButton.isEnabled()
        widget.onApplyButton()
        return True

    widget.logic.ensureDependencies = slow_install
    ui.applyButton.click()
    assert harness.dependency_checks == [True] and widget._run is not None
    assert text(ui.applyButton) == "Cancel" and ui.applyButton.isEnabled()
    ui.applyButton.click()
    assert widget._run is None and text(ui.applyButton) == "Apply" and ui.applyButton.isEnabled()


def test_a_scene_closed_while_apply_installs_runs_nothing_on_the_next_one(harness):
    """pip runs Qt's event loop: the user may close the scene, and open another patient's, before the install
    ends. Apply was pressed for the first scene's volumes: nothing runs on volumes the user never checked."""
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()
    ui.deviceComboBox.setCurrentIndex(1)  # cpu

    def install_while_the_scene_changes(askConfirmation=True):
        harness.dependency_checks.append(askConfirmation)
        harness.scene.Clear(0)
        add_case(harness, names=("Next_T1CE", "Next_T2", "Next_FLAIR"), seed=1)
        process_events(0.5)
        return True

    widget.logic.ensureDependencies = install_while_the_scene_changes
    ui.applyButton.click()
    assert harness.dependency_checks == [True] and widget._run is None
    assert "scene was closed; nothing was run" in ui.statusLabel.text()
    assert harness.messages == [] and text(ui.applyButton) == "Apply"
    harness.wait_until(lambda: ui.t1cSelector.currentNode() is not None, 5)
    assert ui.t1cSelector.currentNode().GetName() == "Next_T1CE"  # the new scene, ready for its own Apply


def test_a_volume_loaded_while_apply_installs_does_not_change_the_inputs_it_was_pressed_with(harness):
    ui, widget = harness.ui, harness.widget
    nodes = add_case(harness)
    widget.enter()
    ui.deviceComboBox.setCurrentIndex(1)  # cpu
    assert ui.t1cSelector.currentNode() is nodes["t1c"]

    def install_while_a_series_loads(askConfirmation=True):
        harness.dependency_checks.append(askConfirmation)
        add_case(harness, names=("Other_T1CE", "Other_T2", "Other_FLAIR"), seed=1)  # matches every role again
        process_events(0.5)  # the panel's fill check would run now
        return True

    widget.logic.ensureDependencies = install_while_a_series_loads
    ui.applyButton.click()
    assert widget._run is not None
    parameters = widget.logic.getParameterNode()
    assert (parameters.t1c, parameters.t2w, parameters.t2f) == (nodes["t1c"], nodes["t2w"], nodes["t2f"])
    widget.cancelRun()
    assert harness.errors() == []


def test_a_double_click_on_apply_starts_the_run_and_does_not_cancel_it(harness):
    """The second click of a double-click reaches the button once it says Cancel: it is not taken as one;
    a click on Cancel a moment later is."""
    ui, widget = harness.ui, harness.widget
    widget.cancelIgnoredForS = type(widget).cancelIgnoredForS
    add_case(harness)
    widget.enter()
    ui.deviceComboBox.setCurrentIndex(1)  # cpu
    ui.applyButton.click()
    ui.applyButton.click()
    run = widget._run
    assert run is not None and text(ui.applyButton) == "Cancel" and run.state == "running"
    time.sleep(widget.cancelIgnoredForS)
    ui.applyButton.click()
    assert widget._run is None and run.state == "cancelled" and text(ui.applyButton) == "Apply"


def test_the_panel_follows_its_parameter_node(harness):
    """A scene loaded with the module open, or a script, changes the parameter node: the panel shows it,
    and does not write its older values back over it."""
    ui, widget = harness.ui, harness.widget
    nodes = add_case(harness)
    widget.enter()
    p = widget.logic.getParameterNode()
    p.tta = True
    p.device = "cpu"
    p.t2w = None
    assert ui.qualityComboBox.currentIndex() == 1 and ui.deviceComboBox.currentIndex() == 1
    assert ui.t2wSelector.currentNode() is None
    ui.show3DCheckBox.setChecked(False)  # the next change in the panel keeps the script's values
    assert (p.tta, p.device, p.t2w, p.t1c, p.show3D) == (True, "cpu", None, nodes["t1c"], False)


def test_auto_detect_leaves_a_sequence_that_several_volumes_match_and_says_so(harness):
    ui = harness.ui
    nodes = add_case(harness)
    harness.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Case_T2 resampled")
    harness.widget.enter()
    assert ui.t2wSelector.currentNode() is None  # neither T2 is taken on trust
    ui.autoDetectButton.click()
    assert ui.t1cSelector.currentNode() is nodes["t1c"] and ui.t2fSelector.currentNode() is nodes["t2f"]
    assert ui.t2wSelector.currentNode() is None
    assert "several volumes look like T2W (Case_T2, Case_T2 resampled)" in ui.statusLabel.text()
    ui.t2wSelector.setCurrentNode(nodes["t2f"])  # an earlier choice is emptied, not kept, by Auto-detect
    ui.autoDetectButton.click()
    assert ui.t2wSelector.currentNode() is None
    assert "Detected: T1CE = Case_T1CE" in ui.statusLabel.text()


def test_model_selector_lists_the_registry_and_passes_the_choice(harness, tmp_path, monkeypatch):
    """User-registered models first, the bundled network, the intensity baseline last and labelled; the box
    under it says what the selection was trained on, its inputs, accuracy and licence; the choice is kept
    in the parameter node and reaches the worker as --model."""
    import json

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "mine.pt").write_bytes(b"")  # listed, not loaded: the panel reads the registry only
    (home / "models" / "registry.json").write_text(json.dumps({"models": [{
        "name": "mine", "kind": "network", "description": "Trained on our own 40 cases", "file": "mine.pt",
        "sha256": "0" * 64, "settings": {"modalities": ["t1c", "t2f"], "modality_dropout": False}}]}))
    monkeypatch.setenv("BRAINUNET_HOME", str(home))
    monkeypatch.delenv("BRAINUNET_MODEL")  # the registry's own default: the first network
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()  # the list is read again on entering the module
    combo, info = ui.modelComboBox, ui.modelInfoLabel
    assert [combo.itemText(i) for i in range(combo.count())] == [
        "mine (default)", BUNDLED, "intensity-baseline (not a trained network)"]
    p = widget.logic.getParameterNode()
    assert p.model == "" and combo.currentIndex() == 0
    assert info.text().splitlines() == ["Trained on our own 40 cases", "Inputs: T1CE, FLAIR; all are required.",
                                        "T1 native is not used.", "Accuracy: not measured.", "Licence: not stated."]
    combo.setCurrentIndex(1)
    assert p.model == BUNDLED
    assert BUNDLED_ENTRY.description in info.text()
    assert "Inputs: T1CE, T2W, FLAIR; one of them may be missing, with lower accuracy." in info.text()
    assert f"Accuracy: {BUNDLED_ENTRY.extra['accuracy']}" in info.text()
    assert f"Licence: {BUNDLED_ENTRY.extra['licence']}" in info.text()
    combo.setCurrentIndex(2)
    assert p.model == "intensity-baseline" and "Not a trained network" in info.text()
    assert "all are required" in info.text()

    commands = []
    command = widget.logic.command
    widget.logic.command = lambda *args: commands.append(command(*args)) or commands[-1]
    for index in (1, 0):
        combo.setCurrentIndex(index)
        ui.applyButton.click()
        ui.applyButton.click()  # cancel: the command line is all this test needs
    assert commands[0][commands[0].index("--model") + 1] == BUNDLED
    assert "--model" not in commands[1]  # the default: the worker's own choice from the same registry
    assert harness.errors() == []
    p.model = "intensity-baseline"  # parameter node -> panel (a scene loaded with a saved choice)
    widget.updateGUIFromParameterNode()
    assert combo.currentIndex() == 2 and "Not a trained network" in info.text()


def test_add_model_file_registers_it_for_the_worker_and_selects_it(harness, tmp_path, monkeypatch, tiny_weights):
    """Add model file...: the weights file is checked and registered by a worker process, in the worker's
    folder under the name given, while the panel stays responsive (the button disabled meanwhile); then the
    list is read again with it first (the default) and selected. A file that is not BrainUNet weights is
    refused with the worker's reason and the list stays as it was."""
    home = tmp_path / "home"
    monkeypatch.delenv("BRAINUNET_MODEL")
    harness.widget.logic.user_home = str(home)
    ui, widget = harness.ui, harness.widget
    widget.enter()
    count = ui.modelComboBox.count()
    widget_harness.FileDialog.answers[:] = [tiny_weights[0]]
    widget_harness.InputDialog.answers[:] = [("our clinic model", True)]
    ui.addModelButton.click()
    assert widget._registerRun is not None and not ui.addModelButton.enabled  # returned before the worker ended
    assert "checking the file" in ui.statusLabel.text()
    harness.wait_until(lambda: widget._registerRun is None, RUN_TIMEOUT_S)
    assert harness.errors() == [] and ui.addModelButton.enabled
    assert ui.modelComboBox.count() == count + 1
    assert ui.modelComboBox.currentText() == "our-clinic-model (default)"
    assert "now the default" in ui.statusLabel.text()
    assert (home / "models" / "our-clinic-model.pt").is_file()
    assert not list((home / "models").glob("*.tmp"))
    assert widget.logic.getParameterNode().model == ""  # "the default", which this model now is

    (tmp_path / "notes.pt").write_text("not weights")
    widget_harness.FileDialog.answers[:] = [tmp_path / "notes.pt"]
    widget_harness.InputDialog.answers[:] = [("other", True)]
    ui.addModelButton.click()
    harness.wait_until(lambda: widget._registerRun is None, RUN_TIMEOUT_S)
    assert len(harness.errors()) == 1 and "could not be added" in harness.errors()[0]
    assert "cannot be read" in harness.errors()[0]  # the worker's reason, passed on
    assert ui.modelComboBox.count() == count + 1 and not (home / "models" / "other.pt").exists()
    assert ui.addModelButton.enabled and "could not be added" in ui.statusLabel.text()
    started = []  # from here on, no worker may start
    monkeypatch.setattr(widget.logic, "start_registering", lambda *a: started.append(a))
    widget_harness.FileDialog.answers[:] = []  # cancelled file dialog: nothing happens
    ui.addModelButton.click()
    assert ui.modelComboBox.count() == count + 1 and len(harness.errors()) == 1 and started == []
    # the same name again: asked first, and declined, nothing changes
    stamp = (home / "models" / "our-clinic-model.pt").stat().st_mtime_ns
    widget_harness.FileDialog.answers[:] = [tiny_weights[0]]
    widget_harness.InputDialog.answers[:] = [("our clinic model", True)]
    harness.answers[:] = [False]
    ui.addModelButton.click()
    assert len(harness.questions) == 1 and "already in the list" in harness.questions[0]
    assert started == []
    assert (home / "models" / "our-clinic-model.pt").stat().st_mtime_ns == stamp
    # a bundled model's name is refused at once: a user's model would hide it
    widget_harness.FileDialog.answers[:] = [tiny_weights[0]]
    widget_harness.InputDialog.answers[:] = [(BUNDLED, True)]
    from brainunet.errors import InputError

    with pytest.raises(InputError, match="comes with BrainUNet"):  # re-raised after the error display
        widget.onAddModelButton()
    assert "comes with BrainUNet" in harness.errors()[-1] and started == []
    assert ui.modelComboBox.count() == count + 1


def test_closing_the_module_while_a_model_is_added_stops_its_worker(harness, tmp_path, monkeypatch, tiny_weights):
    home = tmp_path / "home"
    harness.widget.logic.user_home = str(home)
    monkeypatch.delenv("BRAINUNET_MODEL")
    widget = harness.widget
    widget.enter()
    widget_harness.FileDialog.answers[:] = [tiny_weights[0]]
    widget_harness.InputDialog.answers[:] = [("clinic", True)]
    harness.ui.addModelButton.click()
    run = widget._registerRun
    harness.wait_until(lambda: run.process is not None, 30)  # the worker is running
    widget.cleanup()
    assert widget._registerRun is None and run.state == "cancelled" and not run.workdir.exists()
    assert run.process.poll() is not None  # stopped, not left running
    assert not (home / "models" / "clinic.pt").exists() and not list(home.rglob("*.tmp"))


def test_an_unreadable_user_registry_leaves_the_panel_usable(harness, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "registry.json").write_text("{ not json")
    monkeypatch.setenv("BRAINUNET_HOME", str(tmp_path))
    harness.widget.enter()
    assert harness.ui.modelComboBox.count() == 0 and harness.ui.modelInfoLabel.text() == ""
    assert "registry.json cannot be read" in harness.ui.statusLabel.text()
    assert harness.widget.logic.getParameterNode().model == ""  # the worker's default, which says the same


# ---------------------------------------------------------------------------------------------
# (c) a real background run
# ---------------------------------------------------------------------------------------------


def test_apply_runs_in_background_and_shows_results(harness, tmp_path):
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()
    ui.deviceComboBox.setCurrentIndex(1)  # cpu
    ui.applyButton.click()
    assert text(ui.applyButton) == "Cancel"
    assert not ui.inputsCollapsibleButton.isEnabled()
    assert harness.dependency_checks == [True]
    harness.wait_until(lambda: widget._run is None, RUN_TIMEOUT_S)

    assert harness.errors() == []
    assert text(ui.applyButton) == "Apply" and ui.inputsCollapsibleButton.isEnabled()
    assert ui.statusLabel.text().startswith("Done"), ui.statusLabel.text()
    assert ui.progressBar.value() == 100
    assert ui.logTextEdit.toPlainText().strip()
    segs = harness.nodes_of("vtkMRMLSegmentationNode")
    tables = harness.nodes_of("vtkMRMLTableNode")
    assert len(segs) == 1 and len(tables) == 1
    seg, table = segs[0], tables[0]
    assert seg.GetSegmentation().GetNumberOfSegments() == 3
    assert sorted(seg.GetSegmentation().GetNthSegmentID(i) for i in range(3)) == ["ET", "NETC", "SNFH"]
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")  # show3D is on by default
    assert seg.GetDisplayNode().GetVisibility()
    assert table.GetNumberOfRows() == 5
    assert ui.resultsTableView.rowCount() == 5
    headers = [ui.resultsTableView.horizontalHeaderItem(c).text() for c in range(ui.resultsTableView.columnCount())]
    assert headers[:4] == ["Region", "Name", "Voxels", "Volume (mL)"]
    assert [ui.resultsTableView.item(r, 0).text() for r in range(5)] == ["ET", "NETC", "SNFH", "TC", "WT"]
    assert ui.outputSegmentationSelector.currentNode() is None  # the next Apply creates a new one
    assert ui.segmentationShow3DButton.segmentationNode() is seg  # Show 3D acts on the result

    # export CSV
    assert ui.exportCsvButton.isEnabled()
    widget_harness.FileDialog.answers[:] = [tmp_path / "stats"]
    ui.exportCsvButton.click()
    lines = (tmp_path / "stats.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and lines[0].startswith("region,name,voxels,volume_ml")
    # "stats" typed again: the file the suffix makes it exists, and it is replaced only when the user says so
    (tmp_path / "stats.csv").write_text("an earlier patient's figures", encoding="utf-8")
    widget_harness.FileDialog.answers[:] = [tmp_path / "stats"]
    harness.answers[:] = [False]
    ui.exportCsvButton.click()
    assert len(harness.questions) == 1 and "stats.csv already exists" in harness.questions[0]
    assert (tmp_path / "stats.csv").read_text(encoding="utf-8") == "an earlier patient's figures"
    widget_harness.FileDialog.answers[:] = [tmp_path / "stats"]
    harness.answers[:] = [True]
    ui.exportCsvButton.click()
    assert (tmp_path / "stats.csv").read_text(encoding="utf-8").splitlines() == lines
    assert harness.busy_cursor_at_questions == [False, False]  # asked with the ordinary cursor
    harness.questions.clear()
    harness.busy_cursor_at_questions.clear()
    status = ui.statusLabel.text()
    widget_harness.FileDialog.answers[:] = [tmp_path / "no such folder" / "stats"]
    ui.exportCsvButton.click()  # an unwritable place: a message with the reason, the panel usable
    assert len(harness.errors()) == 1 and harness.errors()[0].startswith("Could not save the statistics to")
    assert "No such file or directory" in harness.errors()[0] and ui.statusLabel.text() == status
    assert widget_harness.QtWidgets.QApplication.overrideCursor() is None
    harness.messages.clear()

    # a correction in Segment Editor (ET erased), then Update statistics: the panel and the CSV follow it
    et_voxels = int(ui.resultsTableView.item(0, 2).text())
    tc_voxels = int(ui.resultsTableView.item(3, 2).text())
    assert et_voxels > 0 and ui.updateStatisticsButton.isEnabled()
    seg.GetSegmentation().RemoveSegment("ET")
    ui.updateStatisticsButton.click()
    assert harness.errors() == [] and ui.statusLabel.text().startswith("Statistics computed again")
    assert ui.resultsTableView.item(0, 2).text() == "0"
    assert int(ui.resultsTableView.item(3, 2).text()) == tc_voxels - et_voxels
    seg.GetSegmentation().RemoveSegment("NETC")
    shown = widget.logic.statisticsForDisplay(table)
    widget_harness.FileDialog.answers[:] = [""]
    ui.exportCsvButton.click()  # the file dialog cancelled: the table is not computed again
    assert widget.logic.statisticsForDisplay(table) == shown and harness.errors() == []
    widget_harness.FileDialog.answers[:] = [tmp_path / "edited"]
    ui.exportCsvButton.click()  # exporting computes them again first
    edited = (tmp_path / "edited.csv").read_text(encoding="utf-8").splitlines()
    assert [line.split(",")[2] for line in edited[1:4]] == ["0", "0", ui.resultsTableView.item(2, 2).text()]

    # choosing the result as output: Apply asks before replacing it; declined, nothing runs or changes
    ui.outputSegmentationSelector.setCurrentNode(seg)
    harness.answers[:] = [False]
    ui.applyButton.click()
    assert widget._run is None and text(ui.applyButton) == "Apply"
    assert len(harness.questions) == 1 and seg.GetName() in harness.questions[0]
    assert harness.busy_cursor_at_questions == [False]  # a question is asked with the ordinary cursor
    assert ui.statusLabel.text().startswith("Nothing was run")
    assert seg.GetSegmentation().GetNumberOfSegments() == 1  # as corrected above: SNFH only
    # accepted: the run updates that segmentation and its table, and creates no other
    harness.answers[:] = [True]
    ui.applyButton.click()
    harness.wait_until(lambda: widget._run is None, RUN_TIMEOUT_S)
    assert harness.errors() == [] and len(harness.questions) == 2
    assert harness.dependency_checks == [True]  # checked once per session
    assert harness.nodes_of("vtkMRMLSegmentationNode") == [seg]
    assert harness.nodes_of("vtkMRMLTableNode") == [table]
    assert seg.GetSegmentation().GetNumberOfSegments() == 3 and table.GetNumberOfRows() == 5
    assert ui.outputSegmentationSelector.currentNode() is seg  # an explicit choice stays
    ui.outputSegmentationSelector.setCurrentNode(None)
    assert ui.segmentationShow3DButton.segmentationNode() is None


def test_a_click_while_the_result_is_imported_starts_nothing(harness, monkeypatch):
    """The import runs on the application's thread; a click made then (on what still looked like Cancel)
    must not start a second run once it ends."""
    ui, widget = harness.ui, harness.widget
    real_import = widget.logic.importAndShow
    during = []

    def import_with_a_click(*args, **kwargs):
        widget._updateApplyButton()  # as the timer that fills empty selectors does when a node is added
        during.append((ui.applyButton.isEnabled(), text(ui.applyButton)))
        ui.applyButton.click()
        widget.onApplyButton()  # a click already on its way when the button was disabled
        return real_import(*args, **kwargs)

    monkeypatch.setattr(widget.logic, "importAndShow", import_with_a_click)
    apply_on_a_case(harness)
    assert during == [(False, "Loading the result...")]
    assert widget._run is None and harness.errors() == []
    assert len(harness.nodes_of("vtkMRMLSegmentationNode")) == 1
    assert text(ui.applyButton) == "Apply" and ui.applyButton.isEnabled()


def test_a_run_that_ends_while_the_user_is_in_another_module_hides_nothing(harness):
    """The user left the panel during a run (to correct an earlier result in Segment Editor, say): the new
    result is added and shown, and no earlier one disappears under their hands."""
    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    (first,) = harness.nodes_of("vtkMRMLSegmentationNode")
    ui.applyButton.click()
    widget.exit()
    harness.wait_until(lambda: widget._run is None, RUN_TIMEOUT_S)
    assert harness.errors() == []
    first_again, second = harness.nodes_of("vtkMRMLSegmentationNode")
    assert first_again is first and first.GetDisplayNode().GetVisibility()
    assert second.GetDisplayNode().GetVisibility() and "Hidden" not in ui.statusLabel.text()


def test_replacing_another_patients_result_says_whose_it_is(harness):
    """Patient A's result still chosen as output when patient B's volumes are selected: the question names
    the volume it was made from before anything is replaced."""
    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    (result,) = harness.nodes_of("vtkMRMLSegmentationNode")
    b = add_case(harness, names=("B_T1CE", "B_T2", "B_FLAIR"), seed=3)
    for selector, role in ((ui.t1cSelector, "t1c"), (ui.t2wSelector, "t2w"), (ui.t2fSelector, "t2f")):
        selector.setCurrentNode(b[role])
    ui.outputSegmentationSelector.setCurrentNode(result)
    harness.answers[:] = [False]
    ui.applyButton.click()
    assert widget._run is None and len(harness.questions) == 1
    assert ('"Case_T1CE BrainUNet" was made from another volume, "Case_T1CE", not from "B_T1CE".'
            in harness.questions[0])
    assert result.GetName() == "Case_T1CE BrainUNet" and result.GetSegmentation().GetNumberOfSegments() == 3


def test_a_second_result_hides_the_first_and_the_results_follow_the_chosen_segmentation(harness):
    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    ui.qualityComboBox.setCurrentIndex(1)  # again, with test-time augmentation, into a new segmentation
    ui.applyButton.click()
    harness.wait_until(lambda: widget._run is None, RUN_TIMEOUT_S)
    assert harness.errors() == []
    first, second = harness.nodes_of("vtkMRMLSegmentationNode")
    assert not first.GetDisplayNode().GetVisibility() and second.GetDisplayNode().GetVisibility()
    assert f"Hidden, not removed: {first.GetName()}." in ui.statusLabel.text()
    assert first.GetAttribute("BrainUNet.Quality") == "standard"
    assert second.GetAttribute("BrainUNet.Quality") == "test-time augmentation (8 passes)"

    # the first result chosen as output: its statistics are shown, and Update statistics works on it
    first.GetSegmentation().RemoveSegment("ET")
    ui.outputSegmentationSelector.setCurrentNode(first)
    assert ui.updateStatisticsButton.isEnabled()
    ui.updateStatisticsButton.click()
    assert harness.errors() == [] and ui.resultsTableView.item(0, 2).text() == "0"
    second_table = second.GetNodeReference("BrainUNetStatistics")
    assert int(second_table.GetTable().GetValueByName(0, "voxels").ToDouble()) > 0  # untouched

    # a saved scene opened again (an import): the panel shows the latest result's statistics
    ui.outputSegmentationSelector.setCurrentNode(None)
    widget._showResults(None)
    widget._resultSegmentationNodeID = None
    assert not ui.exportCsvButton.isEnabled()
    harness.scene.StartState(harness.scene.ImportState)
    harness.scene.EndState(harness.scene.ImportState)
    assert ui.exportCsvButton.isEnabled() and ui.resultsTableView.rowCount() == 5
    assert widget._resultNodes() == (second, second_table)


def test_a_segmentation_edited_while_its_replacement_runs_keeps_the_edits(harness):
    """The clinician chose a result as output, accepted replacing it, then corrected it in Segment Editor
    while the worker ran: the correction stays, the result comes as a new segmentation, and the notes say so."""
    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    (first,) = harness.nodes_of("vtkMRMLSegmentationNode")
    first_table = first.GetNodeReference("BrainUNetStatistics")
    ui.outputSegmentationSelector.setCurrentNode(first)
    harness.answers[:] = [True]
    ui.applyButton.click()
    assert widget._run is not None
    first.GetSegmentation().RemoveSegment("NETC")  # the correction, made before the run ends
    harness.wait_until(lambda: widget._run is None, RUN_TIMEOUT_S)
    assert harness.errors() == []
    assert first.GetSegmentation().GetNumberOfSegments() == 2  # as corrected
    assert first.GetNodeReference("BrainUNetStatistics") is first_table
    segmentations = harness.nodes_of("vtkMRMLSegmentationNode")
    assert len(segmentations) == 2 and segmentations[1].GetSegmentation().GetNumberOfSegments() == 3
    assert widget._resultNodes()[0] is segmentations[1]
    assert any("was changed while BrainUNet ran" in w and first.GetName() in w for w in harness.warnings)
    assert first.GetDisplayNode().GetVisibility()  # still shown, to go on correcting it


def test_a_run_into_a_copy_of_a_result_gives_the_copy_its_own_table(harness):
    """A copied result (Data module Clone copies the node's references) chosen as output: the original
    keeps its table and its figures; the copy gets a table of its own."""
    from BrainUNetSegmentationLib.logic import RunOptions

    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    (first,) = harness.nodes_of("vtkMRMLSegmentationNode")
    first_table = first.GetNodeReference("BrainUNetStatistics")
    first.GetSegmentation().RemoveSegment("ET")  # the clinician's correction, then Update statistics
    ui.outputSegmentationSelector.setCurrentNode(first)
    ui.updateStatisticsButton.click()
    corrected = widget.logic.statisticsForDisplay(first_table)
    copy = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Copy of the result")
    copy.SetNodeReferenceID("BrainUNetStatistics", first_table.GetID())
    run = widget.logic.start(widget.logic.guess_inputs(), RunOptions(device="cpu"))
    assert run.wait(RUN_TIMEOUT_S) == "done"
    seg, table = widget.logic.importAndShow(run, copy)
    assert harness.errors() == []
    assert seg is copy and table is not first_table
    assert copy.GetNodeReference("BrainUNetStatistics") is table
    assert first.GetNodeReference("BrainUNetStatistics") is first_table
    assert widget.logic.statisticsForDisplay(first_table) == corrected  # the original's figures untouched

    # a copy with the original's segments, corrected and its statistics updated: again a table of its own
    clone = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Clone of the result")
    clone.Copy(first)
    clone.SetName("Clone of the result")
    assert clone.GetNodeReference("BrainUNetStatistics") is first_table
    clone.GetSegmentation().RemoveSegment("SNFH")
    ui.outputSegmentationSelector.setCurrentNode(clone)
    ui.updateStatisticsButton.click()
    assert harness.errors() == []
    own = clone.GetNodeReference("BrainUNetStatistics")
    assert own is not first_table and own.GetName() == "Clone of the result statistics"
    assert widget.logic.statisticsForDisplay(first_table) == corrected
    assert widget.logic.statisticsForDisplay(own) != corrected

    # a clone whose statistics cannot be computed (its volume's reference gone): no table is left behind
    orphan = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Clone without its volume")
    orphan.Copy(first)
    orphan.RemoveNodeReferenceIDs("BrainUNetReferenceVolume")
    count = harness.scene.GetNumberOfNodes()
    ui.outputSegmentationSelector.setCurrentNode(orphan)
    ui.updateStatisticsButton.click()
    assert "could not be computed again" in ui.statusLabel.text()
    assert harness.scene.GetNumberOfNodes() == count
    assert orphan.GetNodeReference("BrainUNetStatistics") is first_table
    assert widget.logic.statisticsForDisplay(first_table) == corrected

    # Export CSV on another clone, its file dialog cancelled: no table of its own either
    exported = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Clone to export")
    exported.Copy(first)
    count = harness.scene.GetNumberOfNodes()
    ui.outputSegmentationSelector.setCurrentNode(exported)
    widget_harness.FileDialog.answers[:] = [""]
    ui.exportCsvButton.click()
    assert harness.scene.GetNumberOfNodes() == count and harness.errors() == []
    assert exported.GetNodeReference("BrainUNetStatistics") is first_table


def test_reload_drops_the_bridge_and_the_runtime_so_edits_take_effect(harness):
    names = [n for n in sys.modules if n.split(".")[0] in ("BrainUNetSegmentationLib", "brainunet")]
    saved = {n: sys.modules[n] for n in names}
    assert "brainunet" in saved and "BrainUNetSegmentationLib.logic" in saved
    try:
        harness.widget.onReload()
        assert not [n for n in sys.modules if n.split(".")[0] in ("BrainUNetSegmentationLib", "brainunet")]
        assert harness.widget.reloaded
    finally:
        sys.modules.update(saved)


# ---------------------------------------------------------------------------------------------
# (d) invalid inputs
# ---------------------------------------------------------------------------------------------


def test_apply_is_disabled_until_two_sequences_are_selected(harness):
    """(One missing sequence is for the model to accept or refuse: test_scenarios.)"""
    ui = harness.ui
    add_case(harness)
    harness.widget.enter()
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findText(BUNDLED))  # trained with modality dropout
    assert ui.applyButton.isEnabled()
    ui.t2wSelector.setCurrentNode(None)
    assert ui.applyButton.isEnabled() and "T2W is not selected" in ui.applyButton.toolTip()
    # a model that needs every sequence (the intensity baseline) says so before anything runs
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findText("intensity-baseline", widget_harness.QtCore.Qt.MatchStartsWith))
    assert not ui.applyButton.isEnabled()
    assert "needs every sequence: select T2W" in ui.applyButton.toolTip()
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findText(BUNDLED))
    assert ui.applyButton.isEnabled()
    # one volume chosen for two sequences: refused before anything runs
    ui.t2wSelector.setCurrentNode(ui.t2fSelector.currentNode())
    assert not ui.applyButton.isEnabled() and "The same volume is selected as T2W and FLAIR" in ui.applyButton.toolTip()
    assert ui.statusLabel.text() == ui.applyButton.toolTip()  # said where the user looks, not only on hover
    ui.t2wSelector.setCurrentNode(None)
    assert ui.applyButton.isEnabled() and ui.statusLabel.text() == ""  # mended: no longer said
    assert "T2W is not selected" in ui.applyButton.toolTip()  # and the tooltip tells the state it is in now
    ui.t2fSelector.setCurrentNode(None)
    assert harness.widget.logic.getParameterNode().t2w is None
    assert not ui.applyButton.isEnabled() and "T2W and FLAIR" in ui.applyButton.toolTip()
    count = harness.scene.GetNumberOfNodes()
    ui.applyButton.click()  # disabled: nothing happens
    process_events(0.3)
    assert harness.widget._run is None and harness.scene.GetNumberOfNodes() == count
    assert harness.errors() == []

def test_notes_on_a_result_are_shown_when_it_is_done(harness):
    """A run without T2W finishes (the bundled model was trained with modality dropout) and says so in a
    warning once the result is in, not only in the log."""
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()
    ui.deviceComboBox.setCurrentIndex(1)  # cpu
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findText(BUNDLED))
    ui.t2wSelector.setCurrentNode(None)
    ui.applyButton.click()
    harness.wait_until(lambda: widget._run is None, RUN_TIMEOUT_S)
    assert harness.errors() == []
    assert ui.statusLabel.text().startswith("Done") and ui.statusLabel.text().endswith("Check the notes.")
    assert len(harness.warnings) == 1 and "T2W missing" in harness.warnings[0]
    table = harness.nodes_of("vtkMRMLTableNode")[0]
    assert "T2W missing" in (table.GetDescription() or "")  # the note stays with the figures


def test_a_bad_input_is_reported_and_changes_nothing(harness, tmp_path):
    """slicer.util.tryWithErrorDisplay around Apply: the reason in a message box, no run, no node, no file."""
    import numpy as np

    from BrainUNetSegmentationLib import mrml
    from brainunet.imageio import Volume

    ui, widget = harness.ui, harness.widget
    add_case(harness)
    flat = mrml.add_volume_node(harness.scene, Volume(np.full(SHAPE, 5, np.int16), np.eye(4), "Blank"))
    widget.enter()
    ui.t2fSelector.setCurrentNode(flat)
    count = harness.scene.GetNumberOfNodes()
    ui.applyButton.click()
    assert len(harness.errors()) == 1
    assert harness.errors()[0].startswith("The segmentation could not start.") and "constant" in harness.errors()[0]
    assert "could not start" in ui.statusLabel.text() and text(ui.applyButton) == "Apply"
    assert widget._run is None and harness.scene.GetNumberOfNodes() == count and list(tmp_path.iterdir()) == []
    assert widget_harness.QtWidgets.QApplication.overrideCursor() is None  # the wait cursor is gone again


def test_a_failing_auto_detect_is_reported(harness):
    def broken():
        raise RuntimeError("the scene could not be read")

    harness.widget.logic.guess_inputs = broken
    harness.ui.autoDetectButton.click()
    assert harness.errors() == ["Could not choose the inputs.\n\nthe scene could not be read"]
    assert widget_harness.QtWidgets.QApplication.overrideCursor() is None


def test_failed_run_reports_error_and_adds_nothing(harness):
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()
    fail = [sys.executable, "-c", "import sys; print('error: Simulated failure of the network.'); sys.exit(2)"]
    widget.logic.command = lambda files, outputs, options: fail
    count = harness.scene.GetNumberOfNodes()
    ui.applyButton.click()
    workdir = widget._run.workdir
    harness.wait_until(lambda: widget._run is None, 30)
    assert harness.errors() and "Simulated failure of the network." in harness.errors()[0]
    assert not workdir.exists()  # the inputs written for the worker are removed
    assert ui.statusLabel.text().startswith("Segmentation failed")
    assert text(ui.applyButton) == "Apply"
    assert harness.scene.GetNumberOfNodes() == count
    assert not ui.exportCsvButton.isEnabled()


# ---------------------------------------------------------------------------------------------
# (e) cancel
# ---------------------------------------------------------------------------------------------


def test_cancel_restores_button_and_adds_nothing(harness, tmp_path):
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()
    count = harness.scene.GetNumberOfNodes()
    ui.applyButton.click()
    run = widget._run
    assert run is not None and text(ui.applyButton) == "Cancel"
    ui.applyButton.click()
    assert text(ui.applyButton) == "Apply"
    assert widget._run is None and run.state == "cancelled"
    assert nothing_runs(run)
    assert "Cancelled" in ui.statusLabel.text()
    process_events(0.5)  # nothing arrives late
    assert harness.nodes_of("vtkMRMLSegmentationNode") == []
    assert harness.nodes_of("vtkMRMLTableNode") == []
    assert harness.scene.GetNumberOfNodes() == count
    assert not run.workdir.exists()
    assert harness.errors() == []


def test_cancel_while_the_worker_segments_stops_it_and_adds_nothing(harness):
    """Cancel once the worker process runs and has reported progress: the process tree is stopped before it
    finishes, its folder goes, and the scene and the inputs are as they were."""
    from BrainUNetSegmentationLib import mrml

    ui, widget = harness.ui, harness.widget
    nodes = add_case(harness)
    before = {role: mrml.volume_from_node(node).data.copy() for role, node in nodes.items()}
    widget.enter()
    count = harness.scene.GetNumberOfNodes()
    ui.applyButton.click()
    run = widget._run
    # no Qt events meanwhile: the panel cannot take the result in before Cancel
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while run.process is None or run._lines.empty():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.01)
    ui.applyButton.click()
    assert text(ui.applyButton) == "Apply" and widget._run is None and run.state == "cancelled"
    assert run.process.poll() not in (None, 0)  # stopped by Cancel, not finished
    process_events(0.5)
    assert harness.nodes_of("vtkMRMLSegmentationNode") == [] and harness.nodes_of("vtkMRMLTableNode") == []
    assert harness.scene.GetNumberOfNodes() == count and not run.workdir.exists()
    for role, node in nodes.items():
        assert np.array_equal(mrml.volume_from_node(node).data, before[role]), role
    assert harness.errors() == []


def test_closing_the_scene_cancels_the_run(harness):
    ui, widget = harness.ui, harness.widget
    add_case(harness)
    widget.enter()
    ui.applyButton.click()
    run = widget._run
    assert run is not None
    harness.scene.Clear(0)  # File > Close scene: the inputs disappear
    assert widget._run is None and run.state == "cancelled" and nothing_runs(run)
    assert text(ui.applyButton) == "Apply" and "scene was closed" in ui.statusLabel.text()
    process_events(0.3)
    assert harness.nodes_of("vtkMRMLSegmentationNode") == [] and harness.nodes_of("vtkMRMLTableNode") == []
    # the module is usable again on the new scene
    nodes = add_case(harness)
    ui.autoDetectButton.click()
    assert ui.t1cSelector.currentNode() is nodes["t1c"]
    assert widget.logic.getParameterNode().t1c is nodes["t1c"]


def test_closing_the_scene_after_a_result_leaves_nothing_of_it_on_the_panel(harness):
    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    assert ui.progressBar.value() == 100 and ui.statusLabel.text().startswith("Done")
    assert ui.segmentationShow3DButton.segmentationNode() is not None
    harness.scene.Clear(0)  # File > Close scene
    assert ui.progressBar.value() == 0 and ui.statusLabel.text() == "" and ui.logTextEdit.toPlainText() == ""
    assert ui.segmentationShow3DButton.segmentationNode() is None
    assert widget._resultNodes() == (None, None) and ui.resultsTableView.rowCount() == 0
    assert not ui.exportCsvButton.isEnabled() and not ui.updateStatisticsButton.isEnabled()
    assert harness.errors() == []


def test_a_statistics_table_deleted_in_the_data_module_is_no_longer_shown(harness):
    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    (result,) = harness.nodes_of("vtkMRMLSegmentationNode")
    harness.scene.RemoveNode(result.GetNodeReference("BrainUNetStatistics"))
    assert ui.resultsTableView.rowCount() == 0 and widget._resultNodes()[1] is None
    assert not ui.exportCsvButton.isEnabled() and not ui.updateStatisticsButton.isEnabled()
    # a second result, then the first one's segmentation deleted: the second stays shown
    ui.applyButton.click()
    harness.wait_until(lambda: widget._run is None, RUN_TIMEOUT_S)
    second = [node for node in harness.nodes_of("vtkMRMLSegmentationNode") if node is not result]
    assert len(second) == 1 and widget._resultNodes()[0] is second[0]
    harness.scene.RemoveNode(result)
    assert widget._resultNodes() == (second[0], second[0].GetNodeReference("BrainUNetStatistics"))
    assert ui.resultsTableView.rowCount() == 5
    # the shown result's segmentation deleted: its table is still the last figures, and says so when updated
    harness.scene.RemoveNode(second[0])
    ui.updateStatisticsButton.click()
    assert "segmentation of these statistics was removed" in ui.statusLabel.text()
    assert harness.errors() == []


def test_a_scene_loaded_with_the_panel_hidden_is_left_as_loaded_until_the_panel_is_shown(harness):
    """A scene opened while another module is shown gains no BrainUNet choices (they would be saved with
    it); entering the panel then fills them in and shows the scene's latest result, as with the panel open."""
    ui, widget = harness.ui, harness.widget
    widget.enter()
    widget.exit()
    harness.scene.Clear(0)  # File > Close scene, then a scene is loaded
    harness.scene.StartState(harness.scene.ImportState)
    nodes = add_case(harness)
    harness.scene.EndState(harness.scene.ImportState)
    process_events(0.3)
    saved = harness.scene.GetSingletonNode("BrainUNetSegmentation", "vtkMRMLScriptedModuleNode")
    roles = [saved.GetNthNodeReferenceRole(i) for i in range(saved.GetNumberOfNodeReferenceRoles())] if saved else []
    assert not [role for role in roles if saved.GetNodeReferenceID(role)]  # no volume chosen in it
    assert widget._parameterNode is None and ui.t1cSelector.currentNode() is None
    widget.enter()
    assert ui.t1cSelector.currentNode() is nodes["t1c"] and widget.logic.getParameterNode().t2f is nodes["t2f"]


def test_a_scene_opened_before_the_panel_was_first_shown_shows_its_result_when_the_panel_is(harness):
    """Slicer builds the panel the first time it is shown: a saved scene opened before that (at start-up, from
    the Welcome module) shows its latest result's statistics when the panel opens, as one opened later does."""
    apply_on_a_case(harness)
    (result,) = harness.nodes_of("vtkMRMLSegmentationNode")
    before = harness.widget
    before.exit()
    before.cleanup()
    before.uiWidget.setMRMLScene(None)  # its selectors stop observing the scene, as the harness's tear-down does
    harness.create_widget()  # the panel of the next Slicer session, built after the scene was opened
    ui, widget = harness.ui, harness.widget
    assert ui.resultsTableView.rowCount() == 0  # built, not shown: nothing done yet
    widget.enter()
    assert ui.resultsTableView.rowCount() == 5 and ui.exportCsvButton.isEnabled()
    assert widget._resultNodes() == (result, result.GetNodeReference("BrainUNetStatistics"))
    assert harness.errors() == [] and before._cleanedUp


def test_segments_corrected_in_segment_editor_are_counted_when_the_panel_is_shown_again(harness):
    """Corrections made in another module (Segment Editor) are counted when the panel is shown again; a result
    chosen (or a saved scene's) whose segments were edited after its table says so; a table of a scene saved
    by an older version, which does not record what it was computed from, is left as it is."""
    ui, widget = harness.ui, harness.widget
    apply_on_a_case(harness)
    (result,) = harness.nodes_of("vtkMRMLSegmentationNode")
    table = result.GetNodeReference("BrainUNetStatistics")
    assert ui.resultsTableView.item(0, 2).text() != "0"  # ET voxels
    widget.exit()  # to Segment Editor
    result.GetSegmentation().RemoveSegment("ET")
    assert ui.resultsTableView.item(0, 2).text() != "0"  # hidden, not yet computed
    widget.enter()
    assert ui.resultsTableView.item(0, 2).text() == "0"
    assert ui.statusLabel.text().startswith("The segments were edited: Statistics computed again")
    widget.exit()
    widget._setStatus("")
    widget.enter()  # nothing edited since: nothing computed
    assert ui.statusLabel.text() == ""
    result.GetSegmentation().RemoveSegment("SNFH")
    ui.outputSegmentationSelector.setCurrentNode(result)  # the result chosen as output: its table is shown
    assert ui.statusLabel.text().startswith(f'The segments of "{result.GetName()}" were edited after these')
    ui.updateStatisticsButton.click()
    assert ui.statusLabel.text().startswith("Statistics computed again")
    assert not widget.logic.statistics_outdated(result, table)
    result.GetSegmentation().RemoveSegment("NETC")
    table.RemoveAttribute("BrainUNet.SegmentsDigest")  # a table an older version wrote
    widget.exit()
    widget._setStatus("")
    widget.enter()
    assert ui.statusLabel.text() == ""
    assert harness.errors() == []


def test_a_result_that_cannot_be_loaded_leaves_no_full_progress_bar(harness, monkeypatch, caplog):
    ui, widget = harness.ui, harness.widget

    def fail(*args, **kwargs):
        raise RuntimeError("the reference volume was removed")

    monkeypatch.setattr(widget.logic, "importAndShow", fail)
    with caplog.at_level(logging.ERROR):
        apply_on_a_case(harness)
    assert "Could not load the results: the reference volume was removed" in ui.statusLabel.text()
    # the traceback reaches the console (a bug report), the message box holds the worker's log and it
    assert any(record.exc_info and "the reference volume was removed" in str(record.exc_info[1])
               for record in caplog.records)
    assert "Traceback" in harness.details[-1] and "in fail" in harness.details[-1]
    assert ui.progressBar.value() == 0 and text(ui.applyButton) == "Apply"
    assert harness.nodes_of("vtkMRMLSegmentationNode") == []


def test_an_exception_in_a_qt_slot_fails_the_test():
    """The harness turns an exception that Qt would only print into a failure when its block ends."""
    from PySide6 import QtCore

    def broken_slot():
        raise ValueError("raised in a slot")

    with pytest.raises(AssertionError, match="exception in a Qt slot: ValueError"):
        with WidgetHarness():
            QtCore.QTimer.singleShot(0, broken_slot)
            process_events(0.2)
