"""Segmentations as 3D Slicer ``.seg.nrrd`` files (read and written with slicerio).

Masks are 3D bool arrays in ``[k, j, i]`` order on the segmentation's voxel
grid (the reference volume's grid). Overlapping segments are stored in layers
(a 4D NRRD), as Slicer does.
"""

from __future__ import annotations

import copy
import io
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, VolumeError

#: Segment tags Slicer itself uses (values kept verbatim, as raw strings).
TERMINOLOGY_TAG = "TerminologyEntry"
STATUS_TAG = "Segmentation.Status"

_BINARY_LABELMAP = "Binary labelmap"
_GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass
class Segment:
    """One segment: a named, coloured 3D mask with Slicer tags.

    Attributes:
        id: unique segment ID within the segmentation (Slicer's segment ID).
        name: the name shown in Slicer.
        color: (r, g, b), each 0..1.
        mask: 3D bool array ``[k, j, i]`` on the segmentation grid.
        tags: Slicer segment tags, e.g. ``{"TerminologyEntry": "...",
            "Segmentation.Status": "inprogress"}``. Keys must not contain ':' or
            '|', values must not contain '|'.
        layer, label_value: where the segment is stored in the file (set when
            read; on write, kept when they are consistent, assigned otherwise).
        name_auto_generated, color_auto_generated: Slicer's flags.
    """

    id: str
    name: str
    color: Tuple[float, float, float]
    mask: np.ndarray
    tags: Dict[str, str] = field(default_factory=dict)
    layer: Optional[int] = None
    label_value: Optional[int] = None
    name_auto_generated: bool = False
    color_auto_generated: bool = False

    @property
    def terminology(self) -> Optional[str]:
        """The raw ``TerminologyEntry`` tag, if any."""
        return self.tags.get(TERMINOLOGY_TAG)


@dataclass
class Segmentation:
    """Segments on one voxel grid.

    Attributes:
        ijk_to_lps: 4x4 voxel-index to LPS (mm) matrix of the grid.
        shape: ``(nk, nj, ni)``.
        segments: list of :class:`Segment`.
        extra: other segmentation-level fields kept from a file and written
            back (slicerio names: ``containedRepresentationNames``,
            ``conversionParameters``, ``masterRepresentation``, custom header fields).
    """

    ijk_to_lps: np.ndarray
    shape: Tuple[int, int, int]
    segments: List[Segment] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.ijk_to_lps = np.asarray(self.ijk_to_lps, dtype=float)
        self.shape = tuple(int(n) for n in self.shape)  # type: ignore[assignment]
        if self.ijk_to_lps.shape != (4, 4):
            raise InputError(f"a segmentation needs a 4x4 IJK-to-LPS matrix, got shape {self.ijk_to_lps.shape}.")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise InputError(f"a segmentation needs a 3D shape (k, j, i), got {self.shape}.")

    @classmethod
    def for_volume(cls, volume) -> "Segmentation":
        """An empty segmentation on the volume's voxel grid."""
        return cls(ijk_to_lps=volume.ijk_to_lps.copy(), shape=volume.shape)

    def segment_ids(self) -> List[str]:
        return [s.id for s in self.segments]

    def get(self, id_or_name: str) -> Segment:
        """The segment with this ID, or else the only segment with this name."""
        for s in self.segments:
            if s.id == id_or_name:
                return s
        named = [s for s in self.segments if s.name == id_or_name]
        if len(named) == 1:
            return named[0]
        if not named:
            raise InputError(
                f"no segment with ID or name {id_or_name!r}; segments are: "
                + ", ".join(repr(s.name) for s in self.segments)
            )
        raise InputError(f"several segments are named {id_or_name!r}; give the segment ID.")

    def add_segment(
        self,
        name: str,
        mask: np.ndarray,
        color: Sequence[float],
        tags: Optional[Dict[str, str]] = None,
        id: Optional[str] = None,
    ) -> Segment:
        """Append a segment (ID ``Segment_N`` unless given) and return it."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise InputError(f"segment {name!r}: mask shape {mask.shape} differs from the segmentation {self.shape}.")
        existing = set(self.segment_ids())
        if id is None:
            n = len(self.segments) + 1
            while f"Segment_{n}" in existing:
                n += 1
            id = f"Segment_{n}"
        elif id in existing:
            raise InputError(f"segment ID {id!r} already exists.")
        segment = Segment(id=id, name=name, color=tuple(float(c) for c in color), mask=mask, tags=dict(tags or {}))  # type: ignore[arg-type]
        self.segments.append(segment)
        return segment


# --------------------------------------------------------------------------- geometry


def labelmap_for_volume(volume, dtype=np.uint8) -> np.ndarray:
    """A zero labelmap ``[k, j, i]`` on the volume's grid (for ``imaging.insert_mask``)."""
    return np.zeros(volume.shape, dtype=dtype)


def geometry_mismatch(
    shape_a: Sequence[int], ijk_to_lps_a, shape_b: Sequence[int], ijk_to_lps_b, tolerance_mm: float = _GEOMETRY_TOLERANCE_MM
) -> Optional[str]:
    """None when two grids are the same, else a sentence saying how they differ."""
    shape_a, shape_b = tuple(int(n) for n in shape_a), tuple(int(n) for n in shape_b)
    if shape_a != shape_b:
        return f"grid sizes differ: {shape_a} vs {shape_b} voxels ([k, j, i])"
    a = np.asarray(ijk_to_lps_a, dtype=float)
    b = np.asarray(ijk_to_lps_b, dtype=float)
    # compare the physical positions of the grid corners
    nk, nj, ni = shape_a
    corners = np.array([[i, j, k, 1.0] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)]).T
    offset = np.abs((a @ corners)[:3] - (b @ corners)[:3]).max()
    directions = np.abs(a[:3, :3] - b[:3, :3]).max()
    if offset > tolerance_mm or directions > tolerance_mm:
        return (
            f"voxel grids are placed differently in space (corners up to {offset:.3g} mm apart); "
            f"origin {np.round(a[:3, 3], 3).tolist()} vs {np.round(b[:3, 3], 3).tolist()}, "
            f"axes {np.round(a[:3, :3], 4).tolist()} vs {np.round(b[:3, :3], 4).tolist()}"
        )
    return None


def check_geometry(segmentation: Segmentation, volume) -> None:
    """Raise InputError unless the segmentation lies on the volume's voxel grid."""
    problem = geometry_mismatch(segmentation.shape, segmentation.ijk_to_lps, volume.shape, volume.ijk_to_lps)
    if problem:
        raise InputError(
            f"the segmentation does not match the volume {getattr(volume, 'source', '')}: {problem}. "
            "Use a segmentation made on this volume (or resample it in Slicer)."
        )


def volume_geometry(segmentation: Segmentation):
    """A zero :class:`~MultiTurnSegLib.imaging.Volume` with the segmentation's grid (uint8)."""
    from ..imaging import volume_from_array

    return volume_from_array(np.zeros(segmentation.shape, dtype=np.uint8), segmentation.ijk_to_lps, source="segmentation grid")


# --------------------------------------------------------------------------- validation

_BAD_TEXT = re.compile(r"[\r\n\x00]")


def validate_segment(segment: Segment, shape: Tuple[int, int, int]) -> None:
    """Raise InputError for anything Slicer could not store or read back as it is."""
    label = f"segment {segment.name!r} (ID {segment.id!r})"
    if not isinstance(segment.id, str) or not segment.id.strip():
        raise InputError(f"segment {segment.name!r} has no ID; every segment needs a non-empty ID.")
    for what, text in (("ID", segment.id), ("name", segment.name)):
        if not isinstance(text, str) or _BAD_TEXT.search(text):
            raise InputError(f"{label}: the {what} must be one line of text without control characters.")
    try:
        color = np.asarray(segment.color, dtype=float).reshape(-1)
    except (TypeError, ValueError):  # e.g. ("red", 0, 0): reported below like any bad colour
        color = np.full(0, np.nan)
    if color.shape != (3,) or not np.all(np.isfinite(color)) or np.any(color < 0) or np.any(color > 1):
        raise InputError(f"{label}: colour {segment.color!r} must be 3 numbers (r, g, b) within 0..1.")
    for key, value in (segment.tags or {}).items():
        if not isinstance(key, str) or not key or ":" in key or "|" in key or _BAD_TEXT.search(key):
            raise InputError(
                f"{label}: tag name {key!r} is not allowed; tag names must be non-empty and contain "
                "no ':' or '|' (Slicer stores tags as name:value|...)."
            )
        if not isinstance(value, str) or "|" in value or _BAD_TEXT.search(value):
            raise InputError(
                f"{label}: the value of tag {key!r} ({value!r}) is not allowed; tag values must be text "
                "without '|' or line breaks (encode them first)."
            )
    mask = np.asarray(segment.mask)
    if mask.shape != tuple(shape):
        raise InputError(f"{label}: mask shape {mask.shape} differs from the segmentation grid {tuple(shape)} ([k, j, i]).")


# --------------------------------------------------------------------------- non-ASCII header text
#
# Slicer writes segment names, IDs and tags as UTF-8 bytes in the NRRD header
# and reads them back as UTF-8. pynrrd (under slicerio) writes header lines with
# ``.encode('ascii')`` (UnicodeEncodeError for e.g. "R3 左肾") and reads them with
# ``.decode('ascii', 'ignore')`` (non-ASCII characters silently dropped). We keep
# slicerio/pynrrd for the format and fix only the header text around them:
# on write, non-ASCII strings go through as unique ASCII placeholders that are
# then swapped for their UTF-8 bytes in the header; on read, the header lines
# are decoded as UTF-8 and parsed again by slicerio. The gzip data after the
# header is never touched, and all-ASCII files are exactly what slicerio writes.


def _header_lines(fh) -> List[bytes]:
    """The raw header lines of the binary file ``fh`` (magic line up to, not including, the first blank line).

    Same rule as pynrrd/teem: the header ends at the first line that is empty
    after stripping trailing whitespace; attached data follows it.
    """
    lines: List[bytes] = []
    for index, line in enumerate(fh):
        if index > 0 and not line.rstrip():
            break
        lines.append(line)
    return lines


def _utf8_header_metadata(path: str) -> Optional[Dict[str, Any]]:
    """slicerio's metadata parsed from the UTF-8-decoded header; None when the header is ASCII.

    A header that is not valid UTF-8 raises InputError rather than falling back
    to latin-1: names and tags identify segments (prompts refer to them by name,
    DICOM export labels them), so mojibake (e.g. a GBK name read as latin-1)
    would be the same silent corruption this code exists to prevent. Slicer
    (current versions) writes UTF-8, so such a file comes from some other tool.
    """
    with open(path, "rb") as fh:
        raw = _header_lines(fh)
    if all(line.isascii() for line in raw):
        return None  # slicerio's own reading lost nothing
    text: List[str] = []
    for number, line in enumerate(raw, start=1):
        if line.startswith(b"#"):  # comments are ignored by NRRD readers; never fail on them
            text.append(line.decode("utf-8", "replace"))
            continue
        try:
            text.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path}: header line {number} is not UTF-8 text (byte {line[exc.start]:#04x} at offset "
                f"{exc.start + 1}); 3D Slicer writes segment names and tags as UTF-8. Re-save the file "
                "from 3D Slicer, or convert its header to UTF-8."
            ) from None
    import slicerio

    # pynrrd's header parser takes an iterable of str lines as well as a file; given str it
    # decodes nothing, so every character reaches slicerio's (unchanged) field parsing.
    return slicerio.read_segmentation(text, skip_voxels=True)


def _ascii_placeholders(value: Any, table: Dict[str, str], nonce: str) -> Any:
    """``value`` with every non-ASCII string (dict keys included) replaced by an ASCII placeholder.

    ``table`` maps placeholder -> original text. Placeholders are letters and
    digits only (nothing slicerio joins or splits on: ``| : & ~ ^`` or spaces)
    and fixed-width, so none is a prefix of another.
    """
    if isinstance(value, str):
        if value.isascii():
            return value
        placeholder = f"MTSU8{nonce}N{len(table):06d}Z"
        table[placeholder] = value
        return placeholder
    if isinstance(value, dict):
        return {_ascii_placeholders(k, table, nonce): _ascii_placeholders(v, table, nonce) for k, v in value.items()}
    if isinstance(value, list):
        return [_ascii_placeholders(v, table, nonce) for v in value]
    if isinstance(value, tuple):
        return tuple(_ascii_placeholders(v, table, nonce) for v in value)
    return value  # numbers, arrays: written by pynrrd as ASCII already


def _restore_utf8(content: bytes, table: Dict[str, str], nonce: str, path: str) -> bytes:
    """``content`` (a whole NRRD file) with the header's placeholders replaced by their UTF-8 bytes."""
    header_end = len(b"".join(_header_lines(io.BytesIO(content))))
    header, data = content[:header_end], content[header_end:]
    for placeholder, text in table.items():
        header = header.replace(placeholder.encode("ascii"), text.encode("utf-8"))
    if f"MTSU8{nonce}".encode("ascii") in header:  # cannot happen unless pynrrd changes
        raise InputError(f"cannot write the segmentation {path}: non-ASCII text could not be stored in the header.")
    return header + data


# --------------------------------------------------------------------------- reading


def read_seg_nrrd(path) -> Segmentation:
    """Read a ``.seg.nrrd`` written by Slicer (or by :func:`write_seg_nrrd`).

    Keeps names, colours, tags (TerminologyEntry and Segmentation.Status as raw
    tag strings), IDs, layers and label values, and the segmentation-level
    header fields in ``extra``. Masks come out in ``[k, j, i]`` order. Header
    text is UTF-8, as Slicer writes it (names like "R1 肝脏" keep every
    character); a header that is not UTF-8 raises InputError.
    """
    import slicerio
    from slicerio.segmentation import terminology_entry_to_string

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeError(f"{path}: no such segmentation file.")
    if os.path.isdir(path):
        raise VolumeError(f"{path}: is a folder; give a .seg.nrrd file.")
    try:
        data = slicerio.read_segmentation(path)
    except Exception as exc:  # pynrrd/slicerio raise assorted errors for bad files
        raise VolumeError(f"{path}: not a readable .seg.nrrd segmentation ({exc}).") from None
    # Non-ASCII names/tags: take the metadata from the UTF-8 header (pynrrd drops those characters).
    try:
        utf8_data = _utf8_header_metadata(path)
    except InputError:
        raise
    except Exception as exc:  # same file parsed twice; a failure here means a bad header
        raise VolumeError(f"{path}: not a readable .seg.nrrd segmentation ({exc}).") from None
    if utf8_data is not None:
        utf8_data["voxels"] = data.get("voxels")
        data = utf8_data
    voxels = data.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise VolumeError(f"{path}: the segmentation voxels must be 3D or 4D (layers), got {getattr(voxels, 'shape', None)}.")
    # slicerio reads in NRRD (Fortran) order: [i, j, k] or [layer, i, j, k].
    layers_kji = voxels.transpose(2, 1, 0)[np.newaxis] if voxels.ndim == 3 else voxels.transpose(0, 3, 2, 1)
    shape = tuple(int(n) for n in layers_kji.shape[1:])

    segments: List[Segment] = []
    for info in data.get("segments", []):
        tags: Dict[str, str] = {}
        if "status" in info:
            tags[STATUS_TAG] = str(info["status"])
        if "terminology" in info:
            tags[TERMINOLOGY_TAG] = terminology_entry_to_string(info["terminology"])
        for key, value in (info.get("tags") or {}).items():
            tags[str(key)] = str(value)
        layer = int(info.get("layer", 0))
        label_value = int(info.get("labelValue", 1))
        if not 0 <= layer < layers_kji.shape[0]:
            raise VolumeError(f"{path}: segment {info.get('name')!r} refers to layer {layer}, the file has {layers_kji.shape[0]}.")
        mask = layers_kji[layer] == label_value
        color = tuple(float(c) for c in info.get("color", (0.5, 0.5, 0.5)))
        segments.append(
            Segment(
                id=str(info["id"]),
                name=str(info.get("name", info["id"])),
                color=color,  # type: ignore[arg-type]
                mask=mask,
                tags=tags,
                layer=layer,
                label_value=label_value,
                name_auto_generated=bool(info.get("nameAutoGenerated", False)),
                color_auto_generated=bool(info.get("colorAutoGenerated", False)),
            )
        )
    extra = {
        key: copy.deepcopy(value)
        for key, value in data.items()
        if key not in ("voxels", "ijkToLPS", "segments", "referenceImageExtentOffset")
    }
    return Segmentation(ijk_to_lps=np.asarray(data["ijkToLPS"], dtype=float), shape=shape, segments=segments, extra=extra)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- writing


def _layout_is_usable(segmentation: Segmentation) -> bool:
    """True when every segment has a layer/label that stores its mask without loss."""
    seen = set()
    layers: Dict[int, np.ndarray] = {}
    for s in segmentation.segments:
        if s.layer is None or s.label_value is None or not 0 <= s.layer < 64 or not 1 <= s.label_value <= 255:
            return False
        if (s.layer, s.label_value) in seen:
            return False
        seen.add((s.layer, s.label_value))
        occupied = layers.setdefault(s.layer, np.zeros(segmentation.shape, dtype=bool))
        mask = np.asarray(s.mask, dtype=bool)
        if np.any(occupied & mask):
            return False
        occupied |= mask
    return sorted(layers) == list(range(len(layers)))


def _assign_layers(segmentation: Segmentation) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """Label layers ``[layer, k, j, i]`` uint8 and each segment's ``(layer, label_value)``."""
    shape = segmentation.shape
    placement: List[Tuple[int, int]] = []
    if _layout_is_usable(segmentation):
        n_layers = max((s.layer for s in segmentation.segments), default=0) + 1  # type: ignore[type-var]
        layers = np.zeros((n_layers,) + shape, dtype=np.uint8)
        for s in segmentation.segments:
            layers[s.layer][np.asarray(s.mask, dtype=bool)] = s.label_value
            placement.append((int(s.layer), int(s.label_value)))  # type: ignore[arg-type]
        return layers, placement
    # Pack: each segment goes into the first layer where it overlaps nothing.
    layer_list: List[np.ndarray] = []
    next_label: List[int] = []
    for s in segmentation.segments:
        mask = np.asarray(s.mask, dtype=bool)
        for index, layer in enumerate(layer_list):
            if next_label[index] <= 255 and not np.any(layer[mask]):
                break
        else:
            layer_list.append(np.zeros(shape, dtype=np.uint8))
            next_label.append(1)
            index = len(layer_list) - 1
        label = next_label[index]
        layer_list[index][mask] = label
        next_label[index] += 1
        placement.append((index, label))
    if not layer_list:
        layer_list.append(np.zeros(shape, dtype=np.uint8))
    return np.stack(layer_list), placement


def write_seg_nrrd(path, segmentation: Segmentation, compression_level: int = 6) -> str:
    """Write a ``.seg.nrrd`` that Slicer loads with names, colours, tags and layers.

    Overlapping segments go to separate layers (4D NRRD, like Slicer). Every
    segment gets Slicer's fields (ID, Name, Color, Tags, Extent, Layer,
    LabelValue, NameAutoGenerated, ColorAutoGenerated); extents are the full
    grid. Names, IDs and tags may be any Unicode text: they are stored as
    UTF-8, as Slicer does. The segments' ``layer``/``label_value`` are updated to what was
    written. Raises InputError for bad tags, colours, duplicate IDs or masks
    not on the grid.
    """
    import slicerio

    ids = [s.id for s in segmentation.segments]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"segment IDs must be unique; repeated: {', '.join(duplicates)}.")
    for s in segmentation.segments:
        validate_segment(s, segmentation.shape)

    layers_kji, placement = _assign_layers(segmentation)
    nk, nj, ni = segmentation.shape
    full_extent = [0, ni - 1, 0, nj - 1, 0, nk - 1]

    out: Dict[str, Any] = {}
    for key, value in segmentation.extra.items():
        if key in ("voxels", "ijkToLPS", "segments", "referenceImageExtentOffset", "encoding"):
            continue
        out[key] = copy.deepcopy(value)
    out.setdefault("containedRepresentationNames", [_BINARY_LABELMAP])
    out.setdefault("masterRepresentation", _BINARY_LABELMAP)
    out["referenceImageExtentOffset"] = [0, 0, 0]
    out["encoding"] = "gzip"
    out["ijkToLPS"] = segmentation.ijk_to_lps
    # NRRD (Fortran) order for slicerio/pynrrd: [i, j, k] or [layer, i, j, k]
    out["voxels"] = layers_kji[0].transpose(2, 1, 0) if layers_kji.shape[0] == 1 else layers_kji.transpose(0, 3, 2, 1)
    segments_out = []
    for s, (layer, label) in zip(segmentation.segments, placement):
        segments_out.append(
            {
                "id": s.id,
                "name": s.name,
                "color": [float(c) for c in s.color],
                "colorAutoGenerated": bool(s.color_auto_generated),
                "nameAutoGenerated": bool(s.name_auto_generated),
                "labelValue": int(label),
                "layer": int(layer),
                "extent": list(full_extent),
                "tags": dict(s.tags),
            }
        )
    out["segments"] = segments_out

    # pynrrd writes the header as ASCII: pass non-ASCII text as placeholders, then put its UTF-8 in.
    nonce = secrets.token_hex(8)
    utf8_table: Dict[str, str] = {}
    out = {  # same keys in the same order (header field order), arrays as they are
        _ascii_placeholders(key, utf8_table, nonce): value
        if key in ("voxels", "ijkToLPS")
        else _ascii_placeholders(value, utf8_table, nonce)
        for key, value in out.items()
    }

    path = os.fspath(path)
    # Build the whole file in memory and move it into place, so a failed write leaves no
    # half-written file and an existing file at ``path`` stays as it was.
    buffer = io.BytesIO()
    slicerio.write_segmentation(buffer, out, compression_level=compression_level)
    content = buffer.getvalue()
    if utf8_table:
        content = _restore_utf8(content, utf8_table, nonce, path)
    tmp = f"{path}.{nonce}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(content)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write the segmentation {path}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for s, (layer, label) in zip(segmentation.segments, placement):
        s.layer, s.label_value = layer, label
    return path
