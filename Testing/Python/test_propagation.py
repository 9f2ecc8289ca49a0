"""Propagation: a slice's conversation replayed on a range of slices, with the real tiny engine.

The engine runs on slices 16 and 18 of slicerio's chest CT around a three-round
conversation on slice 17 (~4 s per slice on two busy CPU cores); validation,
cancelling, errors and segment references use a cheap stub backend.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from MultiTurnSegLib.backends.base import Backend  # noqa: E402
from MultiTurnSegLib.conversation import (  # noqa: E402
    ChatSession,
    Conversation,
    PropagationCancelled,
    PropagationError,
    Reference,
    conversation_from_segmentation,
    conversation_segments,
    parse_slice_range,
    propagate,
    propagated_segments,
)
from MultiTurnSegLib.errors import InferenceError, InputError, MultiTurnSegError  # noqa: E402
from MultiTurnSegLib.imaging import extract_mask, num_slices, read_volume, render_slice  # noqa: E402

AXIS, SOURCE, WINDOW = "axial", 17, "lung"
SCRIPT = [("Segment the lungs", None), ("Segment the region inside round 1", None),
          ("Segment the structure next to it", "It is [SEG].")]


class Spy(Backend):
    """Passes turns to the real backend ``inner`` and records what each one was
    given; optionally fails call number ``fail_at`` (failure injection: the
    only way to make the real model fail on a chosen slice)."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.calls, self.fail_at = inner, [], fail_at

    def info(self):
        return self.inner.info()

    def run_turn(self, image, history, turn, **kw):
        self.calls.append((image, list(history), turn))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise InferenceError("out of GPU memory")
        return self.inner.run_turn(image, history, turn, **kw)


def _chat(backend, volume, script, *, segment_masks=None, index=SOURCE):
    image = render_slice(volume, AXIS, index, WINDOW)
    conv = Conversation(volume="CTChest4.nrrd", axis=AXIS, slice_index=index, image_size=image.shape[:2], window=WINDOW)
    session = ChatSession(backend, image, conv, segment_masks=segment_masks)
    for prompt, answer, *ref in script:
        session.ask(prompt, answer=answer, reference=ref[0] if ref else None)
    return conv


@pytest.fixture(scope="module")
def volume(ct_chest_path):
    return read_volume(ct_chest_path)


@pytest.fixture(scope="module")
def engine(tiny_model_json):
    from MultiTurnSegLib.engine import MediRoundEngine

    return MediRoundEngine.from_model_json(tiny_model_json, device="cpu")


@pytest.fixture(scope="module")
def local(engine):
    from MultiTurnSegLib.backends.local import LocalBackend

    return LocalBackend(engine)


@pytest.fixture
def spy(local):
    """A fresh spy on the real tiny model: ``spy()`` or ``spy(fail_at=N)``."""
    return lambda fail_at=None: Spy(local, fail_at)


@pytest.fixture(scope="module")
def run(engine, volume):
    """The conversation on slice 17 and its propagation to 16..18 (spied on)."""
    from MultiTurnSegLib.backends.local import LocalBackend

    backend = LocalBackend(engine)
    conv = _chat(backend, volume, SCRIPT)
    before = conv.copy()
    spy, seen = Spy(backend), []
    result = propagate(spy, volume, conv, (16, 18), progress=lambda done, total: seen.append((done, total)))
    return conv, before, spy, seen, result


def test_masks_cover_the_range_and_the_source_slice_is_kept(run, volume):
    conv, before, spy, seen, result = run
    assert result.slices == (16, 17, 18) and result.source_slice == SOURCE and len(result.masks) == 3
    assert seen == [(0, 2), (1, 2), (2, 2)]
    assert len(spy.calls) == 6  # two slices x three rounds; slice 17 is not recomputed
    outside = np.ones(num_slices(volume, AXIS), dtype=bool)
    outside[[16, 17, 18]] = False
    for turn, mask3d in zip(conv.turns, result.masks):
        assert mask3d.shape == volume.shape and mask3d.dtype == bool
        assert np.array_equal(extract_mask(mask3d, volume, AXIS, SOURCE), turn.mask)
        for k in np.flatnonzero(outside):
            assert not extract_mask(mask3d, volume, AXIS, int(k)).any()
    assert result.jcm_scores[SOURCE] == tuple(t.jcm_score for t in conv.turns)
    assert all(len(result.jcm_scores[k]) == 3 and None not in result.jcm_scores[k] for k in (16, 18))
    assert conv == before  # the input conversation is only read


def test_each_slice_equals_a_fresh_chat_on_it(run, engine, volume):
    from MultiTurnSegLib.backends.local import LocalBackend

    conv, _, _, _, result = run
    fresh_backend = LocalBackend(engine)  # its own caches: nothing can be reused from the propagation
    for k in (16, 18):
        script = [(t.prompt, t.answer, t.reference or "none") for t in conv.turns]
        fresh = _chat(fresh_backend, volume, script, index=k)
        for r, turn in enumerate(fresh.turns):
            assert np.array_equal(extract_mask(result.masks[r], volume, AXIS, k), turn.mask), (k, turn.round)
            assert result.jcm_scores[k][r] == pytest.approx(turn.jcm_score, abs=1e-6)
            assert result.jcm_refined[k][r] == turn.jcm_refined


def test_references_follow_the_structure_and_answers_are_replayed(run, volume):
    conv, _, spy, _, result = run
    for c, (image, history, turn) in enumerate(spy.calls):
        k = (16, 18)[c // 3]
        assert np.array_equal(image, render_slice(volume, AXIS, k, WINDOW))
        source_turn = conv.turns[c % 3]
        assert (turn.prompt, turn.answer) == (source_turn.prompt, source_turn.answer)
        assert [(h.prompt, h.answer) for h in history] == [(t.prompt, t.answer) for t in conv.turns[: c % 3]]
        if source_turn.reference is None:
            assert turn.reference_mask is None
        else:  # round r on *this* slice, not the conversation's stale round-r mask
            r = source_turn.reference.round
            here = extract_mask(result.masks[r - 1], volume, AXIS, k)
            assert np.array_equal(turn.reference_mask, here)
            assert not np.array_equal(turn.reference_mask, conv.turn(r).mask)


def test_segments_keep_names_colours_tags_and_restore_the_conversation(run, volume, spy):
    from MultiTurnSegLib.segmentation_io import Segmentation

    conv, _, _, _, result = run
    flat = conversation_segments(conv, volume)
    segments = propagated_segments(conv, volume, result)
    for a, b, mask3d in zip(segments, flat, result.masks):
        assert (a.id, a.name, a.color, a.tags) == (b.id, b.name, b.color, b.tags)
        assert a.mask is mask3d
    seg = Segmentation.for_volume(volume)
    seg.segments.extend(segments)
    assert conversation_from_segmentation(seg, volume) == conv
    other = _chat(spy(), volume, SCRIPT[:2])
    with pytest.raises(InputError, match="not made from this conversation"):
        propagated_segments(other, volume, result)


@pytest.mark.parametrize("slices, match", [
    ((30, 40), r"range 30\.\.40 goes outside the volume: the axial axis has 34 slices, valid indices are 0\.\.33"),
    ([5, -1], "slice -1 is outside"),
    ((9, 3), "backwards"),
    ("3:5", "a \\(start, stop\\) pair or a list"),
    ([1.5], "whole numbers"),
])
def test_bad_slices_are_refused_before_any_turn(volume, slices, match, spy):
    conv = _chat(spy(), volume, SCRIPT[:1])
    backend = spy()
    with pytest.raises(InputError, match=match):
        propagate(backend, volume, conv, slices)
    assert backend.calls == []


def test_empty_slices_and_conversation(volume, spy):
    conv = _chat(spy(), volume, SCRIPT[:1])
    result = propagate(spy(), volume, conv, [0, SOURCE])  # slice 0: whatever is there, empty masks are fine
    assert result.slices == (0, SOURCE)
    assert propagate(spy(), volume, conv, []).slices == (SOURCE,)
    empty = Conversation(volume="v", axis=AXIS, slice_index=SOURCE, image_size=conv.image_size)
    with pytest.raises(InputError, match="no turns"):
        propagate(spy(), volume, empty, (1, 2))


def test_cancel_stops_cleanly(volume, spy):
    conv = _chat(spy(), volume, SCRIPT)
    before = conv.copy()
    polls = []
    backend = spy()
    with pytest.raises(PropagationCancelled, match="after 1 of 3 slice") as info:
        propagate(backend, volume, conv, (10, 12), cancel=lambda: polls.append(1) or len(polls) > 4)
    assert (info.value.done, info.value.total) == (1, 3) and len(backend.calls) == 4
    assert conv == before


def test_a_failing_slice_names_the_slice_and_changes_nothing(volume, spy):
    conv = _chat(spy(), volume, SCRIPT)
    before = conv.copy()
    with pytest.raises(PropagationError, match=r"axial slice 11, round 2 .*out of GPU memory") as info:
        propagate(spy(fail_at=5), volume, conv, (10, 12))
    assert isinstance(info.value, MultiTurnSegError) and (info.value.slice_index, info.value.round) == (11, 2)
    assert isinstance(info.value.__cause__, InferenceError)
    assert conv == before


def test_segment_references(volume, spy):
    hand = np.zeros(tuple(volume.shape[1:]), dtype=bool)
    hand[40:80, 30:70] = True
    script = [("Segment the lungs", None), ("Segment the nodule inside Hand", None, Reference.to_segment("Hand")),
              ("Segment the region inside R1 lungs", None, "R1 lungs")]
    conv = _chat(spy(), volume, script, segment_masks={"Hand": hand})
    assert [t.reference.kind if t.reference else None for t in conv.turns] == [None, "segment", "round"]
    # as Slicer records a pick of the turn's segment; names match case-insensitively, as in resolve_reference
    conv.turns[2].reference = Reference.to_segment("r1 LUNGS")

    with pytest.raises(InputError, match="segment 'Hand'.*segment_masks"):
        propagate(spy(), volume, conv, (10, 11))

    asked = []

    def segment_masks(name, axis, index):
        asked.append((name, axis, index))
        return np.roll(hand, index, axis=1)  # a different mask on every slice

    backend = spy()
    result = propagate(backend, volume, conv, (10, 11), segment_masks=segment_masks)
    assert asked == [("Hand", AXIS, 10), ("Hand", AXIS, 11)]  # once per slice, only for the hand-drawn one
    for k, calls in zip((10, 11), (backend.calls[:3], backend.calls[3:])):
        assert np.array_equal(calls[1][2].reference_mask, np.roll(hand, k, axis=1))
        # the conversation's own segment is that round on this slice
        assert np.array_equal(calls[2][2].reference_mask, extract_mask(result.masks[0], volume, AXIS, k))

    with pytest.raises(PropagationError, match="slice 10, round 2.*no segment named 'Hand'"):
        propagate(spy(), volume, conv, (10, 11), segment_masks=lambda name, axis, index: None)


def test_cli_propagate_writes_3d_segments(tmp_path, ct_chest_path, tiny_model_json, volume, capsys):
    from MultiTurnSegLib.cli import main
    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    def chat(out, *extra):
        return main(["chat", str(ct_chest_path), "--axis", AXIS, "--slice", str(SOURCE), "--window", WINDOW,
                     "--model", str(tiny_model_json), "--device", "cpu", "--prompt", "Segment the lungs",
                     "--prompt", "Segment the region inside round 1", "-o", str(out), *extra])

    bad = tmp_path / "bad.seg.nrrd"
    assert chat(bad, "--propagate", "30:40") == 2
    assert "valid indices are 0..33" in capsys.readouterr().err and not bad.exists()
    assert chat(bad, "--propagate", "5-9") == 2
    assert "START:STOP" in capsys.readouterr().err and not bad.exists()

    out = tmp_path / "out.seg.nrrd"
    assert chat(out, "--propagate", "16:18") == 0
    text = capsys.readouterr().out
    assert "propagating 2 round(s) to axial slices 16..18" in text and "2/2 slices" in text
    seg = read_seg_nrrd(out)
    assert [s.name for s in seg.segments] == ["R1 lungs", "R2 region inside round 1"]
    for s in seg.segments:
        with_content = [k for k in range(num_slices(volume, AXIS)) if extract_mask(s.mask, volume, AXIS, k).any()]
        assert with_content == [16, 17, 18]


def test_cli_keeps_the_single_slice_segments_when_propagation_fails(tmp_path, ct_chest_path, volume, spy):
    from MultiTurnSegLib.cli.chat import ScriptTurn, run_chat
    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    import io

    out, log = tmp_path / "out.seg.nrrd", io.StringIO()
    outcome = run_chat(spy(fail_at=3), ct_chest_path, [ScriptTurn("Segment the lungs")], out, slice_index=SOURCE,
                       propagate=(10, 12), out=log)
    assert isinstance(outcome.error, PropagationError) and outcome.propagation is None
    assert "propagation failed: propagation stopped at axial slice 11, round 1" in log.getvalue()
    (segment,) = read_seg_nrrd(out).segments
    assert [k for k in range(num_slices(volume, AXIS)) if extract_mask(segment.mask, volume, AXIS, k).any()] == [SOURCE]


@pytest.mark.parametrize("text", [None, 5, (1, 2)])
def test_slice_range_that_is_not_text_is_an_input_error(text):
    with pytest.raises(InputError, match="START:STOP"):
        parse_slice_range(text)
