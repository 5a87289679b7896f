"""The one source of truth for BrainUNet's labels, names, colours and terminology.

Label values follow BraTS 2023: 1 NETC, 2 SNFH, 3 ET.  BraTS 2021 files use 4 for ET;
``to_brats2023`` converts them.  Composite regions: TC = NETC + ET, WT = NETC + SNFH + ET.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: BrainUNet's own terminology context, shipped as Resources/Terminology/BrainUNet.term.json (built by
#: ``terminology_context``) and loaded by the module: the general anatomy list does not hold these types.
TERMINOLOGY_CONTEXT = "BrainUNet - glioma subregions"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
#: SNOMED CT category shared by every tumour subregion.
CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")


@dataclass(frozen=True)
class Region:
    key: str  # short name used in tables and file names: ET, NETC, SNFH, TC, WT
    name: str  # segment name shown to the clinician
    labels: tuple[int, ...]  # label values (BraTS 2023) that make up the region
    color: tuple[float, float, float]  # RGB in 0..1
    snomed_type: tuple[str, str, str] | None = None  # (scheme, code, meaning); None for composites
    description: str = ""

    @property
    def label(self) -> int:
        """Label value of a single-label region (ET, NETC, SNFH)."""
        if len(self.labels) != 1:
            raise ValueError(f"{self.key} is a composite of labels {self.labels}")
        return self.labels[0]

    def mask(self, label_map: np.ndarray) -> np.ndarray:
        return np.isin(label_map, self.labels)

    def terminology_entry(self) -> str:
        """Slicer's TerminologyEntry tag: context~category~type~modifier~anatContext~region~regionMod."""
        if self.snomed_type is None:
            raise ValueError(f"{self.key} is a composite region; it has no segment terminology")
        cat = "^".join(CATEGORY)
        typ = "^".join(self.snomed_type)
        return f"{TERMINOLOGY_CONTEXT}~{cat}~{typ}~^^~{ANATOMIC_CONTEXT}~^^~^^"


NETC = Region("NETC", "Necrotic / non-enhancing tumour core", (1,), (0.20, 0.55, 0.95),
              ("SCT", "6574001", "Necrosis"), "Necrosis, cyst and non-enhancing tumour core")
SNFH = Region("SNFH", "Surrounding FLAIR hyperintensity", (2,), (0.98, 0.85, 0.25),
              ("SCT", "79654002", "Edema"), "Peritumoural oedema and infiltrated tissue")
ET = Region("ET", "Enhancing tumour", (3,), (0.90, 0.20, 0.20),
            ("SCT", "108369006", "Neoplasm"), "Contrast-enhancing tumour on T1CE")
# composites: their names say what they add up, for the statistics table
TC = Region("TC", "Tumour core (NETC + ET)", (1, 3), (0.75, 0.30, 0.75))
WT = Region("WT", "Whole tumour (NETC + SNFH + ET)", (1, 2, 3), (0.35, 0.80, 0.45))

#: Regions that become segments, in display order.
SUBREGIONS: tuple[Region, ...] = (ET, NETC, SNFH)
#: Every region reported in statistics and evaluation.
ALL_REGIONS: tuple[Region, ...] = (ET, NETC, SNFH, TC, WT)
REGIONS_BY_KEY = {r.key: r for r in ALL_REGIONS}
#: Network output channel -> label value (channel 0 is background).
CLASS_LABELS = (0, NETC.label, SNFH.label, ET.label)
VALID_LABELS = frozenset(CLASS_LABELS)


def terminology_context() -> dict:
    """The terminology context file (Slicer / dcmqi segment-context schema) for the three subregions."""
    types = [{"CodingSchemeDesignator": r.snomed_type[0], "CodeValue": r.snomed_type[1],
              "CodeMeaning": r.snomed_type[2], "3dSlicerLabel": r.name,
              "recommendedDisplayRGBValue": [round(255 * c) for c in r.color]} for r in SUBREGIONS]
    return {"SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT,
            "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#",
            "SegmentationCodes": {"Category": [{"CodingSchemeDesignator": CATEGORY[0], "CodeValue": CATEGORY[1],
                                                "CodeMeaning": CATEGORY[2], "showAnatomy": "false",
                                                "Type": types}]}}


def to_brats2023(label_map: np.ndarray) -> np.ndarray:
    """Return labels in BraTS 2023 convention; BraTS 2021's 4 (ET) becomes 3.

    Raises ValueError for any value that is neither convention's.
    """
    arr = np.asarray(label_map)
    if not np.all(np.isfinite(arr)):
        raise ValueError("label map contains NaN or Inf")
    arr = np.rint(arr).astype(np.uint8)
    values = set(np.unique(arr).tolist())
    unknown = values - {0, 1, 2, 3, 4}
    if unknown:
        raise ValueError(f"label map has values {sorted(unknown)}; expected BraTS labels 0-3 (2023) or 0,1,2,4 (2021)")
    if 4 in values:
        if 3 in values:
            raise ValueError("label map mixes 3 and 4; cannot tell BraTS 2021 from 2023 labels")
        arr = arr.copy()
        arr[arr == 4] = ET.label
    return arr
