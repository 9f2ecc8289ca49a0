"""Wire protocol: round trips, sizes, and strict validation of every malformed message."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MultiTurnSegLib.backends.base import AnswerMode, TurnResult, TurnSpec
from MultiTurnSegLib.errors import InputError
from MultiTurnSegLib.worker import protocol as P
from MultiTurnSegLib.worker.protocol import ProtocolError


def _image(h=40, w=60, gray=True, seed=0):
    rng = np.random.default_rng(seed)
    if gray:
        return np.repeat(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), 3, axis=2)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h=40, w=60, seed=1):
    return np.random.default_rng(seed).random((h, w)) > 0.7


def _request(**kw):
    img = kw.pop("image", _image())
    h, w = img.shape[:2]
    history = kw.pop("history", [TurnSpec("Segment the liver.", "Sure, [SEG].", None),
                                 TurnSpec("Segment the lesion inside it.", "It is [SEG].", _mask(h, w))])
    turn = kw.pop("turn", TurnSpec("Segment the vessel next to round 2.", None, _mask(h, w, 3)))
    return P.encode_request(img, history, turn, **kw), img, history, turn


def _split(body):
    magic, version, flags, hlen = struct.unpack_from(">4sHHI", body, 0)
    header = json.loads(body[12 : 12 + hlen].decode())
    return header, body[12 + hlen :]


def _join(header, blobs, magic=b"MTSQ", version=1, flags=0):
    h = json.dumps(header).encode()
    return struct.pack(">4sHHI", magic, version, flags, len(h)) + h + blobs


@pytest.mark.parametrize("gray", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (40, 60), (7, 13), (512, 512)])
def test_request_round_trip(gray, shape):
    img = _image(*shape, gray=gray)
    body, img, history, turn = _request(image=img, history=[TurnSpec("a", "x [SEG]", _mask(*shape))],
                                        turn=TurnSpec("b", None, None), apply_jcm=False,
                                        answer_mode=AnswerMode.GENERATE)
    req = P.decode_request(body)
    assert np.array_equal(req.image, img) and req.image.dtype == np.uint8 and req.image.shape == img.shape
    assert req.image_sha256 == P.image_digest(img)
    assert req.history[0].prompt == "a" and req.history[0].answer == "x [SEG]"
    assert np.array_equal(req.history[0].reference_mask, history[0].reference_mask)
    assert req.turn.reference_mask is None and req.turn.answer is None
    assert req.apply_jcm is False and req.answer_mode is AnswerMode.GENERATE


def test_request_by_digest_and_unicode():
    img = _image()
    body = P.encode_request(img, [], TurnSpec("分割肝脏 — ‘liver’", None, None), send_image=False)
    req = P.decode_request(body)
    assert req.image is None and req.image_sha256 == P.image_digest(img)
    assert req.turn.prompt == "分割肝脏 — ‘liver’"


def test_result_round_trip():
    m = _mask(33, 17)
    r = TurnResult(mask=m, answer="It is [SEG].", jcm_score=0.25, jcm_refined=True, timings={"a": 0.5})
    back = P.decode_result(P.encode_result(r), expected_shape=(33, 17))
    assert np.array_equal(back.mask, m) and back.answer == r.answer
    assert back.jcm_score == 0.25 and back.jcm_refined and back.timings == {"a": 0.5}
    r2 = TurnResult(mask=m, answer="[SEG]", jcm_score=None, jcm_refined=False)
    assert P.decode_result(P.encode_result(r2)).jcm_score is None
    with pytest.raises(ProtocolError, match="slice is"):
        P.decode_result(P.encode_result(r), expected_shape=(17, 33))


def test_ct_slice_sizes_are_compact():
    # a smooth 512 x 512 gray slice: the image travels compressed, masks bit-packed
    yy, xx = np.mgrid[:512, :512]
    u8 = ((np.sin(yy / 40.0) + np.cos(xx / 30.0)) * 60 + 128).astype(np.uint8)
    img = np.repeat(u8[:, :, None], 3, axis=2)
    full = P.encode_request(img, [], TurnSpec("x", None, None))
    assert len(full) < 0.1 * img.nbytes
    m = (yy - 200) ** 2 + (xx - 250) ** 2 < 80 ** 2
    hist = [TurnSpec(f"p{i}", "Sure, [SEG].", m) for i in range(4)]
    by_digest = P.encode_request(img, hist, TurnSpec("x", None, m), send_image=False)
    assert len(by_digest) < 8000


def test_digests_are_content_keys():
    img = _image()
    assert P.image_digest(img) == P.image_digest(img.copy())
    assert P.image_digest(img) != P.image_digest(img[:, ::-1].copy())
    assert P.image_digest(img[:20]) != P.image_digest(img)
    m = _mask()
    a = TurnSpec("p", "[SEG]", m)
    assert P.turn_digest(a) == P.turn_digest(TurnSpec("p", "[SEG]", m.copy()))
    assert P.turn_digest(a) != P.turn_digest(TurnSpec("p", "[SEG]", ~m))
    assert P.turn_digest(a) != P.turn_digest(TurnSpec("p", "[SEG]", None))
    assert P.turn_digest(TurnSpec("ab", "c[SEG]")) != P.turn_digest(TurnSpec("a", "bc[SEG]"))


def test_encode_rejects_bad_inputs_as_input_error():
    img = _image()
    with pytest.raises(InputError, match="uint8"):
        P.encode_request(img.astype(np.float32), [], TurnSpec("x"))
    with pytest.raises(InputError, match=r"\(H, W, 3\)"):
        P.encode_request(img[:, :, 0], [], TurnSpec("x"))
    with pytest.raises(InputError, match="must match the slice"):
        P.encode_request(img, [], TurnSpec("x", None, np.zeros((3, 3), bool)))
    with pytest.raises(InputError, match="empty"):
        P.encode_request(img, [], TurnSpec("   "))
    with pytest.raises(InputError, match="missing"):
        P.encode_request(img, [TurnSpec("a", None)], TurnSpec("x"))
    with pytest.raises(InputError, match="exactly one"):
        P.encode_request(img, [TurnSpec("a", "no seg")], TurnSpec("x"))
    with pytest.raises(InputError, match="TurnSpec"):
        P.encode_request(img, [("a", "Sure, [SEG].")], TurnSpec("x"))


@pytest.mark.parametrize(
    "history, turn",
    [
        ([], TurnSpec("   ")),
        ([TurnSpec("a", None)], TurnSpec("x")),
        ([TurnSpec("a", "no seg")], TurnSpec("x")),
        ([], TurnSpec("x", None, np.zeros((3, 3), bool))),
        ([TurnSpec("a", "[SEG]")] * 64, TurnSpec("x")),
    ],
)
def test_client_and_local_backend_reject_a_turn_alike(history, turn):
    # one check serves the encoder (remote client) and LocalBackend: same error, same words
    img = _image()
    with pytest.raises(InputError) as encoded:
        P.encode_request(img, history, turn)
    with pytest.raises(InputError) as checked:
        P.check_request(img, history, turn)
    assert str(encoded.value) == str(checked.value)


def test_check_request_normalizes_integer_masks():
    img = _image()
    _, history, turn = P.check_request(img, [TurnSpec("a", "[SEG]", _mask().astype(np.uint8))], TurnSpec("x"))
    assert history[0].reference_mask.dtype == bool and turn.reference_mask is None


# ----------------------------------------------------------------------------- targeted malformed messages


def _mutations():
    body, img, history, turn = _request()
    header, blobs = _split(body)

    def with_header(**changes):
        h = json.loads(json.dumps(header))
        for path, value in changes.items():
            obj = h
            keys = path.split("__")
            for k in keys[:-1]:
                obj = obj[int(k)] if k.isdigit() else obj[k]
            obj[keys[-1]] = value
        return _join(h, blobs)

    raw_hdr = json.dumps(header, separators=(",", ":")).encode()
    cases = {
        "empty": (b"", "truncated"),
        "short preamble": (body[:7], "truncated"),
        "bad magic": (b"XXXX" + body[4:], "does not start"),
        "result magic": (b"MTSR" + body[4:], "does not start"),
        "version 2": (body[:4] + struct.pack(">H", 2) + body[6:], "version"),
        "flags": (body[:6] + struct.pack(">H", 1) + body[8:], "flags"),
        "header length beyond body": (body[:8] + struct.pack(">I", len(body)) + body[12:], "truncated"),
        "huge header length": (body[:8] + struct.pack(">I", 1 << 30) + body[12:], "exceeds"),
        "truncated blobs": (body[:-5], "truncated"),
        "trailing bytes": (body + b"xyz", "after its last"),
        "header not utf8": (struct.pack(">4sHHI", b"MTSQ", 1, 0, 3) + b"\xff\xfe\xfd", "UTF-8"),
        "header not json": (_join_raw(b"{not json"), "not valid JSON"),
        "header a list": (_join_raw(b"[1,2]"), "JSON object"),
        "NaN in header": (_join_raw(raw_hdr.replace(b'"apply_jcm":true', b'"apply_jcm":NaN'), blobs), "finite"),
        "Infinity height": (_join_raw(raw_hdr.replace(b'"height":40', b'"height":Infinity'), blobs), "finite"),
        "missing turn": (_join({k: v for k, v in header.items() if k != "turn"}, blobs), "lacks turn"),
        "unknown field": (_join({**header, "extra": 1}, blobs), "unknown fields"),
        "height zero": (with_header(image__height=0), "at least 1"),
        "height float": (with_header(image__height=40.0), "integer"),
        "huge width": (with_header(image__width=10**9), "exceeds"),
        "too many pixels": (with_header(image__width=4096, image__height=4096 + 0), None),
        "wrong dims": (with_header(image__width=61), None),
        "dtype float32": (with_header(image__dtype="float32"), "dtype"),
        "channels 4": (with_header(image__channels=4), "3 channels"),
        "channels true": (with_header(image__channels=True), "3 channels"),
        "bad digest": (with_header(image__sha256="0" * 64), "sha256"),
        "digest not hex": (with_header(image__sha256="Z" * 64), "hexadecimal"),
        "unknown encoding": (with_header(image__encoding="png"), "encoding"),
        "image size negative": (with_header(image__size=-1), "non-negative"),
        "image size too big": (with_header(image__size=10**8), "truncated"),
        "by-digest with size": (with_header(image__encoding="by-digest"), "size 0"),
        "apply_jcm string": (with_header(apply_jcm="yes"), "true or false"),
        "answer mode": (with_header(answer_mode="beam"), "answer_mode"),
        "history dict": (with_header(history={}), "list"),
        "too many turns": (with_header(history=[header["history"][0]] * 64), "at most"),
        "empty prompt": (with_header(turn__prompt=" "), "empty"),
        "prompt number": (with_header(turn__prompt=5), "text"),
        "prompt control char": (with_header(turn__prompt="a\x00b"), "control"),
        "lone surrogate": (_join_raw(raw_hdr.replace(b'"Segment the liver.', b'"\\ud800'), blobs), "surrogate"),
        "huge prompt": (with_header(turn__prompt="x" * 5000), "at most"),
        "history answer missing": (with_header(history__0__answer=None), "missing"),
        "answer without seg": (with_header(history__0__answer="Sure."), "exactly one"),
        "answer two segs": (with_header(turn__answer="[SEG] [SEG]"), "exactly one"),
        "reference bad encoding": (with_header(history__1__reference={"encoding": "rle", "size": 3}), "encoding"),
        "reference extra key": (with_header(turn__reference={"encoding": "bits-zlib", "size": 3, "x": 1}), "unknown"),
        "reference size off": (with_header(turn__reference={"encoding": "bits-zlib", "size": 1}), None),
    }
    return cases


def _join_raw(hdr: bytes, blobs=b""):
    return struct.pack(">4sHHI", b"MTSQ", 1, 0, len(hdr)) + hdr + blobs


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_malformed_request_is_a_protocol_error(name):
    body, needle = _mutations()[name]
    with pytest.raises(ProtocolError) as info:
        P.decode_request(body)
    assert str(info.value)
    if needle:
        assert needle.lower() in str(info.value).lower(), str(info.value)


def test_reference_of_wrong_shape_is_rejected():
    # a mask encoded for a different slice size does not decode to this slice
    body, img, history, turn = _request()
    header, blobs = _split(body)
    other = P.encode_mask(np.ones((10, 10), bool))
    sizes = [header["image"]["size"]] + [t["reference"]["size"] for t in header["history"] if t["reference"]]
    new_turn_blob_start = sum(sizes)
    header["turn"]["reference"]["size"] = len(other)
    with pytest.raises(ProtocolError, match="decompresses to|padding"):
        P.decode_request(_join(header, blobs[:new_turn_blob_start] + other))


def test_zip_bomb_is_refused_without_inflating():
    body, img, history, turn = _request()
    header, blobs = _split(body)
    bomb = zlib.compress(b"\0" * (50 * 1024 * 1024))
    header["image"]["size"] = len(bomb)
    for t in header["history"]:
        t["reference"] = None
    header["turn"]["reference"] = None
    with pytest.raises(ProtocolError, match="more data than"):
        P.decode_request(_join(header, bomb))


def test_corrupted_pixels_fail_the_digest():
    body, img, *_ = _request(history=[], turn=TurnSpec("x"))
    header, blobs = _split(body)
    other = P.encode_image(_image(seed=9))[1]
    header["image"]["size"] = len(other)
    with pytest.raises(ProtocolError, match="sha256"):
        P.decode_request(_join(header, other))


def test_body_limit():
    body, *_ = _request()
    with pytest.raises(ProtocolError, match="exceeds"):
        P.decode_request(body, P.WireLimits(max_body_bytes=100))


def test_result_validation():
    r = TurnResult(mask=_mask(), answer="[SEG]", jcm_score=0.5, jcm_refined=False)
    good = P.encode_result(r)
    header, blobs = _split(good)
    for bad in (
        {**header, "jcm_score": "x"},
        {**header, "jcm_refined": 1},
        {**header, "timings": []},
        {**header, "height": 41},
    ):
        with pytest.raises(ProtocolError):
            P.decode_result(_join(bad, blobs, magic=b"MTSR"))
    with pytest.raises(ProtocolError):
        P.decode_result(_join_raw(json.dumps(header).replace('"jcm_score":0.5', '"jcm_score":NaN').encode()))
    with pytest.raises(ValueError):
        P.encode_result(TurnResult(mask=_mask(), answer="[SEG]", jcm_score=float("nan"), jcm_refined=False))


# ----------------------------------------------------------------------------- fuzzing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_requests_only_raise_protocol_errors(data):
    body, *_ = _request()
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "random", "header"]))
    b = bytearray(body)
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
    elif kind == "cut":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(b)))
        b[i:i] = data.draw(st.binary(min_size=1, max_size=20))
    elif kind == "random":
        b = bytearray(data.draw(st.binary(max_size=200)))
    else:
        header, blobs = _split(body)
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=10),
            lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
            max_leaves=6,
        )
        path = data.draw(st.sampled_from([
            ("image", "height"), ("image", "width"), ("image", "size"), ("image", "encoding"), ("image", "sha256"),
            ("history",), ("turn",), ("turn", "prompt"), ("turn", "answer"), ("turn", "reference"),
            ("apply_jcm",), ("answer_mode",), ("image",),
        ]))
        obj = header
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = data.draw(json_values)
        b = bytearray(_join(header, blobs))
    try:
        req = P.decode_request(bytes(b))
    except ProtocolError as exc:
        assert str(exc)
    else:  # a mutation that still decodes must be a valid request
        assert req.image is None or (req.image.shape == (req.height, req.width, 3) and req.image.dtype == np.uint8)
        for t in req.history + [req.turn]:
            assert t.reference_mask is None or t.reference_mask.shape == (req.height, req.width)


def test_decoded_size_is_bounded_before_inflating():
    """A compact body of many full-size reference masks is refused from its header
    (image + one byte per pixel per mask), before any mask is decompressed."""
    side = 4096
    mask = np.zeros((side, side), bool)
    history = [TurnSpec(f"turn {i}", "Sure, [SEG].", mask) for i in range(40)]
    image = np.zeros((side, side, 3), np.uint8)
    body = P.encode_request(image, history, TurnSpec("next", reference_mask=mask))
    assert len(body) < P.DEFAULT_LIMITS.max_body_bytes  # small on the wire ...
    with pytest.raises(ProtocolError, match="would decode to") as info:  # ... but > 600 MB decoded
        P.decode_request(body)
    assert info.value.code == "too_large"
    # the same conversation of a normal-sized slice is fine
    small = np.zeros((512, 512), bool)
    ok = P.encode_request(np.zeros((512, 512, 3), np.uint8),
                          [TurnSpec(t.prompt, t.answer, small) for t in history], TurnSpec("next", reference_mask=small))
    assert len(P.decode_request(ok).history) == 40
