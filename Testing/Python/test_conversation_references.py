"""Which earlier result a prompt refers to (English and Chinese), and every error case."""

from __future__ import annotations

import numpy as np
import pytest

from MultiTurnSegLib.conversation import (
    Conversation,
    Reference,
    Turn,
    chinese_number,
    resolve_reference,
    segment_color_for,
    segment_name_for,
)
from MultiTurnSegLib.conversation.serialization import conversation_to_json
from MultiTurnSegLib.errors import InputError, ReferenceResolutionError

SIZE = (6, 7)


def make_conversation(prompts, size=SIZE) -> Conversation:
    conv = Conversation(volume="phantom.nrrd", axis="axial", slice_index=2, image_size=size)
    for i, prompt in enumerate(prompts, start=1):
        mask = np.zeros(size, dtype=bool)
        mask[i % size[0], : i + 1] = True
        ref = Reference.to_round(i - 1) if i > 1 else None
        conv.append(
            Turn(
                round=i,
                prompt=prompt,
                answer="Sure, [SEG].",
                reference=ref,
                reference_mask=None if ref is None else conv.turns[-1].mask.copy(),
                mask=mask,
                segment_name=segment_name_for(i, prompt),
                color=segment_color_for(i),
            )
        )
    return conv


THREE = ["Segment the liver.", "Segment the lesion inside round 1.", "Segment the vessel next to it."]
EMPTY: list = []

R = Reference.to_round
S = Reference.to_segment

# (prompt, expected) with a 3-round conversation and no extra segments.
ENGLISH_CASES = [
    ("segment the liver", None),
    ("Segment the spleen in this abdominal CT slice.", None),
    ("segment the lesion inside round 1", R(1)),
    ("segment the lesion inside Round 2", R(2)),
    ("segment the lesion inside ROUND 3.", R(3)),
    ("inside round #2", R(2)),
    ("inside round no. 2", R(2)),
    ("inside round number 2", R(2)),
    ("inside round2", R(2)),
    ("inside round two", R(2)),
    ("in round one", R(1)),
    ("the vessel near the 2nd round", R(2)),
    ("the vessel near the second round", R(2)),
    ("the vessel near the first round", R(1)),
    ("the vessel near the 3rd round", R(3)),
    ("the vessel near the third result", R(3)),
    ("the area under the first output", R(1)),
    ("what is inside instance 2", R(2)),
    ("inside instance #1", R(1)),
    ("the lesion in turn 2", R(2)),
    ("the output of round 2", R(2)),
    ("posterior to result 1", R(1)),
    ("the lesion inside R2", R(2)),
    ("the lesion inside r1", R(1)),
    ("the lesion inside R2's border", R(2)),
    ("segment its border", R(3)),
    ("Segment the lesion within its boundary", R(3)),
    ("segment it again", R(3)),
    ("segment the vessel next to it", R(3)),
    ("segment the vessel next to it.", R(3)),
    ("Segment the organ located posterior to the previous output.", R(3)),
    ("Segment the structure medial to the previous output.", R(3)),
    ("the previous result", R(3)),
    ("the previous segmentation", R(3)),
    ("the previous mask", R(3)),
    ("the previous round", R(3)),
    ("the prior result", R(3)),
    ("the last one", R(3)),
    ("the last round", R(3)),
    ("the latest output", R(3)),
    ("the most recent segmentation", R(3)),
    ("the previously segmented region", R(3)),
    ("the lesion in the preceding mask", R(3)),
    # pronouns defer to an explicitly named round
    ("the lesion inside round 1 and its border", R(1)),
    ("the part of round 2 next to it", R(2)),
    # the same round twice is not ambiguous
    ("inside round 2, i.e. R2", R(2)),
    ("the previous output (round 3)", R(3)),
    # "it" inside words and non-referring "it" do not count
    ("segment the posterior wall", None),
    ("segment the item with the iterative edge", None),
    ("segment the liver if it is visible", None),
    ("Is it possible to segment the spleen?", None),
    ("it's the spleen I want", None),
    ("segment the kidney, it should be bright", None),
    ("segment the quadrant", None),
    # "its" pointing to something named in the same prompt
    ("segment the spleen and its hilum", None),
    ("segment the kidney with its vessels", None),
    ("segment the kidney including its pelvis", None),
    ("segment the aorta along with its branches", None),
    # "round" as an adjective / unrelated numbers
    ("segment the round 2 cm lesion", None),
    ("segment the round 3mm nodule", None),
    ("segment the round one", None),
    ("segment the T2 hyperintense lesion", None),
    ("segment the last rib", None),
    ("segment vertebra L2", None),
]

CHINESE_CASES = [
    ("分割肝脏", None),
    ("分割第1轮中的病灶", R(1)),
    ("分割第2轮中的病灶", R(2)),
    ("分割第 2 轮中的病灶", R(2)),
    ("分割第２轮中的病灶", R(2)),  # full-width digit
    ("分割第二轮中的病灶", R(2)),
    ("分割第三轮旁边的血管", R(3)),
    ("分割第一回合的结果内的病灶", R(1)),
    ("分割第2个结果中的病灶", R(2)),
    ("分割第二次分割的区域", R(2)),
    ("分割上一轮中的病灶", R(3)),
    ("分割上一个结果中的病灶", R(3)),
    ("分割前一轮的病灶", R(3)),
    ("分割上轮结果附近的血管", R(3)),
    ("分割之前的结果内的病灶", R(3)),
    ("分割它的边界", R(3)),
    ("分割它内部的病灶", R(3)),
    ("分割实例2中的病灶", R(2)),
    ("分割实例 1 中的病灶", R(1)),
    ("分割实例二中的病灶", R(2)),
    ("分割R2中的病灶", R(2)),
    ("分割其它器官", None),  # 其它 = "other", not "it"
    ("分割脾脏和它的血管", None),  # "its" points inside the prompt
    ("分割第一轮中的病灶和它的边界", R(1)),
]


@pytest.fixture(scope="module")
def three():
    return make_conversation(THREE)


@pytest.mark.parametrize("prompt, expected", ENGLISH_CASES + CHINESE_CASES)
def test_reference_phrasings(three, prompt, expected):
    assert resolve_reference(prompt, three) == expected


@pytest.mark.parametrize(
    "text, value",
    [("一", 1), ("二", 2), ("两", 2), ("十", 10), ("十二", 12), ("二十", 20), ("二十三", 23), ("一百零五", 105), ("7", 7)],
)
def test_chinese_numbers(text, value):
    assert chinese_number(text) == value


def test_round_twelve_in_chinese():
    conv = make_conversation([f"segment structure {i}" for i in range(1, 13)])
    assert resolve_reference("分割第十二轮中的病灶", conv) == R(12)
    assert resolve_reference("the lesion in round twelve", conv) == R(12)
    assert resolve_reference("the lesion in the 12th round", conv) == R(12)
    assert resolve_reference("the lesion in R12", conv) == R(12)
    assert resolve_reference("the lesion in R1", conv) == R(1)  # R1 does not match inside R12


# (prompt, prior prompts, fragments the message must contain)
ERROR_CASES = [
    ("segment it", EMPTY, ["first round"]),
    ("segment its border", EMPTY, ["first round"]),
    ("the previous output", EMPTY, ["first round"]),
    ("the lesion inside the previous result", EMPTY, ["first round"]),
    ("分割上一轮中的病灶", EMPTY, ["first round"]),
    ("分割它的边界", EMPTY, ["first round"]),
    ("the lesion inside round 1", EMPTY, ["no round 1", "no rounds yet"]),
    ("the lesion inside round 4", THREE, ["no round 4", "rounds 1\u20133", "R1 liver", "R3 vessel next to it"]),
    ("the lesion inside R7", THREE, ["no round 7"]),
    ("the lesion inside the fifth round", THREE, ["no round 5"]),
    ("分割第4轮中的病灶", THREE, ["no round 4"]),
    ("分割第十二轮中的病灶", THREE, ["no round 12"]),
    ("分割实例9中的病灶", THREE, ["no round 9"]),
    ("the lesion inside round 0", THREE, ["numbered from 1"]),
    ("between round 1 and round 2", THREE, ["more than one", "round 1", "round 2"]),
    ("inside round 1 next to the previous output", THREE, ["more than one"]),
    ("分割第一轮和第二轮之间的区域", THREE, ["more than one"]),
    ("the lesion inside round 2", ["Segment the liver."], ["no round 2", "round 1 only"]),
]


@pytest.mark.parametrize("prompt, prior, fragments", ERROR_CASES)
def test_reference_errors(prompt, prior, fragments):
    conv = make_conversation(prior)
    before = conversation_to_json(conv)
    with pytest.raises(ReferenceResolutionError) as info:
        resolve_reference(prompt, conv)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert conversation_to_json(conv) == before  # nothing changes on error


def test_reference_error_is_an_input_error():
    assert issubclass(ReferenceResolutionError, InputError)


# ---------------------------------------------------------------- segment names

SEGMENTS = ["Liver", "Kidney left", "Kidney", "Tumor 1", "肝脏"]

SEGMENT_CASES = [
    # what is to be segmented is not a reference
    ("segment the liver", None),
    ("Segment the Liver.", None),
    ("please segment the kidney", None),
    ("分割肝脏", None),
    # a segment named as context is
    ("segment the lesion inside the liver", S("Liver")),
    ("segment the lesion inside the LIVER", S("Liver")),
    ("segment the lesion in liver", S("Liver")),
    ("segment the liver's left lobe", S("Liver")),
    ("segment the vessel next to kidney left", S("Kidney left")),  # longest match
    ("segment the vessel next to the kidney", S("Kidney")),
    ("the lesion in tumor 1", S("Tumor 1")),
    ("分割肝脏内的病灶", S("肝脏")),
    ("分割肝脏中的血管", S("肝脏")),
    # whole words only
    ("segment the delivered contrast", None),
    ("segment the kidneys", None),
    ("the lesion inside the livers", None),
    # names of turns: the round when the segment is not among the supplied ones
    ("the lesion inside R1 liver", R(1)),
    ("the vessel near R2 lesion inside round 1", R(2)),  # "round 1" inside the name is not a second reference
    # a segment and the round that made it are the same result
    ("the lesion inside R1 liver (round 1)", R(1)),
]


@pytest.mark.parametrize("prompt, expected", SEGMENT_CASES)
def test_segment_names(three, prompt, expected):
    assert resolve_reference(prompt, three, SEGMENTS) == expected


def test_turn_segment_supplied_by_front_end_is_a_segment_reference(three):
    names = [t.segment_name for t in three.turns] + ["Liver"]
    assert resolve_reference("the lesion inside R1 liver", three, names) == S("R1 liver")
    assert resolve_reference("the vessel near R2 lesion inside round 1", three, names) == S("R2 lesion inside round 1")
    # the segment of round 1 and round 1 itself are not two references
    assert resolve_reference("the lesion inside R1 liver from round 1", three, names) == S("R1 liver")


def test_hand_drawn_segment_in_first_round():
    # A segment drawn by hand is a valid reference from round 1 on (the model
    # then sees the slice and the segment's crop and box) ...
    conv = make_conversation(EMPTY)
    assert resolve_reference("segment the lesion inside the liver", conv, ["Liver"]) == S("Liver")
    assert resolve_reference("segment the lesion", conv, ["Liver"], explicit="Liver") == S("Liver")
    assert resolve_reference("segment the lesion inside the liver", conv, ["Liver"], explicit="none") is None
    # ... but naming the structure being segmented is no reference, and rounds do not exist yet.
    assert resolve_reference("segment the liver", conv, ["Liver"]) is None
    with pytest.raises(ReferenceResolutionError, match="first round"):
        resolve_reference("segment the lesion inside the previous output", conv, ["Liver"])
    # from round 2 on, a hand-drawn segment is a reference
    conv = make_conversation(["segment the liver"])
    assert resolve_reference("segment the lesion inside my drawing", conv, ["My drawing"]) == S("My drawing")


def test_two_segments_are_ambiguous(three):
    with pytest.raises(ReferenceResolutionError, match="more than one"):
        resolve_reference("the vessel between the liver and the kidney", three, SEGMENTS)
    with pytest.raises(ReferenceResolutionError, match="more than one"):
        resolve_reference("the lesion in the liver near round 2", three, SEGMENTS)


def test_names_differing_in_case_are_ambiguous(three):
    with pytest.raises(ReferenceResolutionError, match="upper/lower case"):
        resolve_reference("the lesion inside the liver", three, ["Liver", "liver"])


# ---------------------------------------------------------------- explicit

EXPLICIT_CASES = [
    (R(2), "segment the liver", R(2)),
    (R(1), "the lesion inside round 3", R(1)),  # explicit wins over the prompt
    (2, "segment it", R(2)),
    (np.int64(3), "whatever", R(3)),
    ("none", "segment the lesion inside round 2", None),
    ("None", "segment its border", None),
    ("Liver", "segment the lesion inside round 2", S("Liver")),
    ("liver", "x", S("Liver")),
    (S("Kidney"), "inside round 1", S("Kidney")),
    ("2", "x", R(2)),
    ("R3", "x", R(3)),
    ("round 1", "x", R(1)),
    ("R1 liver", "x", R(1)),  # a turn's segment not among the supplied names -> its round
    ("auto", "the lesion inside round 2", R(2)),  # "auto" reads the prompt
    ("", "the lesion inside round 2", R(2)),
]


@pytest.mark.parametrize("explicit, prompt, expected", EXPLICIT_CASES)
def test_explicit_reference_wins(three, explicit, prompt, expected):
    assert resolve_reference(prompt, three, SEGMENTS, explicit=explicit) == expected


@pytest.mark.parametrize(
    "explicit, fragment",
    [
        (4, "no round 4"),
        (0, "numbered from 1"),
        (R(5), "no round 5"),
        ("Spleen", "no segment named 'Spleen'"),
        (S("Spleen"), "no segment named 'Spleen'"),
        (S("2"), "no segment named '2'"),
        (True, "round number"),
        (2.5, "round number"),
    ],
)
def test_explicit_errors(three, explicit, fragment):
    with pytest.raises(ReferenceResolutionError) as info:
        resolve_reference("segment the liver", three, SEGMENTS, explicit=explicit)
    assert fragment in str(info.value)


def test_error_message_lists_other_segments(three):
    with pytest.raises(ReferenceResolutionError) as info:
        resolve_reference("x", three, ["Liver", "R1 liver"], explicit="Spleen")
    message = str(info.value)
    assert "rounds 1\u20133" in message and "'Liver'" in message
    assert "'R1 liver'" not in message.split("other segments")[1]  # turn segments are listed as rounds


def test_reference_validation():
    with pytest.raises(InputError):
        Reference("round", round=0)
    with pytest.raises(InputError):
        Reference("segment", segment=" ")
    with pytest.raises(InputError):
        Reference("box")
    assert str(R(2)) == "round 2" and str(S("Liver")) == "segment 'Liver'"


@pytest.mark.parametrize("text", ["abc", "²", "十x"])
def test_not_a_chinese_number_is_an_input_error(text):
    with pytest.raises(InputError, match="not a number"):
        chinese_number(text)
