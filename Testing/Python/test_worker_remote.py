"""The worker as a real process (``python -m MultiTurnSegLib worker``) with the tiny
fixture model, against RemoteBackend and raw HTTP: equality with LocalBackend,
authentication, malformed requests, concurrent clients."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MultiTurnSegLib.backends.base import AnswerMode, TurnSpec
from MultiTurnSegLib.backends.local import LocalBackend
from MultiTurnSegLib.backends.remote import RemoteBackend
from MultiTurnSegLib.errors import BackendError, InputError
from MultiTurnSegLib.worker import protocol as P

from test_worker_support import TINY_MODEL_JSON, assert_same_result, chain3, run_conversation, start_worker, shared_engine

pytestmark = pytest.mark.slow

TOKEN = "remote-test-token-0123456789"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tok") / "token.txt"
    token_file.write_text(TOKEN + "\n")
    w = start_worker(["--model", str(TINY_MODEL_JSON), "--port", "0", "--token-file", str(token_file),
                      "--device", "cpu", "--cache-mb", "512"])
    yield w
    w.stop()
    assert w.proc.returncode == 0 or w.proc.returncode < 0, "\n".join(w.lines)
    assert not any("Traceback" in line for line in w.lines), "\n".join(w.lines)
    # nothing the user typed reaches the worker's log at the default level
    _, turns = chain3()
    log = "\n".join(w.lines)
    assert not any(t[0] in log or t[0][:20] in log for t in turns), log


@pytest.fixture(scope="module")
def local():
    return LocalBackend(shared_engine())


@pytest.fixture(scope="module")
def case():
    return chain3()


def _raw(url, method, path, body=b"", headers=None):
    host, port = url.split("//")[1].rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_info_describes_the_model(worker):
    info = RemoteBackend(worker.url, TOKEN).test_connection()
    assert info["stage"] == 2 and info["jcm_available"] is True
    assert info["device"] == "cpu" and info["dtype"] == "float32" and "gpu_name" in info
    assert info["versions"]["protocol"] == P.PROTOCOL_VERSION and "torch" in info["versions"]
    assert info["limits"]["max_side"] == 4096 and info["worker"]["auth_required"] is True


def test_remote_equals_local_teacher_forced(worker, local, case):
    img, turns = case
    remote = RemoteBackend(worker.url, TOKEN)
    a = run_conversation(local, img, turns)
    b = run_conversation(remote, img, turns)
    for x, y in zip(a, b):
        assert_same_result(x, y)
    assert b[0].jcm_score is not None
    assert remote.last_exchange["image_sent"] is False  # the slice travelled once


def test_remote_equals_local_template_answers_no_jcm_and_generation(worker, local, case):
    img, turns = case
    flipped = np.ascontiguousarray(img[:, ::-1])
    remote = RemoteBackend(worker.url, TOKEN)
    a = run_conversation(local, flipped, turns, apply_jcm=False, teacher_answers=False)
    b = run_conversation(remote, flipped, turns, apply_jcm=False, teacher_answers=False)
    for x, y in zip(a, b):
        assert_same_result(x, y)
        assert x.jcm_score is None and x.answer == "Sure, [SEG]."
    hist = [TurnSpec(turns[0][0], a[0].answer)]
    spec = TurnSpec(turns[1][0], None, a[0].mask)
    g1 = local.run_turn(flipped, hist, spec, answer_mode=AnswerMode.GENERATE)
    g2 = remote.run_turn(flipped, hist, spec, answer_mode=AnswerMode.GENERATE)
    assert_same_result(g1, g2)
    assert g1.answer.count("[SEG]") == 1


def test_token_is_required(worker, case):
    img, _ = case
    status, headers, body = _raw(worker.url, "GET", "/info")
    assert status == 401 and json.loads(body)["message"]
    status, _, body = _raw(worker.url, "GET", "/info", headers={"Authorization": "Bearer wrong"})
    assert status == 403 and json.loads(body)["message"]
    turn = P.encode_request(img, [], TurnSpec("Segment the liver."))
    status, _, _ = _raw(worker.url, "POST", "/turn", turn, {"Content-Type": P.REQUEST_CONTENT_TYPE})
    assert status == 401
    status, _, _ = _raw(worker.url, "POST", "/turn", turn,
                        {"Content-Type": P.REQUEST_CONTENT_TYPE, "Authorization": "Bearer " + TOKEN[:-1]})
    assert status == 403
    assert _raw(worker.url, "GET", "/health")[0] == 200
    with pytest.raises(BackendError, match="rejected the token"):
        RemoteBackend(worker.url, "wrong").run_turn(img, [], TurnSpec("Segment the liver."))
    with pytest.raises(BackendError, match="requires a token"):
        RemoteBackend(worker.url).test_connection()


def test_model_level_input_errors_are_422(worker, case):
    img, _ = case
    remote = RemoteBackend(worker.url, TOKEN)
    # valid on the wire, refused by the model: reserved model tokens in the text
    with pytest.raises(InputError, match="reserved"):
        remote.run_turn(img, [], TurnSpec("Segment [SEG] the liver."))
    with pytest.raises(InputError, match="reserved"):
        remote.run_turn(img, [], TurnSpec("Segment the liver.", "Sure, [SEG]. </s>"))
    status, _, body = _raw(worker.url, "POST", "/turn", P.encode_request(img, [], TurnSpec("<image> liver")),
                           {"Content-Type": P.REQUEST_CONTENT_TYPE, "Authorization": "Bearer " + TOKEN})
    assert status == 422 and "reserved" in json.loads(body)["message"]


# ----------------------------------------------------------------------------- malformed requests

_small = np.repeat(np.arange(24 * 20, dtype=np.uint8).reshape(24, 20)[:, :, None], 3, axis=2)
_mask = np.zeros((24, 20), bool)
_mask[5:12, 4:9] = True
_VALID = P.encode_request(_small, [TurnSpec("Segment the liver.", "Sure, [SEG].")],
                          TurnSpec("Segment the lesion in round 1.", None, _mask))
_HLEN = int.from_bytes(_VALID[8:12], "big")
_HEADER = json.loads(_VALID[12 : 12 + _HLEN])
_BLOBS = _VALID[12 + _HLEN :]


def _with_header(header: dict, blobs: bytes = _BLOBS, raw: bytes = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return _VALID[:8] + len(h).to_bytes(4, "big") + h + blobs


def _edited(path, value):
    h = json.loads(json.dumps(_HEADER))
    obj = h
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value
    return _with_header(h)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=5,
)
_paths = st.sampled_from([
    ("image", "height"), ("image", "width"), ("image", "size"), ("image", "encoding"), ("image", "sha256"),
    ("image", "dtype"), ("image", "channels"), ("history",), ("turn",), ("turn", "prompt"), ("turn", "answer"),
    ("turn", "reference"), ("apply_jcm",), ("answer_mode",), ("history", 0, "answer"), ("history", 0, "reference"),
])


@st.composite
def malformed(draw):
    """(body, headers) of a request that is wrong in one way."""
    ctype = {"Content-Type": P.REQUEST_CONTENT_TYPE}
    kind = draw(st.sampled_from([
        "flip", "truncate", "insert", "random", "field", "nan", "huge_dims", "ref_shape", "dtype",
        "content_type", "auth", "bad_json", "wrong_version", "too_many_turns",
    ]))
    body = bytearray(_VALID)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(body) - 1))
            body[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "insert":
        i = draw(st.integers(0, len(body)))
        body[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "random":
        body = bytearray(draw(st.binary(max_size=300)))
    elif kind == "field":
        body = bytearray(_edited(draw(_paths), draw(_json_values)))
    elif kind == "nan":
        h = json.dumps(_HEADER).replace('"apply_jcm": true', '"apply_jcm": ' + draw(st.sampled_from(
            ["NaN", "Infinity", "-Infinity"])))
        body = bytearray(_with_header(None, raw=h.encode()))
    elif kind == "huge_dims":
        side = draw(st.sampled_from(["height", "width"]))
        body = bytearray(_edited(("image", side), draw(st.integers(4097, 2**62))))
    elif kind == "ref_shape":
        h, w = draw(st.integers(1, 60)), draw(st.integers(1, 60))
        other = P.encode_mask(np.ones((h, w), bool))
        hd = json.loads(json.dumps(_HEADER))
        hd["turn"]["reference"]["size"] = len(other)
        img_size = hd["image"]["size"]
        body = bytearray(_with_header(hd, _BLOBS[:img_size] + other))
    elif kind == "dtype":
        body = bytearray(_edited(("image", "dtype"), draw(st.sampled_from(["float32", "uint16", "int8", "bool"]))))
    elif kind == "content_type":
        ctype = {"Content-Type": draw(st.sampled_from(
            ["application/json", "text/plain", "application/octet-stream", "multipart/form-data; boundary=x",
             "application/x-www-form-urlencoded", ""]))}
    elif kind == "auth":
        return bytes(body), {**ctype, "Authorization": draw(st.sampled_from(
            ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer wrong-token", "Bearer " + "x" * 500,
             "Token " + TOKEN]))}
    elif kind == "bad_json":
        raw = draw(st.sampled_from([b"{", b"null", b"[]", b'"x"', b"{}", b'{"image": 1}', b"\xff\xfe", b"{'a':1}"]))
        body = bytearray(_with_header(None, raw=raw))
    elif kind == "wrong_version":
        body[4:6] = draw(st.integers(2, 65535)).to_bytes(2, "big")
    elif kind == "too_many_turns":
        hd = json.loads(json.dumps(_HEADER))
        hd["history"] = [{"prompt": "x", "answer": "[SEG]", "reference": None}] * draw(st.integers(64, 5000))
        body = bytearray(_with_header(hd))
    return bytes(body), {**ctype, "Authorization": "Bearer " + TOKEN}


def test_malformed_requests_get_4xx_with_a_message(worker, case):
    seen = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(malformed())
    def check(req):
        body, headers = req
        status, rh, data = _raw(worker.url, "POST", "/turn", body, headers)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, data[:300])
        if status != 200:
            assert 400 <= status < 500
            err = json.loads(data)
            assert err["error"] and err["message"], err

    check()
    assert sum(v for k, v in seen.items() if k >= 400) >= 100, seen
    # broken HTTP itself (not just the body)
    for raw in (b"POST /turn HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                b"POST /turn HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde",
                b"GARBAGE\r\n\r\n"):
        host, port = worker.url.split("//")[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(raw)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 4"), reply[:100]
    # the worker still answers
    img, turns = case
    r = RemoteBackend(worker.url, TOKEN).run_turn(img, [], TurnSpec(turns[0][0], turns[0][1]))
    assert r.mask.shape == img.shape[:2]
    assert worker.proc.poll() is None


# ----------------------------------------------------------------------------- concurrency


def test_eight_concurrent_clients(worker, local, case):
    """8 clients x 20 turns at once, each its own conversation (2 slices x 2 prompt
    orders x JCM on/off), restarted when it ends; every result equals the
    sequential local run."""
    img, turns = case
    images = [img, np.ascontiguousarray(img[::-1])]
    convs = [turns, [(turns[0][0], turns[0][1], None), (turns[2][0], turns[2][1], 0), (turns[1][0], None, 1),
                     ("Segment the spleen.", "[SEG].", None)]]
    variants = [(i, c, jcm) for i in range(2) for c in range(2) for jcm in (True, False)]
    expected = {v: run_conversation(local, images[v[0]], convs[v[1]], apply_jcm=v[2]) for v in variants}
    errors, counts = [], [0] * 8
    start = threading.Barrier(8)

    def client(k):
        try:
            be = RemoteBackend(worker.url, TOKEN, timeout=(10, 300))
            i, c, jcm = variants[k]
            start.wait(60)
            while counts[k] < 20:
                conv = convs[c][: 20 - counts[k]]
                got = run_conversation(be, images[i], conv, apply_jcm=jcm)
                for x, y in zip(got, expected[variants[k]]):
                    assert_same_result(x, y)
                counts[k] += len(got)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append((k, repr(exc)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert counts == [20] * 8
