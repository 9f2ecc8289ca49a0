"""Helpers shared by the worker/backend tests (no tests here).

- ``shared_engine``: the real tiny fixture model, loaded once per process.
- ``SpyEngine``: that engine behind a counting proxy (a spy, not a fake: every
  result is the real model's), with a delay and a failure injection.
- ``start_worker`` / ``stop_worker``: the worker as a real process.
- ``chain3``: the fixture conversation (image and turns).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from MultiTurnSegLib.backends.base import TurnSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "Testing" / "Data"
TINY_MODEL_JSON = DATA_DIR / "mediround-tiny" / "model" / "model.json"
CHAIN3_DIR = DATA_DIR / "mediround-tiny" / "cases" / "chain3"


# --------------------------------------------------------------------------- counting spy


class SpySession:
    """A real ``SliceSession`` behind a proxy that counts ``extend``/``truncate``/``run_turn``
    and otherwise delegates (results are the real model's)."""

    def __init__(self, spy: "SpyEngine", session):
        self._spy = spy
        self._session = session

    def extend(self, spec: TurnSpec):
        self._spy._count("extend")
        return self._session.extend(spec)

    def truncate(self, n):
        self._spy._count("truncate")
        return self._session.truncate(n)

    def run_turn(self, spec: TurnSpec, **kwargs):
        self._spy._count("run_turn")
        if self._spy.delay:
            time.sleep(self._spy.delay)
        self._spy._maybe_fail("run_turn")
        return self._session.run_turn(spec, **kwargs)

    def __getattr__(self, name):  # fed_turns, memory_bytes, undo, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._session, name)


class SpyEngine:
    """The real tiny engine (``shared_engine()``) behind a thin proxy: it counts the
    work asked of it (slice encodings, fed turns, truncations, decoded turns) so
    that cache behaviour can be checked, and delegates every call.

    ``delay``: seconds slept before each real ``run_turn`` (a slow turn, for the
    busy/timeout tests). ``inject(exc, at)``: the next call of ``at``
    ("new_session" or "run_turn") raises ``exc`` instead of calling the engine:
    a failure injection for what the tiny CPU model cannot produce on demand
    (a GPU out-of-memory, a device-side assert, a model failure).
    """

    def __init__(self, engine=None, *, delay: float = 0.0):
        self.engine = engine if engine is not None else shared_engine()
        self.delay = delay
        self.counts = {"new_session": 0, "extend": 0, "truncate": 0, "run_turn": 0}
        self._failures = {}
        self._lock = threading.Lock()

    def _count(self, what):
        with self._lock:
            self.counts[what] += 1

    def inject(self, exc: BaseException, at: str = "run_turn"):
        assert at in ("new_session", "run_turn")
        with self._lock:
            self._failures[at] = exc

    def _maybe_fail(self, at):
        with self._lock:
            exc = self._failures.pop(at, None)
        if exc is not None:
            raise exc

    def info(self):
        return self.engine.info()

    def new_session(self, image):
        self._count("new_session")
        self._maybe_fail("new_session")
        return SpySession(self, self.engine.new_session(image))

    def __getattr__(self, name):
        if name.startswith("_") or name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


_ENGINE = {}


def shared_engine():
    """The tiny model loaded once per test process (CPU, fp32)."""
    if "engine" not in _ENGINE:
        from MultiTurnSegLib.engine import MediRoundEngine

        _ENGINE["engine"] = MediRoundEngine.from_model_json(str(TINY_MODEL_JSON), device="cpu")
    return _ENGINE["engine"]


# --------------------------------------------------------------------------- fixture case


def chain3():
    """(image (H, W, 3) uint8, [(prompt, answer, ref index or None)])."""
    from PIL import Image

    case = json.loads((CHAIN3_DIR / "case.json").read_text())
    img = np.array(Image.open(CHAIN3_DIR / case["image"]).convert("RGB"))
    turns = [(t["prompt"], t["answer"], t["ref"]) for t in case["turns"]]
    return img, turns


def run_conversation(backend, image, turns, *, apply_jcm=True, teacher_answers=True):
    """Run ``turns`` in order, each referring to the predicted mask of its ref; returns results."""
    history: List[TurnSpec] = []
    results = []
    for prompt, answer, ref in turns:
        ref_mask = results[ref].mask if ref is not None else None
        spec = TurnSpec(prompt, answer if teacher_answers else None, ref_mask)
        res = backend.run_turn(image, history, spec, apply_jcm=apply_jcm)
        results.append(res)
        history.append(TurnSpec(prompt, res.answer, ref_mask))
    return results


def assert_same_result(a, b, *, tol=0.0):
    assert a.answer == b.answer
    assert a.jcm_refined == b.jcm_refined
    assert (a.jcm_score is None) == (b.jcm_score is None)
    if a.jcm_score is not None:
        assert abs(a.jcm_score - b.jcm_score) <= tol, (a.jcm_score, b.jcm_score)
    assert a.mask.shape == b.mask.shape
    assert a.mask.dtype == bool and b.mask.dtype == bool
    assert np.array_equal(a.mask, b.mask), f"{int((a.mask != b.mask).sum())} pixels differ"


# --------------------------------------------------------------------------- worker process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MULTITURNSEG_WORKER_TOKEN", None)
    return env


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list):
        self.proc = proc
        self.url = url
        self.lines = lines

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_worker(args: List[str], *, timeout: float = 180.0, launcher: Optional[str] = None) -> WorkerProcess:
    """Start ``python -m MultiTurnSegLib worker ARGS`` (or ``python -c launcher ARGS``) and
    wait for its "listening on URL" line."""
    cmd = [sys.executable, "-c", launcher] if launcher else [sys.executable, "-m", "MultiTurnSegLib", "worker"]
    proc = subprocess.Popen(
        cmd + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=str(REPO_ROOT)
    )
    lines: list = []
    found = {}
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = re.search(r"listening on (https?://\S+)", line)
            if m and not ready.is_set():
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or "url" not in found:
        proc.kill()
        proc.wait(10)
        raise RuntimeError("worker did not start:\n" + "\n".join(lines[-40:]))
    return WorkerProcess(proc, found["url"], lines)


# --------------------------------------------------------------------------- in-process server


class ThreadServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread (for fast tests)."""

    def __init__(self, app, *, ssl_certfile=None, ssl_keyfile=None):
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"{'https' if ssl_certfile else 'http'}://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
