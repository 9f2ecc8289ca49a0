"""The remote worker: a FastAPI app serving turns of one backend.

Endpoints
  GET  /health   liveness, no authentication: {"status": "ok", "protocol": 1}
  GET  /info     model and worker description (stage, jcm_available, dtype,
                 device, GPU, versions, limits)
  POST /turn     binary turn request (``protocol``) -> binary turn result

Every request is self-contained; the worker only caches by content (decoded
slices by digest, engine sessions by conversation prefix), so a restarted or a
second worker answers the same. Errors are JSON ``{"error": code, "message":
text}``: 400 malformed request, 401 no token, 403 wrong token, 409 image sent
by digest that this worker does not have (the client sends it again), 413 too
large, 415 wrong content type, 422 a request the model cannot run (e.g. an
empty prompt), 503 busy, 500 only for a real model failure.

Logs at the default level hold no pixels, prompts or identifiers.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..backends.base import Backend
from ..errors import BackendError, InferenceError, InputError
from . import protocol
from .cache import ImageStore
from .protocol import ProtocolError, WireLimits

log = logging.getLogger("MultiTurnSegLib.worker")


@dataclass(frozen=True)
class WorkerLimits(WireLimits):
    """Wire limits plus the worker's own."""

    max_in_flight: int = 32  # turn requests queued or running; more get 503
    image_cache_mb: float = 512.0  # decoded slices kept for by-digest requests

    def as_dict(self) -> dict:
        d = super().as_dict()
        d["max_in_flight"] = self.max_in_flight
        d["image_cache_mb"] = self.image_cache_mb
        return d


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _error(status: int, code: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(code, message), status_code=status, headers=headers)


def _versions() -> dict:
    v = {"multiturnseg": __version__, "python": platform.python_version(), "protocol": protocol.PROTOCOL_VERSION}
    for name in ("fastapi", "uvicorn", "torch", "transformers", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            v[name] = str(mod.__version__)
    return v


def _gpu_name() -> Optional[str]:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:
        pass
    return None


def create_app(backend: Backend, *, token: Optional[str] = None, limits: Optional[WireLimits] = None) -> FastAPI:
    """The worker app serving ``backend``; ``token``: required bearer token (None: no auth)."""
    if limits is None:
        limits = WorkerLimits()
    elif not isinstance(limits, WorkerLimits):
        limits = WorkerLimits(**{k: getattr(limits, k) for k in WireLimits.__dataclass_fields__})
    if token is not None and not token.strip():
        raise ValueError("the worker token must not be empty")
    token_bytes = token.encode("utf-8") if token is not None else None
    images = ImageStore(int(limits.image_cache_mb * 1024 * 1024))
    state = {"in_flight": 0, "served": 0, "started": time.time()}
    state_lock = threading.Lock()
    try:
        passes_image_key = "image_key" in inspect.signature(backend.run_turn).parameters
    except (TypeError, ValueError):
        passes_image_key = False

    app = FastAPI(title="MultiTurnSeg worker", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.limits = limits
    app.state.images = images

    def check_auth(request: Request):
        if token_bytes is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise _Reject(401, "unauthorized", "this worker requires a token (Authorization: Bearer ...)",
                          {"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _Reject(401, "unauthorized", "the Authorization header must be 'Bearer <token>'",
                          {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token_bytes):
            raise _Reject(403, "forbidden", "the token was rejected by the worker")

    @app.exception_handler(_Reject)
    async def _on_reject(request: Request, exc: _Reject):
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        return _error(422, "bad_request", "the request is not valid")

    @app.get("/health")
    async def health():
        return {"status": "ok", "protocol": protocol.PROTOCOL_VERSION, "version": __version__}

    @app.get("/info")
    async def info(request: Request):
        check_auth(request)
        try:
            data = await run_in_threadpool(backend.info)
        except Exception as exc:  # a description must not crash the worker
            log.warning("backend info failed: %s", type(exc).__name__)
            raise _Reject(500, "model_error", f"the worker could not describe its model: {exc}")
        data = dict(data)
        # file names only: the worker's directory layout is nobody's business
        if data.get("checkpoint_files"):
            data["checkpoint_files"] = [os.path.basename(str(f)) for f in data["checkpoint_files"]]
        if data.get("model_json"):
            data["model_json"] = os.path.basename(str(data["model_json"]))
        data.setdefault("gpu_name", _gpu_name())
        data["versions"] = {**_versions(), **(data.get("versions") or {})}
        data["limits"] = {**(data.get("limits") or {}), **limits.as_dict()}
        data["worker"] = {
            "auth_required": token_bytes is not None,
            "in_flight": state["in_flight"],
            "served": state["served"],
            "uptime_s": round(time.time() - state["started"], 1),
            "image_cache": images.stats(),
        }
        return JSONResponse(data)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise _Reject(400, "bad_request", "Content-Length is not a number")
            if n > limits.max_body_bytes:
                raise _Reject(413, "too_large",
                              f"request of {n} bytes exceeds the worker's limit of {limits.max_body_bytes}")
        chunks = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _Reject(413, "too_large",
                                  f"request exceeds the worker's limit of {limits.max_body_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise _Reject(400, "client_disconnected", "the client closed the connection before sending the request")
        return b"".join(chunks)

    @app.post("/turn")
    async def turn(request: Request):
        check_auth(request)
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype != protocol.REQUEST_CONTENT_TYPE:
            raise _Reject(415, "unsupported_media_type",
                          f"a turn must be sent as {protocol.REQUEST_CONTENT_TYPE}, got {ctype or 'no content type'}")
        with state_lock:
            if state["in_flight"] >= limits.max_in_flight:
                raise _Reject(503, "busy", f"the worker is busy ({state['in_flight']} turns queued); try again shortly",
                              {"Retry-After": "2"})
            state["in_flight"] += 1
        try:
            return await _turn(request)
        finally:
            with state_lock:
                state["in_flight"] -= 1

    async def _turn(request: Request):
        t0 = time.perf_counter()
        body = await read_body(request)
        try:
            # decompression and hashing are CPU work: off the event loop, so /health and uploads go on
            req = await run_in_threadpool(protocol.decode_request, body, limits)
        except ProtocolError as exc:
            status = 413 if exc.code == "too_large" else 400
            raise _Reject(status, exc.code, str(exc))
        except Exception as exc:  # a decoder bug must still not turn bad input into a 500
            log.error("request decoding failed unexpectedly: %s", type(exc).__name__)
            raise _Reject(400, "bad_request", "the request could not be decoded")
        del body
        if req.image is None:
            image = images.get(req.image_sha256)
            if image is None:
                raise _Reject(409, "image_unknown", "this worker does not have the slice; send its pixels")
            if image.shape[:2] != (req.height, req.width):
                raise _Reject(400, "bad_request", "the declared image size does not match the image with this digest")
        else:
            image = req.image
            images.put_image(req.image_sha256, image)
        t_decoded = time.perf_counter()
        kwargs = {"apply_jcm": req.apply_jcm, "answer_mode": req.answer_mode}
        if passes_image_key:
            kwargs["image_key"] = req.image_sha256
        try:
            result = await run_in_threadpool(backend.run_turn, image, req.history, req.turn, **kwargs)
        except InputError as exc:
            raise _Reject(422, "invalid_turn", str(exc))
        except InferenceError as exc:
            log.warning("model failure on a turn: %s", type(exc).__name__)
            status = 503 if "out of memory" in str(exc).lower() else 500
            raise _Reject(status, "model_error", str(exc))
        except BackendError as exc:
            raise _Reject(502, "backend_error", str(exc))
        except Exception as exc:
            log.error("unexpected failure on a turn: %s", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            raise _Reject(500, "model_error", f"the model failed on this turn ({type(exc).__name__})")
        if result.mask.shape != (req.height, req.width):
            raise _Reject(500, "model_error", "the model returned a mask of the wrong size")
        t_ran = time.perf_counter()
        timings = dict(result.timings or {})
        timings["worker_decode"] = t_decoded - t0
        result.timings = timings
        try:
            payload = protocol.encode_result(result)
        except ValueError as exc:
            raise _Reject(500, "model_error", f"the model returned an invalid result: {exc}")
        with state_lock:
            state["served"] += 1
        log.info("turn %dx%d, %d earlier turns, %.3f s", req.width, req.height, len(req.history), t_ran - t0)
        return Response(
            payload,
            media_type=protocol.RESULT_CONTENT_TYPE,
            headers={"X-Worker-Time": f"{time.perf_counter() - t0:.6f}"},
        )

    return app
