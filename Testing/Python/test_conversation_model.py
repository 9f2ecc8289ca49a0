"""Conversation data model, undo, history as fed to the model, segment names and colours."""

from __future__ import annotations

import numpy as np
import pytest

from MultiTurnSegLib.backends.base import TurnSpec
from MultiTurnSegLib.conversation import (
    PALETTE,
    Conversation,
    Reference,
    Turn,
    segment_color_for,
    segment_name_for,
)
from MultiTurnSegLib.errors import InputError


def turn(r, size=(3, 4), ref=None, **kw):
    ref = kw.pop("reference", ref)
    mask = np.zeros(size, dtype=bool)
    mask[0, r % size[1]] = True
    defaults = dict(
        round=r,
        prompt=f"prompt {r}",
        answer="Sure, [SEG].",
        reference=ref,
        reference_mask=None if ref is None else np.ones(size, dtype=bool),
        mask=mask,
        segment_name=f"R{r} x",
        color=segment_color_for(r),
    )
    defaults.update(kw)
    return Turn(**defaults)


def conv(n=0, size=(3, 4)):
    c = Conversation(volume="ct.nrrd", axis="axial", slice_index=1, image_size=size)
    for r in range(1, n + 1):
        c.append(turn(r, size, Reference.to_round(r - 1) if r > 1 else None))
    return c


def test_history_specs_are_turns_as_fed():
    c = conv(3)
    specs = c.history_specs()
    assert [type(s) for s in specs] == [TurnSpec] * 3
    assert [s.prompt for s in specs] == ["prompt 1", "prompt 2", "prompt 3"]
    assert [s.answer for s in specs] == ["Sure, [SEG]."] * 3
    assert specs[0].reference_mask is None
    assert specs[1].reference_mask is c.turns[1].reference_mask


def test_undo_removes_and_returns_the_last_turn():
    c = conv(2)
    last = c.turns[-1]
    assert c.undo() is last
    assert c.rounds == [1] and c.next_round == 2
    c.append(turn(2))
    assert c.rounds == [1, 2]
    c.undo()
    c.undo()
    with pytest.raises(InputError, match="nothing to undo"):
        c.undo()


def test_turn_lookup_and_description():
    c = conv(3)
    assert c.turn(2) is c.turns[1]
    assert c.last_turn is c.turns[2]
    assert c.describe_rounds() == "this conversation has rounds 1\u20133 (R1 x, R2 x, R3 x)"
    assert conv(0).describe_rounds() == "this conversation has no rounds yet"
    with pytest.raises(InputError, match="no round 4"):
        c.turn(4)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (dict(round=3), "must be round 2"),
        (dict(mask=np.zeros((4, 3), bool)), "shape (4, 3)"),
        (dict(mask=np.zeros((3, 4), np.uint8)), "2D bool array"),
        (dict(reference=Reference.to_round(2)), "cannot refer to round 2"),
        (dict(reference=Reference.to_round(1), reference_mask=None), "exactly when"),
        (dict(reference_mask=np.zeros((3, 4), bool)), "exactly when"),
        (dict(jcm_score=float("nan")), "JCM score"),
        (dict(color=(1.0, 2.0, 0.0)), "colour"),
        (dict(timings={"a": "b"}), "timings"),
        (dict(prompt=None), "prompt"),
    ],
)
def test_append_validates(bad, fragment):
    c = conv(1)
    with pytest.raises(InputError) as info:
        c.append(turn(2, **bad))
    assert fragment in str(info.value)
    assert c.rounds == [1]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(image_size=(0, 3)), "image size"),
        (dict(image_size=(3,)), "image size"),
        (dict(slice_index=-1), "slice index"),
        (dict(axis=""), "axis"),
        (dict(window=(1, 2, 3)), "window"),
        (dict(volume=None), "volume"),
    ],
)
def test_conversation_validates(kwargs, fragment):
    args = dict(volume="v", axis="axial", slice_index=0, image_size=(3, 4))
    args.update(kwargs)
    with pytest.raises(InputError, match=fragment):
        Conversation(**args)


def test_copy_is_deep():
    c = conv(2)
    d = c.copy()
    d.turns[0].mask[:] = True
    assert not c.turns[0].mask.all()
    assert d.id == c.id


# ---------------------------------------------------------------- naming

NAMES = [
    (2, "Segment the lesion inside round 1", "R2 lesion inside round 1"),
    (2, "segment the lesion inside round 1.", "R2 lesion inside round 1"),
    (1, "Please segment the liver.", "R1 liver"),
    (1, "Could you please segment the liver?", "R1 liver"),
    (1, "Can you delineate a nodule in the left lung, please.", "R1 nodule in the left lung"),
    (1, "Segment the liver in this abdominal CT slice.", "R1 liver in this abdominal CT slice"),
    (3, "  segment   the\nvessel next to it!  ", "R3 vessel next to it"),
    (1, "Segment an aorta", "R1 aorta"),
    (1, "Segmental artery", "R1 Segmental artery"),  # "segment" only as a whole word
    (1, "the anterior wall", "R1 anterior wall"),
    (1, "分割肝脏。", "R1 肝脏"),
    (2, "请分割第一轮中的病灶", "R2 第一轮中的病灶"),
    (4, "segment", "R4"),
    (4, "", "R4"),
]


@pytest.mark.parametrize("round_number, prompt, expected", NAMES)
def test_segment_names(round_number, prompt, expected):
    assert segment_name_for(round_number, prompt) == expected


def test_long_names_are_shortened_at_a_word():
    name = segment_name_for(
        12, "Segment the small hypodense lesion located in the posterior segment of the right hepatic lobe"
    )
    assert len(name) <= 48
    assert name.startswith("R12 small hypodense lesion")
    assert name.endswith("...")
    assert not name[:-3].endswith(" ")


def test_names_reject_bad_rounds():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InputError):
            segment_name_for(bad, "x")
        with pytest.raises(InputError):
            segment_color_for(bad)


def test_colours_are_distinct_and_cycle():
    colours = [segment_color_for(r) for r in range(1, len(PALETTE) + 1)]
    assert len(set(colours)) == len(PALETTE) >= 10
    for c in colours:
        assert len(c) == 3 and all(0.0 <= v <= 1.0 for v in c)
    # well separated: no two closer than 0.25 in RGB
    arr = np.array(colours)
    dist = np.sqrt(((arr[:, None] - arr[None]) ** 2).sum(-1)) + np.eye(len(arr)) * 9
    assert dist.min() > 0.25
    assert segment_color_for(len(PALETTE) + 1) == segment_color_for(1)


def test_equality_compares_masks_by_value():
    a, b = conv(2), conv(2)
    b.id, b.created = a.id, a.created
    for x, y in zip(a.turns, b.turns):
        y.created = x.created
    assert a == b and a.turns[0] == b.turns[0]
    b.turns[1].mask = b.turns[1].mask.copy()
    b.turns[1].mask[0, 0] = not b.turns[1].mask[0, 0]
    assert a != b and a.turns[1] != b.turns[1]
    assert a.turns[0] != "turn"
