"""LocalBackend: the content-keyed session cache, validation, errors, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from MultiTurnSegLib.backends.base import AnswerMode, TurnSpec
from MultiTurnSegLib.backends.local import LocalBackend
from MultiTurnSegLib.errors import InferenceError, InputError
from MultiTurnSegLib.worker.cache import LRUBytes, SessionCache

from test_worker_support import FakeEngine, assert_same_result, chain3, run_conversation, shared_engine


def _img(seed=0, h=48, w=64):
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), 3, axis=2)


TURNS = [
    ("Segment the liver.", "Sure, [SEG].", None),
    ("Segment the lesion inside round 1.", "It is [SEG].", 0),
    ("Segment the vessel next to it.", None, 1),
    ("Segment the kidney.", "[SEG].", None),
]


def test_continuing_a_conversation_only_feeds_the_new_turn():
    eng = FakeEngine()
    be = LocalBackend(eng)
    img = _img()
    run_conversation(be, img, TURNS)
    assert eng.counts == {"new_session": 1, "extend": 0, "truncate": 0, "run_turn": 4}


def test_results_do_not_depend_on_the_cache():
    img = _img()
    cached = run_conversation(LocalBackend(FakeEngine()), img, TURNS)
    # no cache at all: every turn replays the whole history
    uncached = run_conversation(LocalBackend(FakeEngine(), cache_mb=0), img, TURNS)
    for a, b in zip(cached, uncached):
        assert_same_result(a, b)


def test_undo_and_branch_truncate_a_cached_session():
    eng = FakeEngine()
    be = LocalBackend(eng)
    img = _img()
    res = run_conversation(be, img, TURNS[:3])
    history = [TurnSpec(TURNS[0][0], res[0].answer), TurnSpec(TURNS[1][0], res[1].answer, res[0].mask)]
    # undo round 3 and ask something else: the session is cut back to 2 turns, nothing re-fed
    be.run_turn(img, history, TurnSpec("Segment the spleen."))
    assert eng.counts["new_session"] == 1 and eng.counts["extend"] == 0 and eng.counts["truncate"] == 1
    # a branch after round 1
    be.run_turn(img, history[:1], TurnSpec("Segment the aorta."))
    assert eng.counts["new_session"] == 1 and eng.counts["extend"] == 0 and eng.counts["truncate"] == 2


def test_repeated_slice_reuses_the_image_session():
    eng = FakeEngine()
    be = LocalBackend(eng)
    img = _img()
    r1 = be.run_turn(img, [], TurnSpec("Segment the liver."))
    r2 = be.run_turn(img.copy(), [], TurnSpec("Segment the liver."))
    assert eng.counts["new_session"] == 1
    assert_same_result(r1, r2)
    be.run_turn(_img(1), [], TurnSpec("Segment the liver."))
    assert eng.counts["new_session"] == 2


def test_repeated_turn_comes_from_the_result_cache():
    eng = FakeEngine()
    be = LocalBackend(eng)
    img = _img()
    first = run_conversation(be, img, TURNS)
    runs = eng.counts["run_turn"]
    again = run_conversation(be, img, TURNS)
    assert eng.counts["run_turn"] == runs
    for a, b in zip(first, again):
        assert_same_result(a, b)
        assert b.timings.keys() == {"result_cache"}
    again[0].mask[:] = True  # callers get their own arrays
    assert_same_result(run_conversation(be, img, TURNS[:1])[0], first[0])
    # anything different in the request is a different result
    be.run_turn(img, [], TurnSpec(TURNS[0][0], TURNS[0][1]), apply_jcm=False)
    be.run_turn(img, [], TurnSpec(TURNS[0][0], None))
    be.run_turn(img, [], TurnSpec(TURNS[0][0], None), answer_mode=AnswerMode.GENERATE)
    assert eng.counts["run_turn"] == runs + 3
    assert be.info()["result_cache"]["entries"] == 7


def test_history_from_another_client_is_fed_once():
    eng = FakeEngine()
    img = _img()
    ref = run_conversation(LocalBackend(FakeEngine()), img, TURNS)
    # a second backend (a restarted worker) gets the full history with the last turn
    history = []
    for (p, a, r), res in zip(TURNS[:3], ref[:3]):
        history.append(TurnSpec(p, res.answer, ref[r].mask if r is not None else None))
    be = LocalBackend(eng)
    out = be.run_turn(img, history, TurnSpec(TURNS[3][0], TURNS[3][1]))
    assert eng.counts["extend"] == 3 and eng.counts["new_session"] == 1
    assert_same_result(out, ref[3])


def test_cache_is_byte_bounded():
    eng = FakeEngine()
    img = _img(h=100, w=100)  # 30 kB per session
    be = LocalBackend(eng, cache_mb=0.07)
    for seed in range(5):
        be.run_turn(_img(seed, 100, 100), [], TurnSpec("Segment the liver."))
    st = be.cache.stats()
    assert st["bytes"] <= st["max_bytes"] and st["entries"] == 2 and st["evictions"] == 3


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
    eng = FakeEngine()
    be = LocalBackend(eng)
    args = {"image": _img(), "history": [], "turn": TurnSpec("Segment the liver."), **bad}
    with pytest.raises(InputError, match=match):
        be.run_turn(args["image"], args["history"], args["turn"])
    assert eng.counts["run_turn"] == 0


def test_engine_failure_is_an_inference_error_and_the_session_is_dropped():
    eng = FakeEngine()
    be = LocalBackend(eng)
    img = _img()
    be.run_turn(img, [], TurnSpec("Segment the liver."))

    class Boom(RuntimeError):
        pass

    original = eng.new_session(img).__class__.run_turn

    def failing(self, *a, **k):
        raise Boom("CUDA error: device-side assert")

    type(eng.new_session(img)).run_turn = failing
    try:
        with pytest.raises(InferenceError, match="device-side assert"):
            be.run_turn(img, [TurnSpec("Segment the liver.", "Sure, [SEG].")], TurnSpec("Segment the lesion."))
    finally:
        type(eng.new_session(img)).run_turn = original
    assert be.cache.stats()["entries"] == 0


def test_out_of_memory_frees_the_session_cache():
    eng = FakeEngine()
    be = LocalBackend(eng)
    for seed in range(3):
        be.run_turn(_img(seed), [], TurnSpec("Segment the liver."))
    assert be.cache.stats()["entries"] == 3
    sess_cls = type(eng.new_session(_img()))
    original = sess_cls.run_turn

    def oom(self, *a, **k):
        raise InferenceError("Out of memory while running the turn. Try loading the language model in 4-bit.")

    sess_cls.run_turn = oom
    try:
        with pytest.raises(InferenceError, match="Out of memory"):
            be.run_turn(_img(0), [], TurnSpec("Segment the kidney."))
    finally:
        sess_cls.run_turn = original
    assert be.cache.stats()["entries"] == 0
    be.run_turn(_img(0), [], TurnSpec("Segment the kidney."))  # and it works again


def test_concurrent_callers_never_share_a_session():
    eng = FakeEngine(delay=0.002)
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
    img = _img()
    expected = run_conversation(LocalBackend(FakeEngine()), img, TURNS)

    def worker():
        try:
            for _ in range(5):
                got = run_conversation(be, img, TURNS)
                for a, b in zip(got, expected):
                    assert_same_result(a, b)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_progress_and_info():
    be = LocalBackend(FakeEngine())
    stages = []
    be.run_turn(_img(), [], TurnSpec("Segment the liver."), progress=lambda s, f: stages.append((s, f)))
    assert stages[-1] == ("done", 1.0)
    info = be.info()
    assert info["stage"] == 2 and "limits" in info and info["cache"]["entries"] == 1


# ----------------------------------------------------------------------------- with the real engine


@pytest.fixture(scope="module")
def engine(tiny_model_json):
    return shared_engine()


@pytest.mark.slow
def test_real_engine_cached_equals_uncached(engine):
    img, turns = chain3()
    cached = run_conversation(LocalBackend(engine), img, turns)
    uncached = run_conversation(LocalBackend(engine, cache_mb=0), img, turns)
    for a, b in zip(cached, uncached):
        assert_same_result(a, b, tol=1e-6)
    # the generated-answer path too: answers produced by the model are fed back
    gen = LocalBackend(engine)
    r = gen.run_turn(img, [], TurnSpec(turns[0][0]), answer_mode=AnswerMode.TEMPLATE)
    assert r.answer.count("[SEG]") == 1
