"""Propagation: replay a slice's conversation on other slices to get 3D segments.

MediRound is a 2D model, so "3D" here means: every turn of the conversation is
asked again, in order, on each slice of a range, and the per-slice answers are
stacked. What is replayed is the conversation's *structure*, not its masks:

* the prompts and the answer texts that were fed (teacher-forced, so a
  generated answer is not regenerated differently on every slice);
* a turn that referred to round r refers, on slice k, to round r's mask *on
  slice k*; a reference to the segment of one of the conversation's own turns
  (by name) is the same thing;
* a turn that referred to another segment (hand-drawn, edited, imported) gets
  that segment's mask on slice k from ``segment_masks(name, axis, k)``;
* a turn without a reference has none.

Each slice is an independent fresh conversation run through
:class:`ChatSession` on the backend, so a propagated slice gives exactly what
chatting on that slice with the same prompts would give. The conversation's
own slice is never recomputed: its turns' masks are used as they are (they
may have been edited, and the segments must still carry the conversation, see
:func:`propagated_segments`).

numpy only at import time (``imaging`` and ``segmentation_io`` are imported
when the functions run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from ..errors import InputError, MultiTurnSegError
from .model import Conversation, Reference, _is_int
from .session import JCM_POLICIES, ChatSession

SliceMasks = Callable[[str, str, int], Optional[np.ndarray]]
"""``segment_masks(name, axis, index)`` -> (H, W) mask of segment ``name`` on that slice, or None if unknown."""

Slices = Union[Tuple[int, int], Iterable[int]]


class PropagationError(MultiTurnSegError):
    """A turn failed on one slice of a propagation; nothing of the propagation is kept."""

    def __init__(self, message: str, slice_index: int, round_number: int):
        super().__init__(message)
        self.slice_index = slice_index
        self.round = round_number


class PropagationCancelled(MultiTurnSegError):
    """``cancel()`` returned true; ``done`` of ``total`` slices had been computed (and are dropped)."""

    def __init__(self, done: int, total: int):
        super().__init__(f"propagation cancelled after {done} of {total} slice(s); nothing was changed")
        self.done = done
        self.total = total


@dataclass
class PropagationResult:
    """What :func:`propagate` computed.

    axis:          the conversation's axis.
    source_slice:  the conversation's own slice (its masks are the turns' masks, not recomputed).
    slices:        every slice with results, ascending: the requested ones and ``source_slice``.
    masks:         ``masks[r - 1]`` is round r as a 3D bool ``[k, j, i]`` array on the volume grid,
                   empty outside ``slices``.
    jcm_scores:    slice -> per-round JCM score (None where JCM did not run).
    jcm_refined:   slice -> per-round flag: the JCM head judged the answer poor and corrected it
                   (the engine does so exactly when the score is at or below its threshold), i.e.
                   the places a reader should look at twice.
    """

    axis: str
    source_slice: int
    slices: Tuple[int, ...]
    masks: List[np.ndarray]
    jcm_scores: Dict[int, Tuple[Optional[float], ...]]
    jcm_refined: Dict[int, Tuple[bool, ...]]

    def flagged(self) -> List[Tuple[int, int, Optional[float]]]:
        """``(slice, round, score)`` of every corrected (low-scoring) answer, slice by slice."""
        return [
            (k, r, self.jcm_scores[k][r - 1])
            for k in self.slices
            for r, refined in enumerate(self.jcm_refined[k], 1)
            if refined
        ]


def parse_slice_range(text: str) -> Tuple[int, int]:
    """``"START:STOP"`` (both inclusive, 0-based) as ``(start, stop)``; InputError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text) if isinstance(text, str) else None
    if not m:
        raise InputError(f"a slice range is START:STOP with whole numbers from 0, e.g. 12:20; got {text!r}")
    return _check_range(int(m.group(1)), int(m.group(2)))


def _check_range(start: int, stop: int) -> Tuple[int, int]:
    if start > stop:
        raise InputError(f"the slice range {start}:{stop} is backwards: START must not be after STOP")
    return start, stop


def propagation_slices(volume, axis: str, slices: Slices) -> Tuple[int, ...]:
    """The slice indices ``slices`` stands for, ascending and without repeats.

    ``slices``: a ``(start, stop)`` tuple of two whole numbers means start..stop
    *inclusive* (like the CLI's START:STOP and Slicer's slice sliders); any other
    iterable (list, ``range``, numpy array) lists the indices themselves.
    InputError for anything else and for indices outside the volume.
    """
    from ..imaging import num_slices

    n = num_slices(volume, axis)
    if isinstance(slices, tuple) and len(slices) == 2 and all(_is_int(v) for v in slices):
        start, stop = _check_range(int(slices[0]), int(slices[1]))
        if start < 0 or stop >= n:
            raise InputError(
                f"the slice range {start}..{stop} goes outside the volume: the {axis} axis has {n} slices, "
                f"valid indices are 0..{n - 1}"
            )
        indices = list(range(start, stop + 1))
    elif isinstance(slices, (str, bytes)) or not isinstance(slices, Iterable):
        raise InputError(f"slices must be a (start, stop) pair or a list of slice indices; got {slices!r}")
    else:
        indices = list(slices)
    for index in indices:
        if not _is_int(index):
            raise InputError(f"slice indices must be whole numbers; got {index!r}")
        if not 0 <= index < n:
            raise InputError(
                f"slice {index} is outside the volume: the {axis} axis has {n} slices, valid indices are 0..{n - 1}"
            )
    return tuple(sorted({int(i) for i in indices}))


def _reference_plan(conversation: Conversation, segment_masks: Optional[SliceMasks]) -> List[Union[str, Reference]]:
    """Per turn, the explicit reference to give ``ChatSession.ask`` on another slice."""
    round_of_name = {}
    plan: List[Union[str, Reference]] = []
    for turn in conversation.turns:
        ref = turn.reference
        if ref is None:
            plan.append("none")  # force none: the prompt's words must not be re-read differently
        elif ref.kind == "round":
            plan.append(Reference.to_round(ref.round))
        elif ref.segment.casefold() in round_of_name:
            # One of this conversation's own segments: the structure is that round on the new slice.
            # Case-insensitive, as resolve_reference matches names.
            plan.append(Reference.to_round(round_of_name[ref.segment.casefold()]))
        elif segment_masks is None:
            raise InputError(
                f"round {turn.round} refers to segment '{ref.segment}', which this conversation did not make: "
                "to propagate it, give segment_masks(name, axis, index) returning that segment on each slice"
            )
        else:
            plan.append(Reference.to_segment(ref.segment))
        if turn.segment_name:
            round_of_name[turn.segment_name.casefold()] = turn.round
    return plan


def propagate(
    backend,
    volume,
    conversation: Conversation,
    slices: Slices,
    *,
    window=None,
    jcm: str = "always",
    segment_masks: Optional[SliceMasks] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> PropagationResult:
    """Replay ``conversation`` on every slice in ``slices`` (see the module docstring).

    window:         display window for the new slices; default the conversation's own (or "auto").
    jcm:            "always" or "off", as in :class:`ChatSession`.
    segment_masks:  needed when a turn refers to a segment the conversation did not make.
    progress:       called with ``(done, total)`` slices computed (0 first; the source slice is
                    not counted).
    cancel:         polled before every turn; when it returns true, PropagationCancelled.

    The conversation is only read. Raises InputError for bad slices or settings (before any
    turn runs) and PropagationError naming the slice and round when a turn fails.
    """
    from ..imaging import insert_mask, parse_window, render_slice
    from .segments import check_conversation_fits

    if not isinstance(conversation, Conversation):
        raise InputError("propagate needs a Conversation")
    if not conversation.turns:
        raise InputError("the conversation has no turns yet: there is nothing to propagate")
    if jcm not in JCM_POLICIES:
        raise InputError(f"the JCM policy must be one of {', '.join(JCM_POLICIES)}; got {jcm!r}")
    if segment_masks is not None and not callable(segment_masks):
        raise InputError("segment_masks must be a callable (name, axis, index) -> mask")
    check_conversation_fits(conversation, volume)
    axis, source = conversation.axis, conversation.slice_index
    indices = propagation_slices(volume, axis, slices)
    if window is None:
        window = conversation.window if conversation.window is not None else "auto"
    parse_window(window)
    plan = _reference_plan(conversation, segment_masks)
    referred = {r.segment for r in plan if isinstance(r, Reference) and r.kind == "segment"}
    turns = conversation.turns

    masks = [np.zeros(volume.shape, dtype=bool) for _ in turns]
    for mask3d, turn in zip(masks, turns):
        insert_mask(mask3d, volume, axis, source, turn.mask, value=True)
    scores = {source: tuple(t.jcm_score for t in turns)}
    refined = {source: tuple(bool(t.jcm_refined) for t in turns)}

    todo = [k for k in indices if k != source]
    total = len(todo)
    if progress is not None:
        progress(0, total)
    for done, k in enumerate(todo):
        image = render_slice(volume, axis, k, window)
        replay = Conversation(
            volume=conversation.volume, axis=axis, slice_index=k,
            image_size=conversation.image_size, window=window,
        )
        looked_up: Dict[str, Optional[np.ndarray]] = {}

        def masks_here(name, _k=k, _cache=looked_up):
            # ChatSession also looks up explicit words such as "none", and asks twice per turn
            # (resolve, then capture): ask the caller once per slice, for referred segments only.
            if name not in referred:
                return None
            if name not in _cache:
                _cache[name] = segment_masks(name, axis, _k)
            return _cache[name]

        session = ChatSession(
            backend, image, replay, segment_masks=masks_here if segment_masks is not None else None, jcm=jcm
        )
        for turn, reference in zip(turns, plan):
            if cancel is not None and cancel():
                raise PropagationCancelled(done, total)
            try:
                session.ask(turn.prompt, reference=reference, answer=turn.answer)
            except MultiTurnSegError as exc:
                raise PropagationError(
                    f"propagation stopped at {axis} slice {k}, round {turn.round} ({turn.prompt!r}): {exc}",
                    k, turn.round,
                ) from exc
        for mask3d, new in zip(masks, replay.turns):
            insert_mask(mask3d, volume, axis, k, new.mask, value=True)
        scores[k] = tuple(t.jcm_score for t in replay.turns)
        refined[k] = tuple(bool(t.jcm_refined) for t in replay.turns)
        if progress is not None:
            progress(done + 1, total)

    return PropagationResult(
        axis=axis, source_slice=source, slices=tuple(sorted(set(indices) | {source})),
        masks=masks, jcm_scores=scores, jcm_refined=refined,
    )


def propagated_segments(conversation: Conversation, volume, result: PropagationResult, terminology=None) -> list:
    """The conversation's segments (as :func:`conversation_segments` makes them) with the 3D masks of ``result``.

    Same IDs, names, colours and tags, so the conversation can still be restored from
    them (its slice holds the turns' own masks).
    """
    from .segments import check_conversation_fits, turn_segment

    check_conversation_fits(conversation, volume)
    if not isinstance(result, PropagationResult):
        raise InputError("propagated_segments needs the PropagationResult of propagate()")
    if (
        result.axis != conversation.axis
        or result.source_slice != conversation.slice_index
        or len(result.masks) != len(conversation.turns)
    ):
        raise InputError(
            f"this propagation ({len(result.masks)} rounds from {result.axis} slice {result.source_slice}) was not "
            f"made from this conversation ({len(conversation.turns)} rounds on {conversation.axis} slice "
            f"{conversation.slice_index}); propagate it again"
        )
    for mask3d in result.masks:
        if tuple(mask3d.shape) != tuple(volume.shape):
            raise InputError(f"the propagated masks are {mask3d.shape} but the volume is {volume.shape}")
    return [
        turn_segment(conversation, turn, mask3d, terminology)
        for turn, mask3d in zip(conversation.turns, result.masks)
    ]


__all__ = [
    "PropagationCancelled",
    "PropagationError",
    "PropagationResult",
    "parse_slice_range",
    "propagate",
    "propagated_segments",
    "propagation_slices",
]
