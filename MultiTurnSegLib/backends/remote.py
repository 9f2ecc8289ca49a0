"""Client of the remote worker: Python's standard library and numpy only.

This is what Slicer's Python (which has no extra packages) uses; nothing in
its import chain may import requests, httpx, torch or fastapi.

Every turn request is self-contained. The slice's pixels are sent with the
first turn on a slice; later turns send only its digest, and if the worker
does not have it (restarted, or another worker) it answers 409 and the pixels
are sent again at once, so nothing is lost.

Errors are :class:`BackendError` (or :class:`InputError` for a turn the model
cannot run) with messages a radiologist can act on.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import BackendError, InputError
from ..worker import protocol
from .base import AnswerMode, Backend, ProgressCallback, TurnResult, TurnSpec, report_progress

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = (5.0, 300.0)
_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
_UPLOAD_CHUNK = 256 * 1024
_KNOWN_IMAGES = 64
_UNSENDABLE_IN_HEADER = re.compile(r"[^\t\x20-\x7e\x80-\xff]")  # HTTP field-value characters


class _ConnectFailure(Exception):
    """Could not connect or the connection broke before an answer came; safe to retry."""


def is_loopback_host(host: str) -> bool:
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteBackend(Backend):
    """Runs turns on a MultiTurnSeg worker at ``url``.

    token:     the worker's bearer token (None if it requires none).
    timeout:   (connect, read) seconds; a number means (that, that).
    retries:   extra attempts after a connection failure (never after an answer).
    ca_bundle: PEM file of the certificate authority that signed an https
               worker's certificate (e.g. a self-signed one); system CAs otherwise.
               Certificates and host names are always verified.
    progress:  default progress callback (stage, fraction).
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        *,
        timeout: Union[float, Tuple[float, float]] = DEFAULT_TIMEOUT,
        retries: int = 3,
        ca_bundle: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        backoff: float = 0.5,
        send_image_by_digest: bool = True,
    ):
        if not isinstance(url, str) or not url.strip():
            raise InputError("the worker URL is empty; enter it as http://host:port or https://host:port")
        url = url.strip()
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputError(f"the worker URL {url!r} must look like http://host:port or https://host:port")
        try:
            port = parsed.port
        except ValueError:
            raise InputError(f"the worker URL {url!r} has an invalid port") from None
        self.url = url.rstrip("/")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = port or (443 if parsed.scheme == "https" else 80)
        self.base_path = parsed.path.rstrip("/")
        self.token = token.strip() if token else None
        if self.token and _UNSENDABLE_IN_HEADER.search(self.token):
            # http.client would fail every request with a bare ValueError/UnicodeEncodeError
            raise InputError("the worker token contains characters that cannot be sent in an HTTP header")
        if isinstance(timeout, (int, float)):
            timeout = (float(timeout), float(timeout))
        self.connect_timeout, self.read_timeout = (float(timeout[0]), float(timeout[1]))
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.progress = progress
        self.send_image_by_digest = send_image_by_digest
        self._ssl_context = None
        if self.scheme == "https":
            if ca_bundle is not None and not os.path.isfile(ca_bundle):
                raise InputError(f"the CA bundle {ca_bundle!r} does not exist")
            try:
                self._ssl_context = ssl.create_default_context(cafile=ca_bundle)
            except (ssl.SSLError, OSError) as exc:
                raise InputError(f"the CA bundle {ca_bundle!r} could not be read: {exc}") from None
        elif self.token and not is_loopback_host(self.host):
            log.warning("the worker token is sent unencrypted over http to %s; prefer https", self.host)
        self._known = OrderedDict()
        self._known_lock = threading.Lock()
        self.last_exchange = {}

    # ------------------------------------------------------------------ HTTP

    def _connection(self):
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self._ssl_context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)

    def _headers(self, extra=None) -> dict:
        h = {"User-Agent": "MultiTurnSeg-client", "Accept": "*/*"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if extra:
            h.update(extra)
        return h

    def _once(self, method: str, path: str, body: Optional[bytes], headers: dict, progress):
        """One HTTP exchange -> (status, headers, body, bytes sent, bytes received)."""
        conn = self._connection()
        try:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                raise BackendError(
                    f"The certificate of the worker at {self.url} could not be verified "
                    f"({exc.verify_message or exc}). If the worker uses its own certificate, give its "
                    "CA bundle in the settings."
                ) from None
            except ssl.SSLError as exc:
                raise BackendError(f"A secure connection to the worker at {self.url} failed: {exc}") from None
            except socket.gaierror as exc:
                raise _ConnectFailure(f"the host name {self.host!r} could not be resolved ({exc.strerror or exc})")
            except (socket.timeout, TimeoutError):
                raise _ConnectFailure(f"no answer within {self.connect_timeout:g} s")
            except OSError as exc:
                raise _ConnectFailure(exc.strerror or str(exc) or type(exc).__name__)
            conn.sock.settimeout(self.read_timeout)
            try:
                conn.putrequest(method, self.base_path + path, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body or b"")))
                conn.endheaders()
                sent = len(f"{method} {self.base_path + path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n")
                sent += sum(len(k) + len(str(v)) + 4 for k, v in headers.items()) + len(f"Content-Length: {len(body or b'')}\r\n")
                if body:
                    view = memoryview(body)
                    for start in range(0, len(view), _UPLOAD_CHUNK):
                        chunk = view[start : start + _UPLOAD_CHUNK]
                        conn.send(chunk)
                        sent += len(chunk)
                        if progress:
                            progress("sending", 0.3 * (start + len(chunk)) / len(view))
                if progress:
                    progress("waiting for the worker", 0.3)
                resp = conn.getresponse()
                length = resp.getheader("Content-Length")
                if length is not None and length.isdigit() and int(length) > _MAX_RESPONSE_BYTES:
                    raise BackendError(f"The worker at {self.url} sent an answer that is too large.")
                data = resp.read(_MAX_RESPONSE_BYTES + 1)
                if len(data) > _MAX_RESPONSE_BYTES:
                    raise BackendError(f"The worker at {self.url} sent an answer that is too large.")
                resp_headers = {k.lower(): v for k, v in resp.getheaders()}
                received = len(data) + sum(len(k) + len(v) + 4 for k, v in resp.getheaders())
                return resp.status, resp_headers, data, sent, received
            except (socket.timeout, TimeoutError):
                raise BackendError(
                    f"The worker at {self.url} did not answer within {self.read_timeout:g} s. "
                    "It may be overloaded; try again or raise the timeout."
                ) from None
            except (http.client.RemoteDisconnected, ConnectionError, http.client.IncompleteRead, BrokenPipeError) as exc:
                raise _ConnectFailure(f"the connection was lost ({type(exc).__name__})")
            except http.client.HTTPException as exc:
                raise BackendError(f"The worker at {self.url} sent an answer that is not valid HTTP ({exc}).") from None
            except OSError as exc:
                raise _ConnectFailure(exc.strerror or str(exc) or type(exc).__name__)
        finally:
            conn.close()

    def _request(self, method: str, path: str, body: Optional[bytes] = None, headers=None, progress=None):
        headers = self._headers(headers)
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * (2 ** (attempt - 1))
                if progress:
                    progress(f"worker unreachable, retrying ({attempt}/{self.retries})", 0.0)
                time.sleep(delay)
            try:
                return self._once(method, path, body, headers, progress)
            except _ConnectFailure as exc:
                last = exc
                log.info("worker %s: attempt %d failed: %s", self.url, attempt + 1, exc)
        raise BackendError(
            f"Cannot reach the MultiTurnSeg worker at {self.url}: {last}. "
            "Check that the worker is running and that the URL in the settings is right."
        )

    def _message(self, data: bytes) -> Tuple[str, str]:
        try:
            obj = json.loads(data.decode("utf-8"))
            if isinstance(obj, dict):
                msg = obj.get("message") or obj.get("detail") or ""
                return str(obj.get("error") or ""), str(msg)
        except (ValueError, UnicodeDecodeError):
            pass
        text = data[:300].decode("utf-8", "replace").strip()
        return "", text

    def _raise_for(self, status: int, data: bytes):
        code, msg = self._message(data)
        detail = f": {msg}" if msg else ""
        if status == 401:
            if self.token:
                raise BackendError(f"The worker at {self.url} did not accept the token{detail}.")
            raise BackendError(f"The worker at {self.url} requires a token; enter it in the settings.")
        if status == 403:
            raise BackendError(f"The worker at {self.url} rejected the token; check the token in the settings.")
        if status == 413:
            raise BackendError(f"The request is too large for the worker at {self.url}{detail}.")
        if status in (429, 503) and code != "model_error":
            raise BackendError(f"The worker at {self.url} is busy{detail}. Try again in a moment.")
        if status == 422:
            raise InputError(msg or "the worker could not run this turn")
        if status == 400 or status == 415:
            raise BackendError(
                f"The worker at {self.url} could not read the request{detail}. "
                "Are the client and the worker the same MultiTurnSeg version?"
            )
        if status == 404:
            raise BackendError(f"{self.url} does not look like a MultiTurnSeg worker (404 Not Found).")
        if code == "model_error" or status >= 500:
            raise BackendError(f"The model failed on the worker at {self.url}{detail or f' (HTTP {status})'}.")
        raise BackendError(f"The worker at {self.url} answered HTTP {status}{detail}.")

    def _get_json(self, path: str) -> dict:
        status, headers, data, _, _ = self._request("GET", path)
        if status != 200:
            self._raise_for(status, data)
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise BackendError(f"{self.url} does not look like a MultiTurnSeg worker (its answer is not JSON).")
        return obj

    # ------------------------------------------------------------------ Backend

    def health(self) -> dict:
        """The worker's /health answer (no token needed)."""
        return self._get_json("/health")

    def info(self) -> dict:
        return self._get_json("/info")

    def test_connection(self) -> dict:
        """Check reachability, protocol version and token; returns the worker's info."""
        health = self.health()
        if health.get("status") != "ok":
            raise BackendError(f"{self.url} does not look like a MultiTurnSeg worker.")
        if health.get("protocol") != protocol.PROTOCOL_VERSION:
            raise BackendError(
                f"The worker at {self.url} speaks protocol version {health.get('protocol')}; this client speaks "
                f"version {protocol.PROTOCOL_VERSION}. Use the same MultiTurnSeg version on both sides."
            )
        return self.info()

    def _remember(self, digest: str):
        with self._known_lock:
            self._known[digest] = True
            self._known.move_to_end(digest)
            while len(self._known) > _KNOWN_IMAGES:
                self._known.popitem(last=False)

    def _forget(self, digest: str):
        with self._known_lock:
            self._known.pop(digest, None)

    def _is_known(self, digest: str) -> bool:
        with self._known_lock:
            return digest in self._known

    def run_turn(
        self,
        image: np.ndarray,
        history: Sequence[TurnSpec],
        turn: TurnSpec,
        *,
        apply_jcm: bool = True,
        answer_mode: AnswerMode = AnswerMode.TEMPLATE,
        progress: Optional[ProgressCallback] = None,
    ) -> TurnResult:
        progress = progress or self.progress
        report = functools.partial(report_progress, progress) if progress is not None else None
        image = protocol.check_image(image)
        digest = protocol.image_digest(image)
        send_image = not (self.send_image_by_digest and self._is_known(digest))
        t0 = time.perf_counter()
        stats = {"sent": 0, "received": 0, "round_trips": 0, "image_sent": False}
        for _ in range(2):
            body = protocol.encode_request(
                image, list(history), turn, apply_jcm=apply_jcm, answer_mode=answer_mode,
                send_image=send_image, digest=digest,
            )
            headers = {"Content-Type": protocol.REQUEST_CONTENT_TYPE}
            status, resp_headers, data, sent, received = self._request("POST", "/turn", body, headers, report)
            stats["sent"] += sent
            stats["received"] += received
            stats["round_trips"] += 1
            stats["image_sent"] |= send_image
            if status == 409 and not send_image and self._message(data)[0] == "image_unknown":
                self._forget(digest)
                send_image = True  # the worker lost the slice (restart, another worker): send it again
                continue
            break
        if status != 200:
            self.last_exchange = stats
            self._raise_for(status, data)
        if report:
            report("reading the answer", 0.95)
        try:
            result = protocol.decode_result(data, expected_shape=image.shape[:2])
        except protocol.ProtocolError as exc:
            raise BackendError(f"The worker at {self.url} sent an answer this client cannot read: {exc}") from None
        self._remember(digest)
        result.timings = dict(result.timings)
        result.timings["remote_total"] = time.perf_counter() - t0
        stats["seconds"] = result.timings["remote_total"]
        self.last_exchange = stats
        if report:
            report("done", 1.0)
        return result
