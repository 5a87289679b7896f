"""MRML bridge: volume nodes <-> arrays, label maps -> segmentation node, statistics -> table node.

Uses only MRML classes (the real ones: Slicer's, or slicer-core's without the application).
Arrays are indexed ``[i, j, k]`` with the node's IJKToRAS (parent linear transforms applied), so
oblique, anisotropic and left-handed volumes keep their geometry.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from brainunet.errors import InputError
from brainunet.imageio import Volume, check_volume, check_voxels
from brainunet.labels import SUBREGIONS

try:  # the bridge's messages reach the user: Slicer's translation, the English text where Slicer is absent
    from slicer.i18n import tr as _
except ImportError:  # slicer-core (tests, scripts) has no translation layer
    def _(text: str) -> str:
        return text


def new_headless_scene():
    """A scene with what Slicer's start-up registers for segmentations (tests and scripts only)."""
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the binary-labelmap / closed-surface converter rules
    _KEEP_ALIVE.append(logic)
    return scene


_KEEP_ALIVE: list = []


def _matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(volume_node) -> np.ndarray:
    """IJK -> world RAS, including a parent linear transform (a non-linear one must be hardened first)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    affine = _matrix_to_numpy(m)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(_("{name} is under a non-linear transform; harden it first (Data module: right-click > "
                               "Harden transform).").format(name=volume_node.GetName()))
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        affine = _matrix_to_numpy(to_world) @ affine
    return affine


def _scalar_voxels(volume_node, name: str) -> np.ndarray:
    """The node's voxels as a view ``[k, j, i]`` on its image data (no copy); InputError if it has none."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None or image.GetNumberOfPoints() == 0:
        raise InputError(_("{name} has no image data. Load the image again.").format(name=name))
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(_("{name} has {count} components per voxel (colour or vector image); BrainUNet needs a "
                           "scalar MRI volume.").format(name=name, count=image.GetNumberOfScalarComponents()))
    return np.asarray(slicer.util.arrayFromVolume(volume_node))


def volume_from_node(volume_node, name: str | None = None) -> Volume:
    """Checked float32 copy of a scalar volume node as a Volume (``data[i, j, k]``)."""
    name = name or volume_node.GetName()
    data = check_volume(_scalar_voxels(volume_node, name).transpose(2, 1, 0), ijk_to_ras(volume_node), name)
    return Volume(np.ascontiguousarray(data), ijk_to_ras(volume_node), name)


def voxels_from_node(volume_node, name: str | None = None) -> Volume:
    """Checked copy of a scalar volume node in its own voxel type (``data[i, j, k]``, Fortran order).

    One copy and no conversion, for the application's thread: the copy lets the node change while the
    background writes it, and Fortran order is NIfTI's, so ``save_volume_nifti`` writes it as it is.
    """
    name = name or volume_node.GetName()
    affine = ijk_to_ras(volume_node)
    data = check_voxels(np.array(_scalar_voxels(volume_node, name)).transpose(2, 1, 0), affine, name)
    return Volume(data, affine, name)


def add_volume_node(scene, volume: Volume, name: str | None = None, labelmap: bool = False):
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or volume.name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.affine))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.data.transpose(2, 1, 0)))
    node.CreateDefaultDisplayNodes()
    return node


def load_volume_file(scene, path, name: str | None = None):
    """Read a volume file with Slicer's own storage node (as File > Add Data does)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or "volume")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(_("Slicer could not read {path}.").format(path=path))
    return node


#: Voxel types NIfTI-1 readers take everywhere; others (64-bit integers) are written as float32.
NIFTI_VOXEL_TYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64")


def save_volume_nifti(volume: Volume, path) -> None:
    """Write a Volume for the background process (nibabel; the scene is not touched). Called off the
    application's thread: it reads only ``volume``, never a node."""
    import nibabel as nib

    data = volume.data if volume.data.dtype.name in NIFTI_VOXEL_TYPES else volume.data.astype(np.float32)
    nib.save(nib.Nifti1Image(data, volume.affine), str(path))


def _oriented_image(mask: np.ndarray, affine: np.ndarray):
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*mask.shape)
    flat = np.ascontiguousarray(mask.astype(np.uint8).ravel(order="F"))  # VTK: i varies fastest
    scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(_numpy_to_matrix(affine))
    return image


def _set_terminology(segment, region) -> None:
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(region.terminology_entry())
    else:
        segment.SetTag("TerminologyEntry", region.terminology_entry())


def nodes_of_class(scene, class_name: str) -> list:
    """Every node of ``class_name`` (subclasses included) in scene order."""
    nodes = scene.GetNodesByClass(class_name)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


class _NodeState:
    """What an import may change on a node it writes into: a segmentation's segments, a table's contents,
    description and column units, and either's attributes, node references (the reference and input
    volumes, the reference geometry) and subject-hierarchy parent."""

    def __init__(self, scene, node):
        self.node = node
        self.content = vtk.vtkTable() if node.IsA("vtkMRMLTableNode") else slicer.vtkSegmentation()
        self.content.DeepCopy(node.GetTable() if node.IsA("vtkMRMLTableNode") else node.GetSegmentation())
        self.description = node.GetDescription()
        self.schema = None
        if node.IsA("vtkMRMLTableNode") and node.GetSchema() is not None:
            self.schema = vtk.vtkTable()
            self.schema.DeepCopy(node.GetSchema())
        self.attributes = {name: node.GetAttribute(name) for name in node.GetAttributeNames()}
        self.references = {role: self._ids(role) for role in self._roles()}
        sh = scene.GetSubjectHierarchyNode()
        self.sh, self.item = sh, sh.GetItemByDataNode(node) if sh is not None else 0
        self.parent = sh.GetItemParent(self.item) if self.item else 0

    def _roles(self):
        return [self.node.GetNthNodeReferenceRole(i) for i in range(self.node.GetNumberOfNodeReferenceRoles())]

    def _ids(self, role):
        return [self.node.GetNthNodeReferenceID(role, i) for i in range(self.node.GetNumberOfNodeReferences(role))]

    def restore(self):
        node = self.node
        if node.IsA("vtkMRMLTableNode"):
            node.GetTable().DeepCopy(self.content)
            node.SetAndObserveSchema(self.schema)
        else:
            node.GetSegmentation().DeepCopy(self.content)
        node.SetDescription(self.description)
        for name in node.GetAttributeNames():
            if name not in self.attributes:
                node.RemoveAttribute(name)
        for name, value in self.attributes.items():
            node.SetAttribute(name, value)
        for role in set(self._roles()) | set(self.references):
            saved = self.references.get(role, [])
            if self._ids(role) != saved:
                node.RemoveNodeReferenceIDs(role)
                for node_id in saved:
                    node.AddNodeReferenceID(role, node_id)
        if self.item and self.sh.GetItemParent(self.item) != self.parent:
            self.sh.SetItemParent(self.item, self.parent)
        node.Modified()


@contextmanager
def scene_unchanged_on_error(scene, segmentation_node=None, table_node=None):
    """Leave the scene as it was if the block raises: the nodes it added are removed, and the given
    segmentation and table (a re-run writes over them) are put back as they were (``_NodeState``). The
    block's error is the one raised, even if a step of the restoring fails."""
    import logging

    scene.GetSubjectHierarchyNode()  # made now if missing, so that it is no node the block added
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    states = [_NodeState(scene, n) for n in (segmentation_node, table_node) if n is not None]
    try:
        yield
    except BaseException:
        def attempt(step, what):
            try:
                step()
            except Exception:  # keep restoring the rest; the block's error is the one to report
                logging.getLogger(__name__).exception("Could not restore %s after a failed import", what)

        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before]):
            if node.GetScene() is scene:
                attempt(lambda node=node: scene.RemoveNode(node), node.GetName())
        for state in states:
            attempt(state.restore, state.node.GetName())
        raise


def create_segmentation(scene, labels: np.ndarray, reference_node, name: str | None = None,
                        segmentation_node=None):
    """Segments ET, NETC, SNFH from ``labels`` (reference voxel order) into a segmentation node.

    A new node is created unless ``segmentation_node`` is given (the user chose to overwrite it).
    """
    affine = ijk_to_ras(reference_node)
    if segmentation_node is None:
        name = name or scene.GenerateUniqueName(f"{reference_node.GetName()} BrainUNet")
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    else:
        segmentation_node.GetSegmentation().RemoveAllSegments()
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation = segmentation_node.GetSegmentation()
    for region in SUBREGIONS:
        segment_id = segmentation.AddEmptySegment(region.key, region.name, list(region.color))
        segment = segmentation.GetSegment(segment_id)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        _set_terminology(segment, region)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            _oriented_image(labels == region.label, affine), segmentation_node, segment_id,
            slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    place_beside(scene, segmentation_node, reference_node)
    return segmentation_node


#: Tags of a segment that Segment Editor lets a user change: its terminology and its status (Completed,
#: Flagged, ...), the latter under ``vtkSlicerSegmentationsModuleLogic.GetStatusTagName()`` where it exists.
EDITABLE_SEGMENT_TAGS = ("TerminologyEntry", "Segmentation.Status")


def _segment_tag(segment, name: str) -> str:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def segmentation_contents(segmentation_node) -> tuple:
    """What a user's edit changes in a segmentation: each segment's ID, name, colour, label value, layer,
    terminology and status, and the voxels of its source representation. Labelmaps: a digest of each shared
    layer (voxels, extent, geometry), one pass per layer however many segments share it. Other sources
    (closed surfaces): each surface's modification time. Derived representations are left out (made on
    demand, they change with no edit), and so are display settings (showing or hiding is no edit)."""
    import hashlib

    segmentation = segmentation_node.GetSegmentation()
    # "source" since Slicer 5.4, "master" before
    source = (getattr(segmentation, "GetSourceRepresentationName", None)
              or segmentation.GetMasterRepresentationName)()
    labelmap_source = source == slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        data = segment.GetRepresentation(source)
        segments.append((segment_id, segment.GetName(), tuple(round(c, 4) for c in segment.GetColor()),
                         segment.GetLabelValue(), *(_segment_tag(segment, tag) for tag in EDITABLE_SEGMENT_TAGS),
                         segmentation.GetLayerIndex(segment_id, source) if labelmap_source
                         else data.GetMTime() if data is not None else 0))
    layers = []
    for layer in range(segmentation.GetNumberOfLayers(source) if labelmap_source else 0):
        image = segmentation.GetLayerDataObject(layer, source)
        scalars = image.GetPointData().GetScalars() if image is not None else None
        digest = hashlib.sha1()
        if scalars is not None:
            digest.update(memoryview(np.ascontiguousarray(numpy_support.vtk_to_numpy(scalars))))
            matrix = vtk.vtkMatrix4x4()
            image.GetImageToWorldMatrix(matrix)
            digest.update(repr((image.GetExtent(), _matrix_to_numpy(matrix).round(6).tolist())).encode())
        layers.append(digest.hexdigest())
    return tuple(segments), tuple(layers)


def segment_mask(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """One segment as a bool array on the reference grid (``[i, j, k]``); the scene is left as it was."""
    scene = segmentation_node.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_node)
        if not ok:
            raise RuntimeError(f"could not export segment {segment_id}")
        return slicer.util.arrayFromVolume(labelmap).transpose(2, 1, 0) > 0
    finally:
        # the export adds a display node and a colour table beside the label map: all of them go again
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before]):
            if node.GetScene() is scene:  # not removed already along with the label map
                scene.RemoveNode(node)


def segmentation_to_labels(segmentation_node, reference_node) -> np.ndarray:
    """BraTS 2023 label map from the ET / NETC / SNFH segments (found by ID, then by name)."""
    segmentation = segmentation_node.GetSegmentation()
    shape = tuple(reference_node.GetImageData().GetDimensions())
    labels = np.zeros(shape, np.uint8)
    for region in (SUBREGIONS[2], SUBREGIONS[1], SUBREGIONS[0]):  # SNFH first: overlaps resolve to core labels
        segment_id = region.key if segmentation.GetSegment(region.key) else segmentation.GetSegmentIdBySegmentName(region.name)
        if segment_id:
            labels[segment_mask(segmentation_node, segment_id, reference_node)] = region.label
    return labels


def place_beside(scene, node, reference_node) -> None:
    """Put ``node`` under the same subject-hierarchy parent (patient / study) as ``reference_node``."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return
    ref_item = sh.GetItemByDataNode(reference_node)
    item = sh.GetItemByDataNode(node)
    if ref_item and item:
        sh.SetItemParent(item, sh.GetItemParent(ref_item))


NOTES_ATTRIBUTE = "BrainUNet.Notes"
#: Column -> (unit, description) shown by Slicer's Tables module (intensity columns: see _column_meta).
STATISTICS_COLUMNS = {
    "region": ("", "BraTS region key (ET, NETC, SNFH; TC = ET + NETC, WT = TC + SNFH)"),
    "name": ("", "Region name"),
    "voxels": ("voxels", "Voxels of the region on the reference volume's grid"),
    "volume_ml": ("mL", "Volume of the region"),
    "centroid_r_mm": ("mm", "Centroid, right (RAS)"),
    "centroid_a_mm": ("mm", "Centroid, anterior (RAS)"),
    "centroid_s_mm": ("mm", "Centroid, superior (RAS)"),
    "max_diameter_mm": ("mm", "Largest 3D diameter of the region"),
}


def _column_meta(column: str) -> tuple[str, str]:
    if column in STATISTICS_COLUMNS:
        return STATISTICS_COLUMNS[column]
    for prefix, what in (("mean_", "Mean"), ("median_", "Median")):
        if column.startswith(prefix):
            return "", f"{what} {column[len(prefix):]} intensity in the region (scanner units)"
    return "", ""


def statistics_table(scene, rows: list[dict], name: str | None = None, table_node=None, notes=()):
    """Statistics rows -> a vtkMRMLTableNode (text columns stay text, numbers are doubles). ``notes`` (what
    was done to the input: "brain extracted ...", "FLAIR registered ...") become the node's description
    and its ``BrainUNet.Notes`` attribute, so they stay with the numbers they explain."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name or "BrainUNet statistics"))
    text = "\n".join(notes)
    table_node.SetDescription(text)
    table_node.SetAttribute(NOTES_ATTRIBUTE, text)
    table = table_node.GetTable()
    table.Initialize()
    if not rows:
        return table_node
    for column in rows[0].keys():
        values = [r[column] for r in rows]
        numeric = all(isinstance(v, (int, float, np.floating, np.integer)) for v in values)
        if not numeric:
            try:
                values = [float(v) for v in values]
                numeric = column not in ("region", "name")
            except (TypeError, ValueError):
                numeric = False
        arr = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        arr.SetName(column)
        for v in values:
            arr.InsertNextValue(float(v) if numeric else str(v))
        table.AddColumn(arr)
        unit, description = _column_meta(column)
        table_node.SetColumnUnitLabel(column, unit)
        table_node.SetColumnDescription(column, description)
    table_node.Modified()
    return table_node


def table_to_rows(table_node) -> list[dict]:
    table = table_node.GetTable()
    cols = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    return [{c.GetName(): c.GetValue(r) for c in cols} for r in range(table.GetNumberOfRows())]
