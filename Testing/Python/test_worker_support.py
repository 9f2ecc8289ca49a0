"""Helpers shared by the worker/backend tests (no tests here).

- ``FakeEngine``: an engine with the real engine's session API whose masks are
  a pure function of (image, fed turns); it counts the work it is asked to do,
  so cache behaviour can be checked without torch.
- ``start_worker`` / ``stop_worker``: the worker as a real process.
- ``chain3``: the fixture conversation (image and turns).
"""

from __future__ import annotations

import hashlib
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

from MultiTurnSegLib.backends.base import AnswerMode, TurnSpec
from MultiTurnSegLib.worker.protocol import image_digest, turn_digest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "Testing" / "Data"
TINY_MODEL_JSON = DATA_DIR / "mediround-tiny" / "model" / "model.json"
CHAIN3_DIR = DATA_DIR / "mediround-tiny" / "cases" / "chain3"


# --------------------------------------------------------------------------- fake engine


class _Out:
    def __init__(self, mask, answer, jcm_score, jcm_refined, timings):
        self.mask, self.answer, self.jcm_score, self.jcm_refined, self.timings = (
            mask, answer, jcm_score, jcm_refined, timings)


class FakeSession:
    def __init__(self, engine, image):
        self.engine = engine
        self.image = image
        self.fed_turns: List[TurnSpec] = []

    def _state(self, upto):
        h = hashlib.sha256(image_digest(self.image).encode())
        for t in upto:
            h.update(turn_digest(t).encode())
        return h.digest()

    def extend(self, spec: TurnSpec):
        assert spec.answer is not None
        self.engine.counts["extend"] += 1
        self.fed_turns.append(spec)

    def truncate(self, n):
        self.engine.counts["truncate"] += 1
        del self.fed_turns[n:]

    def undo(self):
        self.fed_turns.pop()

    def run_turn(self, spec: TurnSpec, *, apply_jcm: bool, answer_mode: AnswerMode):
        self.engine.counts["run_turn"] += 1
        if self.engine.delay:
            time.sleep(self.engine.delay)
        answer = spec.answer if spec.answer is not None else "Sure, [SEG]."
        fed = TurnSpec(spec.prompt, answer, spec.reference_mask)
        state = self._state(self.fed_turns + [fed])
        rng = np.random.default_rng(int.from_bytes(state[:8], "little"))
        h, w = self.image.shape[:2]
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = rng.integers(1, max(2, min(h, w) // 3))
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if spec.reference_mask is not None:
            mask &= ~spec.reference_mask
        score = float(rng.random()) if apply_jcm else None
        self.fed_turns.append(fed)
        return _Out(mask, answer, score, score is not None and score <= 0.6, {"fake": 0.0})

    def memory_bytes(self):
        return int(self.image.nbytes) + 1000 * len(self.fed_turns)


class FakeEngine:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.counts = {"new_session": 0, "extend": 0, "truncate": 0, "run_turn": 0}

    def info(self):
        return {"stage": 2, "jcm_available": True, "dtype": "float32", "device": "cpu", "model": "fake"}

    def new_session(self, image):
        self.counts["new_session"] += 1
        return FakeSession(self, np.array(image))


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
