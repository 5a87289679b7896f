"""BrainUNet Segmentation: 3D Slicer module for glioma segmentation (ET, NETC, SNFH) on brain MRI.

This file is the thin Slicer layer: module description, parameter node, widget and the module logic.
The work is done by the ``brainunet`` package next to this file (``BrainUNetSegmentationLib.logic`` holds the
Qt-free logic; the network runs in a background PythonSlicer process so the application never freezes).

Only light modules are imported here: Slicer imports every scripted module at start-up, and
``brainunet`` pulls in numpy/scipy (and torch in the background process). ``brainunet`` is imported
on first use, inside methods.

Signals are connected with the attribute style (``button.clicked.connect(...)``) and Qt properties are
read with ``widget.property("name")`` and written with setters, so the same code runs in Slicer
(PythonQt) and in the PySide6 widget test (Testing/test_widget.py).
"""

import logging
import os
import time
import traceback

import ctk  # noqa: F401  (Slicer modules' standard import; the CTK widgets come from the .ui file)
import qt
import slicer
import vtk  # noqa: F401
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Input role -> selector widget name in the .ui file.
INPUT_SELECTORS = {"t1c": "t1cSelector", "t2w": "t2wSelector", "t2f": "t2fSelector", "t1n": "t1nSelector"}
#: Items of the device combo box, in order.
DEVICES = ("auto", "cpu", "cuda")
#: Python packages the background process needs besides torch (import name -> pip requirement).
PYTHON_REQUIREMENTS = {
    "nibabel": "nibabel>=5.0",
    "scipy": "scipy>=1.10",
    "tqdm": "tqdm>=4.60",
    "slicerio": "slicerio>=1.4",
    "SimpleITK": "SimpleITK>=2.2",  # bundled with Slicer; N4 bias-field correction
    "deepbet": "deepbet>=1.0.2",  # brain extraction of scans that still hold the skull (after torch: uses it)
    "platformdirs": "platformdirs>=3",  # the per-user folder of downloaded models, as the command line finds it
}
MINIMUM_TORCH_VERSION = (2, 1)
TORCH_REQUIREMENT = ">=2.1"
#: Node reference from a BrainUNet segmentation to its statistics table (re-runs update the same table).
STATISTICS_TABLE_REFERENCE = "BrainUNetStatistics"
POLL_INTERVAL_MS = 200


#
# BrainUNetSegmentation
#


class BrainUNetSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("BrainUNet Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainUNet developers"]
        self.parent.helpText = _("""
Segments a glioma on brain MRI into enhancing tumour (ET), non-enhancing tumour core (NETC) and
surrounding FLAIR hyperintensity (SNFH), following the BraTS 2023 labels, and measures each region
(volume, centroid, largest diameter, mean intensities; TC = ET + NETC and WT = TC + SNFH).
<br><br>
Inputs: T1CE (contrast T1), T2W and FLAIR of one study, in any orientation and spacing, skull on or
off (the brain is extracted when needed); T1 native is used only by a model that reads it (the model's information under <i>Advanced</i> lists the sequences it reads). One of T1CE, T2W and FLAIR may be
missing, with lower accuracy (the model's information under <i>Advanced</i> gives its figures). Click <b>Auto-detect</b> to choose
them from the volume names. The segmentation runs in the background (seconds to a minute on a CPU):
Slicer stays usable and the run can be cancelled. Nothing is added to the scene until a run has
finished; the result is a segmentation to correct in Segment Editor, and <b>Update statistics</b>
measures it again.
<br><br>
For research use only; not a medical device. Every result needs review by a qualified reader.
<br><br>
Documentation: <a href="https://github.com/brainunet/SlicerBrainUNet">github.com/brainunet/SlicerBrainUNet</a>
""")
        self.parent.acknowledgementText = _("""
Uses PyTorch through the SlicerPyTorch extension, and deepbet (Fisch et al., 2024) for brain extraction.
The bundled model learned from BraTS 2018 training cases (Menze et al., IEEE TMI 2015; Bakas et al.,
Scientific Data 2017; Bakas et al., arXiv:1811.02629). Label definitions follow the BraTS 2023 adult
glioma challenge. The sample cases are those SlicerMONAIAuto3DSeg publishes.
""")
        # the segments' terminology context, loaded at start-up as SlicerTotalSegmentator and
        # SlicerMONAIAuto3DSeg load theirs (so a .seg.nrrd opened before the module shows its terms)
        app = getattr(slicer, "app", None)  # absent in the slicer-core test harness
        if app is not None:
            app.connect("startupCompleted()", loadTerminology)
            app.connect("startupCompleted()", registerSampleData)


def loadTerminology() -> str:
    """Load Resources/Terminology/BrainUNet.term.json into Slicer's terminology logic (once is enough;
    loading again replaces the context). Returns the context name, or "" where the logic is absent."""
    path = os.path.join(os.path.dirname(__file__), "Resources", "Terminology", "BrainUNet.term.json")
    try:
        terminologies = slicer.modules.terminologies.logic()
    except AttributeError:  # no Terminologies module (a test harness)
        return ""
    return terminologies.LoadTerminologyFromFile(path)


def registerSampleData() -> list:
    """Add the public BraTS sample cases to Sample Data, under "BrainUNet"; returns their names."""
    try:
        import SampleData
    except ImportError:  # Sample Data module not loaded
        return []
    from BrainUNetSegmentationLib.sampledata import register_sample_data

    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "BrainUNetSegmentation.png")
    registered = getattr(getattr(slicer, "modules", None), "sampleDataSources", None)
    return register_sample_data(SampleData.SampleDataLogic, thumbnail=icon, registered=registered)


#
# BrainUNetSegmentationParameterNode
#


@parameterNodeWrapper
class BrainUNetSegmentationParameterNode:
    """
    t1c, t2w, t2f, t1n - input volumes (t1n optional).
    outputSegmentation - segmentation to overwrite; None creates a new one on Apply.
    model - registry name of the model to run; "" runs the default model.
    device - "auto", "cpu" or "cuda".
    tta - test-time augmentation over the 8 flips (the second quality).
    show3D - create closed-surface models after the run.
    """

    t1c: vtkMRMLScalarVolumeNode
    t2w: vtkMRMLScalarVolumeNode
    t2f: vtkMRMLScalarVolumeNode
    t1n: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    device: str = "auto"
    tta: bool = False
    show3D: bool = True


#
# BrainUNetSegmentationWidget
#


class BrainUNetSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    #: A click on Cancel this soon after Apply turned into it is the second click of a double-click on
    #: Apply (Windows' longest double-click is 0.5 s), not a cancel.
    cancelIgnoredForS = 0.5

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.uiWidget = None
        self._parameterNode = None
        self._observedParameterNode = None  # the MRML node behind it, whose changes the panel shows
        self._updatingGUI = False
        self._updatingParameterNode = False
        self._starting = False  # Apply was clicked and the run is not started yet (installing, asking)
        self._importing = False  # a finished run's result is being added to the scene
        self._cleanedUp = False
        self._entered = False
        self._run = None  # BrainUNetSegmentationLib.logic.BackgroundRun while a segmentation is running
        self._registerRun = None  # the same, while Add model file... checks and registers a file
        self._runOutputSegmentation = None
        self._dependenciesReady = False
        self._resultTableNodeID = None
        self._resultSegmentationNodeID = None
        self._autoFilled = {}  # role -> ID of the node the panel filled in by itself (not filled in again)
        self._chosenByUser = set()  # roles whose volume the user selected: never emptied by the panel
        self._sceneImportedWhileHidden = False  # shown (choices, latest result) when the panel is entered
        self._cancelShownAt = float("-inf")  # when Apply last became Cancel
        self._applyRefusalShown = None  # the status line's "same volume twice", cleared once it is mended
        self._sceneCloses = 0  # scenes closed so far: a start that waited on an install checks it is still the same
        self._timer = None
        self._models = []  # BrainUNetSegmentationLib.logic.ModelChoice per item of the model combo box

    # -- set-up and tear-down -----------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        self.uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainUNetSegmentation.ui"))
        self.layout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        # The .ui connects mrmlSceneChanged(vtkMRMLScene*) to each selector's setMRMLScene.
        self.uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = _logicClass()()
        loadTerminology()  # also when the module was added after start-up (Additional module paths)
        registerSampleData()  # likewise; a case already registered at start-up is not added again

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPollTimer)
        self._registerTimer = qt.QTimer()  # Add model file...: its worker process
        self._registerTimer.setInterval(POLL_INTERVAL_MS)
        self._registerTimer.timeout.connect(self.onRegisterPollTimer)
        # volumes loaded while the panel is shown fill its empty inputs; once the loading is over (one
        # check for a whole folder of series, with their names set)
        self._fillTimer = qt.QTimer()
        self._fillTimer.setSingleShot(True)
        self._fillTimer.setInterval(POLL_INTERVAL_MS)
        self._fillTimer.timeout.connect(self.onFillTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        for selectorName in INPUT_SELECTORS.values():
            getattr(self.ui, selectorName).currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.currentNodeChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.currentNodeChanged.connect(self.onOutputSegmentationChanged)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.addModelButton.clicked.connect(self.onAddModelButton)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.qualityComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.show3DCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.autoDetectButton.clicked.connect(self.onAutoDetectButton)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.exportCsvButton.clicked.connect(self.onExportCsvButton)
        self.ui.updateStatisticsButton.clicked.connect(self.onUpdateStatisticsButton)

        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self._showResults(None)
        self.updateModelList()
        try:  # set up again by Reload while shown: Slicer does not call enter() then
            self._entered = slicer.util.selectedModule() == "BrainUNetSegmentation"
        except Exception:  # no main window (a test harness)
            pass
        if self._sceneHoldsBrainUNetWork():
            # Slicer builds the panel when it is first shown: a scene opened before that (a saved .mrb
            # opened at start-up) is shown as one imported while the panel was hidden
            if self._entered:
                self._showImportedScene()
            else:
                self._sceneImportedWhileHidden = True
        else:
            self.initializeParameterNode()

    def _sceneHoldsBrainUNetWork(self) -> bool:
        """Whether the scene holds BrainUNet's saved choices or a BrainUNet result (read without adding a
        parameter node to it)."""
        saved = slicer.mrmlScene.GetSingletonNode("BrainUNetSegmentation", "vtkMRMLScriptedModuleNode")
        if saved is not None and any(saved.GetNodeReferenceID(saved.GetNthNodeReferenceRole(i))
                                     for i in range(saved.GetNumberOfNodeReferenceRoles())):
            return True
        return self.logic.latestResult()[0] is not None

    def cleanup(self) -> None:
        """Called when the application closes or the module is reloaded: stop the run, drop observers."""
        if self._timer is not None:
            self._timer.stop()
            self._registerTimer.stop()
            self._fillTimer.stop()
        if self._run is not None:
            self._run.cancel()
            self._run = None
        if self._registerRun is not None:  # a half-added model is never listed: the worker writes the registry last
            self._registerRun.cancel()
            self._registerRun = None
        self.removeObservers()
        self._parameterNode = None
        self._observedParameterNode = None
        self._cleanedUp = True
        self._entered = False

    def onReload(self) -> None:
        """Slicer's Reload runs this file again but keeps the modules it imported: drop the bridge and the
        runtime too, so that an edit of either takes effect without restarting Slicer."""
        import sys

        dropped = {n: sys.modules.pop(n) for n in list(sys.modules)
                   if n.split(".")[0] in ("BrainUNetSegmentationLib", "brainunet")}
        try:
            ScriptedLoadableModuleWidget.onReload(self)
        except Exception:  # the edited file did not load: this panel goes on with the modules it had
            sys.modules.update(dropped)
            raise

    def enter(self) -> None:
        if self._cleanedUp:  # a panel replaced by Reload (Slicer before 5.6 still calls it)
            return
        self._entered = True
        self.updateModelList()  # a model added for this user (Add model file...) since shows up
        if self._sceneImportedWhileHidden and self._run is None:
            self._sceneImportedWhileHidden = False
            self._showImportedScene()
        else:
            self.initializeParameterNode()
        segmentationNode, tableNode = self._resultNodes()
        if self._run is None and self.logic.statistics_outdated(segmentationNode, tableNode):
            # corrected in Segment Editor meanwhile: the table follows the segments as they are now
            with slicer.util.WaitCursor():
                status = self._updateStatistics(segmentationNode, tableNode)
            self._setStatus(_("The segments were edited: ") + status)

    def exit(self) -> None:
        if self._cleanedUp:
            return
        self._entered = False  # a running segmentation keeps going; the timer still polls it

    def onSceneStartClose(self, caller, event) -> None:
        self._sceneCloses += 1
        cancelled = self._run is not None
        if cancelled:  # its input nodes are about to disappear
            self.cancelRun(_("Cancelled because the scene was closed; nothing was changed."))
        self._parameterNode = None
        # nothing of the closed scene stays on the panel (the next scene's node IDs start again from 1)
        self._resultSegmentationNodeID = None
        self._runOutputSegmentation = None
        self._applyRefusalShown = None
        self.ui.segmentationShow3DButton.setSegmentationNode(None)
        self._showResults(None)
        if not cancelled:  # a "Done" with a full bar would describe a result that is gone
            self.ui.progressBar.setValue(0)
            self.ui.logTextEdit.clear()
            self._setStatus("")

    def onSceneEndClose(self, caller, event) -> None:
        self._autoFilled = {}
        self._chosenByUser = set()
        self._sceneImportedWhileHidden = False
        if self._entered:
            self.initializeParameterNode()

    def onNodeAdded(self, caller, event) -> None:
        if self._entered and self._run is None and not slicer.mrmlScene.IsImporting():
            self._fillTimer.start()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        """The shown result's table or segmentation deleted (Data module): the panel stops showing figures
        whose table is gone, and shows the scene's latest result, if any."""
        if self._cleanedUp or self._run is not None or self._importing or slicer.mrmlScene.IsClosing():
            return
        removed = node.GetID() if node is not None else None
        if removed is None or removed not in (self._resultTableNodeID, self._resultSegmentationNodeID):
            return
        if removed == self._resultSegmentationNodeID:  # its table stays shown: the figures as computed last
            self._resultSegmentationNodeID = None
            if self.ui.segmentationShow3DButton.segmentationNode() is node:
                self.ui.segmentationShow3DButton.setSegmentationNode(None)
        else:
            self._showResults(None)
            if self._entered:
                self._showLatestResult()

    def onFillTimer(self) -> None:
        if not self._entered or self._run is not None or self._parameterNode is None:
            return
        if slicer.mrmlScene.IsBatchProcessing() or self._starting or self._importing:
            # a loader still adding volumes, or Apply waiting on an install: the inputs Apply was pressed
            # with are not changed under it; looked at again afterwards
            self._fillTimer.start()
            return
        # a role the panel filled while only one volume matched it, now matched by a second volume loaded
        # after it: which one is meant is the user's choice, as it is for Auto-detect
        from brainunet.imageio import MODALITY_NAMES

        emptied = []
        for role in self.logic.ambiguous_inputs():
            node = getattr(self._parameterNode, role)
            if node is not None and self._autoFilled.get(role) == node.GetID() and role not in self._chosenByUser:
                setattr(self._parameterNode, role, None)
                emptied.append(MODALITY_NAMES.get(role, role))
        self.initializeParameterNode()
        if emptied:
            self._setStatus(_("Several volumes now look like {roles}: select the right one.").format(
                roles=_(" and ").join(emptied)))

    def onSceneEndImport(self, caller, event) -> None:
        """A scene (or a scene file dropped in) was loaded: show its saved choices and its latest result;
        with the panel hidden, when it is shown (a scene loaded in another module gains no BrainUNet node)."""
        if not self._entered:
            self._sceneImportedWhileHidden = True
            return
        self._showImportedScene()

    def _showImportedScene(self) -> None:
        if self._run is None:
            saved = self.logic.getParameterNode()
            if any(getattr(saved, role) is not None for role in INPUT_SELECTORS):
                # a scene saved with BrainUNet's choices: an input left empty there stays empty, and one
                # chosen there is the user's choice, never emptied by the panel
                self._autoFilled = {role: node.GetID() for role, node in self.logic.guess_inputs().items()}
                self._chosenByUser |= {role for role in INPUT_SELECTORS if getattr(saved, role) is not None}
            self.initializeParameterNode()
            output = self.ui.outputSegmentationSelector.currentNode()
            if output is None or output.GetNodeReference(STATISTICS_TABLE_REFERENCE) is None:
                self._showLatestResult()

    # -- parameter node <-> GUI ---------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        """Use the scene's parameter node, and follow its changes (a scene loaded, a script); fill empty
        inputs from the volume names, each volume once: an input the user emptied stays empty."""
        parameterNode = self.logic.getParameterNode()
        self._parameterNode = parameterNode
        for role, node in self.logic.guess_inputs().items():
            if getattr(parameterNode, role) is None and self._autoFilled.get(role) != node.GetID():
                setattr(parameterNode, role, node)
                self._autoFilled[role] = node.GetID()
        observed, mrmlNode = self._observedParameterNode, parameterNode.parameterNode
        if observed is not mrmlNode:
            if observed is not None:
                self.removeObserver(observed, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            # after the wrappers' own observers (Slicer's parameterNodeWrapper caches each value and refreshes
            # it on this event): read before them, the values would be the old ones
            self.addObserver(mrmlNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified, priority=-1.0)
            self._observedParameterNode = mrmlNode
        self.updateGUIFromParameterNode()

    def onParameterNodeModified(self, caller, event) -> None:
        if not self._updatingParameterNode:
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self) -> None:
        if self._parameterNode is None:
            return
        p = self._parameterNode
        self._updatingGUI = True
        try:
            for role, selectorName in INPUT_SELECTORS.items():
                getattr(self.ui, selectorName).setCurrentNode(getattr(p, role))
            self.ui.outputSegmentationSelector.setCurrentNode(p.outputSegmentation)
            self.ui.modelComboBox.setCurrentIndex(self._modelIndex(p.model))
            self.ui.deviceComboBox.setCurrentIndex(DEVICES.index(p.device) if p.device in DEVICES else 0)
            self.ui.qualityComboBox.setCurrentIndex(1 if p.tta else 0)
            self.ui.show3DCheckBox.setChecked(bool(p.show3D))
        finally:
            self._updatingGUI = False
        self._updateApplyButton()

    def updateParameterNodeFromGUI(self, *args) -> None:
        """Slot for every input widget (the signal's arguments are not used: PythonQt and PySide6 differ)."""
        if self._updatingGUI or self._parameterNode is None:
            return
        p = self._parameterNode
        self._updatingParameterNode = True  # its Modified events would only set the widgets to themselves
        try:
            for role, selectorName in INPUT_SELECTORS.items():
                node = getattr(self.ui, selectorName).currentNode()
                if node is not None and node is not getattr(p, role):
                    self._chosenByUser.add(role)
                setattr(p, role, node)
            p.outputSegmentation = self.ui.outputSegmentationSelector.currentNode()
            modelIndex = self.ui.modelComboBox.property("currentIndex")
            if 0 <= modelIndex < len(self._models):
                chosen = self._models[modelIndex]
                p.model = "" if chosen.default else chosen.name  # the default follows the registry
            deviceIndex = self.ui.deviceComboBox.property("currentIndex")
            p.device = DEVICES[deviceIndex] if 0 <= deviceIndex < len(DEVICES) else "auto"
            p.tta = self.ui.qualityComboBox.property("currentIndex") == 1
            p.show3D = bool(self.ui.show3DCheckBox.property("checked"))
        finally:
            self._updatingParameterNode = False
        self._updateApplyButton()

    # -- models -------------------------------------------------------------------------------
    def updateModelList(self) -> None:
        """Fill the model combo box from the registry the worker reads; the baseline comes last."""
        from brainunet.errors import BrainUNetError

        try:
            self._models = self.logic.model_choices()
        except BrainUNetError as exc:  # an unreadable registry: the panel stays usable and says which file
            self._models = []
            self._setStatus(str(exc))
        wasUpdating, self._updatingGUI = self._updatingGUI, True
        try:
            self.ui.modelComboBox.clear()
            for model in self._models:
                notes = ([_("default")] if model.default else []) + (
                    [_("not a trained network")] if model.kind == "baseline" else [])
                self.ui.modelComboBox.addItem(
                    _("{model} ({notes})").format(model=model.name, notes="; ".join(notes)) if notes else model.name)
        finally:
            self._updatingGUI = wasUpdating
        if self._parameterNode is not None:
            self.updateGUIFromParameterNode()
        self._showModelInformation()

    def onAddModelButton(self, *args) -> None:
        """Register a weights file for this user (the worker's folder) and select it."""
        path = qt.QFileDialog.getOpenFileName(self.uiWidget, _("Add a BrainUNet model"), os.path.expanduser("~"),
                                              _("BrainUNet weights (*.pt *.pth)"))
        if isinstance(path, tuple):  # PySide6 returns (path, filter); PythonQt the path only
            path = path[0]
        if not path:
            return
        name = qt.QInputDialog.getText(self.uiWidget, _("Add a BrainUNet model"),
                                       _("Name of the model in the list:"), qt.QLineEdit.Normal,
                                       os.path.splitext(os.path.basename(path))[0])
        if isinstance(name, tuple):  # PySide6: (text, ok)
            name = name[0] if name[1] else ""
        if not name:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be added."), waitCursor=True):
            name = self.logic.model_name(name)
            if name in {m.name for m in self._models} and not slicer.util.confirmOkCancelDisplay(
                    _("A model named \"{name}\" is already in the list. Replace it?").format(name=name),
                    windowTitle="BrainUNet"):
                return
            if not self._dependenciesReady:  # checking the file needs PyTorch in the worker
                if not self.logic.ensureDependencies():
                    self._setStatus(_("Adding a model needs PyTorch; nothing was added."))
                    return
                self._dependenciesReady = True
            # checked in a worker process (torch loads the file): the application stays responsive
            self._registerRun = self.logic.start_registering(path, name)
            self.ui.addModelButton.enabled = False
            self._setStatus(_("Adding model \"{name}\": checking the file...").format(name=name))
            self._registerTimer.start()

    def onRegisterPollTimer(self) -> None:
        run = self._registerRun
        if run is None or run.poll() == "running":
            return
        self._registerTimer.stop()
        self._registerRun = None
        run.cleanup()
        self.ui.addModelButton.enabled = True
        name = run.model_name
        if run.state != "done":
            self._setStatus(_("The model could not be added; the list is unchanged."))
            slicer.util.errorDisplay(_("The model could not be added: {reason}").format(reason=run.error),
                                     windowTitle="BrainUNet", detailedText="\n".join(run.log[-50:]))
            return
        self.updateModelList()
        index = self._modelIndex(name)
        self.ui.modelComboBox.setCurrentIndex(index)
        default = 0 <= index < len(self._models) and self._models[index].default
        self._setStatus((_("Model \"{name}\" added; it is now the default.") if default else
                         _("Model \"{name}\" added and selected.")).format(name=name))

    def _modelIndex(self, name: str) -> int:
        """Combo box index of a model name ("" or a name no longer registered: the default model)."""
        default = next((i for i, m in enumerate(self._models) if m.default), 0)
        return next((i for i, m in enumerate(self._models) if name and m.name == name), default)

    def onModelChanged(self, *args) -> None:
        self._showModelInformation()
        self.updateParameterNodeFromGUI()

    def _showModelInformation(self) -> None:
        """What the selected model was trained on, its inputs, its measured accuracy and its licence."""
        index = self.ui.modelComboBox.property("currentIndex")
        if not 0 <= index < len(self._models):
            self.ui.modelInfoLabel.setText("")
            return
        from brainunet.imageio import MODALITY_NAMES

        model = self._models[index]
        lines = [model.description]
        if model.sequences:
            names = ", ".join(MODALITY_NAMES.get(role, role) for role in model.sequences)
            if model.one_may_be_missing is True:
                lines.append(_("Inputs: {sequences}; one of them may be missing, with lower accuracy.").format(
                    sequences=names))
            elif model.one_may_be_missing is False:
                lines.append(_("Inputs: {sequences}; all are required.").format(sequences=names))
            else:
                lines.append(_("Inputs: {sequences}.").format(sequences=names))
            if "t1n" not in model.sequences:
                lines.append(_("T1 native is not used."))
        else:
            lines.append(_("Inputs: as stored in its weights file (brainunet models lists them)."))
        lines.append(_("Accuracy: {accuracy}").format(accuracy=model.accuracy or _("not measured.")))
        lines.append(_("Licence: {licence}").format(licence=model.licence or _("not stated.")))
        self.ui.modelInfoLabel.setText("\n".join(lines))

    def onOutputSegmentationChanged(self, *args) -> None:
        """The Show 3D button acts on the output segmentation (read from the selector: the signal's
        argument differs between its overloads); choosing a BrainUNet result there shows its statistics,
        so Update statistics and Export CSV work on it (a result of an earlier session, of another patient)."""
        node = self.ui.outputSegmentationSelector.currentNode()
        self.ui.segmentationShow3DButton.setSegmentationNode(node)
        table = node.GetNodeReference(STATISTICS_TABLE_REFERENCE) if node is not None else None
        if table is not None:
            self._resultSegmentationNodeID = node.GetID()
            self._showResults(table)
            self._sayIfOutdated(node, table)

    def _showLatestResult(self) -> None:
        """Show the statistics of the scene's latest BrainUNet result (a saved scene opened again)."""
        segmentationNode, tableNode = self.logic.latestResult()
        self._resultSegmentationNodeID = segmentationNode.GetID() if segmentationNode is not None else None
        self._showResults(tableNode)
        self._sayIfOutdated(segmentationNode, tableNode)

    def _sayIfOutdated(self, segmentationNode, tableNode) -> None:
        if self.logic.statistics_outdated(segmentationNode, tableNode):
            self._setStatus(_("The segments of \"{name}\" were edited after these statistics were computed: press "
                              "Update statistics to compute them again.").format(name=segmentationNode.GetName()))

    def _updateApplyButton(self) -> None:
        """Apply is enabled once the inputs can run (two of T1CE, T2W and FLAIR at least); while a run
        goes it is the Cancel button and stays enabled."""
        if self._run is not None:
            self.ui.applyButton.setEnabled(True)
            return
        if self._starting or self._importing:  # installing, asking or importing: one thing at a time
            self.ui.applyButton.setEnabled(False)
            return
        from BrainUNetSegmentationLib.logic import missing_inputs

        from brainunet.imageio import MODALITY_NAMES

        inputs = self.selectedInputs()
        index = self.ui.modelComboBox.property("currentIndex")
        model = self._models[index] if 0 <= index < len(self._models) else None
        needsAll = model is not None and model.one_may_be_missing is False
        missing = missing_inputs(inputs, model.sequences if needsAll and model.sequences else None)
        chosen = [(role, node) for role, node in inputs.items() if node is not None]
        twice = [(a, b) for i, (a, node) in enumerate(chosen) for b, other in chosen[i + 1:] if node is other]
        self.ui.applyButton.setEnabled(len(missing) <= (0 if needsAll else 1) and not twice)
        if twice:
            a, b = twice[0]
            reason = _("The same volume is selected as {first} and {second}; select the right volume for "
                       "each.").format(first=MODALITY_NAMES[a], second=MODALITY_NAMES[b])
            self.ui.applyButton.setToolTip(reason)
            if reason != self._applyRefusalShown:  # a slip the greyed-out Apply alone would not explain
                self._setStatus(reason)
                self._applyRefusalShown = reason
            return
        if self._applyRefusalShown is not None:
            if self.ui.statusLabel.text() == self._applyRefusalShown:
                self._setStatus("")
            self._applyRefusalShown = None
        if len(missing) > 1:
            self.ui.applyButton.setToolTip(_("Select the {volumes} volumes first.").format(
                volumes=_(" and ").join(missing)))
        elif missing and needsAll:
            self.ui.applyButton.setToolTip(_("The model \"{model}\" needs every sequence: select {volume}, or "
                                             "choose a model that runs without it.").format(
                model=model.name, volume=missing[0]))
        elif missing:
            self.ui.applyButton.setToolTip(_("{volume} is not selected: the model runs without it, with lower "
                                             "accuracy. Runs in the background; click again to cancel.").format(
                volume=missing[0]))
        else:
            self.ui.applyButton.setToolTip(_("Segment the tumour (ET, NETC, SNFH). Runs in the background; click "
                                             "again to cancel."))

    def selectedInputs(self) -> dict:
        return {role: getattr(self.ui, name).currentNode() for role, name in INPUT_SELECTORS.items()}

    # -- actions ------------------------------------------------------------------------------
    def onAutoDetectButton(self, *args) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not choose the inputs."), waitCursor=True):
            if self._parameterNode is None:
                self.initializeParameterNode()
            from brainunet.imageio import MODALITY_NAMES

            guesses = self.logic.guess_inputs()
            ambiguous = self.logic.ambiguous_inputs()
            several = "; ".join(_("several volumes look like {role} ({names})").format(
                role=MODALITY_NAMES.get(role, role), names=", ".join(names)) for role, names in ambiguous.items())
            if not guesses and not several:
                self._setStatus(_("No volume name looks like T1CE, T2W, FLAIR or T1. Select the volumes by hand."))
                return
            for role, node in guesses.items():
                setattr(self._parameterNode, role, node)
                self._autoFilled[role] = node.GetID()
                self._chosenByUser.discard(role)
            for role in ambiguous:  # emptied, not left on an earlier choice (perhaps another patient's)
                setattr(self._parameterNode, role, None)
            self.updateGUIFromParameterNode()
            found = ", ".join(f"{MODALITY_NAMES.get(role, role)} = {node.GetName()}" for role, node in guesses.items())
            if not several:
                self._setStatus(_("Detected: {volumes}").format(volumes=found))
            elif found:
                self._setStatus(_("Detected: {volumes}. Not chosen: {which}. Select those by hand.").format(
                    volumes=found, which=several))
            else:
                self._setStatus(_("Not chosen: {which}. Select those by hand.").format(which=several))

    def onApplyButton(self, *args) -> None:
        """Apply starts a run; while a run is going the same button cancels it."""
        if self._run is not None:
            if time.monotonic() - self._cancelShownAt >= self.cancelIgnoredForS:
                self.cancelRun()
            return
        if self._starting or self._importing:  # a click while a start installs or asks, or a result comes in
            return
        # a bad input (InputError) or anything unexpected: a message box with the reason, the scene untouched;
        # tryWithErrorDisplay raises again after it, so the traceback reaches the Python console too
        # no wait cursor around the whole start: it may ask questions (install, replace), which need the
        # ordinary cursor; the busy parts set it themselves
        with slicer.util.tryWithErrorDisplay(_("The segmentation could not start.")):
            self._starting = True
            self.ui.applyButton.setEnabled(False)
            try:
                self._startRun()
            except Exception:
                self._setStatus(_("The segmentation could not start; nothing was changed."))
                raise
            finally:
                self._starting = False
                self._updateApplyButton()  # Apply again, or Cancel once the run started
                self._cancelShownAt = time.monotonic()

    def _startRun(self) -> bool:
        """Start a run with the panel's inputs; False if the user declined to install what it needs."""
        if self._parameterNode is None:
            self.initializeParameterNode()
        self.updateParameterNodeFromGUI()
        inputs = self.selectedInputs()
        sceneCloses = self._sceneCloses
        if not self._dependenciesReady:
            with slicer.util.WaitCursor():
                self.logic.check_inputs(inputs)  # say what is missing before offering to install anything
            # the first run may download PyTorch and a few packages: minutes on a slow connection
            self._setStatus(_("Checking PyTorch and the Python packages BrainUNet needs (installing them can "
                              "take several minutes, during which Slicer does not respond)..."))
            slicer.app.processEvents()
            if not self.logic.ensureDependencies():
                self._setStatus(_("BrainUNet needs PyTorch and a few Python packages; nothing was run."))
                return False
            self._dependenciesReady = True
            if self._parameterNode is None or self._sceneCloses != sceneCloses:
                # the scene was closed (and perhaps another opened) while the packages were installed: its
                # volumes are not the ones Apply was pressed for
                self._setStatus(_("The scene was closed; nothing was run."))
                return False
            inputs = self.selectedInputs()
        p = self._parameterNode
        if not self._confirmReplacing(p.outputSegmentation, inputs):
            self._setStatus(_("Nothing was run; the segmentation was left as it was."))
            return False
        options = self.logic.runOptions(p.device, p.tta, p.model)
        with slicer.util.WaitCursor():  # the inputs are checked and copied out of their nodes
            self._run = self.logic.start(inputs, options, on_progress=self._onProgress, on_log=self._onLog,
                                         segmentation_node=p.outputSegmentation)  # edits during the run are kept
        self._runOutputSegmentation = p.outputSegmentation
        self.ui.logTextEdit.clear()
        self._setRunning(True)
        self._setStatus(_("Starting the segmentation..."))
        self._timer.start()
        return True

    def _confirmReplacing(self, segmentationNode, inputs) -> bool:
        """A chosen output segmentation with segments is replaced only when the user says so: it may hold
        corrections made in Segment Editor, or another patient's result."""
        if segmentationNode is None or segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            return True
        question = _("Replace the segments of \"{name}\" and its statistics with the new result? Corrections made "
                     "to it in Segment Editor will be lost. Choose \"Create new segmentation\" as output to keep "
                     "it.").format(name=segmentationNode.GetName())
        other = self.logic.made_from_another_volume(segmentationNode, inputs)
        if other is not None:  # another patient's result, most likely: say so before it is lost
            question = _("\"{name}\" was made from another volume, \"{other}\", not from \"{this}\".").format(
                name=segmentationNode.GetName(), other=other.GetName(),
                this=self.logic.reference_volume(inputs).GetName()) + " " + question
        return slicer.util.confirmOkCancelDisplay(question, windowTitle="BrainUNet")

    def cancelRun(self, message: str = "") -> None:
        if self._run is None:
            return
        message = message or _("Cancelled; nothing was changed.")
        self._timer.stop()
        self._run.cancel()
        self._run = None
        self._setRunning(False)
        self.ui.progressBar.setValue(0)
        self._onLog(message)
        self._setStatus(message)

    def onPollTimer(self) -> None:
        if self._run is None:
            self._timer.stop()
            return
        state = self._run.poll()
        if state == "running":
            return
        self._timer.stop()
        run, self._run = self._run, None
        if state == "done":
            # the import holds the application's thread for a moment: Apply stays disabled through it (whatever
            # else updates the button meanwhile), so a click made then on what still looked like Cancel reaches
            # a disabled button and starts nothing
            self._importing = True
            self.ui.applyButton.setEnabled(False)
            self.ui.applyButton.setText(_("Loading the result..."))
            try:
                showAfterwards = self._finishRun(run)
            finally:
                slicer.app.processEvents()  # clicks queued during the import are delivered (and dropped) now
                self._importing = False
                self._setRunning(False)
            if showAfterwards:  # a dialog waits for the user: the panel is ready behind it
                showAfterwards()
        else:
            self._setRunning(False)
            run.cleanup()
            self.ui.progressBar.setValue(0)
            message = _("Segmentation failed: {reason}").format(
                reason=run.error or _("the segmentation ended ({state}).").format(state=state))
            self._setStatus(message)
            slicer.util.errorDisplay(message, windowTitle="BrainUNet", detailedText="\n".join(run.log[-50:]))

    def _finishRun(self, run):
        """Import a finished run and show it; returns what to show the user once the panel is ready again
        (a message box), or None."""
        try:
            segmentationNode, tableNode = self.logic.importAndShow(
                run, self._runOutputSegmentation, show3D=self._parameterNode.show3D if self._parameterNode else False)
        except Exception as exc:
            logging.exception("BrainUNet: the results could not be loaded")  # the traceback, for a bug report
            message = _("Could not load the results: {reason}").format(reason=str(exc) or exc.__class__.__name__)
            self.ui.progressBar.setValue(0)  # the worker's 100 % is not a result
            self._setStatus(message)
            details = "\n".join(run.log[-50:] + ["", traceback.format_exc()])
            return lambda: slicer.util.errorDisplay(message, windowTitle="BrainUNet", detailedText=details)
        # the output choice is left as it was: with "Create new segmentation", the next Apply (often another
        # patient) never replaces this result or the corrections made to it
        self.ui.segmentationShow3DButton.setSegmentationNode(segmentationNode)
        self.ui.progressBar.setValue(100)
        self._resultSegmentationNodeID = segmentationNode.GetID()
        self._showResults(tableNode)
        done = _("Done: segmentation \"{segmentation}\" and table \"{table}\".").format(
            segmentation=segmentationNode.GetName(), table=tableNode.GetName())
        # one result shows at a time (none removed), but a segmentation changed during the run stays shown,
        # and none is hidden while the user works in another module (one may be open in Segment Editor)
        hidden = (self.logic.hide_other_results(segmentationNode, keep=[run.kept_output])  # None keeps none
                  if self._entered else [])
        if hidden:
            done += " " + _("Hidden, not removed: {names}.").format(names=", ".join(hidden))
        if run.notes:  # what the worker did to the input or doubts about it: shown, not left in the log
            self._setStatus(done + " " + _("Check the notes."))
            notes = "\n\n".join(run.notes)
            return lambda: slicer.util.warningDisplay(notes, windowTitle=_("BrainUNet: notes on this result"))
        self._setStatus(done)
        return None

    def _resultNodes(self):
        """(segmentation, table) of the last result; None for one removed from the scene."""
        get = slicer.mrmlScene.GetNodeByID
        return (get(self._resultSegmentationNodeID) if self._resultSegmentationNodeID else None,
                get(self._resultTableNodeID) if self._resultTableNodeID else None)

    def _updateStatistics(self, segmentationNode, tableNode) -> str:
        """Compute the table again from the segments; returns the status to show (the table is left as it
        was, and the message says why, when it cannot be done)."""
        if segmentationNode is None:
            return _("The segmentation of these statistics was removed from the scene; they are as computed last.")
        try:
            tableNode, changed = self.logic.updateOwnStatistics(segmentationNode, tableNode)
        except Exception as exc:  # the reference volume removed, or an unexpected failure: the table stays
            logging.exception("BrainUNet: the statistics could not be computed again")
            return _("The statistics could not be computed again ({reason}); they are as computed last.").format(
                reason=str(exc) or exc.__class__.__name__)
        self._showResults(tableNode)
        return (_("Statistics computed again from the segments as they are now.") if changed
                else _("The statistics already match the segments."))

    def onUpdateStatisticsButton(self, *args) -> None:
        segmentationNode, tableNode = self._resultNodes()
        if tableNode is None:
            slicer.util.errorDisplay(_("There are no statistics: run the segmentation first."), windowTitle="BrainUNet")
            return
        with slicer.util.WaitCursor():
            status = self._updateStatistics(segmentationNode, tableNode)
        self._setStatus(status)

    def onExportCsvButton(self, *args) -> None:
        segmentationNode, tableNode = self._resultNodes()
        if tableNode is None:
            slicer.util.errorDisplay(_("There is no statistics table to export: run the segmentation first."),
                                     windowTitle="BrainUNet")
            return
        # the path first: a dialog cancelled leaves the table (and a cloned result's shared one) untouched
        name = self.logic.ownStatisticsTableName(segmentationNode, tableNode)
        path = qt.QFileDialog.getSaveFileName(self.uiWidget, _("Export statistics"),
                                              os.path.join(os.path.expanduser("~"), f"{name}.csv"),
                                              _("CSV files (*.csv)"))
        if isinstance(path, tuple):  # PySide6 returns (path, filter); PythonQt the path only
            path = path[0]
        if not path:
            return
        if not path.lower().endswith(".csv"):
            path += ".csv"
            # the dialog asked about replacing the name as typed, not this one (Qt's own dialog adds no suffix)
            if os.path.exists(path) and not slicer.util.confirmOkCancelDisplay(
                    _("{path} already exists. Replace it?").format(path=path), windowTitle="BrainUNet"):
                return
        with slicer.util.WaitCursor():  # computing them again takes seconds on a clinic's grids
            status = self._updateStatistics(segmentationNode, tableNode)  # the file holds the segments as they are
        tableNode = self._resultNodes()[1] or tableNode  # a copied result's own table, made by the update
        with slicer.util.tryWithErrorDisplay(_("Could not save the statistics to {path}.").format(path=path),
                                             waitCursor=True):
            self.logic.exportStatisticsCsv(tableNode, path)
            self._setStatus(_("Statistics saved to {path}").format(path=path) + ". " + status)

    # -- display helpers ----------------------------------------------------------------------
    def _onProgress(self, fraction, text) -> None:
        self.ui.progressBar.setValue(int(round(100 * max(0.0, min(1.0, fraction)))))
        if text:
            self._setStatus(text)

    def _onLog(self, line) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def _setStatus(self, text) -> None:
        self.ui.statusLabel.setText(text)

    def _setRunning(self, running) -> None:
        self.ui.applyButton.setText(_("Cancel") if running else _("Apply"))
        if running:  # when idle, _updateApplyButton says what Apply would do with the inputs chosen
            self.ui.applyButton.setToolTip(_("Stop the running segmentation; nothing is added to the scene."))
        for name in ("inputsCollapsibleButton", "outputsCollapsibleButton", "advancedCollapsibleButton"):
            getattr(self.ui, name).setEnabled(not running)
        if running:
            self.ui.progressBar.setValue(0)
        else:
            self._updateApplyButton()

    def _showResults(self, tableNode) -> None:
        table = self.ui.resultsTableView
        table.clear()
        self._resultTableNodeID = tableNode.GetID() if tableNode is not None else None
        self.ui.exportCsvButton.setEnabled(tableNode is not None)
        self.ui.updateStatisticsButton.setEnabled(tableNode is not None)
        if tableNode is None:
            table.setRowCount(0)
            table.setColumnCount(0)
            return
        headers, rows = self.logic.statisticsForDisplay(tableNode)
        table.setColumnCount(len(headers))
        table.setRowCount(len(rows))
        table.setHorizontalHeaderLabels(headers)
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()


#
# BrainUNetSegmentationLogic
#


class BrainUNetSegmentationLogicBase(ScriptedLoadableModuleLogic):
    """Slicer-specific part of the module logic; see ``BrainUNetSegmentationLogic``.

    The module logic class, ``BrainUNetSegmentationLogic(BrainUNetSegmentationLib.logic.BrainUNetLogic,
    BrainUNetSegmentationLogicBase)``, is built on first use (``_logicClass``) so that importing this
    file does not import brainunet. Outside this file get it as usual:
    ``from BrainUNetSegmentation import BrainUNetSegmentationLogic`` (module ``__getattr__``).
    """

    def getParameterNode(self):
        return BrainUNetSegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def runOptions(device="auto", tta=False, model=""):
        from BrainUNetSegmentationLib.logic import RunOptions

        return RunOptions(device=device or "auto", tta=bool(tta), model=model or None)

    # -- dependencies -------------------------------------------------------------------------
    @staticmethod
    def missingPythonPackages() -> list:
        import importlib.util

        return [requirement for module, requirement in PYTHON_REQUIREMENTS.items()
                if importlib.util.find_spec(module) is None]

    def missingDependencies(self) -> list:
        """What a run needs and is not installed (the PyTorch extension, PyTorch, Python packages), found
        without installing or asking anything."""
        try:
            import PyTorchUtils
        except ImportError:
            return [_("the PyTorch extension")]
        missing = [] if self._torchInstalled(PyTorchUtils.PyTorchUtilsLogic()) else ["torch"]
        return missing + self.missingPythonPackages()

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install PyTorch (through the PyTorch extension) and the Python packages the run needs.

        Returns False if the user declined; raises BrainUNetError if the PyTorch extension is missing.
        Tests replace this method on the instance.
        """
        from brainunet.errors import BrainUNetError

        try:
            import PyTorchUtils
        except ImportError:
            raise BrainUNetError(_("BrainUNet needs the PyTorch extension. Install \"PyTorch\" from the Extensions "
                                   "Manager, restart Slicer and try again."))
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        missing = self.missingPythonPackages()
        if not self._torchInstalled(torchLogic):
            packages = _(" and these Python packages: {names}").format(names=", ".join(missing)) if missing else ""
            # The PyTorch extension picks the CUDA build wherever an NVIDIA driver is found: 2 to 3 GB, where
            # the CPU-only build is about 200 MB and runs BrainUNet in seconds. On a slow connection that
            # difference is hours, so the CPU-only build is what is offered, and the question says how to
            # get the other one.
            nvidia = self.nvidiaDriverPresent()
            if nvidia:
                question = _("BrainUNet needs PyTorch{packages}. This computer has an NVIDIA GPU, for which "
                             "PyTorch is a download of 2 to 3 GB; OK installs the CPU-only build instead, about "
                             "200 MB, on which a BrainUNet run takes seconds. For the GPU build, press Cancel and "
                             "install PyTorch in the PyTorch Utils module (Utilities) first. They are installed "
                             "once, from the internet; on a slow connection this takes minutes, during which "
                             "Slicer does not respond. Install now?").format(packages=packages)
            else:
                question = _("BrainUNet needs PyTorch (a download of about 200 MB){packages}. They are installed "
                             "once, from the internet; on a slow connection this takes minutes, during which "
                             "Slicer does not respond. Install now?").format(packages=packages)
            # one question for all of it, saying what it costs on a slow connection, before anything downloads
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(question, windowTitle="BrainUNet"):
                return False
            torch = self._installing(["torch"] + missing, lambda: torchLogic.installTorch(
                askConfirmation=False, forceComputationBackend="cpu" if nvidia else None,
                torchVersionRequirement=TORCH_REQUIREMENT))
            if torch is None:
                return False
            askConfirmation = False  # the packages were in the question just answered
        else:
            import importlib.metadata
            import re

            version = importlib.metadata.version("torch")
            if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < MINIMUM_TORCH_VERSION:
                raise BrainUNetError(_("PyTorch {installed} is installed but BrainUNet needs version {needed} or "
                                       "newer. Update it in the PyTorch Utils module (uninstall, restart Slicer, "
                                       "install), then try again.").format(
                    installed=version, needed=".".join(map(str, MINIMUM_TORCH_VERSION))))
        missing = self.missingPythonPackages()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("BrainUNet needs these Python packages: {packages}. Download and install them now? This needs "
                      "the internet and takes a minute or two, during which Slicer does not respond.").format(
                        packages=", ".join(missing)), windowTitle="BrainUNet"):
                return False
            self._installing(missing, lambda: slicer.util.pip_install(" ".join(missing)))
        return True

    @staticmethod
    def _torchInstalled(torchLogic) -> bool:
        """The PyTorch extension's check, which imports torch; a half-installed or damaged PyTorch (on Windows
        most often a DLL that fails to load) raises BrainUNetError saying how to repair it."""
        from brainunet.errors import BrainUNetError

        try:
            return bool(torchLogic.torchInstalled())
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
            raise BrainUNetError(_(
                "PyTorch is installed but cannot be loaded ({reason}). Repair it in Utilities → PyTorch Utils: "
                "Uninstall, restart Slicer, then press Apply here again to install it anew. Nothing in the scene "
                "was changed.").format(reason=reason)) from exc

    @staticmethod
    def nvidiaDriverPresent() -> bool:
        """Whether an NVIDIA driver is installed: its nvidia-smi is what the PyTorch extension's installer
        (light-the-torch) asks before it picks a CUDA build."""
        import shutil

        return shutil.which("nvidia-smi") is not None

    @staticmethod
    def _installing(packages, install):
        """``install()``'s result; an install that fails (most often: no internet) raises BrainUNetError saying
        how to go on, with the offline way, instead of pip's bare command line."""
        from brainunet.errors import BrainUNetError

        try:
            return install()
        except BrainUNetError:
            raise
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
            raise BrainUNetError(_(
                "Installing {packages} failed ({reason}). The first run needs the internet once: connect and "
                "press Apply again. On a computer that is never online, copy a folder of their wheel files from "
                "one that is (README, \"Install in 3D Slicer\") and run in the Python console: "
                "slicer.util.pip_install(\"--no-index --find-links FOLDER {packages}\"). Nothing in the scene was "
                "changed.").format(packages=" ".join(packages), reason=reason)) from exc

    # -- results ------------------------------------------------------------------------------
    def importAndShow(self, run, segmentationNode=None, show3D=False):
        """Import a finished run into ``segmentationNode`` (or a new one) and show it; (segmentation, table).

        A re-run into the same segmentation updates its statistics table instead of adding another one.
        """
        tableNode = segmentationNode.GetNodeReference(STATISTICS_TABLE_REFERENCE) if segmentationNode else None
        if tableNode is not None and self._tableSharedWithAnother(segmentationNode, tableNode):
            tableNode = None  # a copy of another result: that result keeps its table, this one gets its own
        segmentationNode, tableNode = self.import_results(run, segmentation_node=segmentationNode, table_node=tableNode)
        segmentationNode.SetNodeReferenceID(STATISTICS_TABLE_REFERENCE, tableNode.GetID())
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility(True)
        if show3D:
            segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentationNode, tableNode

    def ownStatisticsTable(self, segmentationNode, tableNode):
        """``tableNode``, or a copy of it that ``segmentationNode`` then refers to when another segmentation
        refers to the same table (a cloned result): updating one result never rewrites another's figures."""
        if tableNode is None or not self._tableSharedWithAnother(segmentationNode, tableNode):
            return tableNode
        own = self.scene.CopyNode(tableNode)
        own.SetName(self.scene.GenerateUniqueName(self.ownStatisticsTableName(segmentationNode, tableNode)))
        segmentationNode.SetNodeReferenceID(STATISTICS_TABLE_REFERENCE, own.GetID())
        return own

    def ownStatisticsTableName(self, segmentationNode, tableNode) -> str:
        """The name of the table ``ownStatisticsTable`` gives: the table's own, or for a cloned result sharing
        another's table, that of the clone's copy."""
        if segmentationNode is None or not self._tableSharedWithAnother(segmentationNode, tableNode):
            return tableNode.GetName()
        return f"{segmentationNode.GetName()} statistics"

    def updateOwnStatistics(self, segmentationNode, tableNode):
        """Compute the statistics of ``segmentationNode`` again into its own table (``ownStatisticsTable``);
        returns (table, whether a figure changed). When they cannot be computed, the copy made for a cloned
        result is removed again and the clone refers to the shared table as before: the scene is unchanged."""
        own = self.ownStatisticsTable(segmentationNode, tableNode)
        try:
            return own, self.update_statistics(segmentationNode, own)
        except BaseException:
            if own is not tableNode:
                segmentationNode.SetNodeReferenceID(STATISTICS_TABLE_REFERENCE, tableNode.GetID())
                self.scene.RemoveNode(own)
            raise

    def _tableSharedWithAnother(self, segmentationNode, tableNode) -> bool:
        from BrainUNetSegmentationLib import mrml

        return any(node is not segmentationNode
                   and node.GetNodeReferenceID(STATISTICS_TABLE_REFERENCE) == tableNode.GetID()
                   for node in mrml.nodes_of_class(self.scene, "vtkMRMLSegmentationNode"))

    @staticmethod
    def latestResult():
        """(segmentation, table) of the scene's most recent BrainUNet result (by the time it records; then
        by scene order), or (None, None)."""
        from BrainUNetSegmentationLib import mrml
        from BrainUNetSegmentationLib.logic import PROVENANCE_DATE

        results = []
        for i, node in enumerate(mrml.nodes_of_class(slicer.mrmlScene, "vtkMRMLSegmentationNode")):
            table = node.GetNodeReference(STATISTICS_TABLE_REFERENCE)
            if table is not None:
                results.append((node.GetAttribute(PROVENANCE_DATE) or "", i, node, table))
        return max(results, key=lambda r: r[:2])[2:] if results else (None, None)

    @staticmethod
    def statisticsForDisplay(tableNode):
        """(column titles, rows of strings) for the results table widget."""
        from BrainUNetSegmentationLib import mrml

        rows = mrml.table_to_rows(tableNode)
        if not rows:
            return [], []
        columns = list(rows[0].keys())
        return [columnTitle(c) for c in columns], [[formatValue(c, row[c]) for c in columns] for row in rows]

    @staticmethod
    def exportStatisticsCsv(tableNode, path) -> None:
        from BrainUNetSegmentationLib import mrml
        from brainunet.statistics import write_csv

        write_csv(mrml.table_to_rows(tableNode), path)


def columnTitle(column: str) -> str:
    # a table built per call, not at import: each title is translated where it is shown, like every text here
    titles = {
        "region": _("Region"), "name": _("Name"), "voxels": _("Voxels"), "volume_ml": _("Volume (mL)"),
        "centroid_r_mm": _("Centroid R (mm)"), "centroid_a_mm": _("Centroid A (mm)"),
        "centroid_s_mm": _("Centroid S (mm)"),
        "max_diameter_mm": _("Max diameter (mm)"),
    }
    if column in titles:
        return titles[column]
    if column.startswith("mean_"):
        return _("Mean {sequence}").format(sequence=column[len("mean_"):])
    if column.startswith("median_"):
        return _("Median {sequence}").format(sequence=column[len("median_"):])
    return column


def formatValue(column: str, value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN: empty region
            return "-"
        return str(int(round(value))) if column == "voxels" else f"{value:.4g}"
    return str(value)


_LOGIC_CLASS = None


def _userHome():
    """BrainUNet's per-user folder (registered models) next to Slicer's user settings; None outside Slicer."""
    import os

    app = getattr(slicer, "app", None)
    settings = getattr(app, "slicerUserSettingsFilePath", None) if app is not None else None
    return os.path.join(os.path.dirname(settings), "BrainUNet") if settings else None


def _slicerTempDirectory():
    """Slicer's temporary folder (Application Settings), where the worker's inputs are exchanged."""
    try:
        return slicer.util.tempDirectory()
    except Exception:  # no application (test harness): the system's temporary folder
        return None


def _logicClass():
    """The BrainUNetSegmentationLogic class (built once, on first use)."""
    global _LOGIC_CLASS
    if _LOGIC_CLASS is None:
        from BrainUNetSegmentationLib.logic import BrainUNetLogic

        class BrainUNetSegmentationLogic(BrainUNetLogic, BrainUNetSegmentationLogicBase):
            """Module logic: brainunet's BrainUNetLogic (guess_inputs, check_inputs, start, import_results,
            segment) on ``slicer.mrmlScene`` plus ScriptedLoadableModuleLogic (parameter node) and the
            Slicer-only helpers of BrainUNetSegmentationLogicBase."""

            def __init__(self, scene=None, python_executable=None, temp_root=None) -> None:
                # BrainUNetLogic comes first in the MRO: ScriptedLoadableModuleLogic.__init__ calls
                # super().__init__(), which must not reach BrainUNetLogic.__init__ (it needs the scene).
                ScriptedLoadableModuleLogic.__init__(self)
                scene = slicer.mrmlScene if scene is None else scene
                temp_root = temp_root or _slicerTempDirectory()
                BrainUNetLogic.__init__(self, scene, python_executable, temp_root, _userHome())

        BrainUNetSegmentationLogic.__module__ = __name__
        _LOGIC_CLASS = BrainUNetSegmentationLogic
    return _LOGIC_CLASS


def __getattr__(name):
    # PEP 562: ``BrainUNetSegmentation.BrainUNetSegmentationLogic`` builds the class on first access.
    if name == "BrainUNetSegmentationLogic":
        return _logicClass()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#
# BrainUNetSegmentationTest
#


class BrainUNetSegmentationTest(ScriptedLoadableModuleTest):
    """In-application self-test: runs the same scenarios as the pytest suite, on Slicer's own scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_BrainUNetScenarios()

    def test_BrainUNetScenarios(self):
        from BrainUNetSegmentationLib.scenarios import run_all_scenarios

        logic = _logicClass()()
        missing = logic.missingDependencies()
        if missing:
            # The extension build machines run this test without PyTorch: it must neither install nor wait
            # for an answer to a dialog there, so the scenarios are skipped (as SlicerMONAIAuto3DSeg's are).
            self.delayDisplay(_("Skipped: {missing} not installed. Press Apply once (it offers to install them), "
                                "then run the self-test again.").format(missing=", ".join(missing)))
            return
        self.delayDisplay(_("Checking the PyTorch version"))
        self.assertTrue(logic.ensureDependencies(askConfirmation=False),
                        "PyTorch or the Python packages BrainUNet needs are not installed")
        self.delayDisplay("Running the BrainUNet scenarios")
        run_all_scenarios(slicer.mrmlScene)
        self.delayDisplay("Test passed")
