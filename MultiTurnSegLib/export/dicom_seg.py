"""DICOM-SEG export of MultiTurnSeg segmentations (highdicom).

:func:`write_dicom_seg` writes one BINARY DICOM Segmentation object for a
:class:`~MultiTurnSegLib.segmentation_io.Segmentation` (one segment per
conversation turn) on the grid of the DICOM series it was made on:

* each segment gets SNOMED CT codes (its ``TerminologyEntry`` tag, or else a
  :func:`~MultiTurnSegLib.export.terminology.lookup` of its name, or else the
  generic "Tissue"), its display colour (CIELab), algorithm type SEMIAUTOMATIC
  and algorithm "MediRound" version ``MultiTurnSegLib.__version__``;
* voxel slices are matched to source instances by ImagePositionPatient along
  the slice normal (file names and file order do not matter), and the grid may
  run in any axis order/direction as long as its voxels are the series' voxels;
* empty frames are omitted; empty segments are skipped with a warning (all
  empty is an error).

The reader and writer are what dcmqi (Slicer's DICOM-SEG exporter) and
highdicom read back voxel-exactly. pydicom/highdicom are imported when a
function runs, not with this module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from ..errors import ExportError
from .terminology import TermMatch, lookup, match_or_generic, parse_slicer_terminology_entry

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

ALGORITHM_NAME = "MediRound"
MANUFACTURER = "MultiTurnSeg"
CONTENT_LABEL = "MULTITURNSEG"
TERMINOLOGY_TAG = "TerminologyEntry"

#: Non-image storage classes that may sit in a series folder (SEG, RTSTRUCT, SR, ...).
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # segmentation, registration, fiducials, ...
    "1.2.840.10008.5.1.4.1.1.481",  # RT objects
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents
)


# --------------------------------------------------------------------------- the series


@dataclass
class DicomSeries:
    """A single-frame image series sorted along its slice normal.

    ``datasets`` (read without pixel data) and ``files`` are in slice order:
    position ``k`` of the grid ``ijk_to_lps`` (4x4, voxel index (i, j, k, 1)
    to LPS mm; i along rows' direction = columns, j down the columns = rows).
    """

    folder: Path
    series_uid: str
    datasets: list
    files: List[Path]
    ijk_to_lps: np.ndarray
    shape: Tuple[int, int, int]  # (nk, nj, ni)
    description: str = ""
    modality: str = ""

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_lps[:3, :3], axis=0))  # type: ignore[return-value]

    def summary(self) -> str:
        nk, nj, ni = self.shape
        return (
            f"series {self.series_uid} ({self.modality or '?'}"
            f"{', ' + repr(self.description) if self.description else ''}, {nk} slices of {nj}x{ni})"
        )


def _iter_files(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _is_image(ds) -> bool:
    sop = str(getattr(ds, "SOPClassUID", ""))
    if any(sop.startswith(p) for p in _NON_IMAGE_SOP_PREFIXES):
        return False
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "Rows" in ds and "Columns" in ds


def read_dicom_series(
    folder: PathLike,
    series_uid: Optional[str] = None,
    *,
    prefer_shape: Optional[Sequence[int]] = None,
) -> DicomSeries:
    """Read the headers of the image series in ``folder`` (sub-folders included).

    With several image series: ``series_uid`` picks one; else the one whose
    voxel count fits ``prefer_shape`` (any axis order) if exactly one does;
    else ExportError listing them. Raises ExportError for a folder without
    DICOM files, without an image series with slice positions, for enhanced
    multi-frame series, and for slices that differ in orientation, pixel
    spacing or size, share a position, or are unevenly spaced.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(os.fspath(folder)).expanduser()
    if not folder.exists():
        raise ExportError(f"{folder}: no such folder. Give the folder of the DICOM series the segmentation was made on.")
    if not folder.is_dir():
        raise ExportError(
            f"{folder} is a file, not a folder. Give the folder that holds the DICOM series "
            "(all its slice files) the segmentation was made on."
        )
    n_files = 0
    n_dicom = 0
    by_series: Dict[str, List[Tuple[Path, object]]] = {}
    other_kinds: Dict[str, int] = {}
    multiframe: Dict[str, int] = {}
    for path in _iter_files(folder):
        n_files += 1
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            continue
        if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
            continue  # e.g. DICOMDIR
        n_dicom += 1
        if not _is_image(ds):
            kind = str(getattr(ds, "Modality", "") or getattr(ds, "SOPClassUID", "unknown"))
            if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
                multiframe[str(getattr(ds, "SeriesInstanceUID", "?"))] = int(ds.NumberOfFrames)
            else:
                other_kinds[kind] = other_kinds.get(kind, 0) + 1
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            multiframe[str(ds.SeriesInstanceUID)] = int(ds.NumberOfFrames)
            continue
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))

    if n_dicom == 0:
        raise ExportError(
            f"{folder} is not a DICOM series: none of its {n_files} file(s) is a DICOM file. "
            "Give the folder of the DICOM series (the .dcm slices) the segmentation was made on."
        )
    if not by_series:
        detail = ""
        if multiframe:
            detail = (
                f" It holds {len(multiframe)} enhanced multi-frame image object(s), which this "
                "exporter does not support yet; export a classic (one file per slice) series."
            )
        elif other_kinds:
            detail = " It holds only " + ", ".join(f"{n} {k}" for k, n in sorted(other_kinds.items())) + " object(s)."
        raise ExportError(
            f"{folder} is not an image series: no DICOM file in it has image slices with "
            f"ImagePositionPatient/ImageOrientationPatient.{detail}"
        )

    if series_uid is not None:
        if series_uid not in by_series:
            raise ExportError(
                f"{folder}: no image series {series_uid}; it holds " + ", ".join(sorted(by_series)) + "."
            )
        chosen = series_uid
    elif len(by_series) == 1:
        chosen = next(iter(by_series))
    else:
        candidates = list(by_series)
        if prefer_shape is not None:
            want = sorted(int(n) for n in prefer_shape)
            fitting = [
                uid for uid in candidates
                if sorted([len(by_series[uid]), int(by_series[uid][0][1].Rows), int(by_series[uid][0][1].Columns)]) == want
            ]
            if len(fitting) == 1:
                candidates = fitting
        if len(candidates) != 1:
            listing = "; ".join(
                f"{uid} ({getattr(items[0][1], 'Modality', '?')}, {len(items)} slices, "
                f"{getattr(items[0][1], 'SeriesDescription', '')!r})"
                for uid, items in sorted(by_series.items())
            )
            raise ExportError(
                f"{folder} holds {len(by_series)} image series and the segmentation does not pick one: "
                f"{listing}. Give the series UID (--series-uid) or a folder with only that series."
            )
        chosen = candidates[0]
    return _series_geometry(folder, chosen, by_series[chosen])


def _floats(value, n: int, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise ExportError(f"{path}: malformed {what} {value!r}.")
    return arr


def _series_geometry(folder: Path, uid: str, items: List[Tuple[Path, object]]) -> DicomSeries:
    first_path, first = items[0]
    iop = _floats(first.ImageOrientationPatient, 6, "ImageOrientationPatient", first_path)
    row_dir, col_dir = iop[:3], iop[3:]
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    if "PixelSpacing" not in first:
        raise ExportError(f"{first_path}: the slices have no PixelSpacing, so their geometry is unknown.")
    pixel_spacing = _floats(first.PixelSpacing, 2, "PixelSpacing", first_path)  # (between rows, between columns)
    rows, cols = int(first.Rows), int(first.Columns)
    positions = []
    for path, ds in items:
        if "ImageOrientationPatient" not in ds or not np.allclose(
            _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path), iop, atol=1e-4
        ):
            raise ExportError(
                f"{folder}: the slices of series {uid} have different orientations "
                f"({path.name}: {list(ds.ImageOrientationPatient)} vs {first_path.name}: {iop.tolist()})."
            )
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise ExportError(
                f"{folder}: the slices of series {uid} differ in size ({path.name}: {ds.Rows}x{ds.Columns}, "
                f"{first_path.name}: {rows}x{cols})."
            )
        if "PixelSpacing" not in ds or not np.allclose(_floats(ds.PixelSpacing, 2, "PixelSpacing", path), pixel_spacing, rtol=1e-4):
            raise ExportError(f"{folder}: the slices of series {uid} differ in pixel spacing ({path.name}).")
        positions.append(_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", path))
    positions_arr = np.array(positions)
    along = positions_arr @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    positions_arr = positions_arr[order]
    items = [items[i] for i in order]
    n = len(items)
    if n > 1:
        gaps = np.diff(along)
        if np.min(gaps) < 1e-3:
            dup = int(np.argmin(gaps))
            raise ExportError(
                f"{folder}: series {uid} has two slices at the same position "
                f"({items[dup][0].name} and {items[dup + 1][0].name}); it is not one 3D volume."
            )
        step = (positions_arr[-1] - positions_arr[0]) / (n - 1)
        expected = positions_arr[0] + np.outer(np.arange(n), step)
        worst = float(np.abs(positions_arr - expected).max())
        if worst > max(1e-3, 0.01 * float(np.linalg.norm(step))):
            raise ExportError(
                f"{folder}: the slices of series {uid} are not evenly spaced (gaps from {gaps.min():.4g} "
                f"to {gaps.max():.4g} mm); such a series is resampled when loaded and its voxels are "
                "not the slices, so it cannot be exported to."
            )
    else:
        thickness = float(getattr(items[0][1], "SpacingBetweenSlices", 0) or getattr(items[0][1], "SliceThickness", 0) or 1.0)
        step = normal * thickness
    matrix = np.eye(4)
    matrix[:3, 0] = row_dir * pixel_spacing[1]
    matrix[:3, 1] = col_dir * pixel_spacing[0]
    matrix[:3, 2] = step
    matrix[:3, 3] = positions_arr[0]
    return DicomSeries(
        folder=folder,
        series_uid=uid,
        datasets=[ds for _, ds in items],
        files=[p for p, _ in items],
        ijk_to_lps=matrix,
        shape=(n, rows, cols),
        description=str(getattr(first, "SeriesDescription", "") or ""),
        modality=str(getattr(first, "Modality", "") or ""),
    )


# --------------------------------------------------------------------------- grid matching


@dataclass(frozen=True)
class GridMapping:
    """How a segmentation grid's axes map onto the series grid.

    ``axis[a]`` is the series axis (0 = i/columns, 1 = j/rows, 2 = k/slices)
    that segmentation axis ``a`` (same numbering) runs along; ``flip[a]`` is
    True when it runs backwards.
    """

    axis: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        return self.axis == (0, 1, 2) and not any(self.flip)

    def to_series(self, mask_kji: np.ndarray) -> np.ndarray:
        """A ``[k, j, i]`` array on the segmentation grid as ``[k, j, i]`` on the series grid."""
        if self.identity:
            return mask_kji
        ijk = np.transpose(mask_kji, (2, 1, 0))
        for a in range(3):
            if self.flip[a]:
                ijk = np.flip(ijk, axis=a)
        source_axis_for = [self.axis.index(b) for b in range(3)]
        out_ijk = np.transpose(ijk, source_axis_for)
        return np.ascontiguousarray(np.transpose(out_ijk, (2, 1, 0)))


_AXIS_NAMES = ("i (columns)", "j (rows)", "k (slices)")


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in np.asarray(v, dtype=float)) + ")"


def match_grid(shape_kji: Sequence[int], ijk_to_lps, series: DicomSeries, tolerance_voxels: float = 0.05) -> GridMapping:
    """Map a segmentation grid onto the series grid, or raise ExportError saying what differs.

    The grids must have the same voxels: axes along the series' row, column
    and slice directions (each either way), the same spacing, the same size
    and the same corner voxel (within ``tolerance_voxels`` of a voxel).
    """
    a = np.asarray(ijk_to_lps, dtype=float)
    b = series.ijk_to_lps
    seg_shape = tuple(int(n) for n in shape_kji)
    seg_size = (seg_shape[2], seg_shape[1], seg_shape[0])  # along i, j, k
    ser_size = (series.shape[2], series.shape[1], series.shape[0])
    seg_spacing = np.linalg.norm(a[:3, :3], axis=0)
    ser_spacing = np.linalg.norm(b[:3, :3], axis=0)
    if np.any(seg_spacing <= 0):
        raise ExportError("the segmentation's voxel grid is degenerate (a zero-length axis).")
    seg_dir = a[:3, :3] / seg_spacing
    ser_dir = b[:3, :3] / ser_spacing
    cosines = ser_dir.T @ seg_dir  # [series axis, segmentation axis]
    axis: List[int] = []
    flip: List[bool] = []
    for ax in range(3):
        bx = int(np.argmax(np.abs(cosines[:, ax])))
        if abs(cosines[bx, ax]) < 1 - 1e-3 or bx in axis:
            raise ExportError(
                "the segmentation does not match the DICOM series: orientation differs "
                f"(segmentation axes i, j, k point along {_fmt(seg_dir[:, 0])}, {_fmt(seg_dir[:, 1])}, "
                f"{_fmt(seg_dir[:, 2])}; the series' rows, columns and slices along {_fmt(ser_dir[:, 0])}, "
                f"{_fmt(ser_dir[:, 1])}, {_fmt(ser_dir[:, 2])}). Export a segmentation made on this series."
            )
        axis.append(bx)
        flip.append(bool(cosines[bx, ax] < 0))
    for ax in range(3):
        bx = axis[ax]
        if abs(seg_spacing[ax] - ser_spacing[bx]) > 1e-3 * ser_spacing[bx] + 1e-5:
            raise ExportError(
                "the segmentation does not match the DICOM series: spacing differs "
                f"({_AXIS_NAMES[ax]} of the segmentation: {seg_spacing[ax]:.6g} mm; the series' "
                f"{_AXIS_NAMES[bx]}: {ser_spacing[bx]:.6g} mm; segmentation spacing {_fmt(seg_spacing)} mm, "
                f"series {_fmt(ser_spacing)} mm). Export a segmentation made on this series."
            )
    for ax in range(3):
        bx = axis[ax]
        if seg_size[ax] != ser_size[bx]:
            raise ExportError(
                "the segmentation does not match the DICOM series: size differs "
                f"(segmentation {seg_size[0]}x{seg_size[1]}x{seg_size[2]} voxels (i x j x k), series "
                f"{ser_size[0]}x{ser_size[1]}x{ser_size[2]} (columns x rows x slices)). "
                "Export a segmentation made on this whole series (not cropped or resampled)."
            )
    # Where does segmentation voxel (0,0,0) fall in series indices? It must be the matching corner.
    inv = np.linalg.inv(b)
    corner = (inv @ a @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
    expected = np.zeros(3)
    for ax in range(3):
        if flip[ax]:
            expected[axis[ax]] = ser_size[axis[ax]] - 1
    off = corner - expected
    if np.any(np.abs(off) > tolerance_voxels):
        dist = float(np.linalg.norm(b[:3, :3] @ off))
        seg_origin = a[:3, 3]
        ser_corner = (b @ np.append(expected, 1.0))[:3]
        raise ExportError(
            "the segmentation does not match the DICOM series: origin differs "
            f"(segmentation voxel (0, 0, 0) is at LPS {_fmt(seg_origin)} mm, the matching series voxel at "
            f"{_fmt(ser_corner)} mm, {dist:.3g} mm apart). Export a segmentation made on this series."
        )
    return GridMapping(axis=tuple(axis), flip=tuple(flip))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- writing


@dataclass
class ExportedSegment:
    number: int
    segment_id: str
    label: str
    term: TermMatch
    frames: int


@dataclass
class DicomSegExport:
    """What :func:`write_dicom_seg` wrote."""

    path: Path
    series: DicomSeries
    segments: List[ExportedSegment]
    skipped: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    sop_instance_uid: str = ""
    series_instance_uid: str = ""


def _term_for_segment(segment, terminology: Optional[Callable[[str], Optional[object]]]) -> TermMatch:
    name = str(getattr(segment, "name", "") or getattr(segment, "id", ""))
    if terminology is not None:
        found = terminology(name)
        if isinstance(found, TermMatch):
            return found
        if isinstance(found, str):
            parsed = parse_slicer_terminology_entry(found)
            if parsed is not None:
                return parsed
    tags = getattr(segment, "tags", None) or {}
    tag = tags.get(TERMINOLOGY_TAG)
    if tag:
        parsed = parse_slicer_terminology_entry(tag)
        if parsed is not None:
            return parsed
    return lookup(name) or match_or_generic(name)


def _dicom_label(text: str) -> str:
    """SegmentLabel is LO: at most 64 characters, no backslash or control characters."""
    text = "".join(ch for ch in str(text) if ch.isprintable() and ch != "\\").strip() or "segment"
    return text[:64]


def _cielab(color) -> "object":
    import highdicom as hd

    rgb = [min(255.0, max(0.0, float(c) * 255.0)) for c in list(color)[:3]]
    return hd.color.CIELabColor.from_rgb(*rgb)


def segmentation_from_labelmap(
    labelmap_kji: np.ndarray,
    ijk_to_lps,
    names: Optional[Mapping[int, str]] = None,
    colors: Optional[Mapping[int, Sequence[float]]] = None,
):
    """A :class:`~MultiTurnSegLib.segmentation_io.Segmentation` with one segment per label value (> 0)."""
    from ..segmentation_io import Segmentation

    labelmap_kji = np.asarray(labelmap_kji)
    if labelmap_kji.ndim != 3:
        raise ExportError(f"a labelmap must be 3D [k, j, i], got shape {labelmap_kji.shape}.")
    seg = Segmentation(ijk_to_lps=np.asarray(ijk_to_lps, dtype=float), shape=labelmap_kji.shape)
    values = sorted(int(v) for v in np.unique(labelmap_kji) if v > 0)
    for value in sorted(set(values) | set(int(k) for k in (names or {}))):
        name = (names or {}).get(value, f"Segment_{value}")
        color = (colors or {}).get(value)
        if color is None:
            from ..conversation.naming import segment_color_for  # type: ignore

            color = segment_color_for(value)
        seg.add_segment(name, labelmap_kji == value, color)
    return seg


def write_dicom_seg(
    segmentation,
    dicom_series: Union[PathLike, DicomSeries],
    output_path: PathLike,
    *,
    series_uid: Optional[str] = None,
    terminology: Optional[Callable[[str], Optional[object]]] = None,
    series_description: str = "MultiTurnSeg MediRound segmentation",
    series_number: Optional[int] = None,
    content_creator_name: Optional[str] = None,
    content_description: str = "MediRound multi-turn segmentation",
    algorithm_version: Optional[str] = None,
) -> DicomSegExport:
    """Write ``segmentation`` as a BINARY DICOM-SEG referencing ``dicom_series``.

    ``segmentation``: a :class:`~MultiTurnSegLib.segmentation_io.Segmentation`
    (or anything with ``ijk_to_lps``, ``shape`` and ``segments`` of objects with
    ``id``, ``name``, ``color`` 0..1, ``mask`` [k, j, i] bool, ``tags``).
    ``dicom_series``: the folder of the series the segmentation was made on
    (or a :class:`DicomSeries`). ``terminology``: optional callable from a
    segment name to a :class:`TermMatch` or a Slicer TerminologyEntry string;
    by default the segment's TerminologyEntry tag is used, else a lookup of its
    name, else generic "Tissue" codes.

    Raises ExportError when the folder is not a DICOM image series, when the
    segmentation's grid is not the series' grid (saying whether size, spacing,
    origin or orientation differ), and when every segment is empty.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segments = list(getattr(segmentation, "segments", []) or [])
    if not segments:
        raise ExportError("the segmentation has no segments; there is nothing to export.")
    shape = tuple(int(n) for n in segmentation.shape)
    if isinstance(dicom_series, DicomSeries):
        series = dicom_series
    else:
        series = read_dicom_series(dicom_series, series_uid, prefer_shape=shape)
    mapping = match_grid(shape, segmentation.ijk_to_lps, series)

    warnings: List[str] = []
    skipped: List[str] = []
    kept = []
    for segment in segments:
        mask = np.asarray(segment.mask)
        if mask.shape != shape:
            raise ExportError(
                f"segment {segment.name!r}: mask shape {mask.shape} differs from the segmentation grid {shape}."
            )
        if not mask.any():
            msg = f"segment {segment.name!r} is empty and was not exported"
            logger.warning(msg)
            warnings.append(msg)
            skipped.append(str(segment.name))
            continue
        kept.append(segment)
    if not kept:
        raise ExportError(
            "every segment is empty (" + ", ".join(repr(str(s.name)) for s in segments) + "); "
            "there is nothing to export to DICOM-SEG."
        )

    nk, nj, ni = series.shape
    pixel_array = np.zeros((nk, nj, ni, len(kept)), dtype=bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=str(algorithm_version or __version__),
    )
    descriptions = []
    exported: List[ExportedSegment] = []
    for number, segment in enumerate(kept, start=1):
        remapped = mapping.to_series(np.asarray(segment.mask, dtype=bool))
        pixel_array[..., number - 1] = remapped
        term = _term_for_segment(segment, terminology)
        label = _dicom_label(segment.name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=term.category.to_highdicom(),
            segmented_property_type=term.type.to_highdicom(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=str(getattr(segment, "id", "") or label)[:64],
            anatomic_regions=[term.anatomic_region.to_highdicom()] if term.anatomic_region is not None else None,
            display_color=_cielab(getattr(segment, "color", (1.0, 1.0, 0.0))),
        )
        if term.type_modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                term.type_modifier.to_highdicom()
            ]
        if term.anatomic_region is not None and term.anatomic_region_modifier is not None:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
                term.anatomic_region_modifier.to_highdicom()
            ]
        if label != str(segment.name):
            description.SegmentDescription = str(segment.name)[:1024]
        descriptions.append(description)
        exported.append(
            ExportedSegment(
                number=number,
                segment_id=str(getattr(segment, "id", "")),
                label=label,
                term=term,
                frames=int(np.count_nonzero(remapped.reshape(nk, -1).any(axis=1))),
            )
        )

    src_number = getattr(series.datasets[0], "SeriesNumber", None)
    if series_number is None:
        try:
            series_number = int(src_number) + 1000 if src_number not in (None, "") else 1000
        except (TypeError, ValueError):
            series_number = 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=series.datasets,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=f"{MANUFACTURER} {ALGORITHM_NAME}",
            software_versions=str(__version__),
            device_serial_number="0",
            content_description=content_description[:64],
            content_creator_name=content_creator_name,
            content_label=CONTENT_LABEL,
            omit_empty_frames=True,
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ExportError(f"DICOM-SEG could not be built from {series.summary()}: {exc}") from exc
    seg.SeriesDescription = series_description[:64]

    output = Path(os.fspath(output_path)).expanduser()
    if output.is_dir():
        raise ExportError(f"{output} is a folder; give a file name for the DICOM-SEG (e.g. segmentation.dcm).")
    if not output.parent.exists():
        raise ExportError(f"{output.parent}: no such folder for the DICOM-SEG output.")
    try:
        seg.save_as(str(output), enforce_file_format=True)
    except TypeError:  # pydicom < 3
        seg.save_as(str(output))
    except OSError as exc:
        raise ExportError(f"{output}: the DICOM-SEG could not be written ({exc}).") from None
    logger.info("wrote %s: %d segment(s), %d frame(s)", output, len(exported), int(getattr(seg, "NumberOfFrames", 0)))
    return DicomSegExport(
        path=output,
        series=series,
        segments=exported,
        skipped=skipped,
        warnings=warnings,
        sop_instance_uid=str(seg.SOPInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
    )


def export_seg_nrrd(
    seg_nrrd_path: PathLike,
    dicom_series: PathLike,
    output_path: PathLike,
    **kwargs,
) -> DicomSegExport:
    """Read a ``.seg.nrrd`` and write it as DICOM-SEG (see :func:`write_dicom_seg`)."""
    from ..segmentation_io import read_seg_nrrd

    path = Path(os.fspath(seg_nrrd_path)).expanduser()
    if not path.exists():
        raise ExportError(f"{path}: no such segmentation file.")
    segmentation = read_seg_nrrd(path)
    return write_dicom_seg(segmentation, dicom_series, output_path, **kwargs)


def export_conversation_dicom_seg(
    conversation,
    volume,
    dicom_series: PathLike,
    output_path: PathLike,
    **kwargs,
) -> DicomSegExport:
    """Write a conversation's turns (one segment each) as DICOM-SEG on ``dicom_series``.

    ``volume``: the :class:`~MultiTurnSegLib.imaging.Volume` (or a path) the
    conversation ran on, normally read from ``dicom_series`` itself. Segment
    codes come from each turn's prompt (``terminology_entry_for``).
    """
    from ..conversation import conversation_segments
    from ..imaging import as_volume
    from ..segmentation_io import Segmentation
    from .terminology import terminology_entry_for

    vol = as_volume(volume)
    segmentation = Segmentation.for_volume(vol)
    for segment in conversation_segments(conversation, vol, terminology=terminology_entry_for):
        segmentation.segments.append(segment)
    return write_dicom_seg(segmentation, dicom_series, output_path, **kwargs)


__all__ = [
    "ALGORITHM_NAME",
    "DicomSeries",
    "DicomSegExport",
    "ExportedSegment",
    "GridMapping",
    "read_dicom_series",
    "match_grid",
    "write_dicom_seg",
    "export_seg_nrrd",
    "export_conversation_dicom_seg",
    "segmentation_from_labelmap",
]
