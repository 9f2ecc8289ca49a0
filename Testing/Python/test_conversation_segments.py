"""Conversations as segments: into 3D, through .seg.nrrd, and back (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from MultiTurnSegLib.conversation import (
    CONVERSATION_TAG,
    ROUND_TAG,
    TURN_TAG,
    Conversation,
    Reference,
    Turn,
    conversation_from_segmentation,
    conversation_segments,
    conversations_equal,
    conversations_from_segmentation,
    decode_from_tag,
    encode_for_tag,
    segment_color_for,
    segment_name_for,
    segment_tags,
)
from MultiTurnSegLib.errors import ConversationFormatError, InputError
from MultiTurnSegLib.imaging import extract_mask, slice_shape, volume_from_array
from MultiTurnSegLib.segmentation_io import Segmentation, read_seg_nrrd, write_seg_nrrd

# An oblique-free but flipped/permuted grid, so a wrong axis order would show.
IJK_TO_LPS = np.array(
    [
        [0.0, 0.0, -1.5, 10.0],
        [-0.8, 0.0, 0.0, 20.0],
        [0.0, 2.0, 0.0, -5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return volume_from_array(rng.integers(-100, 100, size=(9, 6, 7)).astype(np.int16), IJK_TO_LPS, source="test")


def make_conversation(volume, axis="coronal", index=2, prompts=None, rng_seed=1):
    rng = np.random.default_rng(rng_seed)
    size = slice_shape(volume, axis)
    conv = Conversation(volume="test.nrrd", axis=axis, slice_index=index, image_size=size, window="abdomen")
    prompts = prompts or ["Segment the liver.", "Segment the lesion inside round 1.", "分割它旁边的血管", "lesion in the Drawn"]
    for r, prompt in enumerate(prompts, start=1):
        if r == 1:
            ref = None
        elif r == 4:
            ref = Reference.to_segment("Drawn")
        else:
            ref = Reference.to_round(r - 1)
        conv.append(
            Turn(
                round=r,
                prompt=prompt,
                answer="Sure, [SEG]." if r % 2 else "It is [SEG].",
                reference=ref,
                reference_mask=None if ref is None else rng.random(size) > 0.5,
                mask=rng.random(size) > 0.6,
                jcm_score=None if r == 2 else 0.25 * r,
                jcm_refined=r == 1,
                timings={"llm": 0.125 * r, "sam_decode": 1.5},
                segment_name=segment_name_for(r, prompt),
                color=segment_color_for(r),
            )
        )
    return conv


def test_segments_carry_masks_names_colours_and_tags(volume):
    conv = make_conversation(volume)
    segments = conversation_segments(conv, volume, terminology=lambda p: "Code~SCT^1^x" if "liver" in p else None)
    assert [s.name for s in segments] == [t.segment_name for t in conv.turns]
    assert [tuple(s.color) for s in segments] == [tuple(t.color) for t in conv.turns]
    assert len({s.id for s in segments}) == 4
    for seg, turn in zip(segments, conv.turns):
        assert seg.mask.shape == volume.shape and seg.mask.dtype == bool
        assert seg.mask.sum() == turn.mask.sum()  # only the conversation's slice
        assert np.array_equal(extract_mask(seg.mask, volume, conv.axis, conv.slice_index), turn.mask)
        assert seg.tags[ROUND_TAG] == str(turn.round)
        for value in seg.tags.values():
            assert "|" not in value and "\n" not in value
        assert decode_from_tag(seg.tags[CONVERSATION_TAG])["slice_index"] == conv.slice_index
        assert decode_from_tag(seg.tags[TURN_TAG])["prompt"] == turn.prompt
    assert segments[0].tags["TerminologyEntry"] == "Code~SCT^1^x"
    assert "TerminologyEntry" not in segments[1].tags


@pytest.mark.parametrize("axis, index", [("axial", 0), ("coronal", 2), ("sagittal", 6)])
def test_seg_nrrd_round_trip(tmp_path, volume, axis, index):
    conv = make_conversation(volume, axis, index)
    # Segment names must be ASCII in .seg.nrrd as written today (pynrrd); the
    # Chinese prompt itself travels in the encoded tag.
    conv.turns[2].segment_name = "R3 vessel beside it"
    seg = Segmentation.for_volume(volume)
    seg.segments.extend(conversation_segments(conv, volume))
    # a hand-drawn segment without conversation tags is ignored
    seg.add_segment("Drawn", np.ones(volume.shape, dtype=bool), (0.5, 0.5, 0.5))
    path = write_seg_nrrd(tmp_path / "chat.seg.nrrd", seg)
    back = conversation_from_segmentation(read_seg_nrrd(path), volume)
    assert conversations_equal(conv, back)
    # the volume may be left out: the segmentation's own grid is used
    assert conversations_equal(conv, conversation_from_segmentation(read_seg_nrrd(path)))


def test_edited_and_renamed_segments_come_back_as_they_are_now(volume):
    conv = make_conversation(volume)
    segments = conversation_segments(conv, volume)
    segments[0].name = "Liver (edited)"
    segments[0].color = (0.1, 0.2, 0.3)
    segments[0].mask[:] = False
    seg = Segmentation.for_volume(volume)
    seg.segments.extend(segments)
    back = conversation_from_segmentation(seg, volume)
    assert back.turns[0].segment_name == "Liver (edited)"
    assert back.turns[0].color == (0.1, 0.2, 0.3)
    assert not back.turns[0].mask.any()
    # reference masks are what the model saw, not re-read
    assert np.array_equal(back.turns[1].reference_mask, conv.turns[1].reference_mask)


def test_several_conversations(volume):
    a = make_conversation(volume, "axial", 1)
    b = make_conversation(volume, "sagittal", 3, prompts=["segment the spleen", "its hilum"], rng_seed=5)
    seg = Segmentation.for_volume(volume)
    seg.segments.extend(conversation_segments(a, volume) + conversation_segments(b, volume))
    found = conversations_from_segmentation(seg, volume)
    assert sorted(c.id for c in found) == sorted([a.id, b.id])
    with pytest.raises(ConversationFormatError, match="several conversations"):
        conversation_from_segmentation(seg, volume)
    assert conversations_equal(conversation_from_segmentation(seg, volume, conversation_id=b.id), b)
    with pytest.raises(ConversationFormatError, match="no conversation 'nope'"):
        conversation_from_segmentation(seg, volume, conversation_id="nope")


def test_no_conversation(volume):
    seg = Segmentation.for_volume(volume)
    seg.add_segment("Drawn", np.zeros(volume.shape, dtype=bool), (1, 0, 0))
    with pytest.raises(ConversationFormatError, match="no MultiTurnSeg conversation"):
        conversation_from_segmentation(seg, volume)


def test_missing_round_is_reported(volume):
    conv = make_conversation(volume)
    seg = Segmentation.for_volume(volume)
    seg.segments.extend(s for s in conversation_segments(conv, volume) if s.tags[ROUND_TAG] != "2")
    with pytest.raises(ConversationFormatError, match="rounds 1, 3, 4"):
        conversation_from_segmentation(seg, volume)


def test_corrupt_tags_are_reported(volume):
    conv = make_conversation(volume)
    segments = conversation_segments(conv, volume)
    segments[1].tags[TURN_TAG] = "mts1.garbage"
    seg = Segmentation.for_volume(volume)
    seg.segments.extend(segments)
    with pytest.raises(ConversationFormatError, match="corrupt"):
        conversation_from_segmentation(seg, volume)
    segments[1].tags[TURN_TAG] = encode_for_tag({"round": 2})
    with pytest.raises(ConversationFormatError, match="missing field 'prompt'"):
        conversation_from_segmentation(seg, volume)
    del segments[1].tags[CONVERSATION_TAG]
    with pytest.raises(ConversationFormatError, match="no MultiTurnSeg.Conversation tag"):
        conversation_from_segmentation(seg, volume)


def test_conversation_on_another_volume_is_refused(volume):
    conv = make_conversation(volume, "axial", 1)
    other = volume_from_array(np.zeros((3, 4, 5), np.int16), np.eye(4))
    with pytest.raises(InputError, match="same volume"):
        conversation_segments(conv, other)
    bad_index = make_conversation(volume, "axial", 1)
    bad_index.slice_index = 99
    with pytest.raises(InputError, match="same volume"):
        conversation_segments(bad_index, volume)


def test_terminology_with_bar_is_refused(volume):
    conv = make_conversation(volume)
    with pytest.raises(InputError, match="terminology"):
        segment_tags(conv, conv.turns[0], terminology=lambda p: "a|b")
