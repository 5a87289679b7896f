"""Inputs as clinics and Slicer save them: NRRD / MetaImage files and folders of one DICOM series, read into
the same voxels and world geometry as the NIfTI they were made from."""
import re
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from brainunet.errors import InputError
from brainunet.imageio import load_volume
from test_cli import brainunet, case_args


def _oblique_nifti(tmp_path, synthetic_case):
    """The case's T2W placed obliquely and left-handed, stored as int16 (what DICOM holds)."""
    img = nib.load(str(synthetic_case["t2w"]))
    data = np.round(np.asarray(img.dataobj) * 1000).astype(np.int16)
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.9, 1.1, 2.5])
    affine[:3, 3] = [40.0, -30.0, 12.0]
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _canonical(volume):
    """Voxels and affine reordered to the closest RAS axes: DICOM cannot store a left-handed grid, so a
    reader gives the same voxels in the other slice order, at the same places in the world."""
    img = nib.as_closest_canonical(nib.Nifti1Image(volume.data, volume.affine))
    return np.asarray(img.dataobj), img.affine


def _write_dicom_series(image, folder, description, series_uid, slices=None, shift_mm=0.0, prefix="", tags=()):
    """One file per slice with the tags a scanner writes (SimpleITK's DicomSeriesFromArray recipe).
    ``slices``: which to write (default all); ``shift_mm``: each slice moved this far along the rows per
    slice (a tilted gantry)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    shared = [("0008|0031", now[1]), ("0008|0021", now[0]), ("0008|0008", "DERIVED\\SECONDARY"),
              ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
              ("0020|0037", "\\".join(map(str, (*direction[0::3], *direction[1::3])))),
              ("0008|103e", description), ("0008|0060", "MR"), *tags]
    for k in (range(image.GetDepth()) if slices is None else slices):
        slice_ = image[:, :, k]
        for tag, value in shared:
            slice_.SetMetaData(tag, value)
        position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k))) + k * shift_mm * np.asarray(direction[0::3])
        slice_.SetMetaData("0020|0032", "\\".join(map(str, position)))
        slice_.SetMetaData("0020|0013", str(k))
        slice_.SetMetaData("0008|0018", f"{series_uid}.{prefix}{k}")
        writer.SetFileName(str(folder / f"{prefix}{description.replace(' ', '_')}_{k:04d}.dcm"))
        writer.Execute(slice_)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_an_nrrd_or_metaimage_file_reads_as_its_nifti(tmp_path, synthetic_case, suffix):
    source = _oblique_nifti(tmp_path, synthetic_case)
    other = tmp_path / f"t2w{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(other))
    a, b = load_volume(source, "T2W"), load_volume(other, "T2W")
    assert np.array_equal(a.data, b.data)
    assert np.allclose(a.affine, b.affine, atol=1e-4)


def test_one_dicom_file_given_for_a_sequence_asks_for_its_series_folder(tmp_path, synthetic_case):
    """A DICOM file is one slice: it is not called corrupt, and the message names the folder to give."""
    source = _oblique_nifti(tmp_path, synthetic_case)
    folder = tmp_path / "dicom" / "FLAIR"
    _write_dicom_series(sitk.ReadImage(str(source)), folder, "FLAIR AX", "1.2.826.0.1.3680043.2.1125.9")
    first = sorted(folder.iterdir())[0]
    with pytest.raises(InputError, match=re.escape(f"{first.name} is one DICOM file, a single slice of its series. "
                                                   f"Give the folder that holds the whole series ({folder})")):
        load_volume(first, "FLAIR")


def test_a_dicom_series_folder_reads_as_its_nifti(tmp_path, synthetic_case):
    source = _oblique_nifti(tmp_path, synthetic_case)
    folder = tmp_path / "dicom" / "T2W"
    _write_dicom_series(sitk.ReadImage(str(source)), folder, "T2 AX", "1.2.826.0.1.3680043.2.1125.2")
    (a, a_affine), (b, b_affine) = _canonical(load_volume(source, "T2W")), _canonical(load_volume(folder, "T2W"))
    assert np.array_equal(a, b)
    assert np.allclose(a_affine, b_affine, atol=1e-3)


def test_a_folder_of_several_dicom_series_is_refused_naming_them(tmp_path, synthetic_case):
    image = sitk.ReadImage(str(_oblique_nifti(tmp_path, synthetic_case)))
    folder = tmp_path / "export"
    _write_dicom_series(image, folder, "T2 AX", "1.2.826.0.1.3680043.2.1125.3")
    _write_dicom_series(image, folder, "FLAIR AX", "1.2.826.0.1.3680043.2.1125.4")
    with pytest.raises(InputError, match="holds 2 DICOM series: .*'(T2 AX|FLAIR AX)'.*its own folder"):
        load_volume(folder, "T2W")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder without a DICOM series"):
        load_volume(tmp_path / "empty", "T2W")


@pytest.mark.parametrize("flaw, message", [
    ("missing slice", "not evenly spaced"),
    ("tilted gantry", "shifted sideways"),
    ("two echoes", "same position"),
])
def test_a_dicom_series_that_is_not_one_regular_volume_is_refused(tmp_path, synthetic_case, flaw, message):
    """ITK would read each of these as a regular volume, with a warning only: wrong places, wrong volumes."""
    image = sitk.ReadImage(str(_oblique_nifti(tmp_path, synthetic_case)))
    folder = tmp_path / "T2W"
    uid = "1.2.826.0.1.3680043.2.1125.6"
    if flaw == "missing slice":
        _write_dicom_series(image, folder, "T2 AX", uid, slices=[k for k in range(image.GetDepth()) if k != 9])
    elif flaw == "tilted gantry":
        _write_dicom_series(image, folder, "T2 AX", uid, shift_mm=0.3)
    else:
        _write_dicom_series(image, folder, "T2 AX", uid, prefix="e1_")
        _write_dicom_series(image, folder, "T2 AX", uid, prefix="e2_")
    with pytest.raises(InputError, match=f"not one regular 3D volume: .*{message}.*dcm2niix"):
        load_volume(folder, "T2W")


def test_a_cancel_while_a_dicom_folder_is_scanned_stays_a_cancel(tmp_path, monkeypatch):
    from brainunet.errors import Cancelled

    def cancelled(folder):
        raise Cancelled("Cancelled")

    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesIDs", staticmethod(cancelled))
    with pytest.raises(Cancelled):
        load_volume(tmp_path, "T2W")


def test_a_file_that_cannot_be_opened_is_refused_and_an_unreadable_t1_is_left_out(tmp_path, synthetic_case,
                                                                                  monkeypatch):
    """A file without read permission (as one copied from another account): a message saying to check its
    permissions, not a traceback; the native T1, used for statistics only, is left out with a note."""
    from pathlib import Path

    from brainunet.pipeline import load_inputs

    locked = {Path(synthetic_case["t1n"]), Path(synthetic_case["t2w"])}
    real_open = Path.open

    def open_refusing_locked_files(self, *args, **kwargs):
        if self in locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_refusing_locked_files)
    with pytest.raises(InputError, match="cannot be opened \\(Permission denied\\). Check that you may read it"):
        load_volume(synthetic_case["t2w"], "T2W")
    notes = []
    volumes = load_inputs({"t1c": synthetic_case["t1c"], "t2f": synthetic_case["t2f"], "t1n": synthetic_case["t1n"]},
                          notes)
    assert set(volumes) == {"t1c", "t2f"} and "cannot be opened" in notes[0]


def test_a_corrupt_nrrd_is_refused(tmp_path):
    bad = tmp_path / "t2w.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + b"\0" * 100)
    with pytest.raises(InputError, match="cannot be read as an image"):
        load_volume(bad, "T2W")


def test_segment_takes_a_dicom_folder_and_an_nrrd_and_writes_on_the_t1ce_grid(tmp_path, synthetic_case):
    """The whole CLI with T1CE as a DICOM series and FLAIR as NRRD gives the labels the NIfTI run gives."""
    t1c = sitk.ReadImage(str(synthetic_case["t1c"]))
    t1c_int = sitk.Cast(sitk.RescaleIntensity(t1c, 0, 4000), sitk.sitkInt16)
    sitk.WriteImage(t1c_int, str(tmp_path / "t1c.nii.gz"))
    _write_dicom_series(t1c_int, tmp_path / "T1CE", "T1 POST GD", "1.2.826.0.1.3680043.2.1125.5")
    sitk.WriteImage(sitk.ReadImage(str(synthetic_case["t2f"])), str(tmp_path / "flair.nrrd"))
    runs = {}
    for kind, t1c_input, t2f_input in (("nifti", tmp_path / "t1c.nii.gz", synthetic_case["t2f"]),
                                       ("clinic", tmp_path / "T1CE", tmp_path / "flair.nrrd")):
        out = tmp_path / f"{kind}.nii.gz"
        r = brainunet("segment", "--t1c", t1c_input, "--t2w", synthetic_case["t2w"], "--t2f", t2f_input,
                      "--output", out, "--progress", "none")
        assert r.returncode == 0, r.stderr
        runs[kind] = nib.load(str(out))
    assert np.array_equal(np.asarray(runs["nifti"].dataobj), np.asarray(runs["clinic"].dataobj))
    assert np.allclose(runs["nifti"].affine, runs["clinic"].affine, atol=1e-3)
    assert (np.asarray(runs["clinic"].dataobj) > 0).any()


def test_a_detached_header_without_its_data_file_says_so(tmp_path, synthetic_case):
    sitk.WriteImage(sitk.ReadImage(str(synthetic_case["t2w"])), str(tmp_path / "t2w.nhdr"))
    for data_file in tmp_path.glob("t2w.raw*"):
        data_file.unlink()
    with pytest.raises(InputError, match="needs its data file"):
        load_volume(tmp_path / "t2w.nhdr", "T2W")


def test_batch_finds_dicom_series_folders_and_nrrd_files_named_by_sequence(tmp_path, synthetic_case):
    """A case folder as a clinic might fill it: T1CE as a DICOM series folder, T2W as NRRD, FLAIR as NIfTI."""
    case = tmp_path / "cases" / "patient01"
    t1c = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(synthetic_case["t1c"])), 0, 4000), sitk.sitkInt16)
    _write_dicom_series(t1c, case / "T1CE", "T1 POST GD", "1.2.826.0.1.3680043.2.1125.7")
    sitk.WriteImage(sitk.ReadImage(str(synthetic_case["t2w"])), str(case / "patient01-t2w.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(synthetic_case["t2f"])), str(case / "patient01_flair.nii.gz"))
    r = brainunet("batch", tmp_path / "cases", "--progress", "none")
    assert r.returncode == 0, r.stderr
    labels = nib.load(str(tmp_path / "cases" / "brainunet" / "patient01-seg.nii.gz"))
    assert labels.shape == t1c.GetSize() and (np.asarray(labels.dataobj) > 0).any()



def test_batch_reads_case_folders_of_dicom_series_by_their_descriptions(tmp_path, synthetic_case):
    """One study export per patient, series in folders named by the scanner: each sequence is found by its
    description; a folder whose only series is a localiser fails, naming it."""
    cases = tmp_path / "cases"
    for i, (role, description) in enumerate((("t1c", "AX T1 POST GD"), ("t2w", "AX T2 TSE"), ("t2f", "AX FLAIR"))):
        image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(synthetic_case[role])), 0, 4000), sitk.sitkInt16)
        _write_dicom_series(image, cases / "patient02" / "DICOM" / f"SE{i}", description,
                            f"1.2.826.0.1.3680043.2.1125.6{i}")
    _write_dicom_series(image, cases / "patient03" / "SE1", "3-PLANE LOC", "1.2.826.0.1.3680043.2.1125.69",
                        slices=range(3))
    r = brainunet("batch", cases, "--progress", "none")
    assert r.returncode == 1, r.stderr
    assert "patient02: Study: T1CE: series 'AX T1 POST GD'" in r.stderr
    assert (cases / "brainunet" / "patient02-seg.nii.gz").exists()
    assert "patient03: failed, nothing written: no T1CE, T2W or FLAIR" in r.stderr
    assert "series '3-PLANE LOC'" in r.stderr and "1 failed: patient03" in r.stdout


def test_segment_finds_the_sequences_of_a_dicom_study_by_their_descriptions(tmp_path, synthetic_case):
    """A study exported into one folder: the three sequences, a localiser and a shorter sagittal T1 post-contrast.
    The run takes each sequence by its description (the longest T1 post-contrast), as the NIfTI run would."""
    study = tmp_path / "study" / "DICOM"
    nifti = {}
    for i, (role, description) in enumerate((("t1c", "AX T1 POST GD"), ("t2w", "AX T2 TSE"), ("t2f", "AX FLAIR"))):
        image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(synthetic_case[role])), 0, 4000), sitk.sitkInt16)
        nifti[role] = tmp_path / f"{role}.nii.gz"
        sitk.WriteImage(image, str(nifti[role]))
        _write_dicom_series(image, study, description, f"1.2.826.0.1.3680043.2.1125.8{i}")
        if role == "t1c":
            _write_dicom_series(image, study, "SAG T1 POST", "1.2.826.0.1.3680043.2.1125.89", slices=range(10, 20),
                                prefix="sag_")
    _write_dicom_series(image, study, "3-PLANE LOC", "1.2.826.0.1.3680043.2.1125.90", slices=range(3), prefix="loc_")
    out = {kind: tmp_path / f"{kind}.nii.gz" for kind in ("study", "nifti")}
    r = brainunet("segment", "--study", tmp_path / "study", "--output", out["study"], "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "Study: T1CE: series 'AX T1 POST GD'" in r.stderr and "chosen over series 'SAG T1 POST'" in r.stderr
    assert "Study: FLAIR: series 'AX FLAIR'" in r.stderr and "LOC" not in r.stderr
    r = brainunet("segment", "--t1c", nifti["t1c"], "--t2w", nifti["t2w"], "--t2f", nifti["t2f"],
                  "--output", out["nifti"], "--progress", "none")
    assert r.returncode == 0, r.stderr
    study_labels, nifti_labels = nib.load(str(out["study"])), nib.load(str(out["nifti"]))
    assert np.array_equal(np.asarray(study_labels.dataobj), np.asarray(nifti_labels.dataobj))
    assert np.allclose(study_labels.affine, nifti_labels.affine, atol=1e-3)
    # another series of the flat export, named by its description
    r = brainunet("segment", "--study", tmp_path / "study", "--t1c", "sag t1 post", "--output", tmp_path / "sag.nii.gz",
                  "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "Study: T1CE: series 'SAG T1 POST' (10 files" in r.stderr and "as asked" in r.stderr
    assert nib.load(str(tmp_path / "sag.nii.gz")).shape[2] == 10
    r = brainunet("segment", "--study", tmp_path / "study", "--t1c", "T1 PRE", "--output", tmp_path / "x.nii.gz",
                  "--progress", "none")
    assert r.returncode == 2 and "no series of the study" in r.stderr and "'AX T1 POST GD'" in r.stderr
    # a mistyped path is a missing file, not a series description
    r = brainunet("segment", "--study", tmp_path / "study", "--t1c", tmp_path / "study" / "typo-t1c.nii.gz",
                  "--output", tmp_path / "y.nii.gz", "--progress", "none")
    assert r.returncode == 2 and "typo-t1c.nii.gz: no such file or folder" in r.stderr, r.stderr
    assert not (tmp_path / "y.nii.gz").exists()


def test_a_study_mixes_series_and_image_files_and_one_without_named_sequences_is_refused(tmp_path, synthetic_case):
    from brainunet.imageio import DicomSeries
    from brainunet.sequences import find_study_inputs

    study = tmp_path / "study"
    image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(synthetic_case["t2f"])), 0, 4000), sitk.sitkInt16)
    _write_dicom_series(image, study / "s1", "AX FLAIR", "1.2.826.0.1.3680043.2.1125.91")
    sitk.WriteImage(image, str(study / "patient_t2w.nrrd"))
    found, notes = find_study_inputs(study)
    assert set(found) == {"t2f", "t2w"} and isinstance(found["t2f"], DicomSeries)
    assert found["t2w"] == study / "patient_t2w.nrrd" and set(notes) == {"t2f", "t2w"}
    (tmp_path / "other").mkdir()
    _write_dicom_series(image, tmp_path / "other", "SCOUT", "1.2.826.0.1.3680043.2.1125.92")
    with pytest.raises(InputError, match="no series or image named as T1CE, T2W or FLAIR"):
        find_study_inputs(tmp_path / "other")


def test_a_study_takes_acquisitions_after_contrast_and_passes_over_what_cannot_be_an_input(tmp_path, synthetic_case):
    """The same T1 protocol before and after contrast (told apart by the contrast agent recorded), a dual-echo
    PD/T2 (two images per position) with more files than the T2, a FLAIR reformat with more slices than the
    FLAIR, and macOS's ._ copies."""
    from brainunet.sequences import find_study_inputs

    image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(synthetic_case["t1c"])), 0, 4000), sitk.sitkInt16)
    study = tmp_path / "study"
    original = (("0008|0008", "ORIGINAL\\PRIMARY"),)
    uid = "1.2.826.0.1.3680043.2.1125.10"
    _write_dicom_series(image, study / "s1", "t1_mprage_sag", uid + "1", tags=original)
    _write_dicom_series(image, study / "s2", "t1_mprage_sag", uid + "2", tags=original + (("0018|0010", "Gadovist"),))
    _write_dicom_series(image, study / "s3", "AX T2", uid + "3", tags=original, slices=range(30))
    _write_dicom_series(image, study / "s4", "PD T2 FSE", uid + "4", tags=original, prefix="e1_")
    _write_dicom_series(image, study / "s4", "PD T2 FSE", uid + "4", tags=original, prefix="e2_")
    _write_dicom_series(image, study / "s5", "AX FLAIR", uid + "5", tags=original, slices=range(30))
    _write_dicom_series(image, study / "s6", "AX FLAIR MPR", uid + "6", tags=original)
    (study / "._AX-t1c.nii.gz").write_bytes(b"\0" * 10)
    found, notes = find_study_inputs(study)
    assert (found["t1c"].folder.name, found["t1n"].folder.name) == ("s2", "s1")
    assert found["t2w"].description == "AX T2" and "'PD T2 FSE' (" in notes["t2w"] and "not one regular" in notes["t2w"]
    assert found["t2f"].description == "AX FLAIR" and "AX FLAIR MPR" in notes["t2f"]


def test_a_series_split_over_two_folders_is_read_as_one(tmp_path, synthetic_case):
    """Some CD exports cap the files per folder: the parts of one series (one UID) make one volume."""
    from brainunet.sequences import find_study_inputs

    image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(synthetic_case["t2f"])), 0, 4000), sitk.sitkInt16)
    uid = "1.2.826.0.1.3680043.2.1125.11"
    depth = image.GetDepth()
    _write_dicom_series(image, tmp_path / "study" / "DIR000", "AX FLAIR", uid, slices=range(depth // 2, depth))
    _write_dicom_series(image, tmp_path / "study" / "DIR001", "AX FLAIR", uid, slices=range(depth // 2))
    found, _ = find_study_inputs(tmp_path / "study")
    assert len(found["t2f"].files) == depth
    whole = tmp_path / "whole.nii.gz"
    sitk.WriteImage(image, str(whole))
    (a, a_affine), (b, b_affine) = _canonical(load_volume(whole, "FLAIR")), _canonical(load_volume(found["t2f"], "FLAIR"))
    assert np.array_equal(a, b) and np.allclose(a_affine, b_affine, atol=1e-3)


def test_a_study_follows_linked_series_folders_and_a_link_loop_ends(tmp_path, synthetic_case):
    """An archive that links each series into the patient's folder; a link back to the study itself is
    read once, not forever, and a series reached twice counts once."""
    from brainunet.sequences import find_study_inputs

    image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(synthetic_case["t2f"])), 0, 4000), sitk.sitkInt16)
    _write_dicom_series(image, tmp_path / "archive" / "series-7", "AX FLAIR", "1.2.826.0.1.3680043.2.1125.12")
    study = tmp_path / "study"
    study.mkdir()
    (study / "flair").symlink_to(tmp_path / "archive" / "series-7", target_is_directory=True)
    (study / "flair again").symlink_to(tmp_path / "archive" / "series-7", target_is_directory=True)
    (study / "loop").symlink_to(study, target_is_directory=True)
    sitk.WriteImage(image, str(study / "patient_t2w.nrrd"))
    found, _ = find_study_inputs(study)
    assert found["t2f"].description == "AX FLAIR" and len(found["t2f"].files) == image.GetDepth()
    assert found["t2w"] == study / "patient_t2w.nrrd"


def test_a_study_folder_far_larger_than_a_study_is_refused(tmp_path, monkeypatch):
    from brainunet import sequences

    monkeypatch.setattr(sequences, "MAX_STUDY_FOLDERS", 3)
    for i in range(5):
        (tmp_path / "disk" / f"folder{i}").mkdir(parents=True)
    with pytest.raises(InputError, match="more than 3 folders, far more than one study"):
        sequences.find_study_inputs(tmp_path / "disk")


@pytest.mark.parametrize("name", ["t1c.mgz", "t1c.mgh", "t1c.img"])
def test_a_freesurfer_or_analyze_file_is_refused_saying_how_to_convert_it(tmp_path, name):
    """nibabel reads them, but MGH has no NIfTI header to write the labels with and Analyze no left-right
    orientation (nibabel would guess it): refused before any work, saying what BrainUNet reads."""
    data = np.random.default_rng(0).random((12, 14, 10)).astype(np.float32)
    kind = nib.AnalyzeImage if name.endswith(".img") else nib.MGHImage
    nib.save(kind(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / name))
    with pytest.raises(InputError, match=r"t1c\.\w+ is not NIfTI .*NIfTI \(\.nii, \.nii\.gz\), NRRD.*convert"):
        load_volume(tmp_path / name, "T1CE")
    pair = nib.Nifti1Pair(data, np.diag([2.0, 2.0, 2.0, 1.0]))  # NIfTI as a .hdr/.img pair: oriented, read
    nib.save(pair, str(tmp_path / "pair.img"))
    assert np.array_equal(load_volume(tmp_path / "pair.img", "T1CE").data, data)
