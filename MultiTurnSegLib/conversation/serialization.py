"""Conversations as JSON (versioned, lossless) and as compact strings for Slicer tags.

Document layout (version 1)::

    {"format": "multiturnseg-conversation", "version": 1,
     "id": "...", "created": "2024-...+00:00",
     "volume": "CTChest.nrrd", "axis": "axial", "slice_index": 42,
     "image_size": [H, W], "window": null | "preset" | [width, level],
     "turns": [{"round": 1, "prompt": "...", "answer": "Sure, [SEG].",
                "reference": null | {"kind": "round", "round": 1}
                                  | {"kind": "segment", "segment": "Liver"},
                "reference_mask": null | MASK, "mask": MASK,
                "jcm_score": null | 0.83, "jcm_refined": false,
                "timings": {"stage": seconds}, "segment_name": "R1 liver",
                "color": [r, g, b], "created": "..."}]}

    MASK = {"shape": [H, W], "encoding": "packbits-zlib-base64", "data": "..."}

Masks are bit-packed (numpy.packbits, row-major), zlib-compressed and base64
encoded. Unknown keys are ignored (forward compatible within a version);
everything else is checked and reported with ConversationFormatError.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import ConversationFormatError, InputError
from .model import Conversation, Reference, Turn, _is_int, _is_number

FORMAT_NAME = "multiturnseg-conversation"
FORMAT_VERSION = 1
MASK_ENCODING = "packbits-zlib-base64"
TAG_PREFIX = "mts1."  # marks encode_for_tag strings (version of the tag encoding)


# ---------------------------------------------------------------------------
# masks


def encode_mask(mask: np.ndarray) -> dict:
    """A (H, W) bool mask as ``{"shape", "encoding", "data"}`` (bit-packed, zlib, base64)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a mask must be 2D; got shape {mask.shape}")
    packed = np.packbits(mask.astype(bool, copy=False).ravel())
    data = base64.b64encode(zlib.compress(packed.tobytes(), 9)).decode("ascii")
    return {"shape": [int(mask.shape[0]), int(mask.shape[1])], "encoding": MASK_ENCODING, "data": data}


def decode_mask(obj: Any, where: str = "mask") -> np.ndarray:
    """Inverse of :func:`encode_mask`; ConversationFormatError if it is malformed."""
    if not isinstance(obj, dict):
        raise ConversationFormatError(f"{where}: expected an object with shape and data, got {_type(obj)}")
    shape = obj.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(_is_int(v) and v >= 0 for v in shape)
    ):
        raise ConversationFormatError(f"{where}: 'shape' must be [rows, columns] (non-negative integers); got {shape!r}")
    encoding = obj.get("encoding", MASK_ENCODING)
    if encoding != MASK_ENCODING:
        raise ConversationFormatError(f"{where}: unknown mask encoding {encoding!r} (expected {MASK_ENCODING!r})")
    data = obj.get("data")
    if not isinstance(data, str):
        raise ConversationFormatError(f"{where}: 'data' must be a base64 string; got {_type(data)}")
    try:
        raw = zlib.decompress(base64.b64decode(data.encode("ascii"), validate=True))
    except (binascii.Error, ValueError, UnicodeEncodeError, zlib.error) as exc:
        raise ConversationFormatError(f"{where}: mask data is not valid base64/zlib data ({exc})") from exc
    h, w = int(shape[0]), int(shape[1])
    expected = (h * w + 7) // 8
    if len(raw) != expected:
        raise ConversationFormatError(
            f"{where}: mask data holds {len(raw) * 8} bits but shape {h} x {w} needs {h * w} "
            f"({expected} bytes, got {len(raw)})"
        )
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=h * w)
    return bits.reshape(h, w).astype(bool)


# ---------------------------------------------------------------------------
# helpers


def _type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "text", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _require(d: dict, key: str, where: str):
    if key not in d:
        raise ConversationFormatError(f"{where}: missing field '{key}'")
    return d[key]


def _str(d: dict, key: str, where: str) -> str:
    value = _require(d, key, where)
    if not isinstance(value, str):
        raise ConversationFormatError(f"{where}: '{key}' must be text; got {_type(value)}")
    return value


def _int(d: dict, key: str, where: str) -> int:
    value = _require(d, key, where)
    if not _is_int(value):
        raise ConversationFormatError(f"{where}: '{key}' must be an integer; got {_type(value)}")
    return value


# ---------------------------------------------------------------------------
# references and turns


def reference_to_json(ref: Optional[Reference]) -> Optional[dict]:
    if ref is None:
        return None
    if ref.kind == "round":
        return {"kind": "round", "round": int(ref.round)}
    return {"kind": "segment", "segment": ref.segment}


def reference_from_json(obj: Any, where: str = "reference") -> Optional[Reference]:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ConversationFormatError(f"{where}: expected null or an object; got {_type(obj)}")
    kind = _require(obj, "kind", where)
    if kind == "round":
        value = _int(obj, "round", where)
        if value < 1:
            raise ConversationFormatError(f"{where}: rounds start at 1; got {value}")
        return Reference.to_round(value)
    if kind == "segment":
        name = _str(obj, "segment", where)
        if not name.strip():
            raise ConversationFormatError(f"{where}: the segment name is empty")
        return Reference.to_segment(name)
    raise ConversationFormatError(f"{where}: 'kind' must be 'round' or 'segment'; got {kind!r}")


def turn_to_json(turn: Turn, *, include_mask: bool = True) -> dict:
    d = {
        "round": int(turn.round),
        "prompt": turn.prompt,
        "answer": turn.answer,
        "reference": reference_to_json(turn.reference),
        "reference_mask": None if turn.reference_mask is None else encode_mask(turn.reference_mask),
        "jcm_score": None if turn.jcm_score is None else float(turn.jcm_score),
        "jcm_refined": bool(turn.jcm_refined),
        "timings": {str(k): float(v) for k, v in turn.timings.items()},
        "segment_name": turn.segment_name,
        "color": [float(c) for c in turn.color],
        "created": turn.created,
    }
    if include_mask:
        d["mask"] = encode_mask(turn.mask)
    return d


def turn_from_json(d: Any, where: str = "turn", *, mask: Optional[np.ndarray] = None) -> Turn:
    """A Turn from its JSON object; ``mask`` supplies the mask when the object has none (tags)."""
    if not isinstance(d, dict):
        raise ConversationFormatError(f"{where}: expected an object; got {_type(d)}")
    round_number = _int(d, "round", where)
    if round_number < 1:
        raise ConversationFormatError(f"{where}: 'round' must be >= 1; got {round_number}")
    where = f"round {round_number}"
    prompt = _str(d, "prompt", where)
    answer = _str(d, "answer", where)
    reference = reference_from_json(_require(d, "reference", where), f"{where} reference")
    ref_mask_obj = _require(d, "reference_mask", where)
    reference_mask = None if ref_mask_obj is None else decode_mask(ref_mask_obj, f"{where} reference_mask")
    if mask is None:
        mask = decode_mask(_require(d, "mask", where), f"{where} mask")
    jcm_score = _require(d, "jcm_score", where)
    if jcm_score is not None and (not _is_number(jcm_score) or not math.isfinite(jcm_score)):
        raise ConversationFormatError(f"{where}: 'jcm_score' must be a number or null; got {jcm_score!r}")
    jcm_refined = _require(d, "jcm_refined", where)
    if not isinstance(jcm_refined, bool):
        raise ConversationFormatError(f"{where}: 'jcm_refined' must be true or false; got {_type(jcm_refined)}")
    timings = _require(d, "timings", where)
    if not isinstance(timings, dict) or not all(_is_number(v) and math.isfinite(v) for v in timings.values()):
        raise ConversationFormatError(f"{where}: 'timings' must map stage names to seconds")
    segment_name = _str(d, "segment_name", where)
    color = _require(d, "color", where)
    if (
        not isinstance(color, list)
        or len(color) != 3
        or not all(_is_number(c) and 0.0 <= c <= 1.0 for c in color)
    ):
        raise ConversationFormatError(f"{where}: 'color' must be [r, g, b] with values in 0..1; got {color!r}")
    created = _str(d, "created", where)
    turn = Turn(
        round=round_number,
        prompt=prompt,
        answer=answer,
        reference=reference,
        reference_mask=reference_mask,
        mask=mask,
        jcm_score=None if jcm_score is None else float(jcm_score),
        jcm_refined=jcm_refined,
        timings={k: float(v) for k, v in timings.items()},
        segment_name=segment_name,
        color=tuple(float(c) for c in color),
        created=created,
    )
    try:
        turn.validate()
    except InputError as exc:
        raise ConversationFormatError(str(exc)) from exc
    return turn


# ---------------------------------------------------------------------------
# conversations


def conversation_header_to_json(conv: Conversation) -> dict:
    """Everything but the turns."""
    window = conv.window
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "id": conv.id,
        "created": conv.created,
        "volume": conv.volume,
        "axis": conv.axis,
        "slice_index": int(conv.slice_index),
        "image_size": [int(conv.image_size[0]), int(conv.image_size[1])],
        "window": list(window) if isinstance(window, tuple) else window,
    }


def conversation_to_json(conv: Conversation) -> dict:
    """The conversation as a JSON-compatible dict (see the module docstring)."""
    d = conversation_header_to_json(conv)
    d["turns"] = [turn_to_json(t) for t in conv.turns]
    return d


def check_format(d: Any, where: str = "conversation") -> None:
    """Raise ConversationFormatError unless ``d`` is a version-1 conversation object."""
    if not isinstance(d, dict):
        raise ConversationFormatError(f"{where}: expected a JSON object; got {_type(d)}")
    fmt = d.get("format")
    if fmt != FORMAT_NAME:
        raise ConversationFormatError(
            f"{where}: not a MultiTurnSeg conversation (format is {fmt!r}, expected {FORMAT_NAME!r})"
        )
    version = d.get("version")
    if not _is_int(version):
        raise ConversationFormatError(f"{where}: 'version' must be an integer; got {version!r}")
    if version != FORMAT_VERSION:
        raise ConversationFormatError(
            f"{where}: conversation format version {version} is not supported (this MultiTurnSeg reads version "
            f"{FORMAT_VERSION}); update MultiTurnSeg to open it"
        )


def conversation_header_from_json(d: Any, where: str = "conversation") -> Conversation:
    """A Conversation without turns from a header (or full) object."""
    check_format(d, where)
    image_size = _require(d, "image_size", where)
    if (
        not isinstance(image_size, list)
        or len(image_size) != 2
        or not all(_is_int(v) and v > 0 for v in image_size)
    ):
        raise ConversationFormatError(f"{where}: 'image_size' must be [rows, columns], both > 0; got {image_size!r}")
    window = _require(d, "window", where)
    if not (
        window is None
        or isinstance(window, str)
        or (isinstance(window, list) and len(window) == 2 and all(_is_number(v) and math.isfinite(v) for v in window))
    ):
        raise ConversationFormatError(f"{where}: 'window' must be null, a preset name or [width, level]; got {window!r}")
    slice_index = _int(d, "slice_index", where)
    if slice_index < 0:
        raise ConversationFormatError(f"{where}: 'slice_index' must be >= 0; got {slice_index}")
    conv_id = _str(d, "id", where)
    if not conv_id:
        raise ConversationFormatError(f"{where}: 'id' is empty")
    axis = _str(d, "axis", where)
    if not axis:
        raise ConversationFormatError(f"{where}: 'axis' is empty")
    try:
        return Conversation(
            volume=_str(d, "volume", where),
            axis=axis,
            slice_index=slice_index,
            image_size=(image_size[0], image_size[1]),
            window=tuple(window) if isinstance(window, list) else window,
            id=conv_id,
            created=_str(d, "created", where),
        )
    except InputError as exc:  # pragma: no cover - the checks above come first
        raise ConversationFormatError(f"{where}: {exc}") from exc


def add_turn_checked(conv: Conversation, turn: Turn) -> None:
    """Append ``turn``, turning InputError into ConversationFormatError."""
    try:
        conv.append(turn)
    except InputError as exc:
        raise ConversationFormatError(f"conversation: {exc}") from exc


def conversation_from_json(d: Any) -> Conversation:
    """Inverse of :func:`conversation_to_json`; ConversationFormatError says what is wrong."""
    conv = conversation_header_from_json(d)
    turns = _require(d, "turns", "conversation")
    if not isinstance(turns, list):
        raise ConversationFormatError(f"conversation: 'turns' must be a list; got {_type(turns)}")
    for i, item in enumerate(turns):
        add_turn_checked(conv, turn_from_json(item, f"turn {i + 1}"))
    return conv


def conversation_to_json_text(conv: Conversation, *, indent: Optional[int] = 1) -> str:
    return json.dumps(conversation_to_json(conv), ensure_ascii=False, indent=indent, allow_nan=False)


def conversation_from_json_text(text: Union[str, bytes]) -> Conversation:
    try:
        d = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConversationFormatError(f"conversation: not valid JSON ({exc})") from exc
    return conversation_from_json(d)


def save_conversation(conv: Conversation, path: Union[str, os.PathLike]) -> Path:
    """Write the conversation as UTF-8 JSON (atomically: a temporary file, then rename)."""
    path = Path(path)
    text = conversation_to_json_text(conv)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(directory))
    except OSError as exc:
        raise InputError(f"cannot write the conversation to {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise InputError(f"cannot write the conversation to {path}: {exc.strerror or exc}") from exc
    return path


def load_conversation(path: Union[str, os.PathLike]) -> Conversation:
    """Read a conversation written by :func:`save_conversation`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the conversation file {path}: {exc.strerror or exc}") from exc
    try:
        return conversation_from_json_text(data)
    except ConversationFormatError as exc:
        raise ConversationFormatError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------
# compact strings for Slicer segment tags


def encode_for_tag(obj: Any) -> str:
    """A JSON-compatible object as a compact string safe in a Slicer segment tag.

    ``mts1.`` + URL-safe base64 (no padding) of zlib-compressed UTF-8 JSON: only
    letters, digits, '-', '_' and '.', so no '|', ':' or newline.
    """
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return TAG_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode("ascii").rstrip("=")


def decode_from_tag(text: Any) -> Any:
    """Inverse of :func:`encode_for_tag`; ConversationFormatError for anything else."""
    if not isinstance(text, str) or not text.startswith(TAG_PREFIX):
        raise ConversationFormatError(
            f"not a MultiTurnSeg tag value (expected text starting with {TAG_PREFIX!r}); got {str(text)[:40]!r}"
        )
    body = text[len(TAG_PREFIX):].strip()
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise ConversationFormatError(f"a MultiTurnSeg tag value is corrupt ({exc})") from exc
