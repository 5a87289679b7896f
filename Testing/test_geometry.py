"""Geometry: arrays <-> MRML nodes, left-handed / oblique / anisotropic files, inputs on different grids."""
import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from conftest import dice
from brainunet import pipeline, synthetic
from BrainUNetSegmentationLib import mrml
from brainunet.imageio import Volume, load_volume
from brainunet.preprocessing import resample_to_grid


def oblique_affine(spacing=(0.9, 1.1, 3.0), angles=(12, -7, 20), left_handed=False):
    r = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    if left_handed:
        r = r @ np.diag([1.0, 1.0, -1.0])
    a = np.eye(4)
    a[:3, :3] = r * np.asarray(spacing)
    a[:3, 3] = (-30.0, 20.0, -15.0)
    return a


def node_value_at_world(node, xyz):
    arr = mrml.volume_from_node(node).data
    ijk = np.linalg.inv(mrml.ijk_to_ras(node)) @ np.append(xyz, 1.0)
    return arr[tuple(np.round(ijk[:3]).astype(int))]


@pytest.mark.parametrize("left_handed", [False, True])
def test_nifti_through_slicer_storage_node_keeps_world_positions(tmp_path, scene, left_handed):
    """Slicer's reader may flip K for qfac = -1; the node's IJKToRAS must still place every voxel right."""
    affine = oblique_affine(left_handed=left_handed)
    data = np.random.default_rng(0).integers(1, 1000, (20, 24, 12)).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    path = tmp_path / "img.nii.gz"
    nib.save(img, str(path))
    if left_handed:
        assert nib.load(str(path)).header["pixdim"][0] == -1  # really a qfac = -1 file
    node = mrml.load_volume_file(scene, path, "img")
    rng = np.random.default_rng(1)
    for _ in range(25):
        ijk = rng.integers(0, data.shape)
        xyz = (affine @ np.append(ijk, 1))[:3]
        assert node_value_at_world(node, xyz) == data[tuple(ijk)]


@pytest.mark.parametrize("left_handed", [False, True])
def test_volume_node_round_trip_oblique_anisotropic(scene, left_handed):
    affine = oblique_affine(left_handed=left_handed)
    data = np.random.default_rng(0).normal(size=(17, 13, 9)).astype(np.float32)
    node = mrml.add_volume_node(scene, Volume(data, affine, "v"))
    back = mrml.volume_from_node(node)
    assert np.array_equal(back.data, data)
    assert np.allclose(back.affine, affine)


def test_parent_linear_transform_is_applied(scene):
    import vtk

    node = mrml.add_volume_node(scene, Volume(np.random.rand(5, 6, 7).astype(np.float32) + 1, np.eye(4), "v"))
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 12.5)
    t.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(t.GetID())
    assert mrml.ijk_to_ras(node)[0, 3] == pytest.approx(12.5)


def _segment_world(case_files, tmp_path, name):
    out = tmp_path / f"{name}.nii.gz"
    pipeline.run({k: case_files[k] for k in ("t1c", "t2w", "t2f")}, out, device="cpu")
    return nib.load(str(out))


def _write(volume: Volume, path):
    nib.save(nib.Nifti1Image(volume.data, volume.affine), str(path))
    return path


def test_output_is_on_the_t1ce_grid_for_reoriented_left_handed_input(tmp_path):
    """The same anatomy stored in another voxel order (left-handed, axes permuted) gives the same labels in world space."""
    vols, _ = synthetic.make_case(seed=4, shape=(40, 48, 36), spacing=(2.0, 2.0, 2.0))
    ras_files = {k: _write(v, tmp_path / f"ras_{k}.nii.gz") for k, v in vols.items()}
    # Permute to (k, i, j) order and flip the new first axis: a left-handed, non-RAS storage order.
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    perm[2, 0] = 1  # new i walks old k
    perm[0, 1] = 1  # new j walks old i
    perm[1, 2] = 1  # new k walks old j
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = 35  # new i' = 35 - i
    old_from_new = perm @ flip
    assert np.linalg.det(old_from_new[:3, :3]) < 0
    other_files = {}
    for k, v in vols.items():
        data = np.flip(np.transpose(v.data, (2, 0, 1)), axis=0)
        other_files[k] = _write(Volume(np.ascontiguousarray(data), v.affine @ old_from_new, k), tmp_path / f"lh_{k}.nii.gz")
    a = _segment_world(ras_files, tmp_path, "ras")
    b = _segment_world(other_files, tmp_path, "lh")
    assert np.allclose(b.affine, nib.load(str(other_files["t1c"])).affine)
    assert b.shape == nib.load(str(other_files["t1c"])).shape
    b_in_ras_order = np.transpose(np.flip(np.asarray(b.dataobj), axis=0), (1, 2, 0))
    assert np.asarray(a.dataobj).any()
    assert np.array_equal(np.asarray(a.dataobj), b_in_ras_order)


def test_inputs_on_different_grids_are_resampled_in_physical_space(tmp_path):
    vols, truth = synthetic.make_case(seed=5, shape=(48, 56, 40), spacing=(2.0, 2.0, 2.0))
    t1c = vols["t1c"]
    files = {"t1c": _write(t1c, tmp_path / "t1c.nii.gz")}
    # T2W: oblique, 1.5 x 1.5 x 4 mm, its field of view centred on the head; FLAIR: another size and origin.
    t2w_affine, t2w_shape = oblique_affine((1.5, 1.5, 4.0), (5, 0, -10)), (88, 104, 30)
    t2w_affine[:3, 3] = -t2w_affine[:3, :3] @ ((np.array(t2w_shape) - 1) / 2)
    for key, affine, shape in (("t2w", t2w_affine, t2w_shape),
                               ("t2f", np.diag([2.5, 2.5, 2.5, 1.0]) + np.array([[0, 0, 0, -55], [0, 0, 0, -60], [0, 0, 0, -45], [0, 0, 0, 0]]), (44, 50, 38))):
        moved = resample_to_grid(vols[key], shape, affine)
        files[key] = _write(Volume(moved, affine, key), tmp_path / f"{key}.nii.gz")
    out = tmp_path / "labels.nii.gz"
    result = pipeline.run(files, out, device="cpu")
    img = nib.load(str(out))
    assert img.shape == t1c.data.shape and np.allclose(img.affine, t1c.affine)
    assert dice(result.labels > 0, truth > 0) > 0.85


def test_label_output_keeps_reference_header_geometry(tmp_path, synthetic_case):
    out = tmp_path / "l.nii.gz"
    pipeline.run({k: synthetic_case[k] for k in ("t1c", "t2w", "t2f")}, out, device="cpu")
    ref, lab = nib.load(str(synthetic_case["t1c"])), nib.load(str(out))
    assert lab.get_data_dtype() == np.uint8
    assert np.allclose(ref.affine, lab.affine)
    assert np.allclose(ref.header.get_qform(), lab.header.get_qform())
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1, 2, 3}
    assert load_volume(synthetic_case["t1c"]).data.shape == lab.shape


def test_an_integer_volume_is_resampled_without_rounding():
    """Slicer holds most scans as int16: resampled onto another grid (Update statistics does it) they keep
    their fractions, as the worker's float32 volumes do, so the same segments give the same medians."""
    data = np.arange(6 * 6 * 6, dtype=np.int16).reshape(6, 6, 6) * 3
    shifted = np.eye(4)
    shifted[:3, 3] = 0.5  # half a voxel along each axis: every value is a mean of eight
    as_int = resample_to_grid(Volume(data, np.eye(4), "T2W"), (5, 5, 5), shifted)
    as_float = resample_to_grid(Volume(data.astype(np.float32), np.eye(4), "T2W"), (5, 5, 5), shifted)
    assert as_int.dtype == np.float32
    assert np.array_equal(as_int, as_float) and not np.array_equal(as_int, np.round(as_int))
