"""RemoteBackend needs nothing beyond the standard library and numpy: run it in a
process where torch, fastapi, httpx, requests, ... cannot be imported. The worker
it talks to serves the real tiny model (in this process, on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from MultiTurnSegLib.backends.base import TurnSpec
from MultiTurnSegLib.backends.local import LocalBackend
from MultiTurnSegLib.worker.server import create_app

from test_worker_support import REPO_ROOT, SpyEngine, ThreadServer, _env, shared_engine

pytestmark = pytest.mark.slow  # the real tiny model

CLIENT = r"""
import importlib.abc, json, sys
BLOCKED = {"torch", "fastapi", "starlette", "uvicorn", "httpx", "requests", "urllib3", "transformers",
           "pydantic", "anyio", "h11", "PIL", "SimpleITK", "hypothesis"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
import numpy as np
from MultiTurnSegLib.backends.remote import RemoteBackend
from MultiTurnSegLib.backends.base import TurnSpec
from MultiTurnSegLib.worker import protocol
be = RemoteBackend(sys.argv[1], sys.argv[2])
info = be.test_connection()
img = np.repeat(np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)[:, :, None], 3, axis=2)
r = be.run_turn(img, [], TurnSpec("Segment the liver."))
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps({"stage": info["stage"], "mask": np.packbits(r.mask).tolist(), "answer": r.answer,
                  "score": r.jcm_score, "loaded": loaded}))
"""


def test_remote_client_runs_with_stdlib_and_numpy_only():
    engine = SpyEngine()
    app = create_app(LocalBackend(engine), token="import-test-token")
    srv = ThreadServer(app)
    try:
        p = subprocess.run([sys.executable, "-c", CLIENT, srv.url, "import-test-token"], capture_output=True,
                           text=True, env=_env(), cwd=str(REPO_ROOT), timeout=120)
    finally:
        srv.stop()
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["stage"] == 2
    assert engine.counts["run_turn"] == 1  # the worker's model ran the turn
    img = np.repeat(np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)[:, :, None], 3, axis=2)
    ref = LocalBackend(shared_engine()).run_turn(img, [], TurnSpec("Segment the liver."))
    assert out["mask"] == np.packbits(ref.mask).tolist()
    assert out["answer"] == ref.answer and out["score"] == ref.jcm_score
