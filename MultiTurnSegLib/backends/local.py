"""The engine in this process, with a content-keyed cache of slice sessions.

A request is self-contained (image, every earlier turn, the new turn). The
model is deterministic, so results are kept too (a small LRU keyed by the
whole request's content): repeating a turn costs nothing. Otherwise the
backend looks for a cached session of the same image whose fed turns share
the longest prefix with the request's history, truncates it to that prefix,
feeds the remaining history turns teacher-forced (``extend``) and runs the new
turn, so continuing a conversation only pays for the new turn's tokens. The
results do not depend on what is cached.

Engine work is serialized by one lock (one GPU); a taken session leaves the
cache while it is used, so concurrent callers never share one.

This module imports no torch itself; ``from_model_json`` imports the engine.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Optional, Sequence

import numpy as np

from ..errors import InferenceError, MultiTurnSegError
from ..worker.cache import LRUBytes, SessionCache
from ..worker.protocol import DEFAULT_LIMITS, WireLimits, check_request, image_digest, turn_digest
from .base import AnswerMode, Backend, ProgressCallback, TurnResult, TurnSpec, report_progress

log = logging.getLogger(__name__)

DEFAULT_CACHE_MB = 2048
DEFAULT_RESULT_CACHE_MB = 64


def request_key(image_key: str, history_keys, turn: TurnSpec, apply_jcm: bool, answer_mode: AnswerMode) -> str:
    """Content key of a whole turn request (for the result cache)."""
    h = hashlib.sha256(b"MTS-REQUEST-1")
    h.update(image_key.encode("ascii"))
    for k in history_keys:
        h.update(k.encode("ascii"))
    h.update(b"|" + turn_digest(turn).encode("ascii"))
    h.update(b"|" + (b"answer" if turn.answer is not None else b"none"))
    h.update(b"|jcm" if apply_jcm else b"|nojcm")
    h.update(b"|" + AnswerMode(answer_mode).value.encode("ascii"))
    return h.hexdigest()


class _StoredResult:
    __slots__ = ("bits", "shape", "answer", "jcm_score", "jcm_refined")

    def __init__(self, result: TurnResult):
        self.bits = np.packbits(result.mask, axis=None)
        self.shape = result.mask.shape
        self.answer = result.answer
        self.jcm_score = result.jcm_score
        self.jcm_refined = result.jcm_refined

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes) + 4 * len(self.answer) + 256

    def result(self) -> TurnResult:
        n = self.shape[0] * self.shape[1]
        mask = np.unpackbits(self.bits, count=n).reshape(self.shape).astype(bool)
        return TurnResult(mask=mask, answer=self.answer, jcm_score=self.jcm_score,
                          jcm_refined=self.jcm_refined, timings={})


class LocalBackend(Backend):
    """Runs turns on a ``MediRoundEngine`` in this process."""

    def __init__(
        self,
        engine,
        cache_mb: float = DEFAULT_CACHE_MB,
        *,
        result_cache_mb: Optional[float] = None,
        limits: WireLimits = DEFAULT_LIMITS,
    ):
        """cache_mb: memory for cached sessions (image embeddings, key/value caches);
        result_cache_mb: memory for finished results (default 64 MB, 0 when cache_mb is 0)."""
        self.engine = engine
        self.limits = limits
        self.cache = SessionCache(int(cache_mb * 1024 * 1024))
        if result_cache_mb is None:
            result_cache_mb = DEFAULT_RESULT_CACHE_MB if cache_mb > 0 else 0
        self.results = LRUBytes(int(result_cache_mb * 1024 * 1024))
        self._lock = threading.Lock()  # serializes all engine (GPU) work
        self._closed = False

    @classmethod
    def from_model_json(cls, path, *, device: str = "auto", dtype=None, load_in_4bit: bool = False, cache_mb=DEFAULT_CACHE_MB):
        from ..engine import MediRoundEngine

        engine = MediRoundEngine.from_model_json(path, device=device, dtype=dtype, load_in_4bit=load_in_4bit)
        return cls(engine, cache_mb=cache_mb)

    # ------------------------------------------------------------------ Backend

    def info(self) -> dict:
        info = dict(self.engine.info())
        info.setdefault("backend", "local")
        info["limits"] = self.limits.as_dict()
        info["cache"] = self.cache.stats()
        info["result_cache"] = self.results.stats()
        return info

    def run_turn(
        self,
        image: np.ndarray,
        history: Sequence[TurnSpec],
        turn: TurnSpec,
        *,
        apply_jcm: bool = True,
        answer_mode: AnswerMode = AnswerMode.TEMPLATE,
        progress: Optional[ProgressCallback] = None,
        image_key: Optional[str] = None,
    ) -> TurnResult:
        """See :meth:`Backend.run_turn`. ``image_key``: the image's digest if the caller
        already computed it (the worker does)."""
        if self._closed:
            raise InferenceError("the local model was closed; load it again")
        image, history, turn = check_request(image, history, turn, self.limits)
        answer_mode = AnswerMode(answer_mode)
        t_start = time.perf_counter()
        img_key = image_key or image_digest(image)
        keys = [turn_digest(t) for t in history]
        rkey = request_key(img_key, keys, turn, bool(apply_jcm), answer_mode)
        stored = self.results.get(rkey) if self.results.max_bytes > 0 else None
        if stored is not None:
            result = stored.result()
            result.timings = {"result_cache": time.perf_counter() - t_start}
            report_progress(progress, "done", 1.0)
            return result
        report_progress(progress, "queued", 0.0)
        with self._lock:
            t_locked = time.perf_counter()
            entry, n = self.cache.take(img_key, keys)
            session = None
            try:
                timings = {"queue": t_locked - t_start}
                if entry is None:
                    report_progress(progress, "encoding image", 0.05)
                    t0 = time.perf_counter()
                    session = self.engine.new_session(image)
                    timings["new_session"] = time.perf_counter() - t0
                    n = 0
                else:
                    session = entry.session
                    if len(entry.turn_keys) > n:
                        session.truncate(n)
                self.cache.reused_turns += n
                if len(history) > n:
                    t0 = time.perf_counter()
                    for i, t in enumerate(history[n:]):
                        report_progress(progress, "reading conversation", 0.1 + 0.5 * i / max(1, len(history) - n))
                        session.extend(t)
                    self.cache.fed_turns += len(history) - n
                    timings["extend"] = time.perf_counter() - t0
                report_progress(progress, "segmenting", 0.6)
                out = session.run_turn(turn, apply_jcm=bool(apply_jcm), answer_mode=answer_mode)
            except MultiTurnSegError as exc:
                # the session is dropped (not put back); after running out of
                # memory, free every cached session so that a retry has room
                if isinstance(exc, InferenceError) and "out of memory" in str(exc).lower():
                    self.cache.clear()
                raise
            except MemoryError as exc:
                self.cache.clear()
                raise InferenceError(f"Out of memory while running the turn ({exc}).") from exc
            except Exception as exc:
                # type only: messages and tracebacks may quote the request (debug level has them)
                log.error("model failure: %s", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
                raise InferenceError(f"the model failed on this turn: {type(exc).__name__}: {exc}") from exc
            answer = str(out.answer)
            new_keys = keys + [turn_digest(turn, answer=answer)]
            try:
                nbytes = int(session.memory_bytes())
            except Exception:
                nbytes = self.cache.max_bytes + 1  # unknown size: do not keep it
            self.cache.put(img_key, new_keys, session, nbytes)
        timings.update({k: float(v) for k, v in dict(getattr(out, "timings", None) or {}).items()})
        timings["total"] = time.perf_counter() - t_start
        report_progress(progress, "done", 1.0)
        score = out.jcm_score
        mask = np.asarray(out.mask, dtype=bool)
        if mask.shape != image.shape[:2]:
            raise InferenceError(f"the model returned a mask of shape {mask.shape} for a slice of {image.shape[:2]}")
        result = TurnResult(
            mask=mask,
            answer=answer,
            jcm_score=None if score is None else float(score),
            jcm_refined=bool(out.jcm_refined),
            timings=timings,
        )
        if self.results.max_bytes > 0:
            stored = _StoredResult(result)
            self.results.put(rkey, stored, stored.nbytes)
        return result

    def clear_cache(self):
        with self._lock:
            self.cache.clear()
            self.results.clear()

    def close(self) -> None:
        with self._lock:
            self.cache.clear()
            self.results.clear()
            self._closed = True
