"""``multiturnseg export``: a ``.seg.nrrd`` to DICOM-SEG on its source DICOM series."""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a .seg.nrrd as DICOM-SEG for PACS",
        description=(
            "Write a segmentation (.seg.nrrd, e.g. saved by 'multiturnseg chat' or Slicer) as a "
            "BINARY DICOM Segmentation object referencing the DICOM series it was made on. "
            "Each segment keeps its name, colour and SNOMED CT codes (from its TerminologyEntry "
            "or looked up from its name, English or Chinese); empty segments are skipped."
        ),
    )
    parser.add_argument("segmentation", metavar="SEG.seg.nrrd", help="segmentation file (.seg.nrrd)")
    parser.add_argument(
        "--dicom-series", "-d", required=True, metavar="DIR",
        help="folder of the DICOM series the segmentation was made on (file names and order do not matter)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT.dcm", help="DICOM-SEG file to write")
    parser.add_argument("--series-uid", default=None, help="SeriesInstanceUID to use when DIR holds several series")
    parser.add_argument(
        "--series-description", default="MultiTurnSeg MediRound segmentation",
        help="SeriesDescription of the new SEG series (default: %(default)s)",
    )
    parser.add_argument("--series-number", type=int, default=None, help="SeriesNumber (default: source series number + 1000)")
    parser.add_argument("--creator", default=None, metavar="NAME", help="ContentCreatorName, e.g. 'Doe^Jane'")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from ..export.dicom_seg import export_seg_nrrd

    result = export_seg_nrrd(
        args.segmentation,
        args.dicom_series,
        args.output,
        series_uid=args.series_uid,
        series_description=args.series_description,
        series_number=args.series_number,
        content_creator_name=args.creator,
    )
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"wrote {result.path} ({len(result.segments)} segment(s) on {result.series.summary()})")
    for s in result.segments:
        term = s.term
        code = f"{term.type.scheme} {term.type.value} {term.type.meaning}"
        if term.type_modifier is not None:
            code += f", {term.type_modifier.meaning}"
        if term.anatomic_region is not None:
            code += f" in {term.anatomic_region.meaning}"
            if term.anatomic_region_modifier is not None:
                code += f" ({term.anatomic_region_modifier.meaning})"
        print(f"  {s.number}: {s.label}  [{code}{'; generic' if term.generic else ''}]  {s.frames} frame(s)")
    return 0
