"""Worker app and RemoteBackend over real HTTP (uvicorn on loopback, in this process)
serving the real tiny engine: auth, error mapping, limits, by-digest images,
TLS, timeouts and retries.

The engine is ``SpyEngine`` (the real model behind a counting proxy); slow
turns are a delay around the real call, and model failures are injected at
the engine boundary (see the tests that do it)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from MultiTurnSegLib.backends.base import TurnSpec
from MultiTurnSegLib.backends.local import LocalBackend
from MultiTurnSegLib.backends.remote import RemoteBackend
from MultiTurnSegLib.errors import BackendError, InferenceError, InputError
from MultiTurnSegLib.worker import protocol as P
from MultiTurnSegLib.worker.server import WorkerLimits, create_app

from test_worker_support import (
    SpyEngine,
    ThreadServer,
    assert_same_result,
    chain3,
    free_port,
    run_conversation,
    shared_engine,
)

pytestmark = pytest.mark.slow  # the real tiny model (about a second per slice and per turn on the CPU)

TOKEN = "s3cret-token-for-tests"


# the fixture phantom (200 x 300): the slice of every turn the model actually runs
IMG = chain3()[0]


def _img(seed=0, h=48, w=64):
    """Noise, for requests that are refused before the model runs."""
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), 3, axis=2)


TURNS = [
    ("Segment the liver.", "Sure, [SEG].", None),
    ("Segment the lesion inside round 1.", "It is [SEG].", 0),
    ("Segment the vessel next to it.", None, 1),
]


@pytest.fixture(scope="module")
def worker():
    """The worker app on a real loopback server, serving the real engine."""
    engine = SpyEngine()
    backend = LocalBackend(engine)
    app = create_app(backend, token=TOKEN, limits=WorkerLimits(max_body_bytes=2_000_000, max_side=1024,
                                                               max_pixels=1024 * 1024))
    srv = ThreadServer(app)
    srv.app, srv.engine, srv.backend = app, engine, backend
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local():
    """The same model in this process, for comparison (results are cached by content)."""
    return LocalBackend(shared_engine())


def _raw(url, method, path, body=b"", headers=None):
    host, port = url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_health_needs_no_token_info_does(worker):
    status, _, body = _raw(worker.url, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = _raw(worker.url, "GET", "/info")
    assert status == 401 and "token" in json.loads(body)["message"]
    assert headers.get("www-authenticate") == "Bearer"
    status, _, body = _raw(worker.url, "GET", "/info", headers={"Authorization": "Bearer wrong"})
    assert status == 403 and json.loads(body)["error"] == "forbidden"
    status, _, body = _raw(worker.url, "GET", "/info", headers={"Authorization": "Basic abc"})
    assert status == 401


def test_test_connection_returns_info(worker):
    info = RemoteBackend(worker.url, TOKEN).test_connection()
    assert info["model"] == "MediRound" and info["stage"] == 2 and info["jcm_available"] is True
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["versions"]["protocol"] == P.PROTOCOL_VERSION and "multiturnseg" in info["versions"]
    assert info["limits"]["max_side"] == 1024 and info["worker"]["auth_required"] is True


@pytest.mark.parametrize("token, match", [(None, "requires a token"), ("nope", "rejected the token")])
def test_bad_token_is_reported(worker, token, match):
    be = RemoteBackend(worker.url, token)
    with pytest.raises(BackendError, match=match) as info:
        be.test_connection()
    assert worker.url in str(info.value)
    with pytest.raises(BackendError, match=match):
        be.run_turn(_img(), [], TurnSpec("Segment the liver."))


def test_remote_equals_local(worker, local):
    img = IMG
    runs = worker.engine.counts["run_turn"]
    expected = run_conversation(local, img, TURNS)
    remote = run_conversation(RemoteBackend(worker.url, TOKEN), img, TURNS)
    assert worker.engine.counts["run_turn"] == runs + len(TURNS)  # the worker ran them itself
    assert all(r.mask.any() for r in remote[:2])
    for a, b in zip(expected, remote):
        assert_same_result(a, b)
    stages = []
    RemoteBackend(worker.url, TOKEN, progress=lambda s, f: stages.append((s, f))).run_turn(
        img, [], TurnSpec("Segment the kidney."))
    assert stages[0][0] == "sending" and stages[-1] == ("done", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in stages)


def test_image_travels_once_and_is_resent_when_the_worker_lost_it(worker, local):
    img = _img(4, 256, 256)  # noise: the pixels dominate the first request's size
    be = RemoteBackend(worker.url, TOKEN)
    r1 = be.run_turn(img, [], TurnSpec("Segment the liver."))
    first = dict(be.last_exchange)
    assert first["image_sent"] and first["round_trips"] == 1
    h = [TurnSpec("Segment the liver.", r1.answer)]
    be.run_turn(img, h, TurnSpec("Segment the lesion.", None, r1.mask))
    second = dict(be.last_exchange)
    assert not second["image_sent"] and second["sent"] < first["sent"] / 10
    worker.app.state.images.clear()  # as if the worker restarted
    r3 = be.run_turn(img, h, TurnSpec("Segment the lesion.", None, r1.mask))
    third = dict(be.last_exchange)
    assert third["image_sent"] and third["round_trips"] == 2
    r3b = local.run_turn(img, h, TurnSpec("Segment the lesion.", None, r1.mask))
    assert_same_result(r3, r3b)


def _turn_body(**kw):
    return P.encode_request(IMG, [], TurnSpec("Segment the liver."), **kw)


def _post(url, body, ctype=P.REQUEST_CONTENT_TYPE, token=TOKEN, extra=None):
    headers = {"Content-Type": ctype, "Authorization": f"Bearer {token}", **(extra or {})}
    return _raw(url, "POST", "/turn", body, headers)


def test_error_statuses(worker):
    url = worker.url
    ok = _turn_body()
    status, headers, body = _post(url, ok)
    assert status == 200 and headers["content-type"] == P.RESULT_CONTENT_TYPE
    assert P.decode_result(body).mask.shape == IMG.shape[:2]
    cases = [
        (_post(url, ok, ctype="application/json"), 415),
        (_post(url, ok, ctype=""), 415),
        (_post(url, b"garbage"), 400),
        (_post(url, ok[:-3]), 400),
        (_post(url, ok, token="bad"), 403),
        (_post(url, P.encode_request(_img(h=2000, w=10), [], TurnSpec("x"))), 413),
        (_post(url, _turn_body(send_image=False, digest="ab" * 32)), 409),
        (_raw(url, "GET", "/turn"), 405),
        (_raw(url, "GET", "/nothing"), 404),
    ]
    for (status, _, body), expected in cases:
        assert status == expected, (status, body)
        err = json.loads(body)
        assert err["error"] and err["message"]


def test_body_limit_is_enforced_before_reading(worker):
    host, port = worker.url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.putrequest("POST", "/turn")
    c.putheader("Content-Type", P.REQUEST_CONTENT_TYPE)
    c.putheader("Authorization", f"Bearer {TOKEN}")
    c.putheader("Content-Length", str(10**9))
    c.endheaders()  # no body sent at all
    r = c.getresponse()
    assert r.status == 413 and "exceeds" in json.loads(r.read())["message"]
    c.close()
    # chunked upload without a length, over the limit
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("POST", "/turn", body=iter([b"x" * 1_000_000] * 3),
              headers={"Content-Type": P.REQUEST_CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}"})
    r = c.getresponse()
    assert r.status == 413
    c.close()


@pytest.mark.parametrize(
    "exc, status, err_type, match",
    [
        (InputError("reference to round 7, which does not exist"), 422, InputError, "round 7"),
        (InferenceError("CUDA out of memory (tried 2 GiB)"), 503, BackendError, "out of memory"),
        (InferenceError("the model produced no [SEG] token"), 500, BackendError, "model failed.*no \\[SEG\\]"),
        (RuntimeError("boom"), 500, BackendError, "model failed"),
    ],
)
def test_backend_errors_are_mapped(exc, status, err_type, match):
    # Failure injection at the real engine's boundary (encoding the slice): the tiny
    # CPU model cannot run out of GPU memory or fail on demand. The real
    # LocalBackend and worker app map what it raises.
    eng = SpyEngine()
    srv = ThreadServer(create_app(LocalBackend(eng)))
    try:
        eng.inject(exc, at="new_session")
        st, _, body = _post(srv.url, _turn_body(), token="")
        assert st == status and json.loads(body)["message"]
        eng.inject(exc, at="new_session")
        with pytest.raises(err_type, match=match):
            RemoteBackend(srv.url).run_turn(IMG, [], TurnSpec("Segment the liver."))
        assert eng.counts["new_session"] == 2 and eng.counts["run_turn"] == 0
    finally:
        srv.stop()


def test_busy_worker_answers_503():
    eng = SpyEngine(delay=1.0)  # a slow turn: a delay before the real one
    srv = ThreadServer(create_app(LocalBackend(eng), limits=WorkerLimits(max_in_flight=1)))
    try:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", _post(srv.url, _turn_body(), token="")))
        t.start()
        time.sleep(0.3)
        with pytest.raises(BackendError, match="busy"):
            RemoteBackend(srv.url).run_turn(IMG, [], TurnSpec("Segment the kidney."))
        t.join()
        assert first["r"][0] == 200  # the turn in flight was not disturbed
        assert eng.counts["run_turn"] == 1  # the refused one never reached the model
    finally:
        srv.stop()


def test_read_timeout_is_reported():
    eng = SpyEngine(delay=1.5)  # a slow turn: a delay before the real one
    srv = ThreadServer(create_app(LocalBackend(eng)))
    try:
        be = RemoteBackend(srv.url, timeout=(2, 0.3))
        with pytest.raises(BackendError, match=r"did not answer within 0.3 s"):
            be.run_turn(IMG, [], TurnSpec("Segment the liver."))
    finally:
        srv.stop()


def test_unreachable_worker_retries_then_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    stages = []
    be = RemoteBackend(url, retries=2, backoff=0.05, progress=lambda s, f: stages.append(s))
    t0 = time.time()
    with pytest.raises(BackendError, match="Cannot reach the MultiTurnSeg worker at " + url) as info:
        be.run_turn(_img(), [], TurnSpec("Segment the liver."))
    assert "running" in str(info.value)
    assert sum("retrying" in s for s in stages) == 2 and time.time() - t0 >= 0.15
    with pytest.raises(BackendError, match="Cannot reach"):
        RemoteBackend(url, retries=0).test_connection()
    with pytest.raises(BackendError, match="could not be resolved"):
        RemoteBackend("http://no-such-host.invalid:8000", retries=0).health()


def test_bad_urls_are_input_errors():
    for url in ("", "ftp://x", "localhost:8000", "http://:80", "http://h:99999"):
        with pytest.raises(InputError):
            RemoteBackend(url)


@pytest.mark.parametrize("token", ["abc\ndef", "tok\u20ac", "a\x00b"])
def test_unsendable_token_is_an_input_error(token):
    # not a bare ValueError/UnicodeEncodeError from http.client at the first request
    with pytest.raises(InputError, match="token"):
        RemoteBackend("http://127.0.0.1:9", token)


def test_input_errors_are_raised_before_sending(worker):
    be = RemoteBackend(worker.url, TOKEN)
    with pytest.raises(InputError, match="empty"):
        be.run_turn(_img(), [], TurnSpec(" "))
    with pytest.raises(InputError, match="must match"):
        be.run_turn(_img(), [], TurnSpec("x", None, np.zeros((3, 3), bool)))


def test_not_a_worker():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        do_POST = do_GET

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(BackendError, match="does not look like a MultiTurnSeg worker"):
            RemoteBackend(url).test_connection()
        with pytest.raises(BackendError, match="cannot read"):
            RemoteBackend(url).run_turn(_img(), [], TurnSpec("x"))
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not available")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def test_tls_is_verified(tls_files, local):
    cert, key = tls_files
    srv = ThreadServer(create_app(LocalBackend(shared_engine()), token=TOKEN), ssl_certfile=str(cert),
                       ssl_keyfile=str(key))
    try:
        url = srv.url.replace("127.0.0.1", "localhost")
        with pytest.raises(BackendError, match="certificate .* could not be verified"):
            RemoteBackend(url, TOKEN, retries=0).test_connection()
        be = RemoteBackend(url, TOKEN, ca_bundle=str(cert))
        assert be.test_connection()["stage"] == 2
        r = be.run_turn(IMG, [], TurnSpec("Segment the liver."))
        assert r.mask.any()
        assert_same_result(r, local.run_turn(IMG, [], TurnSpec("Segment the liver.")))
        # the host name is checked too (the certificate names "localhost" only)
        wrong_host = RemoteBackend(srv.url, TOKEN, ca_bundle=str(cert), retries=0)
        with pytest.raises(BackendError, match="could not be verified"):
            wrong_host.test_connection()
    finally:
        srv.stop()
    with pytest.raises(InputError, match="does not exist"):
        RemoteBackend("https://localhost:1", ca_bundle="/nonexistent.pem")
