"""Sample Data: the public BraTS cases SlicerMONAIAuto3DSeg publishes, registered under "BrainUNet",
fetched and verified offline through a file:// URL."""
import hashlib
import re

import pytest

from BrainUNetSegmentationLib import sampledata
from brainunet.errors import WeightsError


class SampleDataLogicRecorder:
    """Records registerCustomSampleDataSource calls (the keyword names of Slicer's SampleDataLogic)."""
    KEYWORDS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                "thumbnailFileName", "loadFileType", "loadFiles", "loadFileProperties", "checksums"}

    def __init__(self):
        self.sources = []

    def registerCustomSampleDataSource(self, **kwargs):
        assert set(kwargs) <= self.KEYWORDS, set(kwargs) - self.KEYWORDS
        self.sources.append(kwargs)


def test_every_case_is_registered_with_its_three_sequences_urls_and_sha256():
    logic = SampleDataLogicRecorder()
    names = sampledata.register_sample_data(logic, thumbnail="icon.png")
    assert names == ["BraTS-GLI-00001-000", "BraTS-SSA-00002-000"] and len(logic.sources) == len(names)
    for source in logic.sources:
        assert source["category"] == "BrainUNet"
        assert len(source["uris"]) == len(source["fileNames"]) == len(source["checksums"]) == 3
        for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
            assert uri == sampledata.RELEASE_URL + name and name.endswith((".nii.gz"))
            assert re.fullmatch(r"SHA256:[0-9a-f]{64}", checksum)
        # node names the module's Auto-detect maps to T1CE, T2W and FLAIR
        assert [n.rsplit("-", 1)[1] for n in source["nodeNames"]] == ["T1CE", "T2W", "FLAIR"]


def test_a_case_already_listed_is_not_registered_twice():
    from types import SimpleNamespace

    logic = SampleDataLogicRecorder()
    listed = {"BrainUNet": [SimpleNamespace(sampleName="BraTS-GLI-00001-000")], "Other": []}
    assert sampledata.register_sample_data(logic, registered=listed) == ["BraTS-SSA-00002-000"]
    assert [s["sampleName"] for s in logic.sources] == ["BraTS-SSA-00002-000"]


def test_node_names_are_recognised_by_auto_detect():
    from BrainUNetSegmentationLib.logic import guess_role

    sources = sampledata.sample_data_sources()
    assert len(sources) == 2
    for source in sources:
        assert [guess_role(n) for n in source["nodeNames"]] == ["t1c", "t2w", "t2f"]


@pytest.fixture
def local_release(tmp_path):
    """A release folder served through file:// with three small files, and a case listing their SHA-256."""
    release = tmp_path / "release"
    release.mkdir()
    sums = {}
    for key in ("t1c", "t2w", "t2f"):
        data = f"not an image: {key}".encode()
        (release / f"Case-1-{key}.nii.gz").write_bytes(data)
        sums[key] = hashlib.sha256(data).hexdigest()
    return release, sampledata.SampleCase("Case-1", "test", sums)


def test_fetch_case_downloads_and_verifies_each_file(local_release, tmp_path):
    release, case = local_release
    files = sampledata.fetch_case(case, tmp_path / "cache", base_url=release.as_uri() + "/")
    assert sorted(files) == ["t1c", "t2f", "t2w"]
    assert all(files[k].read_bytes() == (release / case.file_name(k)).read_bytes() for k in files)


def test_a_file_that_does_not_match_its_checksum_is_refused_and_not_kept(local_release, tmp_path):
    release, case = local_release
    (release / case.file_name("t2w")).write_bytes(b"changed on the server")
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="does not match the expected checksum"):
        sampledata.fetch_case(case, cache, base_url=release.as_uri() + "/")
    assert not (cache / case.file_name("t2w")).exists()
    assert not list(cache.glob("*.part"))
