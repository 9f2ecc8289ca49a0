"""Conversations as segments (``.seg.nrrd`` / Slicer segments) and back.

Every turn becomes one segment: its mask placed on the conversation's slice of
the volume, its name and colour, and Slicer tags that carry the turn and the
conversation (encoded with :func:`encode_for_tag`, so no '|' or ':' trouble):

* ``MultiTurnSeg.Round``         the round number (plain text, for people),
* ``MultiTurnSeg.Turn``          the turn (prompt, answer, reference, reference
                                 mask, JCM score/refined, timings, ...; not its
                                 mask, which is the segment itself),
* ``MultiTurnSeg.Conversation``  the conversation header (id, volume, axis,
                                 slice index, image size, window, ...),
* ``TerminologyEntry``           when a ``terminology`` callable gives one.

Slicer keeps tags with the scene and in ``.seg.nrrd`` files, so
:func:`conversation_from_segmentation` restores the conversation: the masks are
read back from the segments on the conversation's slice (as they are now, so
edits made in the Segment Editor count), names and colours are the segments'
current ones. Segments without these tags (drawn by hand) are ignored.

``imaging`` and ``segmentation_io`` are imported when these functions run.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional

import numpy as np

from ..errors import ConversationFormatError, InputError
from ..segmentation_io.segnrrd import TERMINOLOGY_TAG  # numpy only at import, like this module
from .model import Conversation, Turn
from .serialization import (
    FORMAT_NAME,
    add_turn_checked,
    conversation_header_from_json,
    conversation_header_to_json,
    decode_from_tag,
    encode_for_tag,
    turn_from_json,
    turn_to_json,
)

ROUND_TAG = "MultiTurnSeg.Round"
TURN_TAG = "MultiTurnSeg.Turn"
CONVERSATION_TAG = "MultiTurnSeg.Conversation"

Terminology = Callable[[str], Optional[str]]


def segment_id_for(conversation: Conversation, turn: Turn) -> str:
    """A segment ID unique per conversation and round: ``MultiTurnSeg_<id8>_R<round>``."""
    return f"MultiTurnSeg_{conversation.id[:8]}_R{turn.round}"


def segment_tags(conversation: Conversation, turn: Turn, terminology: Optional[Terminology] = None) -> Dict[str, str]:
    """The Slicer segment tags that carry ``turn`` and its conversation (values have no '|')."""
    tags = {
        ROUND_TAG: str(int(turn.round)),
        TURN_TAG: encode_for_tag(turn_to_json(turn, include_mask=False)),
        CONVERSATION_TAG: encode_for_tag(conversation_header_to_json(conversation)),
    }
    if terminology is not None:
        entry = terminology(turn.prompt)
        if entry:
            entry = str(entry)
            if "|" in entry or "\n" in entry:
                raise InputError(f"the terminology entry for round {turn.round} contains '|' or a line break: {entry!r}")
            tags[TERMINOLOGY_TAG] = entry
    return tags


def conversation_segments(conversation: Conversation, volume, *, terminology: Optional[Terminology] = None) -> list:
    """One :class:`~MultiTurnSegLib.segmentation_io.Segment` per turn, on ``volume``'s grid.

    Masks are 3D bool ``[k, j, i]`` with the turn's mask on the conversation's
    slice (``imaging.insert_mask``). Raises InputError when the conversation's
    slice does not fit the volume.
    """
    from ..imaging import insert_mask

    check_conversation_fits(conversation, volume)
    segments = []
    for turn in conversation.turns:
        labelmap = np.zeros(volume.shape, dtype=bool)
        insert_mask(labelmap, volume, conversation.axis, conversation.slice_index, turn.mask, value=True)
        segments.append(turn_segment(conversation, turn, labelmap, terminology))
    return segments


def check_conversation_fits(conversation: Conversation, volume) -> None:
    """InputError unless ``conversation``'s slice exists in ``volume`` with the conversation's image size."""
    from ..imaging import num_slices, slice_shape

    axis = conversation.axis
    shape2d = tuple(slice_shape(volume, axis))
    if shape2d != tuple(conversation.image_size):
        raise InputError(
            f"the conversation is on {conversation.image_size[0]} x {conversation.image_size[1]} slices but {axis} "
            f"slices of this volume are {shape2d[0]} x {shape2d[1]}: is it the same volume?"
        )
    if conversation.slice_index >= num_slices(volume, axis):
        raise InputError(
            f"the conversation is on {axis} slice {conversation.slice_index} but the volume has "
            f"{num_slices(volume, axis)} {axis} slices: is it the same volume?"
        )


def turn_segment(conversation: Conversation, turn: Turn, mask3d: np.ndarray, terminology: Optional[Terminology] = None):
    """The segment of ``turn`` with the 3D mask ``mask3d`` (ID, name, colour and tags as for the turn)."""
    from ..segmentation_io import Segment

    return Segment(
        id=segment_id_for(conversation, turn),
        name=turn.segment_name or f"R{turn.round}",
        color=tuple(float(c) for c in turn.color),
        mask=mask3d,
        tags=segment_tags(conversation, turn, terminology),
    )


def _segment_label(segment) -> str:
    return f"segment {getattr(segment, 'name', '?')!r} (ID {getattr(segment, 'id', '?')!r})"


def conversations_from_tagged(segments: Iterable, volume) -> List[Conversation]:
    """Every conversation carried by ``segments`` (objects with ``name``, ``color``, ``tags``, 3D ``mask``).

    ``mask`` is the segment's current 3D ``[k, j, i]`` mask on ``volume``'s grid
    (a ``segmentation_io.Segment``, or what the Slicer module builds from its
    segments). Segments without MultiTurnSeg tags are skipped. Returns the
    conversations oldest first; ConversationFormatError when tags are corrupt,
    rounds repeat or are missing.
    """
    from ..imaging import extract_mask

    groups: Dict[str, dict] = {}
    for segment in segments:
        tags: Mapping[str, str] = getattr(segment, "tags", None) or {}
        if TURN_TAG not in tags:
            continue
        label = _segment_label(segment)
        if CONVERSATION_TAG not in tags:
            raise ConversationFormatError(f"{label}: has a {TURN_TAG} tag but no {CONVERSATION_TAG} tag")
        try:
            header = decode_from_tag(tags[CONVERSATION_TAG])
            turn_obj = decode_from_tag(tags[TURN_TAG])
        except ConversationFormatError as exc:
            raise ConversationFormatError(f"{label}: {exc}") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise ConversationFormatError(f"{label}: the {CONVERSATION_TAG} tag is not a MultiTurnSeg conversation")
        conv_id = header.get("id")
        group = groups.setdefault(str(conv_id), {"header": header, "items": []})
        if group["header"] != header:
            raise ConversationFormatError(
                f"{label}: segments of conversation {conv_id} disagree about the conversation "
                "(volume, axis, slice or size)"
            )
        group["items"].append((segment, turn_obj))

    conversations: List[Conversation] = []
    for conv_id, group in groups.items():
        conv = conversation_header_from_json(group["header"], f"conversation {conv_id}")
        parsed = []
        for segment, turn_obj in group["items"]:
            label = _segment_label(segment)
            try:
                mask = extract_mask(np.asarray(segment.mask), volume, conv.axis, conv.slice_index)
            except InputError as exc:
                raise ConversationFormatError(f"{label}: cannot read its mask on the conversation's slice ({exc})") from exc
            if mask.shape != conv.image_size:
                raise ConversationFormatError(
                    f"{label}: its slice is {mask.shape} but the conversation's slice was {conv.image_size}: "
                    "is this the volume the conversation was made on?"
                )
            turn = turn_from_json(turn_obj, label, mask=mask)
            # The segment as it is now: current name and colour.
            name = getattr(segment, "name", None)
            if isinstance(name, str) and name != turn.segment_name:
                turn.segment_name = name
            color = getattr(segment, "color", None)
            if color is not None:
                current = tuple(float(c) for c in color)
                if len(current) == 3 and max(abs(a - b) for a, b in zip(current, turn.color)) > 1e-4:
                    turn.color = current
            parsed.append(turn)
        parsed.sort(key=lambda t: t.round)
        rounds = [t.round for t in parsed]
        if rounds != list(range(1, len(rounds) + 1)):
            raise ConversationFormatError(
                f"conversation {conv_id} on {conv.axis} slice {conv.slice_index}: its segments hold rounds "
                f"{', '.join(map(str, rounds))}; rounds 1 to {max(rounds)} are needed (was a segment deleted "
                "or duplicated?)"
            )
        for turn in parsed:
            add_turn_checked(conv, turn)
        conversations.append(conv)
    conversations.sort(key=lambda c: (c.created, c.id))
    return conversations


def conversations_from_segmentation(segmentation, volume=None) -> List[Conversation]:
    """Every conversation stored in a :class:`~MultiTurnSegLib.segmentation_io.Segmentation`.

    ``volume`` defaults to the segmentation's own grid; when given, it must
    lie on the same grid.
    """
    from ..segmentation_io import check_geometry, volume_geometry

    if volume is None:
        volume = volume_geometry(segmentation)
    else:
        check_geometry(segmentation, volume)
    return conversations_from_tagged(segmentation.segments, volume)


def conversation_from_segmentation(segmentation, volume=None, *, conversation_id: Optional[str] = None) -> Conversation:
    """The conversation stored in ``segmentation`` (see :func:`conversation_segments`).

    With several conversations (different slices), give ``conversation_id``.
    ConversationFormatError when there is none or the choice is ambiguous.
    """
    conversations = conversations_from_segmentation(segmentation, volume)
    if conversation_id is not None:
        for conv in conversations:
            if conv.id == conversation_id:
                return conv
        raise ConversationFormatError(
            f"the segmentation holds no conversation {conversation_id!r}; it holds "
            + (", ".join(_describe(c) for c in conversations) or "none")
        )
    if not conversations:
        raise ConversationFormatError(
            "the segmentation holds no MultiTurnSeg conversation (no segment has a "
            f"{TURN_TAG} tag)"
        )
    if len(conversations) > 1:
        raise ConversationFormatError(
            "the segmentation holds several conversations: "
            + ", ".join(_describe(c) for c in conversations)
            + "; choose one by its id"
        )
    return conversations[0]


def _describe(conv: Conversation) -> str:
    return f"{conv.id} ({conv.axis} slice {conv.slice_index}, {len(conv.turns)} rounds)"
