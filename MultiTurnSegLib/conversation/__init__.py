"""Conversations: turns, references between rounds, JSON form, and running turns.

* data model (model.py): :class:`Reference`, :class:`Turn`, :class:`Conversation`
* references (references.py): :func:`resolve_reference` (English and Chinese)
* names and colours (naming.py): :func:`segment_name_for`, :func:`segment_color_for`
* JSON and tags (serialization.py): :func:`conversation_to_json` /
  :func:`conversation_from_json`, :func:`save_conversation` /
  :func:`load_conversation`, :func:`encode_for_tag` / :func:`decode_from_tag`
* running turns (session.py): :class:`ChatSession`
* segments (segments.py): :func:`conversation_segments`,
  :func:`conversation_from_segmentation`, :func:`segment_tags`
* 3D (propagation.py): :func:`propagate`, :func:`propagated_segments`

numpy only at import time (the segment helpers import ``imaging`` and
``segmentation_io`` when called).
"""

from .model import Conversation, Reference, Turn, conversations_equal, turns_equal
from .naming import PALETTE, describe_prompt, segment_color_for, segment_name_for
from .references import chinese_number, resolve_reference
from .serialization import (
    FORMAT_NAME,
    FORMAT_VERSION,
    conversation_from_json,
    conversation_from_json_text,
    conversation_to_json,
    conversation_to_json_text,
    decode_from_tag,
    decode_mask,
    encode_for_tag,
    encode_mask,
    load_conversation,
    save_conversation,
)
from .session import ChatSession
from .propagation import (
    PropagationCancelled,
    PropagationError,
    PropagationResult,
    parse_slice_range,
    propagate,
    propagated_segments,
    propagation_slices,
)
from .segments import (
    CONVERSATION_TAG,
    ROUND_TAG,
    TURN_TAG,
    conversation_from_segmentation,
    conversation_segments,
    conversations_from_segmentation,
    conversations_from_tagged,
    segment_id_for,
    segment_tags,
)

__all__ = [
    "CONVERSATION_TAG",
    "ChatSession",
    "Conversation",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PALETTE",
    "PropagationCancelled",
    "PropagationError",
    "PropagationResult",
    "ROUND_TAG",
    "Reference",
    "TURN_TAG",
    "Turn",
    "chinese_number",
    "conversation_from_json",
    "conversation_from_json_text",
    "conversation_from_segmentation",
    "conversation_segments",
    "conversation_to_json",
    "conversation_to_json_text",
    "conversations_equal",
    "conversations_from_segmentation",
    "conversations_from_tagged",
    "decode_from_tag",
    "decode_mask",
    "describe_prompt",
    "encode_for_tag",
    "encode_mask",
    "load_conversation",
    "parse_slice_range",
    "propagate",
    "propagated_segments",
    "propagation_slices",
    "resolve_reference",
    "save_conversation",
    "segment_color_for",
    "segment_id_for",
    "segment_name_for",
    "segment_tags",
    "turns_equal",
]
