"""Public BraTS sample cases in Slicer's Sample Data module, under a "BrainUNet" category.

The files, URLs and SHA-256 checksums are those SlicerMONAIAuto3DSeg registers (its "TestingData"
release). Only the three sequences BrainUNet reads are listed: T1 native is not used, and on a slow
connection every file counts. SampleData downloads each file once into Slicer's cache and checks its
checksum; ``fetch_case`` does the same outside Slicer (a ``file://`` base URL works offline).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CATEGORY = "BrainUNet"
RELEASE_URL = "https://github.com/lassoan/SlicerMONAIAuto3DSeg/releases/download/TestingData/"
#: File suffix -> the input role (and node name suffix) it fills.
SEQUENCES = (("t1c", "T1CE"), ("t2w", "T2W"), ("t2f", "FLAIR"))


@dataclass(frozen=True)
class SampleCase:
    name: str
    description: str
    sha256: dict  # sequence key -> SHA-256 of "<name>-<key>.nii.gz"

    def file_name(self, key: str) -> str:
        return f"{self.name}-{key}.nii.gz"


SAMPLE_CASES = (
    SampleCase("BraTS-GLI-00001-000", "Adult glioma (BraTS 2023 GLI), skull-stripped, 1 mm", {
        "t1c": "4399faadcc45c8a4541313cdf88aced7d835ed59ac3078d950e0eac293d603f5",
        "t2w": "4cd389cc57d12134a30a898c66532228126b9a7d0600ee578e82a32144528b51",
        "t2f": "82aed8546af5e6d8d94fd91c56227abdcf6120130390d1556c4342a208980604",
    }),
    SampleCase("BraTS-SSA-00002-000", "Adult glioma scanned in sub-Saharan Africa (BraTS-Africa), skull-stripped", {
        "t1c": "b980aab6d6fb2e95f01e6f6c964d94a89ef32e717448e1b1c101e163219042b1",
        "t2w": "4d9810cd217a9504f8aa4313a0edec4a091ecb145bad09dab5b7955688639420",
        "t2f": "b7067abe232daafbf5c46c9707462edc961cdb30cb5eb445e5d4407e0da70c08",
    }),
)


def sample_data_sources(thumbnail: str | None = None, base_url: str = RELEASE_URL,
                        cases=SAMPLE_CASES) -> list[dict]:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource``, a case each.
    Node names end in T1CE / T2W / FLAIR, the names the module's Auto-detect recognises."""
    sources = []
    for case in cases:
        keys = [k for k, _ in SEQUENCES]
        sources.append({
            "category": CATEGORY,
            "sampleName": case.name,
            "uris": [base_url + case.file_name(k) for k in keys],
            "fileNames": [case.file_name(k) for k in keys],
            "nodeNames": [f"{case.name}-{label}" for _, label in SEQUENCES],
            "checksums": [f"SHA256:{case.sha256[k]}" for k in keys],
            "thumbnailFileName": thumbnail,
        })
    return sources


def register_sample_data(sample_data_logic, thumbnail: str | None = None, registered: dict | None = None) -> list[str]:
    """Register every sample case with ``sample_data_logic`` (Slicer's ``SampleData.SampleDataLogic``);
    returns the names registered. ``registered``: the sample data sources Slicer lists already (category ->
    sources); a case listed there is not added twice (start-up and the module's set-up both call
    this, so that a module added after start-up has its sample data too)."""
    present = {getattr(s, "sampleName", None) for s in (registered or {}).get(CATEGORY, [])}
    names = []
    for source in sample_data_sources(thumbnail):
        if source["sampleName"] in present:
            continue
        sample_data_logic.registerCustomSampleDataSource(**source)
        names.append(source["sampleName"])
    return names


def fetch_case(case: SampleCase, destination, base_url: str = RELEASE_URL, progress=None) -> dict[str, Path]:
    """Download a sample case's three sequences into ``destination`` (skipping files already there with
    the right checksum), each verified against its SHA-256; returns sequence key -> file."""
    from brainunet.weights import download, sha256_of

    destination = Path(destination)
    files = {}
    for key, _ in SEQUENCES:
        target = destination / case.file_name(key)
        if not (target.is_file() and sha256_of(target) == case.sha256[key]):
            download(base_url + case.file_name(key), target, case.sha256[key], progress, what="sample image")
        files[key] = target
    return files
