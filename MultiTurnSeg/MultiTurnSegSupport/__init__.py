"""Slicer-free helpers of the MultiTurnSeg Slicer module.

Everything here runs without Slicer, Qt or VTK (it is tested with pytest in
CI): which packages each backend needs, which library axis a slice view shows,
the background runner that keeps turns off the GUI thread, and how turns are
shown in the chat. MultiTurnSeg.py keeps only what needs Slicer.

It imports MultiTurnSegLib lazily (inside functions), like the module: the
module must load before the library's dependencies are installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------
# Dependencies
#
# (pip requirement, importable module). Kept in step with pyproject.toml by
# Testing/Python/test_slicer_module_support.py. torch is not in these lists:
# it is installed through the PyTorch extension (PyTorchUtils), which picks
# the build matching the GPU driver.

CORE_REQUIREMENTS: Tuple[Tuple[str, str], ...] = (
    ("numpy>=1.24", "numpy"),
    ("SimpleITK>=2.2", "SimpleITK"),
    ("slicerio>=1.1", "slicerio"),
    ("pynrrd>=1.0", "nrrd"),
    ("Pillow>=9.0", "PIL"),
)
"""What MultiTurnSegLib needs for anything (also a remote worker client)."""

ENGINE_REQUIREMENTS: Tuple[Tuple[str, str], ...] = (
    ("transformers>=5.0", "transformers"),
    ("peft>=0.13", "peft"),
    ("sentencepiece>=0.1.99", "sentencepiece"),
    ("safetensors>=0.4", "safetensors"),
    ("segment-anything>=1.0", "segment_anything"),
    ("tqdm>=4.60", "tqdm"),
)
"""What running the model on this computer needs besides torch."""

DICOM_REQUIREMENTS: Tuple[Tuple[str, str], ...] = (
    ("highdicom>=0.22", "highdicom"),
    ("pydicom>=2.4", "pydicom"),
)
"""Optional: DICOM-SEG export."""

TORCH_REQUIREMENT = ("torch>=2.1", "torch")

BACKEND_LOCAL = "local"
BACKEND_REMOTE = "remote"
BACKEND_KINDS = (BACKEND_LOCAL, BACKEND_REMOTE)


def _present(module: str, find_spec=importlib.util.find_spec) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class MissingPackages:
    """What must be installed before a backend can run."""

    torch: bool = False  # install through PyTorchUtils
    pip: List[str] = field(default_factory=list)  # pip requirement strings

    def __bool__(self) -> bool:
        return self.torch or bool(self.pip)

    def describe(self) -> List[str]:
        items = list(self.pip)
        if self.torch:
            items.insert(0, f"{TORCH_REQUIREMENT[0]} (through the PyTorch extension, matching your GPU driver)")
        return items


def missing_requirements(backend_kind: str, *, dicom: bool = False, find_spec=importlib.util.find_spec) -> MissingPackages:
    """Packages missing for ``backend_kind`` ("local" or "remote"), optionally DICOM-SEG export."""
    if backend_kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend kind {backend_kind!r}; use one of {BACKEND_KINDS}")
    needed = list(CORE_REQUIREMENTS)
    missing = MissingPackages()
    if backend_kind == BACKEND_LOCAL:
        needed += list(ENGINE_REQUIREMENTS)
        missing.torch = not _present(TORCH_REQUIREMENT[1], find_spec)
    if dicom:
        needed += list(DICOM_REQUIREMENTS)
    missing.pip = [req for req, module in needed if not _present(module, find_spec)]
    return missing


# ---------------------------------------------------------------------------
# Which slice a view shows

AXIS_OF_PATIENT_AXIS = {2: "axial", 1: "coronal", 0: "sagittal"}
"""Library axis name for the LPS axis (0 L, 1 P, 2 S) that is the slice normal."""

DEFAULT_ALIGNMENT_TOLERANCE_DEG = 1.0


class ObliqueViewError(ValueError):
    """The view's slice plane is not a voxel plane of the volume."""


def ras_to_lps(vector) -> Tuple[float, float, float]:
    x, y, z = (float(v) for v in vector)
    return (-x, -y, z)


def axis_for_view(volume, normal_ras, tolerance_deg: float = DEFAULT_ALIGNMENT_TOLERANCE_DEG, view_name: str = "the view") -> str:
    """The library axis ("axial", "coronal", "sagittal") whose slices the view shows.

    normal_ras: the view's slice normal (third column of SliceToRAS).
    The normal must be within ``tolerance_deg`` of one voxel axis of the
    volume (the library cuts voxel planes, without interpolation); otherwise
    ObliqueViewError says how to fix the view.
    """
    import numpy as np

    from MultiTurnSegLib import imaging

    normal = np.asarray(ras_to_lps(normal_ras), dtype=float)
    length = float(np.linalg.norm(normal))
    if not math.isfinite(length) or length == 0.0:
        raise ObliqueViewError(f"{view_name} has no valid slice orientation.")
    normal /= length
    direction = volume.direction  # columns: unit LPS directions of i, j, k
    cosines = np.abs(direction.T @ normal)
    best = int(np.argmax(cosines))
    angle = math.degrees(math.acos(min(1.0, float(cosines[best]))))
    if angle > tolerance_deg:
        raise ObliqueViewError(
            f"{view_name} is oblique to the volume ({angle:.1f} degrees from its nearest voxel plane). "
            "MultiTurnSeg segments axial, coronal or sagittal slices of the volume as stored: "
            "reset the view orientation (view menu > Reset orientation, or 'Rotate to volume plane') and try again."
        )
    patient_axis = imaging.patient_axis_mapping(volume)[best][0]
    return AXIS_OF_PATIENT_AXIS[patient_axis]


# ---------------------------------------------------------------------------
# Chat display

JCM_LOW_THRESHOLD = 0.6
"""Scores at or below this are flagged (the official JCM refines at <= 0.6)."""

REFERENCE_AUTO = "auto"
REFERENCE_NONE = "none"


def color_hex(color: Sequence[float]) -> str:
    """(r, g, b) in 0..1 as ``#rrggbb``."""
    r, g, b = (max(0, min(255, int(round(float(c) * 255)))) for c in color[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def jcm_text(score: Optional[float], refined: bool = False) -> Tuple[str, bool, str]:
    """(cell text, is_low, tooltip) for a turn's JCM score."""
    if score is None:
        return ("-", False, "JCM did not run on this turn (stage-1 model or JCM off).")
    low = score <= JCM_LOW_THRESHOLD
    text = f"{score:.2f}"
    tip = f"JCM quality score {score:.3f}"
    if refined:
        tip += "; the model corrected its answer (score at or below the threshold)"
    if low:
        text += " (low)"
        tip += f". Scores at or below {JCM_LOW_THRESHOLD} are flagged: check this segment carefully."
    return (text, low, tip)


def reference_text(reference) -> str:
    """How a turn's reference is shown ("-" for none)."""
    return "-" if reference is None else reference.describe()


# ---------------------------------------------------------------------------
# Error messages shown in the panel


def error_message(exc: BaseException) -> str:
    """One user-facing sentence for an error raised while running a turn."""
    from MultiTurnSegLib.errors import BackendError, InferenceError, ModelLoadError, MultiTurnSegError, ReferenceResolutionError

    text = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, ReferenceResolutionError):
        return f"Reference problem: {text}"
    if isinstance(exc, BackendError):
        return f"Worker problem: {text}"
    if isinstance(exc, ModelLoadError):
        return f"Model problem: {text}"
    if isinstance(exc, InferenceError):
        return f"The model failed on this turn: {text}"
    if isinstance(exc, MultiTurnSegError):
        return text
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return (
            "Out of memory while running the turn. Close other GPU programs, use a smaller device map or 4-bit "
            f"loading, or use a remote worker. ({text})"
        )
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"Could not reach the worker: {text}"
    return f"Unexpected error ({exc.__class__.__name__}): {text}"


# ---------------------------------------------------------------------------
# Background work


class Cancelled(Exception):
    """Raised inside a background task's progress callback after cancel()."""


class BackgroundTask:
    """Runs ``fn(progress)`` in a daemon thread; the GUI polls it with a timer.

    ``progress(stage, fraction)`` may be called by ``fn`` from its thread; it
    raises :class:`Cancelled` once :meth:`cancel` was called, so a backend that
    reports progress stops at its next step. A backend that does not report
    keeps running, but its result is discarded (``cancelled`` is True).

    Only :meth:`poll` / the attributes are read from the GUI thread; ``fn``
    must not touch Qt or MRML.
    """

    def __init__(
        self, fn: Callable[[Callable[[str, float], None]], object], name: str = "MultiTurnSeg turn", kind: str = ""
    ):
        self._fn = fn
        self.kind = kind  # what the task does ("turn", "propagation", "test-connection"): how its result is applied
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.stage = "starting"
        self.fraction = 0.0
        self.result = None
        self.error: Optional[BaseException] = None
        self.started = None
        self.finished = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _progress(self, stage: str, fraction: float) -> None:
        with self._lock:
            self.stage = str(stage)
            try:
                self.fraction = max(0.0, min(1.0, float(fraction)))
            except (TypeError, ValueError):
                pass
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")

    def _run(self) -> None:
        try:
            self.result = self._fn(self._progress)
        except BaseException as exc:  # reported to the GUI thread, never lost
            self.error = exc
        finally:
            self.finished = time.monotonic()
            self._done.set()

    def start(self) -> "BackgroundTask":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def poll(self) -> Tuple[str, float, float]:
        """(stage, fraction, elapsed seconds) as last reported."""
        with self._lock:
            stage, fraction = self.stage, self.fraction
        elapsed = (self.finished or time.monotonic()) - (self.started or time.monotonic())
        return stage, fraction, elapsed


# ---------------------------------------------------------------------------
# Scene storage: names of parameters and segment tags

PARAMETER_CONVERSATIONS = "Conversations"  # conversations_to_json_text: every conversation (one per slice)
PARAMETER_CONVERSATION = "Conversation"  # before per-slice conversations: one conversation_to_json_text (read only)
PARAMETER_PROPAGATION = "Propagation"  # propagation_records_text: the last propagation of each conversation
PARAMETER_NAMES = (
    "SliceView",
    "WindowPreset",
    "BackendKind",
    "ModelPath",
    "Device",
    "WorkerUrl",
    "JcmPolicy",
    PARAMETER_CONVERSATIONS,
    PARAMETER_PROPAGATION,
)
REFERENCE_INPUT_VOLUME = "InputVolume"
REFERENCE_SEGMENTATION = "Segmentation"


# ---------------------------------------------------------------------------
# Conversations: one per slice, all stored in the parameter node


def conversations_to_json_text(conversations: Sequence) -> str:
    """Parameter text of several library Conversations (a JSON list of ``conversation_to_json``)."""
    from MultiTurnSegLib.conversation import conversation_to_json

    return json.dumps([conversation_to_json(c) for c in conversations], separators=(",", ":"))


def conversations_from_json_text(text: Optional[str], legacy: Optional[str] = None) -> Tuple[list, List[str]]:
    """``(conversations, problems)`` from :func:`conversations_to_json_text` text.

    ``legacy``: the single-conversation parameter of older scenes, read when ``text`` is empty.
    An unreadable entry is left out and described in ``problems``; the others are kept.
    Conversations with the same id as an earlier one are left out too.
    """
    conversations, problems, seen = [], [], set()
    if not text and not legacy:
        return conversations, problems  # nothing stored: the library need not be installed yet
    from MultiTurnSegLib.conversation import conversation_from_json, conversation_from_json_text

    if not text:
        if legacy:
            try:
                conversations.append(conversation_from_json_text(legacy))
            except Exception as exc:
                problems.append(f"the stored conversation cannot be read ({exc})")
        return conversations, problems
    try:
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ValueError("not a list")
    except ValueError as exc:
        return [], [f"the stored conversations cannot be read ({exc})"]
    for number, entry in enumerate(entries, 1):
        try:
            conversation = conversation_from_json(entry)
        except Exception as exc:
            problems.append(f"stored conversation {number} cannot be read ({exc})")
            continue
        if conversation.id in seen:
            problems.append(f"stored conversation {number} repeats conversation {conversation.id}")
            continue
        seen.add(conversation.id)
        conversations.append(conversation)
    return conversations, problems


def conversation_slices_text(conversations: Sequence, current=None) -> str:
    """How the conversations of a volume are summed up: "axial 17 (3), axial 20 (1)" ordered by axis, slice."""
    items = sorted(conversations, key=lambda c: (c.axis, c.slice_index))
    return ", ".join(f"{c.axis} {c.slice_index} ({len(c.turns)})" + (" *" if c is current else "") for c in items)


# ---------------------------------------------------------------------------
# Propagation (the conversation replayed on a range of slices)

PROPAGATION_MARGIN = 5
"""The default range is the conversation's slice plus/minus this many slices (clamped to the volume)."""


def default_propagation_range(slice_index: int, slice_count: int, margin: int = PROPAGATION_MARGIN) -> Tuple[int, int]:
    """``(first, last)`` (inclusive) around ``slice_index``, clamped to ``0..slice_count - 1``."""
    if slice_count <= 0:
        return (0, 0)
    last = int(slice_count) - 1
    index = max(0, min(int(slice_index), last))
    return (max(0, index - int(margin)), min(last, index + int(margin)))


def propagation_record(
    conversation_id: str,
    axis: str,
    source_slice: int,
    first: int,
    last: int,
    slices: Sequence[int],
    rounds: int,
    flagged: Sequence[Tuple[int, int, Optional[float]]] = (),
) -> str:
    """The parameter-node text describing a propagation written into a conversation's segments."""
    return json.dumps(
        {
            "conversation": str(conversation_id),
            "axis": str(axis),
            "source": int(source_slice),
            "first": int(first),
            "last": int(last),
            "slices": [int(k) for k in slices],
            "rounds": int(rounds),
            "flagged": [[int(k), int(r), None if s is None else float(s)] for k, r, s in flagged],
        },
        separators=(",", ":"),
    )


def parse_propagation_record(text: Optional[str]) -> Optional[dict]:
    """The dict of :func:`propagation_record` text, or None when empty or unreadable (never raises)."""
    if not text:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            return None
        record["conversation"] = str(record["conversation"])
        record["axis"] = str(record["axis"])
        for key in ("source", "first", "last", "rounds"):
            record[key] = int(record[key])
        record["slices"] = [int(k) for k in record.get("slices", [])]
        record["flagged"] = [
            (int(k), int(r), None if s is None else float(s)) for k, r, s in record.get("flagged", [])
        ]
    except (ValueError, TypeError, KeyError):
        return None
    return record


def propagation_records(text: Optional[str]) -> Dict[str, dict]:
    """{conversation id: :func:`parse_propagation_record` dict} of the propagation parameter (never raises).

    Reads :func:`propagation_records_text` (a JSON list) and the single record older scenes stored.
    """
    if not text:
        return {}
    try:
        entries = json.loads(text)
    except ValueError:
        return {}
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        return {}
    records = {}
    for entry in entries:
        record = parse_propagation_record(json.dumps(entry)) if isinstance(entry, dict) else None
        if record is not None:
            records[record["conversation"]] = record
    return records


def propagation_records_text(records: Dict[str, object]) -> str:
    """Parameter text of {conversation id: :func:`propagation_record` text or parsed dict}; empty ones are left out."""
    entries = [json.loads(value) if isinstance(value, str) else value for _id, value in sorted(records.items()) if value]
    return json.dumps(entries, separators=(",", ":")) if entries else ""


def truncated_propagation_record(record: Optional[dict], rounds: int) -> Optional[str]:
    """After undo: the record text for the first ``rounds`` rounds ("" when none are left).

    None when ``record`` (a :func:`parse_propagation_record` dict) needs no change, i.e. covers at
    most ``rounds`` rounds: a round added after the propagation must not pass for propagated.
    """
    if record is None or record["rounds"] <= rounds:
        return None
    if rounds <= 0:
        return ""
    flagged = [item for item in record["flagged"] if item[1] <= rounds]
    return propagation_record(
        record["conversation"], record["axis"], record["source"], record["first"], record["last"],
        record["slices"], rounds, flagged,
    )


def worker_info_text(info) -> str:
    """One line about a worker's model, from its info() answer."""
    if not isinstance(info, dict):
        return str(info)[:300]
    keys = ("model", "stage", "device", "dtype", "jcm_available", "version")
    parts = [f"{k}: {info[k]}" for k in keys if k in info]
    return "; ".join(parts) if parts else json.dumps(info, default=str)[:300]


def flagged_text(flagged: Sequence[Tuple[int, int, Optional[float]]], limit: int = 12) -> str:
    """``slice 12 R2 (0.41), slice 14 R1 (0.55)``: the answers the JCM head corrected ("" when none)."""
    items = []
    for k, r, score in list(flagged)[:limit]:
        items.append(f"slice {k} R{r}" + ("" if score is None else f" ({score:.2f})"))
    if len(flagged) > limit:
        items.append(f"and {len(flagged) - limit} more")
    return ", ".join(items)
