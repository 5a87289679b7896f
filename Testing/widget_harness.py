"""Test-only harness: runs BrainUNetSegmentation.py's widget under PySide6 (offscreen) and slicer-core.

slicer-core provides the real MRML classes and the real ``slicer.util``, but not the application:
no ``qt``/``ctk`` (PythonQt), no ``slicer.ScriptedLoadableModule``, no ``slicer.parameterNodeWrapper``,
no ``slicer.mrmlScene``, and none of Slicer's C++ widgets. This harness adds test-only stand-ins for
exactly those, loads the module's real Designer file with PySide6's QUiLoader, and takes everything
away again afterwards. The stand-ins mimic the behaviour the module relies on (node lists filtered
by type, a "None" item, the .ui file's mrmlSceneChanged -> setMRMLScene connections); they prove the module's wiring and names, not the
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
import vtk  # noqa: E402

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


def _property(kind, attribute: str, refresh: bool = True):
    """A Qt property kept in ``attribute`` (set from the .ui file); a combo box lists its nodes again."""
    def setter(self, value):
        setattr(self, attribute, value)
        if refresh:
            self._refresh()
    return QtCore.Property(kind, lambda self: getattr(self, attribute), setter)


class qMRMLWidget(QtWidgets.QWidget):
    """Top widget of a Slicer .ui file: setMRMLScene emits mrmlSceneChanged."""

    mrmlSceneChanged = QtCore.Signal(object)

    def setMRMLScene(self, scene):
        self.mrmlSceneChanged.emit(scene)


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    """A group box with ctkCollapsibleButton's ``text`` and ``collapsed`` properties."""

    _collapsed = False
    text = QtCore.Property(str, QtWidgets.QGroupBox.title, QtWidgets.QGroupBox.setTitle)
    collapsed = _property(bool, "_collapsed", refresh=False)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Lists the scene's nodes of ``nodeTypes`` by name; item data is the node ID.

    Like the real widget: a leading "None" item when ``noneEnabled`` (text ``noneDisplay``), subclasses
    only when ``showChildNodeTypes``, the list kept up to date as nodes come and go.
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
        self._show_child_node_types = True
        self._refreshing = False
        self._last_emitted_id = None
        self.currentIndexChanged.connect(self._on_index_changed)

    nodeTypes = _property("QStringList", "_node_types")
    noneEnabled = _property(bool, "_none_enabled")
    noneDisplay = _property(str, "_none_display")
    showChildNodeTypes = _property(bool, "_show_child_node_types")
    addEnabled = _property(bool, "_add_enabled", refresh=False)
    removeEnabled = _property(bool, "_remove_enabled", refresh=False)

    def mrmlScene(self):
        return self._scene

    @QtCore.Slot(object)
    def setMRMLScene(self, scene):
        for tag in self._observer_tags:
            self._scene.RemoveObserver(tag)
        self._observer_tags = []
        self._scene = scene
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observer_tags.append(scene.AddObserver(event, lambda caller, event: self._refresh()))
        self._refresh()

    def _accepts(self, node) -> bool:
        if self._show_child_node_types:
            return any(node.IsA(t) for t in self._node_types)
        return node.GetClassName() in self._node_types

    def _refresh(self):
        current_id = self.currentData()
        self._refreshing = True
        try:
            self.clear()
            if self._none_enabled:
                self.addItem(self._none_display, None)
            if self._scene is not None:
                nodes = self._scene.GetNodes()
                for node in (nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())):
                    if self._accepts(node):
                        self.addItem(node.GetName(), node.GetID())
            self.setCurrentIndex(max(self.findData(current_id) if current_id else -1, 0))
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

    def setCurrentNode(self, node):
        index = self.findData(node.GetID()) if node is not None else -1
        self.setCurrentIndex(index if index >= 0 else (0 if self._none_enabled else -1))
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
        qfile = QtCore.QFile(str(path))
        qfile.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
        widget = self.load(qfile)
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


# ---------------------------------------------------------------------------------------------
# Stand-ins for the Python modules Slicer provides
# ---------------------------------------------------------------------------------------------


class FileDialog(QtWidgets.QFileDialog):
    """qt.QFileDialog with scripted getSaveFileName / getOpenFileName (PySide6's (path, filter) return shape)."""

    answers: list = []

    @staticmethod
    def getSaveFileName(parent=None, caption="", directory="", filter=""):  # noqa: A002
        path = FileDialog.answers.pop(0) if FileDialog.answers else ""
        return (str(path), filter)

    @staticmethod
    def getOpenFileName(parent=None, caption="", directory="", filter=""):  # noqa: A002
        path = FileDialog.answers.pop(0) if FileDialog.answers else ""
        return (str(path), filter)


class InputDialog(QtWidgets.QInputDialog):
    """qt.QInputDialog with a scripted getText: ``answers`` holds PySide6's (text, ok) replies in order."""

    answers: list = []

    @staticmethod
    def getText(parent=None, title="", label="", echo=None, text=""):
        return InputDialog.answers.pop(0) if InputDialog.answers else ("", False)


def make_qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.__doc__ = "Test-only: PySide6's QtCore/QtGui/QtWidgets names under PythonQt's module name."
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if not name.startswith("_"):
                setattr(qt, name, getattr(module, name))
    qt.QFileDialog = FileDialog
    qt.QInputDialog = InputDialog
    return qt


def make_scripted_loadable_module() -> types.ModuleType:
    """Minimal slicer.ScriptedLoadableModule, keeping the parts the module relies on."""
    m = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            super().__init__()
            self.parent = parent
            self.layout = parent.layout()

        def resourcePath(self, filename):
            moduleFile = sys.modules[self.__class__.__module__].__file__
            return os.path.join(os.path.dirname(moduleFile), "Resources", filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

        def onReload(self):
            self.reloaded = True

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()  # as Slicer's: cooperative, so the MRO after it must accept no arguments
            self.moduleName = self.__class__.__name__.removesuffix("Logic")

        def getParameterNode(self):
            """The scene's singleton parameter node of the module, created on first use."""
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(slicer.mrmlScene.GetUniqueNameByString(self.moduleName))
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    m.ScriptedLoadableModule = ScriptedLoadableModule
    m.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    m.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    m.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
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

    def read(node, name, annotation):
        if _is_node_type(annotation):
            return node.GetNodeReference(name)
        text = node.GetParameter(name)
        if annotation is bool:
            return defaults.get(name, False) if text == "" else text == "True"
        return text if text != "" else defaults.get(name, "")

    def make_property(name, annotation):
        # like Slicer's wrapper, values are cached and the cache refreshed by an observer of the node's
        # ModifiedEvent added when the wrapper is made: an observer of the module that runs before it reads
        # the old values
        def getter(self):
            return self._cache[name]

        if _is_node_type(annotation):
            def setter(self, value):
                if value is not None and not value.IsA(annotation.__name__):
                    raise TypeError(f"{name} must be a {annotation.__name__}, not {value.GetClassName()}")
                self._cache[name] = value
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif annotation is bool:
            def setter(self, value):
                if not isinstance(value, bool):
                    raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
                self._cache[name] = value
                self.parameterNode.SetParameter(name, str(value))
        else:
            def setter(self, value):
                if not isinstance(value, str):
                    raise TypeError(f"{name} must be a str, not {type(value).__name__}")
                self._cache[name] = value
                self.parameterNode.SetParameter(name, value)
        return property(getter, setter)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._cache = {}

        def refresh(*args):
            self._cache.update({name: read(parameterNode, name, a) for name, a in annotations.items()})

        refresh()
        parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, refresh)

    namespace = {"__init__": __init__, "__doc__": cls.__doc__, "__module__": cls.__module__}
    for name, annotation in annotations.items():
        namespace[name] = make_property(name, annotation)
    return type(cls.__name__, (), namespace)


def make_application() -> types.SimpleNamespace:
    """slicer.app as far as the module and slicer.util.tryWithErrorDisplay / WaitCursor use it (slicer-core
    has none)."""
    return types.SimpleNamespace(setOverrideCursor=QtWidgets.QApplication.setOverrideCursor,
                                 restoreOverrideCursor=QtWidgets.QApplication.restoreOverrideCursor,
                                 processEvents=QtWidgets.QApplication.processEvents,
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

    ``messages`` records the text of every errorDisplay call, ``warnings`` of every warningDisplay call;
    confirmOkCancelDisplay records its question in ``questions`` and answers with the next of ``answers``.
    Leaving the ``with`` block tears everything down (widget, observers, scene) and restores
    ``sys.modules``, ``slicer`` and ``slicer.util`` as they were.
    """

    def __init__(self):
        self.messages: list[str] = []
        self.details: list[str] = []  # the detailedText of each errorDisplay call
        self.warnings: list[str] = []  # warningDisplay texts
        self.questions: list[str] = []  # confirmOkCancelDisplay texts
        self.answers: list[bool] = []  # the user's answers to them, in order (a question without one fails)
        self.busy_cursor_at_questions: list[bool] = []  # whether a wait cursor covered each question
        self.module = None
        self.widget = None
        self.ui = None
        self.scene = None
        self._saved_modules = {}
        self._saved_slicer = {}
        self._saved_util = {}
        # an exception raised inside a Qt slot (a click, a timer) reaches only sys.excepthook, which
        # prints it; kept here and raised when the block ends, so that it fails the test
        self.slot_exceptions: list[BaseException] = []
        self._saved_excepthook = None
        self._shown_exceptions: list[BaseException] = []

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
        self._saved_excepthook = sys.excepthook

        def record(exc_type, exc, tb):
            # one the user was shown (Slicer's tryWithErrorDisplay re-raises after its message box) is the
            # module's own handling, as in Slicer, where the console then prints it
            if not any(exc is shown or exc.__cause__ is shown for shown in self._shown_exceptions):
                self.slot_exceptions.append(exc)
            self._saved_excepthook(exc_type, exc, tb)

        sys.excepthook = record
        # QUiLoader's warnings about the connections it cannot make (connect_ui_connections makes them)
        QtCore.QLoggingCategory.setFilterRules("qt.core.qobject.connect.warning=false")
        self.scene = mrml.new_headless_scene()
        scripted = make_scripted_loadable_module()
        wrapper = make_parameter_node_wrapper_module()
        i18n = make_i18n_module()
        self._set_module("qt", make_qt_module())
        self._set_module("ctk", types.ModuleType("ctk"))  # imported by the module, none of its names used
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
        self._set_attr(self._saved_util, util, "errorDisplay", self._error_display)
        self._set_attr(self._saved_util, util, "warningDisplay", lambda text, *a, **kw: self.warnings.append(str(text)))
        self._set_attr(self._saved_util, util, "confirmOkCancelDisplay", self._confirm)
        self._set_attr(self._saved_util, util, "pip_install", self._refuse("pip_install"))

    def _confirm(self, text, *args, **kwargs) -> bool:
        self.questions.append(str(text))
        self.busy_cursor_at_questions.append(QtWidgets.QApplication.overrideCursor() is not None)
        if not self.answers:
            raise AssertionError(f"unexpected question to the user: {text}")
        return self.answers.pop(0)

    def _error_display(self, text, *args, **kwargs):
        self.messages.append(str(text))
        self.details.append(str(kwargs.get("detailedText", "")))
        shown = sys.exc_info()[1]  # tryWithErrorDisplay shows the exception it handles, then re-raises it
        if shown is not None:
            self._shown_exceptions.append(shown)

    def restore(self):
        if self._saved_excepthook is not None:
            sys.excepthook, self._saved_excepthook = self._saved_excepthook, None
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
        QtCore.QLoggingCategory.setFilterRules("")

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

    def create_widget(self):
        parent = QtWidgets.QWidget()
        parent.setLayout(QtWidgets.QVBoxLayout())
        self.parent = parent
        self.widget = self.module.BrainUNetSegmentationWidget(parent)
        self.widget.cancelIgnoredForS = 0.0  # a test's Cancel right after Apply is meant (a test sets it back)
        self.widget.setup()
        self.ui = self.widget.ui

    def __enter__(self):
        self.install()
        try:
            self.import_module()
            self.create_widget()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        if exc_type is None and self.slot_exceptions:
            raise AssertionError(f"an exception in a Qt slot: {self.slot_exceptions[0]!r}") from self.slot_exceptions[0]
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
        return list(self.messages)

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
