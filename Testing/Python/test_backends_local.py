"""LocalBackend on the real tiny engine: the content-keyed session cache, validation,
errors, thread safety.

The engine is the real fixture model (loaded once per process) behind
``SpyEngine``, a counting proxy: every mask compared here is the real model's.
The model costs about a second per slice encoding and per decoded turn on the
CPU, so work is shared where a test only reads it (``cached_run``).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from MultiTurnSegLib.backends.base import AnswerMode, TurnSpec
from MultiTurnSegLib.backends.local import LocalBackend
from MultiTurnSegLib.errors import InferenceError, InputError
from MultiTurnSegLib.worker.cache import LRUBytes, SessionCache

from test_worker_support import SpyEngine, assert_same_result, chain3, run_conversation

pytestmark = pytest.mark.slow  # the real tiny model (a second per slice and per turn on the CPU)


def _img(seed=0, h=48, w=64):
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), 3, axis=2)


# the fixture phantom (200 x 300): real anatomy-like shapes, so masks are not empty
IMG = chain3()[0]

TURNS = [
    ("Segment the liver.", "Sure, [SEG].", None),
    ("Segment the lesion inside round 1.", "It is [SEG].", 0),
    ("Segment the vessel next to it.", None, 1),
    ("Segment the kidney.", "[SEG].", None),
]
NO_WORK = {"new_session": 0, "extend": 0, "truncate": 0, "run_turn": 0}


@pytest.fixture(scope="module")
def cached_run():
    """TURNS run once through a fresh cached backend: its spy's counts right after,
    the results, and the backend (later tests only add to its caches)."""
    spy = SpyEngine()
    backend = LocalBackend(spy)
    results = run_conversation(backend, IMG, TURNS)
    return SimpleNamespace(spy=spy, backend=backend, results=results, counts=dict(spy.counts))


def test_continuing_a_conversation_only_feeds_the_new_turn(cached_run):
    assert cached_run.counts == {"new_session": 1, "extend": 0, "truncate": 0, "run_turn": 4}
    assert all(r.mask.any() for r in cached_run.results[:2])  # real, non-trivial masks
    assert not np.array_equal(cached_run.results[0].mask, cached_run.results[1].mask)


def test_results_do_not_depend_on_the_cache(cached_run):
    # no cache at all: every turn encodes the slice and replays the whole history
    spy = SpyEngine()
    uncached = run_conversation(LocalBackend(spy, cache_mb=0), IMG, TURNS[:3])
    assert spy.counts == {"new_session": 3, "extend": 0 + 1 + 2, "truncate": 0, "run_turn": 3}
    for a, b in zip(cached_run.results, uncached):
        assert_same_result(a, b, tol=1e-6)


def test_undo_and_branch_truncate_a_cached_session():
    eng = SpyEngine()
    be = LocalBackend(eng)
    res = run_conversation(be, IMG, TURNS[:3])
    history = [TurnSpec(TURNS[0][0], res[0].answer), TurnSpec(TURNS[1][0], res[1].answer, res[0].mask)]
    # undo round 3 and ask something else: the session is cut back to 2 turns, nothing re-fed
    be.run_turn(IMG, history, TurnSpec("Segment the spleen."))
    assert eng.counts["new_session"] == 1 and eng.counts["extend"] == 0 and eng.counts["truncate"] == 1
    # a branch after round 1
    be.run_turn(IMG, history[:1], TurnSpec("Segment the aorta."))
    assert eng.counts["new_session"] == 1 and eng.counts["extend"] == 0 and eng.counts["truncate"] == 2
    assert eng.counts["run_turn"] == 5


def test_session_reuse_byte_bound_and_out_of_memory():
    """One backend through: a repeated slice reuses its session; the session cache
    stays within its byte budget (least recently used out); running out of memory
    empties it, and the next turn works."""
    eng = SpyEngine()
    be = LocalBackend(eng, cache_mb=14)
    flipped, mirrored = np.ascontiguousarray(IMG[::-1]), np.ascontiguousarray(IMG[:, ::-1])
    r1 = be.run_turn(IMG, [], TurnSpec("Segment the liver."))
    one = be.cache.stats()["bytes"]  # a real session: image embeddings and key/value cache
    assert 2 * one <= be.cache.max_bytes < 3 * one, (one, be.cache.max_bytes)  # room for two sessions
    r2 = be.run_turn(IMG.copy(), [], TurnSpec("Segment the liver."))  # the same request: its stored result
    assert_same_result(r1, r2)
    assert eng.counts["new_session"] == 1 and eng.counts["run_turn"] == 1
    be.run_turn(IMG.copy(), [], TurnSpec("Segment the kidney."))  # same slice, other question: same session
    assert eng.counts["new_session"] == 1 and eng.counts["run_turn"] == 2 and eng.counts["truncate"] == 1
    be.run_turn(flipped, [], TurnSpec("Segment the liver."))
    be.run_turn(mirrored, [], TurnSpec("Segment the liver."))
    assert eng.counts["new_session"] == 3
    st = be.cache.stats()
    assert st["bytes"] <= st["max_bytes"] and st["entries"] == 2 and st["evictions"] == 1

    # Failure injection at the engine boundary: the tiny CPU model cannot run out of
    # GPU memory on demand; the engine reports it as this InferenceError.
    eng.inject(InferenceError("Out of memory while running the turn. Try loading the language model in 4-bit."))
    with pytest.raises(InferenceError, match="Out of memory"):
        be.run_turn(flipped, [], TurnSpec("Segment the spleen."))
    assert be.cache.stats()["entries"] == 0
    out = be.run_turn(mirrored, [], TurnSpec("Segment the spleen."))  # and it works again
    assert eng.counts["new_session"] == 4  # the mirrored slice's session was freed too
    assert out.mask.shape == IMG.shape[:2] and out.answer == "Sure, [SEG]."


def test_repeated_turn_comes_from_the_result_cache(cached_run):
    eng, be, first = cached_run.spy, cached_run.backend, cached_run.results
    runs = eng.counts["run_turn"]
    entries = be.info()["result_cache"]["entries"]
    again = run_conversation(be, IMG, TURNS)
    assert eng.counts["run_turn"] == runs
    for a, b in zip(first, again):
        assert_same_result(a, b)
        assert b.timings.keys() == {"result_cache"}
    again[0].mask[:] = True  # callers get their own arrays
    assert_same_result(run_conversation(be, IMG, TURNS[:1])[0], first[0])
    # anything different in the request is a different result
    be.run_turn(IMG, [], TurnSpec(TURNS[0][0], TURNS[0][1]), apply_jcm=False)
    be.run_turn(IMG, [], TurnSpec(TURNS[0][0], None))
    gen = be.run_turn(IMG, [], TurnSpec(TURNS[0][0], None), answer_mode=AnswerMode.GENERATE)
    assert gen.answer.count("[SEG]") == 1
    assert eng.counts["run_turn"] == runs + 3
    assert be.info()["result_cache"]["entries"] == entries + 3


def test_history_from_another_client_is_fed_once(cached_run):
    ref = cached_run.results
    # a second backend (a restarted worker) gets the full history with the last turn
    history = []
    for (p, a, r), res in zip(TURNS[:3], ref[:3]):
        history.append(TurnSpec(p, res.answer, ref[r].mask if r is not None else None))
    eng = SpyEngine()
    be = LocalBackend(eng)
    out = be.run_turn(IMG, history, TurnSpec(TURNS[3][0], TURNS[3][1]))
    assert eng.counts == {"new_session": 1, "extend": 3, "truncate": 0, "run_turn": 1}
    assert_same_result(out, ref[3], tol=1e-6)


def test_lru_order_and_oversized_items():
    lru = LRUBytes(100)
    assert lru.put("a", 1, 40) and lru.put("b", 2, 40)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3, 40)
    assert "b" not in lru and "a" in lru and "c" in lru
    assert not lru.put("big", 0, 101) and "big" not in lru
    assert lru.nbytes == 80


def test_session_cache_picks_the_longest_shared_prefix():
    sc = SessionCache(10_000)
    sc.put("img", ("a",), "s1", 10)
    sc.put("img", ("a", "b", "c"), "s3", 10)
    sc.put("img", ("a", "x"), "sx", 10)
    sc.put("other", ("a", "b", "c", "d"), "o", 10)
    entry, n = sc.take("img", ("a", "b", "z"))
    assert entry.session == "s3" and n == 2
    entry, n = sc.take("img", ("a", "x", "y"))
    assert entry.session == "sx" and n == 2
    entry, n = sc.take("img", ())
    assert entry.session == "s1" and n == 0
    assert sc.take("img", ("a",)) == (None, 0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(image=np.zeros((10, 10), np.uint8)), r"\(H, W, 3\)"),
        (dict(image=np.zeros((10, 10, 3), np.float32)), "uint8"),
        (dict(image=np.zeros((0, 10, 3), np.uint8)), "empty"),
        (dict(turn=TurnSpec("")), "empty"),
        (dict(turn=TurnSpec("x", "no token")), "exactly one"),
        (dict(turn=TurnSpec("x", None, np.zeros((5, 5), bool))), "must match"),
        (dict(history=[TurnSpec("x", None)]), "missing"),
        (dict(history=[TurnSpec("x", "[SEG]")] * 64), "at most"),
    ],
)
def test_bad_requests_are_input_errors(bad, match):
    eng = SpyEngine()
    be = LocalBackend(eng)
    args = {"image": _img(), "history": [], "turn": TurnSpec("Segment the liver."), **bad}
    with pytest.raises(InputError, match=match):
        be.run_turn(args["image"], args["history"], args["turn"])
    assert eng.counts == {"new_session": 0, "extend": 0, "truncate": 0, "run_turn": 0}


def test_engine_failure_is_an_inference_error_and_the_session_is_dropped():
    eng = SpyEngine()
    be = LocalBackend(eng)
    first = be.run_turn(IMG, [], TurnSpec("Segment the liver."))
    assert be.cache.stats()["entries"] == 1

    class Boom(RuntimeError):
        pass

    # Failure injection: a device-side assert cannot be provoked in the real CPU model.
    eng.inject(Boom("CUDA error: device-side assert"))
    with pytest.raises(InferenceError, match="device-side assert"):
        be.run_turn(IMG, [TurnSpec("Segment the liver.", first.answer)], TurnSpec("Segment the lesion."))
    assert eng.counts["new_session"] == 1  # the failing turn ran on the cached session ...
    assert be.cache.stats()["entries"] == 0  # ... which was dropped


def test_concurrent_callers_never_share_a_session(cached_run):
    eng = SpyEngine()
    in_use = set()
    guard = threading.Lock()
    errors = []
    orig_new = eng.new_session

    def new_session(image):
        s = orig_new(image)
        run = s.run_turn

        def checked(*a, **k):
            with guard:
                assert id(s) not in in_use
                in_use.add(id(s))
            try:
                return run(*a, **k)
            finally:
                with guard:
                    in_use.discard(id(s))

        s.run_turn = checked
        return s

    eng.new_session = new_session
    be = LocalBackend(eng)
    expected = cached_run.results[:2]

    def worker():
        try:
            for _ in range(2):
                got = run_conversation(be, IMG, TURNS[:2])
                for a, b in zip(got, expected):
                    assert_same_result(a, b, tol=1e-6)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert eng.counts["run_turn"] >= 2  # the engine did run (not only stored results)


def test_progress_and_info(cached_run):
    be = cached_run.backend
    stages = []
    be.run_turn(IMG, [], TurnSpec("Segment the pancreas."), progress=lambda s, f: stages.append((s, f)))
    assert ("segmenting", 0.6) in stages and stages[-1] == ("done", 1.0)
    info = be.info()
    assert info["model"] == "MediRound" and info["stage"] == 2 and info["jcm_available"] is True
    assert "limits" in info and info["cache"]["entries"] == 1
