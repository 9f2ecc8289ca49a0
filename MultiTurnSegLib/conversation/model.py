"""Turns, references and conversations: the data every front end shares.

A conversation lives on one slice of one volume (a 2D model sees one slice at a
time). Rounds are 1-based for users: round 1 is the first turn and its segment
is named ``R1 ...``. Each turn keeps the mask it referred to *as the model saw
it* (``reference_mask``), so the conversation can be replayed exactly and a
request to a remote worker is self-contained.

numpy only; no Slicer, no torch.
"""

from __future__ import annotations

import datetime as _dt
import math
import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import numpy as np

from ..backends.base import TurnSpec
from ..errors import InputError, ReferenceResolutionError

Color = Tuple[float, float, float]
Window = Union[None, str, Tuple[float, float]]


def now_iso() -> str:
    """The current time as an ISO 8601 string in UTC (microseconds kept)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def as_mask(value, shape: Optional[Tuple[int, int]] = None, *, what: str = "mask") -> np.ndarray:
    """``value`` as a fresh (H, W) bool array; InputError if it is not 2D or not ``shape``."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # pragma: no cover - numpy rarely refuses
        raise InputError(f"the {what} is not an array: {exc}") from exc
    if array.ndim != 2:
        raise InputError(f"the {what} must be a 2D (rows, columns) array; got shape {tuple(array.shape)}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise InputError(
            f"the {what} has shape {tuple(array.shape)} but this slice is {shape[0]} x {shape[1]} (rows x columns)"
        )
    if array.dtype == bool:
        return array.copy()
    if not (np.issubdtype(array.dtype, np.number)):
        raise InputError(f"the {what} must be boolean or numeric; got dtype {array.dtype}")
    return array != 0


@dataclass(frozen=True)
class Reference:
    """What a turn refers to: an earlier round (1-based) or a segment by name."""

    kind: str  # "round" | "segment"
    round: Optional[int] = None
    segment: Optional[str] = None

    def __post_init__(self):
        if self.kind == "round":
            if not _is_int(self.round) or self.round < 1:
                raise InputError(f"a round reference needs a round number >= 1; got {self.round!r}")
            if self.segment is not None:
                raise InputError("a round reference cannot also name a segment")
            object.__setattr__(self, "round", int(self.round))
        elif self.kind == "segment":
            if not isinstance(self.segment, str) or not self.segment.strip():
                raise InputError(f"a segment reference needs a segment name; got {self.segment!r}")
            if self.round is not None:
                raise InputError("a segment reference cannot also name a round")
        else:
            raise InputError(f"a reference is to a 'round' or a 'segment'; got kind {self.kind!r}")

    @classmethod
    def to_round(cls, round_number: int) -> "Reference":
        return cls("round", round=round_number)

    @classmethod
    def to_segment(cls, name: str) -> "Reference":
        return cls("segment", segment=name)

    def describe(self) -> str:
        """Short human text: ``round 2`` or ``segment 'Liver'``."""
        return f"round {self.round}" if self.kind == "round" else f"segment '{self.segment}'"

    def __str__(self) -> str:
        return self.describe()


@dataclass(eq=False)
class Turn:
    """One finished turn of a conversation.

    round:           1-based round number.
    prompt:          the user's text as fed to the model.
    answer:          the assistant text fed to the model (contains "[SEG]").
    reference:       what the prompt referred to, or None.
    reference_mask:  (H, W) bool mask the model got as reference when the turn
                     ran (None exactly when ``reference`` is None).
    mask:            (H, W) bool result.
    jcm_score:       JCM quality score in [0, 1], None when JCM did not run.
    jcm_refined:     the correction MLP replaced the [SEG] token.
    timings:         stage name -> seconds.
    segment_name:    name of the segment this turn became (``R2 lesion ...``).
    color:           (r, g, b) in 0..1.
    created:         ISO 8601 time the turn ran.
    """

    round: int
    prompt: str
    answer: str
    reference: Optional[Reference]
    reference_mask: Optional[np.ndarray]
    mask: np.ndarray
    jcm_score: Optional[float] = None
    jcm_refined: bool = False
    timings: dict = field(default_factory=dict)
    segment_name: str = ""
    color: Color = (1.0, 0.0, 0.0)
    created: str = field(default_factory=now_iso)

    def __eq__(self, other):
        if not isinstance(other, Turn):
            return NotImplemented
        return turns_equal(self, other)

    __hash__ = None  # mutable

    def spec(self) -> TurnSpec:
        """This turn as fed to the model (for the history of later turns)."""
        return TurnSpec(prompt=self.prompt, answer=self.answer, reference_mask=self.reference_mask)

    def validate(self, image_size: Optional[Tuple[int, int]] = None) -> None:
        """Raise InputError if a field has the wrong type or shape."""
        if not _is_int(self.round) or self.round < 1:
            raise InputError(f"a turn's round must be an integer >= 1; got {self.round!r}")
        if not isinstance(self.prompt, str):
            raise InputError("a turn's prompt must be text")
        if not isinstance(self.answer, str):
            raise InputError("a turn's answer must be text")
        if self.reference is not None and not isinstance(self.reference, Reference):
            raise InputError("a turn's reference must be a Reference or None")
        if (self.reference is None) != (self.reference_mask is None):
            raise InputError(
                f"round {self.round}: a reference mask is stored exactly when the turn has a reference"
            )
        shape = tuple(image_size) if image_size is not None else None
        for name, mask in (("mask", self.mask), ("reference mask", self.reference_mask)):
            if mask is None:
                continue
            if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.ndim != 2:
                raise InputError(f"round {self.round}: the {name} must be a 2D bool array")
            if shape is not None and mask.shape != shape:
                raise InputError(
                    f"round {self.round}: the {name} has shape {mask.shape}, the conversation's slice is {shape}"
                )
        if self.jcm_score is not None and (not _is_number(self.jcm_score) or not math.isfinite(self.jcm_score)):
            raise InputError(f"round {self.round}: the JCM score must be a finite number or None")
        if not isinstance(self.jcm_refined, (bool, np.bool_)):
            raise InputError(f"round {self.round}: jcm_refined must be true or false")
        if not isinstance(self.timings, dict) or not all(
            isinstance(k, str) and _is_number(v) and math.isfinite(v) for k, v in self.timings.items()
        ):
            raise InputError(f"round {self.round}: timings must map stage names to seconds")
        if not isinstance(self.segment_name, str):
            raise InputError(f"round {self.round}: the segment name must be text")
        if (
            not isinstance(self.color, (tuple, list))
            or len(self.color) != 3
            or not all(_is_number(c) and 0.0 <= c <= 1.0 for c in self.color)
        ):
            raise InputError(f"round {self.round}: the colour must be three numbers in 0..1")
        if not isinstance(self.created, str):
            raise InputError(f"round {self.round}: the creation time must be text")


def _check_window(window) -> Window:
    if window is None or isinstance(window, str):
        return window
    if (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(_is_number(v) and math.isfinite(v) for v in window)
    ):
        return (float(window[0]), float(window[1]))
    raise InputError(f"the window must be a preset name, a (width, level) pair or None; got {window!r}")


@dataclass(eq=False)
class Conversation:
    """A conversation on one slice.

    volume:      an identifier of the volume (file name or Slicer node id; no patient data).
    axis:        the slicing axis, as ``imaging`` names it.
    slice_index: index of the slice along ``axis``.
    image_size:  (H, W) of the slice image the model sees.
    window:      display window used to make the 8-bit image: a preset name ("auto", "abdomen", ...)
                 or (width, level) as in ``imaging.parse_window``; None if unknown.
    turns:       finished turns, round 1 first.
    id:          unique identifier (keeps conversations on different slices apart).
    created:     ISO 8601 creation time.
    """

    volume: str
    axis: str
    slice_index: int
    image_size: Tuple[int, int]
    window: Window = None
    turns: List[Turn] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=now_iso)

    def __post_init__(self):
        if not isinstance(self.volume, str):
            raise InputError("the volume identifier must be text")
        if not isinstance(self.axis, str) or not self.axis:
            raise InputError(f"the axis must be a name; got {self.axis!r}")
        if not _is_int(self.slice_index) or self.slice_index < 0:
            raise InputError(f"the slice index must be an integer >= 0; got {self.slice_index!r}")
        self.slice_index = int(self.slice_index)
        size = self.image_size
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(_is_int(v) and v > 0 for v in size)
        ):
            raise InputError(f"the image size must be (rows, columns), both > 0; got {size!r}")
        self.image_size = (int(size[0]), int(size[1]))
        self.window = _check_window(self.window)
        if not isinstance(self.id, str) or not self.id:
            raise InputError("the conversation id must be non-empty text")
        turns = list(self.turns)
        self.turns = []
        for turn in turns:
            self.append(turn)

    def __eq__(self, other):
        if not isinstance(other, Conversation):
            return NotImplemented
        return conversations_equal(self, other)

    __hash__ = None  # mutable

    # -- turns ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.turns)

    @property
    def next_round(self) -> int:
        return len(self.turns) + 1

    @property
    def rounds(self) -> List[int]:
        return [t.round for t in self.turns]

    @property
    def last_turn(self) -> Optional[Turn]:
        return self.turns[-1] if self.turns else None

    def turn(self, round_number: int) -> Turn:
        """The turn of ``round_number`` (1-based); ReferenceResolutionError if there is none."""
        if _is_int(round_number) and 1 <= round_number <= len(self.turns):
            return self.turns[int(round_number) - 1]
        raise ReferenceResolutionError(f"there is no round {round_number}; {self.describe_rounds()}")

    def append(self, turn: Turn) -> None:
        """Add a finished turn; its round must be the next one and its masks the slice's size."""
        if not isinstance(turn, Turn):
            raise InputError("only Turn objects can be added to a conversation")
        turn.validate(self.image_size)
        if turn.round != self.next_round:
            raise InputError(f"the next turn must be round {self.next_round}; got round {turn.round}")
        if turn.reference is not None and turn.reference.kind == "round" and turn.reference.round >= turn.round:
            raise InputError(f"round {turn.round} cannot refer to round {turn.reference.round} (not earlier)")
        self.turns.append(turn)

    def undo(self) -> Turn:
        """Remove and return the last turn; InputError when there is none."""
        if not self.turns:
            raise InputError("there is nothing to undo: the conversation has no turns")
        return self.turns.pop()

    def clear(self) -> List[Turn]:
        """Remove all turns and return them."""
        turns, self.turns = self.turns, []
        return turns

    def history_specs(self) -> List[TurnSpec]:
        """Every turn as it was fed to the model (prompt, answer, reference mask)."""
        return [t.spec() for t in self.turns]

    def describe_rounds(self) -> str:
        """``this conversation has rounds 1–3 (R1 liver, R2 ..., R3 ...)`` or ``... has no rounds yet``."""
        if not self.turns:
            return "this conversation has no rounds yet"
        names = ", ".join(t.segment_name or f"R{t.round}" for t in self.turns)
        if len(self.turns) == 1:
            return f"this conversation has round 1 only ({names})"
        return f"this conversation has rounds 1\u2013{len(self.turns)} ({names})"

    def copy(self) -> "Conversation":
        """A deep copy (masks copied)."""
        from .serialization import conversation_from_json, conversation_to_json

        return conversation_from_json(conversation_to_json(self))


def turns_equal(a: Turn, b: Turn) -> bool:
    """Field-by-field equality of two turns, comparing masks by value (also ``a == b``)."""

    def masks_equal(x, y):
        if x is None or y is None:
            return x is None and y is None
        return x.shape == y.shape and bool(np.array_equal(x, y))

    return (
        a.round == b.round
        and a.prompt == b.prompt
        and a.answer == b.answer
        and a.reference == b.reference
        and masks_equal(a.reference_mask, b.reference_mask)
        and masks_equal(a.mask, b.mask)
        and a.jcm_score == b.jcm_score
        and bool(a.jcm_refined) == bool(b.jcm_refined)
        and a.timings == b.timings
        and a.segment_name == b.segment_name
        and tuple(a.color) == tuple(b.color)
        and a.created == b.created
    )


def conversations_equal(a: Conversation, b: Conversation) -> bool:
    """Equality of two conversations including every turn field and mask values (also ``a == b``)."""
    return (
        a.id == b.id
        and a.volume == b.volume
        and a.axis == b.axis
        and a.slice_index == b.slice_index
        and tuple(a.image_size) == tuple(b.image_size)
        and a.window == b.window
        and a.created == b.created
        and len(a.turns) == len(b.turns)
        and all(turns_equal(x, y) for x, y in zip(a.turns, b.turns))
    )

