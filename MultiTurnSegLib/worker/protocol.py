"""Wire protocol between :class:`RemoteBackend` and the worker.

Imports numpy and the standard library only: the Slicer client imports it.

A message is::

    magic    4 bytes   b"MTSQ" (turn request) or b"MTSR" (turn result)
    version  uint16    big-endian, PROTOCOL_VERSION
    flags    uint16    must be 0
    hlen     uint32    length of the header
    header   hlen      UTF-8 JSON object (no NaN/Infinity)
    blobs              binary sections, in the order the header lists them,
                       each of the byte size the header gives; nothing after

Request header::

    {"image": {"height": H, "width": W, "channels": 3, "dtype": "uint8",
               "sha256": hex, "encoding": "gray-sub-zlib" | "rgb-sub-zlib" | "by-digest",
               "size": bytes},
     "history": [turn, ...],         # every earlier turn, answer required
     "turn": turn,                   # the new turn, answer may be null
     "apply_jcm": bool, "answer_mode": "template" | "generate"}
    turn = {"prompt": str, "answer": str | null,
            "reference": null | {"encoding": "bits-zlib", "size": bytes}}

Blobs: the image (unless "by-digest", then size is 0 and no blob), then the
reference mask of each history turn that has one, then that of the new turn.

Image encoding: the (H, W, 3) uint8 slice, reduced to one channel when the
three are equal (CT/MR slices always are), each row replaced by the
differences of neighbouring pixels (modulo 256, PNG's "Sub" filter), then
zlib. "by-digest" sends only the digest of an image the worker has already
received; a worker that does not have it answers 409 ``image_unknown`` and the
client sends the pixels again. Masks are (H, W) bool, bit-packed row-major
(numpy.packbits order, zero padding) and zlib-compressed.

Result header::

    {"height": H, "width": W, "mask": {"encoding": "bits-zlib", "size": bytes},
     "answer": str, "jcm_score": float | null, "jcm_refined": bool,
     "timings": {stage: seconds}}

Errors are JSON (``{"error": code, "message": text}``), not this format.
Every malformed message raises :class:`ProtocolError` with a message saying
what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..backends.base import AnswerMode, TurnResult, TurnSpec
from ..errors import InputError

PROTOCOL_VERSION = 1
REQUEST_MAGIC = b"MTSQ"
RESULT_MAGIC = b"MTSR"
REQUEST_CONTENT_TYPE = "application/vnd.multiturnseg.turn"
RESULT_CONTENT_TYPE = "application/vnd.multiturnseg.result"
_PREAMBLE = struct.Struct(">4sHHI")

IMAGE_ENCODINGS = ("gray-sub-zlib", "rgb-sub-zlib", "by-digest")
MASK_ENCODING = "bits-zlib"
SEG_TOKEN = "[SEG]"


class ProtocolError(InputError):
    """A message that does not follow the wire protocol."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class WireLimits:
    """What a worker accepts; checked before anything is decompressed."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 1024 * 1024
    max_side: int = 4096
    max_pixels: int = 4096 * 4096
    max_turns: int = 64  # history turns + the new one
    max_prompt_chars: int = 2000
    max_answer_chars: int = 2000
    # Per-item limits alone let a small body unpack to 64 full-size masks (> 1 GB).
    max_decoded_bytes: int = 256 * 1024 * 1024

    def as_dict(self) -> dict:
        return {
            "max_decoded_bytes": self.max_decoded_bytes,
            "max_body_bytes": self.max_body_bytes,
            "max_header_bytes": self.max_header_bytes,
            "max_side": self.max_side,
            "max_pixels": self.max_pixels,
            "max_turns": self.max_turns,
            "max_prompt_chars": self.max_prompt_chars,
            "max_answer_chars": self.max_answer_chars,
        }


DEFAULT_LIMITS = WireLimits()


# --------------------------------------------------------------------------- content keys


def image_digest(image: np.ndarray) -> str:
    """sha256 of an (H, W, 3) uint8 image: its shape and its pixels."""
    image = np.ascontiguousarray(image)
    h = hashlib.sha256(b"MTS-IMAGE-1")
    h.update(struct.pack(">III", *image.shape))
    h.update(memoryview(image).cast("B"))
    return h.hexdigest()


def mask_digest(mask: Optional[np.ndarray]) -> str:
    """sha256 of an (H, W) bool mask (shape and bits); "-" for no mask."""
    if mask is None:
        return "-"
    mask = np.asarray(mask, dtype=bool)
    h = hashlib.sha256(b"MTS-MASK-1")
    h.update(struct.pack(">II", *mask.shape))
    h.update(np.packbits(mask, axis=None).tobytes())
    return h.hexdigest()


def turn_digest(turn: TurnSpec, answer: Optional[str] = None) -> str:
    """Content key of a fed turn: prompt, the answer fed, reference mask."""
    h = hashlib.sha256(b"MTS-TURN-1")
    for part in (turn.prompt, turn.answer if answer is None else answer):
        data = (part or "").encode("utf-8", "surrogatepass")
        h.update(struct.pack(">I", len(data)))
        h.update(data)
    h.update(mask_digest(turn.reference_mask).encode("ascii"))
    return h.hexdigest()


# --------------------------------------------------------------------------- validation


def _fail(message: str, code: str = "bad_request"):
    raise ProtocolError(message, code)


def check_text(value: Any, what: str, max_chars: int, *, allow_none: bool = False) -> Optional[str]:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        _fail(f"{what} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        _fail(f"{what} is {len(value)} characters long; at most {max_chars} are allowed", "too_large")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"{what} is not valid Unicode text (lone surrogate)")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        _fail(f"{what} contains control characters")
    return value


def check_prompt(value: Any, what: str, limits: WireLimits) -> str:
    value = check_text(value, what, limits.max_prompt_chars)
    if not value.strip():
        _fail(f"{what} is empty; type what to segment")
    return value


def check_answer(value: Any, what: str, limits: WireLimits, *, required: bool) -> Optional[str]:
    if value is None:
        if required:
            _fail(f"{what} is missing: every earlier turn must carry the answer that was fed")
        return None
    value = check_text(value, what, limits.max_answer_chars)
    n = value.count(SEG_TOKEN)
    if n != 1:
        _fail(f"{what} must contain exactly one {SEG_TOKEN}, found {n}")
    return value


def check_dims(height: Any, width: Any, limits: WireLimits) -> Tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool):
            _fail(f"image {name} must be an integer, got {type(v).__name__}")
        if v < 1:
            _fail(f"image {name} must be at least 1, got {v}")
        if v > limits.max_side:
            _fail(
                f"image {name} {v} exceeds the worker's limit of {limits.max_side} pixels",
                "too_large",
            )
    if height * width > limits.max_pixels:
        _fail(
            f"image of {height} x {width} pixels exceeds the worker's limit of {limits.max_pixels} pixels",
            "too_large",
        )
    return height, width


def check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InputError(f"the slice image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"the slice image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise InputError(f"the slice image must be 8-bit (uint8), got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"the slice image is empty: shape {image.shape}")
    return np.ascontiguousarray(image)


def check_mask(mask: Any, shape: Tuple[int, int], what: str) -> Optional[np.ndarray]:
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray):
        raise InputError(f"{what} must be a numpy array, got {type(mask).__name__}")
    if mask.shape != tuple(shape):
        raise InputError(f"{what} has shape {mask.shape}; it must match the slice, {tuple(shape)}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise InputError(f"{what} must be boolean, got {mask.dtype}")
        mask = mask != 0
    return mask


def check_request(
    image: Any,
    history: Sequence[TurnSpec],
    turn: TurnSpec,
    limits: WireLimits = DEFAULT_LIMITS,
) -> Tuple[np.ndarray, List[TurnSpec], TurnSpec]:
    """Check a turn request as a backend receives it; returns (image, history, turn)
    normalized (masks boolean). Raises InputError."""
    image = check_image(image)
    shape = image.shape[:2]
    if not isinstance(turn, TurnSpec) or any(not isinstance(t, TurnSpec) for t in history):
        raise InputError("turns must be TurnSpec objects")
    if len(history) + 1 > limits.max_turns:
        raise InputError(f"the conversation has {len(history) + 1} turns; at most {limits.max_turns} are allowed")
    out = []
    try:
        for i, t in enumerate(list(history) + [turn]):
            what = f"turn {i + 1}" if i < len(history) else "the new turn's"
            check_prompt(t.prompt, f"{what} prompt", limits)
            check_answer(t.answer, f"{what} answer", limits, required=i < len(history))
            mask = check_mask(t.reference_mask, shape, f"{what} reference mask")
            out.append(t if mask is t.reference_mask else TurnSpec(t.prompt, t.answer, mask))
    except ProtocolError as exc:
        raise InputError(str(exc)) from None
    return image, out[:-1], out[-1]


# --------------------------------------------------------------------------- low-level pieces


def _sub_filter(plane: np.ndarray) -> np.ndarray:
    out = plane.copy()
    out[:, 1:] -= plane[:, :-1]  # uint8 arithmetic wraps modulo 256
    return out


def _unsub_filter(filtered: np.ndarray) -> np.ndarray:
    return np.cumsum(filtered, axis=1, dtype=np.uint8)


def encode_image(image: np.ndarray, level: int = 6) -> Tuple[str, bytes]:
    """(encoding, blob) for an (H, W, 3) uint8 image."""
    if np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 0], image[:, :, 2]):
        return "gray-sub-zlib", zlib.compress(_sub_filter(image[:, :, 0]).tobytes(), level)
    planes = np.moveaxis(image, 2, 0).reshape(3 * image.shape[0], image.shape[1])
    return "rgb-sub-zlib", zlib.compress(_sub_filter(planes).tobytes(), level)


def _inflate(blob: bytes, expected: int, what: str) -> bytes:
    d = zlib.decompressobj()
    try:
        data = d.decompress(blob, expected)
        if len(data) == expected and d.unconsumed_tail:
            _fail(f"{what} holds more data than its declared size")
        data += d.flush()
    except zlib.error as exc:
        _fail(f"{what} is not valid zlib data ({exc})")
    if not d.eof:
        _fail(f"{what} is truncated (zlib stream incomplete)")
    if d.unused_data:
        _fail(f"{what} has trailing bytes after its zlib stream")
    if len(data) != expected:
        _fail(f"{what} decompresses to {len(data)} bytes; its declared size needs {expected}")
    return data


def decode_image(encoding: str, blob: bytes, height: int, width: int) -> np.ndarray:
    if encoding == "gray-sub-zlib":
        raw = _inflate(blob, height * width, "image data")
        plane = _unsub_filter(np.frombuffer(raw, np.uint8).reshape(height, width))
        return np.repeat(plane[:, :, None], 3, axis=2)
    if encoding == "rgb-sub-zlib":
        raw = _inflate(blob, 3 * height * width, "image data")
        planes = _unsub_filter(np.frombuffer(raw, np.uint8).reshape(3 * height, width))
        return np.ascontiguousarray(np.moveaxis(planes.reshape(3, height, width), 0, 2))
    _fail(f"unknown image encoding {encoding!r}")


def encode_mask(mask: np.ndarray, level: int = 6) -> bytes:
    return zlib.compress(np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes(), level)


def decode_mask(blob: bytes, height: int, width: int, what: str) -> np.ndarray:
    n = height * width
    raw = _inflate(blob, (n + 7) // 8, what)
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=None)
    if bits[n:].any():
        _fail(f"{what} has non-zero padding bits; it does not match a {height} x {width} mask")
    return bits[:n].reshape(height, width).astype(bool)


def _reject_constant(name: str):
    _fail(f"the header contains {name}; only finite numbers are allowed")


def _pack(magic: bytes, header: dict, blobs: Sequence[bytes]) -> bytes:
    hdr = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return b"".join([_PREAMBLE.pack(magic, PROTOCOL_VERSION, 0, len(hdr)), hdr, *blobs])


def _unpack(body: bytes, magic: bytes, what: str, max_header: int) -> Tuple[dict, memoryview]:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        _fail(f"{what} must be bytes")
    body = memoryview(body)
    if len(body) < _PREAMBLE.size:
        _fail(f"{what} is truncated: {len(body)} bytes, shorter than the {_PREAMBLE.size}-byte preamble")
    got_magic, version, flags, hlen = _PREAMBLE.unpack_from(body, 0)
    if got_magic != magic:
        _fail(f"{what} does not start with {magic!r} (got {bytes(got_magic)!r}); is this a MultiTurnSeg client/worker?")
    if version != PROTOCOL_VERSION:
        _fail(
            f"{what} uses protocol version {version}; this side speaks version {PROTOCOL_VERSION}. "
            "Update the client and the worker to the same MultiTurnSeg version",
            "version_mismatch",
        )
    if flags != 0:
        _fail(f"{what} has unknown flags {flags:#06x}")
    if hlen > max_header:
        _fail(f"{what} header of {hlen} bytes exceeds the limit of {max_header}", "too_large")
    if len(body) < _PREAMBLE.size + hlen:
        _fail(f"{what} is truncated: header declares {hlen} bytes, only {len(body) - _PREAMBLE.size} present")
    raw = bytes(body[_PREAMBLE.size : _PREAMBLE.size + hlen])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"{what} header is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        _fail(f"{what} header is not valid JSON ({exc})")
    if not isinstance(header, dict):
        _fail(f"{what} header must be a JSON object, got {type(header).__name__}")
    return header, body[_PREAMBLE.size + hlen :]


def _check_keys(obj: Any, what: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
    if not isinstance(obj, dict):
        _fail(f"{what} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        _fail(f"{what} lacks {', '.join(missing)}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        _fail(f"{what} has unknown fields {', '.join(map(str, unknown))}")
    return obj


def _check_size(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        _fail(f"{what} size must be a non-negative integer")
    return value


class _Blobs:
    def __init__(self, data: memoryview, what: str):
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, size: int, name: str) -> bytes:
        if self.pos + size > len(self.data):
            _fail(
                f"{self.what} is truncated: {name} needs {size} bytes, "
                f"only {len(self.data) - self.pos} left"
            )
        out = bytes(self.data[self.pos : self.pos + size])
        self.pos += size
        return out

    def finish(self):
        if self.pos != len(self.data):
            _fail(f"{self.what} has {len(self.data) - self.pos} bytes after its last declared section")


# --------------------------------------------------------------------------- requests


@dataclass
class TurnRequest:
    """A decoded turn request. ``image`` is None when sent by digest only."""

    height: int
    width: int
    image_sha256: str
    image: Optional[np.ndarray]
    history: List[TurnSpec]
    turn: TurnSpec
    apply_jcm: bool
    answer_mode: AnswerMode


def encode_request(
    image: np.ndarray,
    history: Sequence[TurnSpec],
    turn: TurnSpec,
    *,
    apply_jcm: bool = True,
    answer_mode: AnswerMode = AnswerMode.TEMPLATE,
    send_image: bool = True,
    digest: Optional[str] = None,
    limits: WireLimits = DEFAULT_LIMITS,
) -> bytes:
    """Encode a turn request; raises InputError for inputs no worker would accept."""
    image = check_image(image)
    height, width = image.shape[:2]
    try:
        check_dims(height, width, limits)
    except ProtocolError as exc:
        raise InputError(str(exc)) from None
    image, history, turn = check_request(image, history, turn, limits)
    blobs: List[bytes] = []
    digest = digest or image_digest(image)
    if send_image:
        encoding, blob = encode_image(image)
        blobs.append(blob)
    else:
        encoding, blob = "by-digest", b""
    header: Dict[str, Any] = {
        "image": {
            "height": height,
            "width": width,
            "channels": 3,
            "dtype": "uint8",
            "sha256": digest,
            "encoding": encoding,
            "size": len(blob),
        },
        "history": [],
        "turn": None,
        "apply_jcm": bool(apply_jcm),
        "answer_mode": AnswerMode(answer_mode).value,
    }

    def put_turn(t: TurnSpec) -> dict:
        ref = None
        if t.reference_mask is not None:
            blob = encode_mask(t.reference_mask)
            blobs.append(blob)
            ref = {"encoding": MASK_ENCODING, "size": len(blob)}
        return {"prompt": t.prompt, "answer": t.answer, "reference": ref}

    header["history"] = [put_turn(t) for t in history]
    header["turn"] = put_turn(turn)
    return _pack(REQUEST_MAGIC, header, blobs)


def decode_request(body: bytes, limits: WireLimits = DEFAULT_LIMITS) -> TurnRequest:
    """Decode and validate a turn request; raises ProtocolError."""
    if len(body) > limits.max_body_bytes:
        _fail(f"request of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}", "too_large")
    header, rest = _unpack(body, REQUEST_MAGIC, "request", limits.max_header_bytes)
    _check_keys(header, "request header", ("image", "history", "turn", "apply_jcm", "answer_mode"))
    img = _check_keys(
        header["image"], "image description", ("height", "width", "channels", "dtype", "sha256", "encoding", "size")
    )
    height, width = check_dims(img["height"], img["width"], limits)
    if img["channels"] != 3 or isinstance(img["channels"], bool):
        _fail(f"image must have 3 channels, got {img['channels']!r}")
    if img["dtype"] != "uint8":
        _fail(f"image dtype must be 'uint8', got {img['dtype']!r}")
    digest = img["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        _fail("image sha256 must be 64 lower-case hexadecimal digits")
    encoding = img["encoding"]
    if encoding not in IMAGE_ENCODINGS:
        _fail(f"unknown image encoding {encoding!r}; expected one of {', '.join(IMAGE_ENCODINGS)}")
    image_size = _check_size(img["size"], "image")
    if encoding == "by-digest" and image_size != 0:
        _fail("an image sent by digest must have size 0")
    if not isinstance(header["apply_jcm"], bool):
        _fail("apply_jcm must be true or false")
    try:
        answer_mode = AnswerMode(header["answer_mode"])
    except (ValueError, TypeError):
        _fail(f"answer_mode must be one of {', '.join(m.value for m in AnswerMode)}, got {header['answer_mode']!r}")
    history_raw = header["history"]
    if not isinstance(history_raw, list):
        _fail("history must be a JSON list")
    if len(history_raw) + 1 > limits.max_turns:
        _fail(
            f"the conversation has {len(history_raw) + 1} turns; the worker accepts at most {limits.max_turns}",
            "too_large",
        )

    def parse_turn(raw: Any, what: str, required_answer: bool):
        t = _check_keys(raw, what, ("prompt", "answer", "reference"))
        prompt = check_prompt(t["prompt"], f"{what} prompt", limits)
        answer = check_answer(t["answer"], f"{what} answer", limits, required=required_answer)
        ref = t["reference"]
        size = None
        if ref is not None:
            _check_keys(ref, f"{what} reference", ("encoding", "size"))
            if ref["encoding"] != MASK_ENCODING:
                _fail(f"{what} reference has unknown encoding {ref['encoding']!r}; expected {MASK_ENCODING!r}")
            size = _check_size(ref["size"], f"{what} reference")
        return prompt, answer, size

    parsed = [parse_turn(t, f"history turn {i + 1}", True) for i, t in enumerate(history_raw)]
    parsed.append(parse_turn(header["turn"], "new turn", False))
    # What decoding would allocate (RGB image + one bool per pixel per mask), refused before inflating.
    n_masks = sum(size is not None for _p, _a, size in parsed)
    decoded = height * width * (3 + n_masks)
    if decoded > limits.max_decoded_bytes:
        _fail(
            f"the request would decode to {decoded} bytes ({n_masks} reference masks of {width}x{height}); "
            f"the worker accepts at most {limits.max_decoded_bytes}: send fewer turns or a smaller slice",
            "too_large",
        )

    blobs = _Blobs(rest, "request")
    image = None
    if encoding != "by-digest":
        image = decode_image(encoding, blobs.take(image_size, "the image"), height, width)
        if image_digest(image) != digest:
            _fail("image pixels do not match the declared sha256 (corrupted in transit?)")
    specs: List[TurnSpec] = []
    for i, (prompt, answer, size) in enumerate(parsed):
        name = f"history turn {i + 1} reference mask" if i < len(history_raw) else "new turn reference mask"
        mask = None
        if size is not None:
            mask = decode_mask(blobs.take(size, name), height, width, name)
        specs.append(TurnSpec(prompt=prompt, answer=answer, reference_mask=mask))
    blobs.finish()
    return TurnRequest(
        height=height,
        width=width,
        image_sha256=digest,
        image=image,
        history=specs[:-1],
        turn=specs[-1],
        apply_jcm=header["apply_jcm"],
        answer_mode=answer_mode,
    )


# --------------------------------------------------------------------------- results


def _finite(value: Any, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        _fail(f"{what} must be a finite number")
    return float(value)


def encode_result(result: TurnResult) -> bytes:
    mask = np.asarray(result.mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"result mask must be 2D, got shape {mask.shape}")
    blob = encode_mask(mask)
    score = result.jcm_score
    if score is not None:
        score = float(score)
        if not math.isfinite(score):
            raise ValueError("JCM score is not finite")
    header = {
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "mask": {"encoding": MASK_ENCODING, "size": len(blob)},
        "answer": result.answer,
        "jcm_score": score,
        "jcm_refined": bool(result.jcm_refined),
        "timings": {str(k): float(v) for k, v in (result.timings or {}).items() if math.isfinite(float(v))},
    }
    return _pack(RESULT_MAGIC, header, [blob])


def decode_result(body: bytes, expected_shape: Optional[Tuple[int, int]] = None) -> TurnResult:
    header, rest = _unpack(body, RESULT_MAGIC, "result", 1 << 20)
    _check_keys(header, "result header", ("height", "width", "mask", "answer", "jcm_score", "jcm_refined", "timings"))
    limits = WireLimits(max_side=1 << 16, max_pixels=1 << 32)
    height, width = check_dims(header["height"], header["width"], limits)
    if expected_shape is not None and (height, width) != tuple(expected_shape):
        _fail(f"result mask is {height} x {width}; the slice is {expected_shape[0]} x {expected_shape[1]}")
    m = _check_keys(header["mask"], "result mask", ("encoding", "size"))
    if m["encoding"] != MASK_ENCODING:
        _fail(f"result mask has unknown encoding {m['encoding']!r}")
    answer = check_text(header["answer"], "answer", 1 << 20)
    score = header["jcm_score"]
    if score is not None:
        score = _finite(score, "JCM score")
    if not isinstance(header["jcm_refined"], bool):
        _fail("jcm_refined must be true or false")
    timings = header["timings"]
    if not isinstance(timings, dict):
        _fail("timings must be a JSON object")
    timings = {str(k): _finite(v, f"timing {k!r}") for k, v in timings.items()}
    blobs = _Blobs(rest, "result")
    mask = decode_mask(blobs.take(_check_size(m["size"], "result mask"), "the mask"), height, width, "result mask")
    blobs.finish()
    return TurnResult(mask=mask, answer=answer, jcm_score=score, jcm_refined=header["jcm_refined"], timings=timings)


def error_body(code: str, message: str) -> Dict[str, str]:
    """JSON body of every error answer."""
    return {"error": code, "message": message}
