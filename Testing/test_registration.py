"""Sequences that moved relative to the T1CE are registered back rigidly; sequences that share its grid
are left alone; a registration that cannot have worked is refused."""
import numpy as np
import pytest

from brainunet import pipeline, registration, synthetic
from brainunet.errors import InputError
from brainunet.imageio import Volume
from brainunet.preprocessing import resample_to_grid


def rigid(degrees_z: float, shift_mm) -> np.ndarray:
    a = np.radians(degrees_z)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = shift_mm
    return m


@pytest.fixture(scope="module")
def phantom():
    return synthetic.make_case(seed=0, shape=(96, 112, 80), spacing=(1.6, 1.6, 1.6), modalities=("t1c", "t2w", "t2f"))


def mapping_error_mm(transform, true_fixed_to_moving: np.ndarray, volume: Volume) -> float:
    """Largest distance between where the estimated and the true transform send brain points (RAS mm)."""
    voxels = np.argwhere(volume.data > 0)[::200]
    points = voxels @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    worst = 0.0
    for p in points:
        q = np.asarray(transform.TransformPoint([-p[0], -p[1], p[2]]))  # SimpleITK works in LPS
        estimated = np.array([-q[0], -q[1], q[2]])
        worst = max(worst, float(np.linalg.norm(estimated - (true_fixed_to_moving[:3, :3] @ p + true_fixed_to_moving[:3, 3]))))
    return worst


def test_a_moved_sequence_is_registered_back_within_2_mm(phantom):
    volumes, _ = phantom
    motion = rigid(5.0, [4.0, -3.0, 2.0])
    moved = dict(volumes, t2f=Volume(volumes["t2f"].data, motion @ volumes["t2f"].affine, "t2f"))
    reg = registration.register_rigid(moved["t1c"], moved["t2f"])
    assert mapping_error_mm(reg.transform, motion, volumes["t1c"]) < 2.0
    # the same inputs, the same registration (SimpleITK would seed its sampling from the clock)
    again = registration.register_rigid(moved["t1c"], moved["t2f"])
    # (to within the last digits that multi-threaded sums change: an unseeded run differs by ~1e-4)
    assert again.transform.GetParameters() == pytest.approx(reg.transform.GetParameters(), abs=1e-7)
    assert (again.metric_before, again.metric_after) == pytest.approx((reg.metric_before, reg.metric_after), rel=1e-6)
    with pytest.raises(ValueError, match="seed 0 means a random seed"):
        registration.register_rigid(moved["t1c"], moved["t2f"], seed=0)
    notes = []
    aligned, _ = pipeline.prepare_inputs(moved, pipeline.load_model("intensity-baseline"), notes=notes)
    assert len(notes) == 1 and notes[0].startswith("FLAIR registered to T1CE")
    brain = volumes["t1c"].data > 0
    before = np.corrcoef(resample_to_grid(moved["t2f"], brain.shape, volumes["t1c"].affine)[brain],
                         volumes["t2f"].data[brain])[0, 1]
    after = np.corrcoef(aligned["t2f"][brain], volumes["t2f"].data[brain])[0, 1]
    assert after > 0.97 and after > before + 0.05


def test_sequences_on_the_reference_grid_are_left_alone(phantom):
    volumes, _ = phantom
    notes = []
    aligned, _ = pipeline.prepare_inputs(volumes, pipeline.load_model("intensity-baseline"), notes=notes)
    assert notes == [] and all(np.array_equal(aligned[k], volumes[k].data) for k in volumes)


def test_a_sequence_on_the_reference_grid_that_moved_is_registered_not_called_another_patients(phantom):
    """A patient who moved between two series of one planning: the second keeps the grid, not the anatomy.
    It is found by how little anatomy it shares, registered back and said so, and not taken for another
    patient's; a sequence that lines up stays untouched."""
    from brainunet import plausibility

    volumes, _ = phantom
    motion = rigid(15.0, [16.0, -10.0, 6.0])  # within what a patient moves in the coil
    displaced = Volume(volumes["t2f"].data, motion @ volumes["t2f"].affine, "t2f")
    # the moved anatomy, stored on the T1CE's grid as the scanner would store it
    same_grid = Volume(resample_to_grid(displaced, volumes["t1c"].data.shape, volumes["t1c"].affine),
                       volumes["t1c"].affine, "t2f")
    moved = dict(volumes, t2f=same_grid)
    shared = plausibility.shared_information(
        {k: v.data for k, v in moved.items()}, "t1c", volumes["t1c"].spacing)
    assert shared["t2f"] < plausibility.SAME_PATIENT_MIN_INFORMATION < shared["t2w"]
    notes = []
    aligned, _ = pipeline.prepare_inputs(moved, pipeline.load_model("intensity-baseline"), notes=notes)
    # (what moved out of the stored field of view stays missing, and is noted as such)
    assert [n for n in notes if "registered" in n or "patient" in n] == [notes[-1]], notes
    assert notes[-1].startswith("FLAIR registered to T1CE (the patient moved: ")
    brain = volumes["t1c"].data > 0
    assert np.corrcoef(aligned["t2f"][brain], volumes["t2f"].data[brain])[0, 1] > 0.95
    assert np.array_equal(aligned["t2w"], volumes["t2w"].data)


def test_a_registration_that_cannot_have_worked_is_refused(phantom):
    volumes, _ = phantom
    other = np.random.default_rng(0).uniform(0, 1000, volumes["t2f"].data.shape).astype(np.float32)
    far = dict(volumes, t2f=Volume(other, rigid(0.0, [0.5, 0.0, 0.0]) @ volumes["t2f"].affine, "t2f"))
    with pytest.raises(InputError, match="shares almost no structure"):
        pipeline.prepare_inputs(far, pipeline.load_model("intensity-baseline"), notes=[])


def test_two_moved_sequences_are_registered_together_and_noted_in_their_order(phantom):
    """A clinic's export: T2W and FLAIR both moved. Both are registered back (two at a time) and noted in
    the sequences' order; an optional sequence (the native T1) that cannot be registered is reported to
    the caller, not refused, and a required one is refused."""
    volumes, _ = phantom
    ref = volumes["t1c"]
    noise = np.random.default_rng(0).uniform(0, 1000, ref.data.shape).astype(np.float32)
    moved = {"t1c": ref,
             "t2w": Volume(volumes["t2w"].data, rigid(-4.0, [-3.0, 2.0, 1.0]) @ volumes["t2w"].affine, "t2w"),
             "t2f": Volume(volumes["t2f"].data, rigid(5.0, [4.0, -3.0, 2.0]) @ volumes["t2f"].affine, "t2f"),
             "t1n": Volume(noise, rigid(0.0, [0.5, 0.0, 0.0]) @ ref.affine, "t1n")}
    aligned = {k: resample_to_grid(v, ref.data.shape, ref.affine) for k, v in moved.items()}
    notes, failed = [], []
    registration.register_to_reference(moved, aligned, "t1c", notes, optional=("t1n",),
                                       on_optional_failure=lambda key, exc: failed.append((key, str(exc))))
    assert [n.split(" registered to T1CE")[0] for n in notes] == ["T2W", "FLAIR"], notes
    assert [key for key, _ in failed] == ["t1n"] and "shares almost no structure" in failed[0][1]
    brain = ref.data > 0
    for key in ("t2w", "t2f"):
        assert np.corrcoef(aligned[key][brain], volumes[key].data[brain])[0, 1] > 0.97
    required = {k: moved[k] for k in ("t1c", "t1n")}
    with pytest.raises(InputError, match="shares almost no structure"):
        registration.register_to_reference(required, {k: aligned[k] for k in required}, "t1c", [])
