"""Conversation JSON: lossless round trip of every field, and clear rejections."""

from __future__ import annotations

import base64
import copy
import json
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MultiTurnSegLib.conversation import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Conversation,
    Reference,
    Turn,
    conversation_from_json,
    conversation_from_json_text,
    conversation_to_json,
    conversation_to_json_text,
    conversations_equal,
    decode_from_tag,
    decode_mask,
    encode_for_tag,
    encode_mask,
    load_conversation,
    save_conversation,
)
from MultiTurnSegLib.errors import ConversationFormatError, InputError

# ---------------------------------------------------------------- strategies

texts = st.text(min_size=0, max_size=40)
names = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def masks(draw, shape):
    bits = draw(st.lists(st.booleans(), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    return np.array(bits, dtype=bool).reshape(shape)


@st.composite
def conversations(draw):
    shape = (draw(st.integers(1, 9)), draw(st.integers(1, 11)))
    window = draw(st.one_of(st.none(), st.sampled_from(["auto", "abdomen", "lung"]), st.tuples(finite, finite)))
    conv = Conversation(
        volume=draw(texts),
        axis=draw(st.sampled_from(["axial", "coronal", "sagittal"])),
        slice_index=draw(st.integers(0, 10_000)),
        image_size=shape,
        window=window,
        id=draw(st.text(alphabet="0123456789abcdef", min_size=1, max_size=32)),
        created=draw(texts),
    )
    for r in range(1, draw(st.integers(0, 4)) + 1):
        kind = draw(st.sampled_from(["none", "round", "segment"])) if r > 1 else draw(st.sampled_from(["none", "segment"]))
        if kind == "none":
            ref = None
        elif kind == "round":
            ref = Reference.to_round(draw(st.integers(1, r - 1)))
        else:
            ref = Reference.to_segment(draw(names))
        conv.append(
            Turn(
                round=r,
                prompt=draw(texts),
                answer=draw(texts),
                reference=ref,
                reference_mask=None if ref is None else draw(masks(shape)),
                mask=draw(masks(shape)),
                jcm_score=draw(st.one_of(st.none(), finite)),
                jcm_refined=draw(st.booleans()),
                timings=draw(st.dictionaries(texts, finite, max_size=3)),
                segment_name=draw(texts),
                color=(draw(unit), draw(unit), draw(unit)),
                created=draw(texts),
            )
        )
    return conv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_json_round_trip_every_field(conv):
    d = conversation_to_json(conv)
    text = json.dumps(d)  # plain JSON, no numpy types
    back = conversation_from_json(json.loads(text))
    assert conversations_equal(conv, back)
    assert conversation_to_json(back) == d
    # the text helpers and the tag encoding are lossless too
    assert conversations_equal(conv, conversation_from_json_text(conversation_to_json_text(conv)))
    assert conversations_equal(conv, conversation_from_json(decode_from_tag(encode_for_tag(d))))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40).flatmap(lambda h: st.tuples(st.just(h), st.integers(0, 40))).flatmap(masks))
def test_mask_encoding_round_trip(mask):
    enc = encode_mask(mask)
    assert enc["shape"] == list(mask.shape)
    out = decode_mask(json.loads(json.dumps(enc)))
    assert out.dtype == bool and np.array_equal(out, mask)


def test_masks_are_compact():
    mask = np.zeros((512, 512), dtype=bool)
    mask[100:300, 150:400] = True
    assert len(json.dumps(encode_mask(mask))) < 400


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | finite | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_tag_encoding_round_trip_and_alphabet(obj):
    tag = encode_for_tag(obj)
    assert decode_from_tag(tag) == obj
    assert all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in tag)
    assert "|" not in tag and ":" not in tag and "\n" not in tag


@pytest.mark.parametrize("bad", [None, 3, "plain text", "mts1.###", "mts1.AAAA", "mts2." + encode_for_tag({})[5:]])
def test_bad_tag_values(bad):
    with pytest.raises(ConversationFormatError):
        decode_from_tag(bad)


# ---------------------------------------------------------------- rejections


def sample() -> dict:
    conv = Conversation(volume="ct.nrrd", axis="axial", slice_index=3, image_size=(4, 5), window=(400.0, 40.0))
    m1 = np.zeros((4, 5), dtype=bool)
    m1[1:3, 1:4] = True
    conv.append(Turn(1, "segment the liver", "Sure, [SEG].", None, None, m1, 0.9, False, {"total": 0.5}, "R1 liver", (1.0, 0.0, 0.0)))
    conv.append(
        Turn(2, "lesion in round 1", "It is [SEG].", Reference.to_round(1), m1.copy(), ~m1, None, True, {}, "R2 lesion in round 1", (0.0, 1.0, 0.0))
    )
    return conversation_to_json(conv)


def _set(d, path, value):
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()

REJECTIONS = [
    (("format",), "something-else", "not a MultiTurnSeg conversation"),
    (("format",), _DELETE, "not a MultiTurnSeg conversation"),
    (("version",), 2, "version 2 is not supported"),
    (("version",), "1", "'version' must be an integer"),
    (("version",), _DELETE, "'version'"),
    (("volume",), _DELETE, "missing field 'volume'"),
    (("volume",), 7, "'volume' must be text"),
    (("axis",), "", "'axis' is empty"),
    (("slice_index",), -1, "'slice_index' must be >= 0"),
    (("slice_index",), 2.0, "'slice_index' must be an integer"),
    (("slice_index",), True, "'slice_index' must be an integer"),
    (("image_size",), [4], "'image_size'"),
    (("image_size",), [4, 0], "'image_size'"),
    (("window",), [1, 2, 3], "'window'"),
    (("window",), _DELETE, "missing field 'window'"),
    (("id",), "", "'id' is empty"),
    (("turns",), {}, "'turns' must be a list"),
    (("turns",), _DELETE, "missing field 'turns'"),
    (("turns", 0), "x", "expected an object"),
    (("turns", 0, "round"), 2, "the next turn must be round 1"),
    (("turns", 0, "round"), 0, "'round' must be >= 1"),
    (("turns", 0, "prompt"), _DELETE, "missing field 'prompt'"),
    (("turns", 0, "prompt"), None, "'prompt' must be text"),
    (("turns", 0, "answer"), 1, "'answer' must be text"),
    (("turns", 0, "mask"), _DELETE, "missing field 'mask'"),
    (("turns", 0, "mask", "shape"), [5, 4], "the conversation's slice is (4, 5)"),
    (("turns", 0, "mask", "shape"), [40, 50], "needs 2000"),
    (("turns", 0, "mask", "shape"), [4], "'shape'"),
    (("turns", 0, "mask", "data"), "%%%", "not valid base64"),
    (("turns", 0, "mask", "data"), base64.b64encode(b"not zlib").decode(), "not valid base64/zlib"),
    (("turns", 0, "mask", "data"), base64.b64encode(zlib.compress(b"\xff" * 9)).decode(), "holds 72 bits"),
    (("turns", 0, "mask", "data"), 5, "'data' must be a base64 string"),
    (("turns", 0, "mask", "encoding"), "png", "unknown mask encoding"),
    (("turns", 0, "jcm_score"), "high", "'jcm_score'"),
    (("turns", 0, "jcm_refined"), 0, "'jcm_refined'"),
    (("turns", 0, "timings"), {"total": "fast"}, "'timings'"),
    (("turns", 0, "timings"), {"total": float("nan")}, "'timings'"),
    (("turns", 0, "jcm_score"), float("inf"), "'jcm_score'"),
    (("window",), [float("nan"), 1.0], "'window'"),
    (("turns", 0, "color"), [1, 0], "'color'"),
    (("turns", 0, "color"), [2, 0, 0], "'color'"),
    (("turns", 0, "segment_name"), None, "'segment_name'"),
    (("turns", 0, "created"), _DELETE, "missing field 'created'"),
    (("turns", 1, "reference"), {"kind": "box"}, "'kind' must be 'round' or 'segment'"),
    (("turns", 1, "reference"), {"kind": "round", "round": 0}, "rounds start at 1"),
    (("turns", 1, "reference"), {"kind": "round", "round": 2}, "cannot refer to round 2"),
    (("turns", 1, "reference"), {"kind": "segment", "segment": ""}, "segment name is empty"),
    (("turns", 1, "reference"), "round 1", "expected null or an object"),
    (("turns", 1, "reference"), None, "reference mask is stored exactly when"),
    (("turns", 1, "reference_mask"), None, "reference mask is stored exactly when"),
    (("turns", 1, "reference_mask"), _DELETE, "missing field 'reference_mask'"),
]


@pytest.mark.parametrize("path, value, fragment", REJECTIONS)
def test_malformed_documents_are_rejected(path, value, fragment):
    d = copy.deepcopy(sample())
    _set(d, path, value)
    with pytest.raises(ConversationFormatError) as info:
        conversation_from_json(d)
    assert fragment in str(info.value)


@pytest.mark.parametrize("doc", [None, [], "text", 3])
def test_non_objects_are_rejected(doc):
    with pytest.raises(ConversationFormatError, match="expected a JSON object"):
        conversation_from_json(doc)


def test_unknown_keys_are_ignored():
    d = sample()
    d["future_field"] = 1
    d["turns"][0]["future_field"] = {"x": 1}
    conv = conversation_from_json(d)
    assert len(conv.turns) == 2


def test_document_header():
    d = sample()
    assert d["format"] == FORMAT_NAME == "multiturnseg-conversation"
    assert d["version"] == FORMAT_VERSION == 1
    assert d["window"] == [400.0, 40.0]


# ---------------------------------------------------------------- files


def test_file_round_trip(tmp_path):
    conv = conversation_from_json(sample())
    conv.turns[0].prompt = "分割肝脏"  # non-ASCII survives
    path = save_conversation(conv, tmp_path / "chat.json")
    assert conversations_equal(load_conversation(path), conv)
    assert "分割肝脏" in path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_conversation(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConversationFormatError, match="not valid JSON"):
        load_conversation(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "x", "version": 1}), encoding="utf-8")
    with pytest.raises(ConversationFormatError, match="other.json"):
        load_conversation(other)
    with pytest.raises(InputError, match="cannot write"):
        save_conversation(conversation_from_json(sample()), tmp_path / "no" / "such" / "dir.json")
