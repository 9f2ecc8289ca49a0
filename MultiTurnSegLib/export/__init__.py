"""Export: SNOMED CT terminology for segments and DICOM-SEG files.

``terminology`` (pure Python, table in ``Resources/Terminology``):
``lookup(text) -> TermMatch | None``, ``terminology_entry_for(text) -> str | None``
(Slicer's TerminologyEntry tag), ``match_or_generic(text)``.

``dicom_seg`` (highdicom/pydicom, imported when called):
``write_dicom_seg(segmentation, dicom_folder, out)``, ``export_seg_nrrd(...)``,
``export_conversation_dicom_seg(conversation, volume, dicom_folder, out)``,
``read_dicom_series(folder)``, ``match_grid(...)``.
"""

from .terminology import (
    Code,
    TermMatch,
    generic_match,
    lookup,
    match_or_generic,
    parse_slicer_terminology_entry,
    terminology_entry_for,
)
from .dicom_seg import (
    DicomSegExport,
    DicomSeries,
    export_conversation_dicom_seg,
    export_seg_nrrd,
    match_grid,
    read_dicom_series,
    segmentation_from_labelmap,
    write_dicom_seg,
)

__all__ = [
    "Code",
    "TermMatch",
    "generic_match",
    "lookup",
    "match_or_generic",
    "parse_slicer_terminology_entry",
    "terminology_entry_for",
    "DicomSegExport",
    "DicomSeries",
    "export_conversation_dicom_seg",
    "export_seg_nrrd",
    "match_grid",
    "read_dicom_series",
    "segmentation_from_labelmap",
    "write_dicom_seg",
]
