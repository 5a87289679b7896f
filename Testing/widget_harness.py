"""Test-only harness: runs BrainUNetSegmentation.py's widget under PySide6 (offscreen) and slicer-core.

slicer-core provides the real MRML classes and the real ``slicer.util``, but not the application:
no ``qt``/``ctk`` (PythonQt), no ``slicer.ScriptedLoadableModule``, no ``slicer.parameterNodeWrapper``,
no ``slicer.mrmlScene``, and none of Slicer's C++ widgets. This harness adds test-only stand-ins for
exactly those, loads the module's real Designer file with PySide6's QUiLoader, and takes everything
away again afterwards. The stand-ins mimic the behaviour the module relies on (node lists filtered
by type, a "None" item, QComboBox auto-selection when "None" is disabled, the .ui file's
mrmlSceneChanged -> setMRMLScene connections); they prove the module's wiring and names, not the
behaviour of Slicer's C++ widgets.

Usage::

    with WidgetHarness() as h:          # installs the stand-ins, new scene, module widget set up
        h.widget.enter()
        h.ui.applyButton.click()
        h.wait_until(lambda: h.widget._run is None)
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

import slicer  # noqa: E402  (slicer-core)
import slicer.util  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "BrainUNetSegmentation"
MODULE_FILE = MODULE_DIR / "BrainUNetSegmentation.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "BrainUNetSegmentation.ui"
MODULE_NAME = "BrainUNetSegmentation"


def application() -> QtWidgets.QApplication:
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def process_events(seconds: float = 0.0) -> None:
    end = time.monotonic() + seconds
    while True:
        QtWidgets.QApplication.processEvents()
        if time.monotonic() >= end:
            return
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Stand-ins for Slicer's C++ widgets (registered with QUiLoader under the .ui class names)
# ---------------------------------------------------------------------------------------------


class qMRMLWidget(QtWidgets.QWidget):
    """Top widget of a Slicer .ui file: setMRMLScene emits mrmlSceneChanged."""

    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def mrmlScene(self):
        return self._scene

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """A group box with ctkCollapsibleButton's ``text`` and ``collapsed`` properties."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _get_text(self):
        return self.title()

    def _set_text(self, text):
        self.setTitle(text)

    def _get_collapsed(self):
        return self._collapsed

    def _set_collapsed(self, collapsed):
        self._collapsed = bool(collapsed)

    text = QtCore.Property(str, _get_text, _set_text)
    collapsed = QtCore.Property(bool, _get_collapsed, _set_collapsed)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Lists the scene's nodes of ``nodeTypes`` by name; item data is the node ID.

    Like the real widget: a leading "None" item when ``noneEnabled`` (text ``noneDisplay``), subclasses
    only when ``showChildNodeTypes``, hidden nodes left out, and (QComboBox behaviour) the first node is
    selected automatically when "None" is disabled and nothing is selected.
    """

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observer_tags = []
        self._node_types = []
        self._none_enabled = False
        self._none_display = "None"
        self._add_enabled = True
        self._remove_enabled = True
        self._rename_enabled = False
        self._show_child_node_types = True
        self._refreshing = False
        self._last_emitted_id = None
        self.currentIndexChanged.connect(self._on_index_changed)

    # Qt properties set from the .ui file
    def _get_node_types(self):
        return list(self._node_types)

    def _set_node_types(self, types_):
        self._node_types = [t for t in types_ if t]
        self._refresh()

    def _get_none_enabled(self):
        return self._none_enabled

    def _set_none_enabled(self, enabled):
        self._none_enabled = bool(enabled)
        self._refresh()

    def _get_none_display(self):
        return self._none_display

    def _set_none_display(self, text):
        self._none_display = text
        self._refresh()

    def _flag(name):  # noqa: N805  (property factory for plain boolean flags)
        return QtCore.Property(bool, lambda self: getattr(self, name), lambda self, v: setattr(self, name, bool(v)))

    nodeTypes = QtCore.Property("QStringList", _get_node_types, _set_node_types)
    noneEnabled = QtCore.Property(bool, _get_none_enabled, _set_none_enabled)
    noneDisplay = QtCore.Property(str, _get_none_display, _set_none_display)
    addEnabled = _flag("_add_enabled")
    removeEnabled = _flag("_remove_enabled")
    renameEnabled = _flag("_rename_enabled")
    def _get_show_child_node_types(self):
        return self._show_child_node_types

    def _set_show_child_node_types(self, show):
        self._show_child_node_types = bool(show)
        self._refresh()

    showChildNodeTypes = QtCore.Property(bool, _get_show_child_node_types, _set_show_child_node_types)
    del _flag

    # MRML API used by modules
    def mrmlScene(self):
        return self._scene

    @QtCore.Slot(object)
    def setMRMLScene(self, scene):
        if self._scene is not None:
            for tag in self._observer_tags:
                self._scene.RemoveObserver(tag)
        self._observer_tags = []
        self._scene = scene
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observer_tags.append(scene.AddObserver(event, self._on_scene_event))
        self._refresh()

    def _on_scene_event(self, caller, event):
        self._refresh()

    def _accepts(self, node) -> bool:
        if node.GetHideFromEditors():
            return False
        if self._show_child_node_types:
            return any(node.IsA(t) for t in self._node_types)
        return node.GetClassName() in self._node_types

    def nodes(self) -> list:
        if self._scene is None:
            return []
        found = []
        collection = self._scene.GetNodes()
        for i in range(collection.GetNumberOfItems()):
            node = collection.GetItemAsObject(i)
            if self._accepts(node):
                found.append(node)
        return found

    def _refresh(self):
        current_id = self.currentData()
        self._refreshing = True
        try:
            self.clear()
            if self._none_enabled:
                self.addItem(self._none_display, None)
            for node in self.nodes():
                self.addItem(node.GetName(), node.GetID())
            index = self.findData(current_id) if current_id else -1
            if index < 0:
                index = 0 if (self._none_enabled or self.count()) else -1
            self.setCurrentIndex(index)
        finally:
            self._refreshing = False
        self._on_index_changed()

    def _on_index_changed(self, *args):
        if self._refreshing:
            return
        node = self.currentNode()
        node_id = node.GetID() if node is not None else None
        if node_id != self._last_emitted_id:
            self._last_emitted_id = node_id
            self.currentNodeChanged.emit(node)

    def currentNode(self):
        node_id = self.currentData()
        return self._scene.GetNodeByID(node_id) if (self._scene is not None and node_id) else None

    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node):
        index = self.findData(node.GetID()) if node is not None else -1
        if index < 0:
            index = 0 if self._none_enabled else -1
        self.setCurrentIndex(index)
        self._on_index_changed()


class qMRMLSegmentationShow3DButton(QtWidgets.QPushButton):
    """Holds the segmentation node whose 3D display the real button toggles."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._segmentation_node = None

    def segmentationNode(self):
        return self._segmentation_node

    def setSegmentationNode(self, node):
        self._segmentation_node = node


CUSTOM_WIDGETS = (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLSegmentationShow3DButton)


class UiLoader(QUiLoader):
    """QUiLoader that knows the stand-ins and makes the .ui file's mrmlSceneChanged connections.

    QUiLoader cannot connect ``mrmlSceneChanged(vtkMRMLScene*)`` (a type PySide6 does not know); the
    connections are read from the file and made in Python instead, so a missing connection in the
    .ui file still shows up as a selector without a scene.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        for cls in CUSTOM_WIDGETS:
            self.registerCustomWidget(cls)

    def load_file(self, path):
        path = str(path)
        qfile = QtCore.QFile(path)
        if not qfile.open(QtCore.QIODevice.OpenModeFlag.ReadOnly):
            raise RuntimeError(f"Could not load UI file: {path}")
        try:
            widget = self.load(qfile)
        finally:
            qfile.close()
        if widget is None:
            raise RuntimeError(f"Could not load UI file: {path}: {self.errorString()}")
        connect_ui_connections(widget, path)
        return widget


def ui_connections(path) -> list[tuple[str, str, str, str]]:
    root = ElementTree.parse(str(path)).getroot()
    return [(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
            for c in root.iter("connection")]


def connect_ui_connections(top, path) -> None:
    for sender_name, signal, receiver_name, slot in ui_connections(path):
        sender = top if top.objectName() == sender_name else top.findChild(QtCore.QObject, sender_name)
        receiver = top if top.objectName() == receiver_name else top.findChild(QtCore.QObject, receiver_name)
        if sender is None or receiver is None:
            raise RuntimeError(f"{path}: connection between unknown widgets {sender_name} -> {receiver_name}")
        if signal == "mrmlSceneChanged(vtkMRMLScene*)" and slot == "setMRMLScene(vtkMRMLScene*)":
            sender.mrmlSceneChanged.connect(receiver.setMRMLScene)
        # other (plain Qt) connections were made by QUiLoader itself


_QT_MESSAGE_FILTER = ("No such signal qMRMLWidget::mrmlSceneChanged(vtkMRMLScene*)",
                      "QObject::connect:  (sender name:", "QObject::connect:  (receiver name:")


def _qt_message_handler(mode, context, message):
    if any(m in message for m in _QT_MESSAGE_FILTER):
        return  # the connections QUiLoader cannot make; connect_ui_connections makes them
    sys.stderr.write(message + "\n")


# ---------------------------------------------------------------------------------------------
# Stand-ins for the Python modules Slicer provides
# ---------------------------------------------------------------------------------------------


class FileDialog(QtWidgets.QFileDialog):
    """qt.QFileDialog with a scripted getSaveFileName (PySide6's (path, filter) return shape)."""

    answers: list = []
    calls: list = []

    @staticmethod
    def getSaveFileName(parent=None, caption="", directory="", filter=""):  # noqa: A002
        FileDialog.calls.append((caption, directory, filter))
        path = FileDialog.answers.pop(0) if FileDialog.answers else ""
        return (str(path), filter)


def make_qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.__doc__ = "Test-only: PySide6's QtCore/QtGui/QtWidgets names under PythonQt's module name."
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if not name.startswith("_"):
                setattr(qt, name, getattr(module, name))
    qt.QUiLoader = UiLoader
    qt.QFileDialog = FileDialog
    return qt


def make_ctk_module() -> types.ModuleType:
    ctk = types.ModuleType("ctk")
    ctk.__doc__ = "Test-only stand-in for CTK's Python module."
    ctk.ctkCollapsibleButton = ctkCollapsibleButton
    return ctk


def make_scripted_loadable_module() -> types.ModuleType:
    """Minimal slicer.ScriptedLoadableModule, keeping the parts the module relies on."""
    m = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            super().__init__()
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""

        def getDefaultModuleDocumentationLink(self, docPage=None):
            return ""

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[:-6]
            if parent is None:
                parent = qMRMLWidget()
                parent.setLayout(QtWidgets.QVBoxLayout())
                parent.setMRMLScene(slicer.mrmlScene)
            self.parent = parent
            self.layout = parent.layout()

        def resourcePath(self, filename):
            moduleFile = sys.modules[self.__class__.__module__].__file__
            return os.path.join(os.path.dirname(moduleFile), "Resources", filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()  # as Slicer's: cooperative, so the MRO after it must accept no arguments
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.vtkMRMLScriptedModuleNode()
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GetUniqueNameByString(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=100):
            print(message)

    m.ScriptedLoadableModule = ScriptedLoadableModule
    m.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    m.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    m.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    m.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"]
    return m


def _is_node_type(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, slicer.vtkMRMLNode)


def parameterNodeWrapper(cls):
    """Test-only parameterNodeWrapper: typed fields stored in a real vtkMRMLScriptedModuleNode.

    Nodes are node references, str and bool are parameters (like Slicer's wrapper, values of the wrong
    type are refused). Only the types the module uses are supported.
    """
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    defaults = {name: cls.__dict__[name] for name in annotations if name in cls.__dict__}
    for name, annotation in annotations.items():
        if not (_is_node_type(annotation) or annotation in (str, bool)):
            raise TypeError(f"test parameterNodeWrapper does not support {name}: {annotation!r}")

    def make_property(name, annotation):
        if _is_node_type(annotation):
            def getter(self):
                return self.parameterNode.GetNodeReference(name)

            def setter(self, value):
                if value is not None and not value.IsA(annotation.__name__):
                    raise TypeError(f"{name} must be a {annotation.__name__}, not {value.GetClassName()}")
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif annotation is bool:
            def getter(self):
                text = self.parameterNode.GetParameter(name)
                return defaults.get(name, False) if text == "" else text == "True"

            def setter(self, value):
                if not isinstance(value, bool):
                    raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
                self.parameterNode.SetParameter(name, str(value))
        else:
            def getter(self):
                return self.parameterNode.GetParameter(name) if self.parameterNode.GetParameter(name) != "" \
                    else defaults.get(name, "")

            def setter(self, value):
                if not isinstance(value, str):
                    raise TypeError(f"{name} must be a str, not {type(value).__name__}")
                self.parameterNode.SetParameter(name, value)
        return property(getter, setter)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, annotation in annotations.items():
            if not _is_node_type(annotation) and parameterNode.GetParameter(name) == "" and name in defaults:
                setattr(self, name, defaults[name])

    namespace = {"__init__": __init__, "__doc__": cls.__doc__, "__module__": cls.__module__,
                 "allParameters": dict(annotations)}
    for name, annotation in annotations.items():
        namespace[name] = make_property(name, annotation)
    return type(cls.__name__, (), namespace)


def make_application() -> types.SimpleNamespace:
    """slicer.app as far as the module and slicer.util.tryWithErrorDisplay use it (slicer-core has none)."""
    return types.SimpleNamespace(setOverrideCursor=QtWidgets.QApplication.setOverrideCursor,
                                 restoreOverrideCursor=QtWidgets.QApplication.restoreOverrideCursor,
                                 testingEnabled=lambda: False, connect=lambda signal, slot: True)


def make_i18n_module() -> types.ModuleType:
    """slicer.i18n without translations (slicer-core lacks it): every text comes back as written."""
    m = types.ModuleType("slicer.i18n")
    m.tr = lambda text: text
    m.translate = lambda context, text: text
    return m


def make_parameter_node_wrapper_module() -> types.ModuleType:
    m = types.ModuleType("slicer.parameterNodeWrapper")
    m.parameterNodeWrapper = parameterNodeWrapper
    return m


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------

_MISSING = object()


class WidgetHarness:
    """Installs the stand-ins, imports the module, sets up its widget on a fresh real scene.

    ``messages`` records (kind, text) of every errorDisplay/infoDisplay/... call.
    Leaving the ``with`` block tears everything down (widget, observers, scene) and restores
    ``sys.modules``, ``slicer`` and ``slicer.util`` as they were.
    """

    def __init__(self, setup_widget: bool = True):
        self.setup_widget = setup_widget
        self.messages: list[tuple[str, str]] = []
        self.module = None
        self.widget = None
        self.ui = None
        self.scene = None
        self._saved_modules = {}
        self._saved_slicer = {}
        self._saved_util = {}
        self._previous_handler = None

    # -- install / restore ----------------------------------------------------------------------
    def _set_module(self, name, module):
        self._saved_modules.setdefault(name, sys.modules.get(name, _MISSING))
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module

    def _set_attr(self, saved, owner, name, value):
        saved.setdefault(name, getattr(owner, name, _MISSING))
        setattr(owner, name, value)

    def install(self):
        from BrainUNetSegmentationLib import mrml

        application()
        self._previous_handler = QtCore.qInstallMessageHandler(_qt_message_handler)
        self.scene = mrml.new_headless_scene()
        scripted = make_scripted_loadable_module()
        wrapper = make_parameter_node_wrapper_module()
        i18n = make_i18n_module()
        self._set_module("qt", make_qt_module())
        self._set_module("ctk", make_ctk_module())
        self._set_module("slicer.ScriptedLoadableModule", scripted)
        self._set_module("slicer.parameterNodeWrapper", wrapper)
        self._set_module("slicer.i18n", i18n)
        self._set_module(MODULE_NAME, None)
        self._set_attr(self._saved_slicer, slicer, "mrmlScene", self.scene)
        self._set_attr(self._saved_slicer, slicer, "app", make_application())
        self._set_attr(self._saved_slicer, slicer, "ScriptedLoadableModule", scripted)
        self._set_attr(self._saved_slicer, slicer, "parameterNodeWrapper", wrapper)
        self._set_attr(self._saved_slicer, slicer, "i18n", i18n)
        util = slicer.util
        self._set_attr(self._saved_util, util, "loadUI", lambda path: UiLoader().load_file(path))
        self._set_attr(self._saved_util, util, "childWidgetVariables", child_widget_variables)
        for kind in ("errorDisplay", "warningDisplay", "infoDisplay", "delayDisplay"):
            self._set_attr(self._saved_util, util, kind, self._recorder(kind))
        self._set_attr(self._saved_util, util, "confirmOkCancelDisplay", self._recorder("confirmOkCancelDisplay", True))
        self._set_attr(self._saved_util, util, "pip_install", self._refuse("pip_install"))

    def restore(self):
        for name, value in self._saved_util.items():
            if value is _MISSING:
                delattr(slicer.util, name)
            else:
                setattr(slicer.util, name, value)
        for name, value in self._saved_slicer.items():
            if value is _MISSING:
                delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        for name, value in self._saved_modules.items():
            if value is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
        self._saved_util.clear()
        self._saved_slicer.clear()
        self._saved_modules.clear()
        QtCore.qInstallMessageHandler(self._previous_handler)

    def _recorder(self, kind, result=None):
        def record(text="", *args, **kwargs):
            self.messages.append((kind, str(text)))
            return result
        return record

    def _refuse(self, name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"the widget test must not call slicer.util.{name}")
        return refuse

    # -- module and widget ----------------------------------------------------------------------
    def import_module(self):
        spec = importlib.util.spec_from_file_location(MODULE_NAME, MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        spec.loader.exec_module(module)
        self.module = module
        return module

    def create_widget(self):
        parent = QtWidgets.QWidget()
        parent.setLayout(QtWidgets.QVBoxLayout())
        self.parent = parent
        self.widget = self.module.BrainUNetSegmentationWidget(parent)
        self.widget.setup()
        self.ui = self.widget.ui
        return self.widget

    def __enter__(self):
        self.install()
        try:
            self.import_module()
            if self.setup_widget:
                self.create_widget()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Explicit tear-down (see slicer-core.md trap 6): no VTK observer may outlive its Qt widget."""
        try:
            if self.widget is not None:
                if getattr(self.widget, "_run", None) is not None:
                    self.widget.cancelRun()
                self.widget.cleanup()
                if self.widget.uiWidget is not None:
                    self.widget.uiWidget.setMRMLScene(None)
                self.parent.deleteLater()
                QtCore.QCoreApplication.sendPostedEvents(None, QtCore.QEvent.Type.DeferredDelete)
                process_events()
                self.widget = None
                self.ui = None
            if self.scene is not None:
                self.scene.Clear(1)
        finally:
            self.restore()

    # -- helpers for tests ----------------------------------------------------------------------
    def wait_until(self, predicate, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise TimeoutError(f"condition not met within {timeout} s")
            process_events(0.05)

    def errors(self) -> list[str]:
        return [text for kind, text in self.messages if kind == "errorDisplay"]

    def nodes_of(self, class_name: str) -> list:
        collection = self.scene.GetNodesByClass(class_name)
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def child_widget_variables(widget):
    """slicer.util.childWidgetVariables for PySide6 (objectName() instead of PythonQt's .name)."""
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        name = child.objectName()
        if name and not name.startswith("qt_"):
            setattr(ui, name, child)
    return ui
