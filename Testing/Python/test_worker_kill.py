"""A worker killed (SIGKILL) in the middle of a turn: the client reports it
clearly; after a restart the same turn succeeds and the conversation goes on
unchanged (requests are self-contained)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from MultiTurnSegLib.backends.base import TurnSpec
from MultiTurnSegLib.backends.local import LocalBackend
from MultiTurnSegLib.backends.remote import RemoteBackend
from MultiTurnSegLib.errors import BackendError

from test_worker_support import TINY_MODEL_JSON, assert_same_result, chain3, free_port, start_worker, shared_engine

pytestmark = pytest.mark.slow

# The real worker command, with every turn delayed so that the kill lands mid-turn.
SLOW_LAUNCHER = r"""
import functools, sys, time
from MultiTurnSegLib.backends import local
_orig = local.LocalBackend.run_turn
@functools.wraps(_orig)
def _slow(self, *a, **k):
    time.sleep(float(sys.argv[1]))
    return _orig(self, *a, **k)
local.LocalBackend.run_turn = _slow
from MultiTurnSegLib.cli import main
sys.exit(main(["worker"] + sys.argv[2:]))
"""


def test_kill_during_a_turn_then_restart():
    img, turns = chain3()
    port = free_port()
    args = ["--model", str(TINY_MODEL_JSON), "--port", str(port), "--device", "cpu"]
    slow = start_worker(["2.0"] + args, launcher=SLOW_LAUNCHER)
    restarted = None
    try:
        url = slow.url
        assert url == f"http://127.0.0.1:{port}"
        remote = RemoteBackend(url, timeout=(5, 120), retries=2, backoff=0.2)
        # round 1 goes through (slowly)
        spec1 = TurnSpec(turns[0][0], turns[0][1])
        r1 = remote.run_turn(img, [], spec1)
        history = [TurnSpec(turns[0][0], r1.answer)]
        spec2 = TurnSpec(turns[1][0], turns[1][1], r1.mask)

        outcome = {}

        def second_turn():
            try:
                outcome["result"] = remote.run_turn(img, history, spec2)
            except BaseException as exc:  # noqa: BLE001
                outcome["error"] = exc

        t = threading.Thread(target=second_turn)
        t.start()
        time.sleep(0.8)  # the worker is now inside the turn (it sleeps 2 s first)
        os.kill(slow.proc.pid, signal.SIGKILL)
        slow.proc.wait(10)
        t.join(60)
        assert "result" not in outcome
        err = outcome["error"]
        assert isinstance(err, BackendError), repr(err)
        assert url in str(err) and "Cannot reach" in str(err), str(err)

        # restart a (normal) worker on the same address; the client keeps its state
        restarted = start_worker(args)
        assert restarted.url == url
        r2 = remote.run_turn(img, history, spec2)
        assert remote.last_exchange["round_trips"] == 2  # the new worker asked for the slice again
        history.append(TurnSpec(turns[1][0], r2.answer, r1.mask))
        r3 = remote.run_turn(img, history, TurnSpec(turns[2][0], turns[2][1], r2.mask))

        local = LocalBackend(shared_engine())
        l1 = local.run_turn(img, [], spec1)
        l2 = local.run_turn(img, history[:1], spec2)
        l3 = local.run_turn(img, history, TurnSpec(turns[2][0], turns[2][1], l2.mask))
        for a, b in ((r1, l1), (r2, l2), (r3, l3)):
            assert_same_result(a, b)
    finally:
        slow.stop(signal.SIGKILL)
        if restarted is not None:
            restarted.stop()
