"""ChatSession on the real tiny MediRound engine through the real local backend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from MultiTurnSegLib.backends.base import AnswerMode, TurnSpec
from MultiTurnSegLib.conversation import (
    ChatSession,
    Conversation,
    Reference,
    conversation_from_segmentation,
    conversation_segments,
    conversation_to_json,
    conversations_equal,
    segment_color_for,
)
from MultiTurnSegLib.errors import InferenceError, InputError, ReferenceResolutionError
from MultiTurnSegLib.imaging import render_slice, slice_shape, volume_from_array
from MultiTurnSegLib.segmentation_io import Segmentation, read_seg_nrrd, write_seg_nrrd

pytestmark = pytest.mark.slow  # loads the tiny model (a few seconds)

AXIS, INDEX = "axial", 1


@pytest.fixture(scope="module")
def engine(tiny_model_json):
    from MultiTurnSegLib.engine import MediRoundEngine

    return MediRoundEngine.from_model_json(tiny_model_json)


@pytest.fixture(scope="module")
def backend(engine):
    from MultiTurnSegLib.backends.local import LocalBackend

    return LocalBackend(engine)


@pytest.fixture(scope="module")
def volume(fixture_cases_dir):
    grey = np.asarray(Image.open(fixture_cases_dir / "chain3" / "images" / "phantom_a.png").convert("L"))
    array = np.zeros((3,) + grey.shape, dtype=np.int16)
    array[INDEX] = grey.astype(np.int16) * 4 - 200  # CT-like values
    ijk_to_lps = np.diag([0.7, 0.7, 2.5, 1.0])
    ijk_to_lps[:3, 3] = (-100.0, -80.0, 30.0)
    return volume_from_array(array, ijk_to_lps, source="phantom")


@pytest.fixture(scope="module")
def image(volume):
    return render_slice(volume, AXIS, INDEX, (1020.0, 310.0))


def new_conversation(volume):
    return Conversation(
        volume="phantom.nrrd", axis=AXIS, slice_index=INDEX, image_size=slice_shape(volume, AXIS), window=(1020.0, 310.0)
    )


def test_three_turn_chat_stores_reference_masks(backend, volume, image, tmp_path):
    conv = new_conversation(volume)
    chat = ChatSession(backend, image, conv)
    stages = []
    t1 = chat.ask("Segment the liver in this abdominal CT slice.", progress=lambda s, f: stages.append((s, f)))
    t2 = chat.ask("Segment the organ located posterior to round 1.")
    t3 = chat.ask("Segment the structure medial to its border.", answer="The segmentation output is [SEG].")

    assert conv.turns == [t1, t2, t3]
    assert stages and stages[-1][1] == 1.0
    assert (t1.reference, t2.reference, t3.reference) == (None, Reference.to_round(1), Reference.to_round(2))
    assert t1.reference_mask is None
    assert np.array_equal(t2.reference_mask, t1.mask) and t2.reference_mask is not t1.mask
    assert np.array_equal(t3.reference_mask, t2.mask)
    assert t3.answer == "The segmentation output is [SEG]."
    assert t1.answer == "Sure, [SEG]."  # the template
    for i, t in enumerate(conv.turns, start=1):
        assert t.round == i
        assert t.mask.shape == conv.image_size and t.mask.dtype == bool
        assert isinstance(t.jcm_score, float) and 0.0 <= t.jcm_score <= 1.0  # stage-2 tiny model, JCM on
        assert t.segment_name.startswith(f"R{i} ") and t.color == segment_color_for(i)
        assert t.timings["total"] > 0
    assert t2.segment_name == "R2 organ located posterior to round 1"

    # What is stored is exactly what was fed: replaying round 3 from the stored history gives the same mask.
    replay = backend.run_turn(image, conv.history_specs()[:2], TurnSpec(t3.prompt, t3.answer, t3.reference_mask))
    assert np.array_equal(replay.mask, t3.mask)

    # .seg.nrrd round trip restores the whole conversation (masks read back from the segments).
    seg = Segmentation.for_volume(volume)
    seg.segments.extend(conversation_segments(conv, volume))
    path = write_seg_nrrd(tmp_path / "chat.seg.nrrd", seg)
    back = conversation_from_segmentation(read_seg_nrrd(path), volume)
    assert conversations_equal(back, conv)

    # and the restored conversation continues where it stopped
    chat2 = ChatSession(backend, image, back)
    t4 = chat2.ask("segment the lesion inside the previous output")
    assert t4.reference == Reference.to_round(3) and np.array_equal(t4.reference_mask, t3.mask)

    assert chat.undo() is t3
    assert conv.rounds == [1, 2]


def test_bad_input_leaves_the_conversation_unchanged(backend, engine, volume, image):
    conv = new_conversation(volume)
    chat = ChatSession(backend, image, conv)
    with pytest.raises(ReferenceResolutionError, match="first round"):
        chat.ask("segment it")
    chat.ask("Segment the liver.")
    before = conversation_to_json(conv)
    bad = [
        (ReferenceResolutionError, dict(prompt="segment the lesion inside round 4"), "no round 4"),
        (ReferenceResolutionError, dict(prompt="between round 1 and the drawing", reference=3), "no round 3"),
        (ReferenceResolutionError, dict(prompt="x", reference="Spleen"), "no segment named 'Spleen'"),
        (InputError, dict(prompt="   "), "empty"),
        (InputError, dict(prompt="segment the liver", answer="no token"), "[SEG]"),
        (InputError, dict(prompt="segment the liver " * 200), "2000"),  # refused by the backend itself
    ]
    for error, kwargs, fragment in bad:
        prompt = kwargs.pop("prompt")
        with pytest.raises(error) as info:
            chat.ask(prompt, **kwargs)
        assert fragment in str(info.value)
        assert conversation_to_json(conv) == before

    # a backend that fails: the error propagates, the conversation stays as it was
    from MultiTurnSegLib.backends.local import LocalBackend

    closed = LocalBackend(engine)
    closed.close()
    with pytest.raises(InferenceError):
        ChatSession(closed, image, conv).ask("segment the lesion inside round 1")
    assert conversation_to_json(conv) == before


def test_segment_references_use_the_current_mask(backend, volume, image):
    conv = new_conversation(volume)
    size = conv.image_size
    drawn = np.zeros(size, dtype=bool)
    drawn[60:120, 100:180] = True
    store = {"My drawing": drawn}
    chat = ChatSession(backend, image, conv, segment_masks=store)

    # a hand-drawn segment is a reference from round 1 on: the model sees the slice and the drawing
    t0 = chat.ask("segment the liver next to my drawing")
    assert t0.reference == Reference.to_segment("My drawing") and np.array_equal(t0.reference_mask, drawn)
    assert not np.array_equal(t0.mask, chat.ask("segment the liver", reference="none").mask)
    chat.undo()
    t1 = chat.ask("segment the lesion inside my drawing")
    assert t1.reference == Reference.to_segment("My drawing")
    assert np.array_equal(t1.reference_mask, drawn)

    # the user edits the segment: the next turn sees the edit, the first keeps what it saw
    store["My drawing"] = np.zeros(size, dtype=np.uint8)
    store["My drawing"][10:20, 10:20] = 1
    t2 = chat.ask("the vessel next to my drawing")
    assert t2.reference_mask.dtype == bool and t2.reference_mask.sum() == 100
    assert np.array_equal(t1.reference_mask, drawn)

    # an empty reference mask is allowed (the model falls back to the whole image)
    store["Empty"] = np.zeros(size, dtype=bool)
    t3 = chat.ask("segment the organ", reference="Empty")
    assert t3.reference == Reference.to_segment("Empty") and not t3.reference_mask.any()

    # a callable source with a name list, picked explicitly
    chat2 = ChatSession(backend, image, conv, segment_masks=lambda name: drawn if name == "Hidden" else None)
    t4 = chat2.ask("segment the organ", reference=Reference.to_segment("Hidden"))
    assert np.array_equal(t4.reference_mask, drawn)

    before = conversation_to_json(conv)
    store["Wrong"] = np.zeros((size[0] + 1, size[1]), dtype=bool)
    with pytest.raises(InputError, match="shape"):
        chat.ask("the lesion inside wrong")
    store["Flat"] = np.zeros(size[0] * size[1], dtype=bool)
    with pytest.raises(InputError, match="2D"):
        chat.ask("x", reference="Flat")
    assert conversation_to_json(conv) == before


def test_jcm_off_and_session_checks(backend, volume, image):
    conv = new_conversation(volume)
    chat = ChatSession(backend, image, conv, jcm="off", answer_mode=AnswerMode.TEMPLATE)
    t1 = chat.ask("Segment the liver.")
    assert t1.jcm_score is None and t1.jcm_refined is False
    with pytest.raises(InputError, match="JCM"):
        ChatSession(backend, image, conv, jcm="sometimes")
    with pytest.raises(InputError, match="answer mode"):
        ChatSession(backend, image, conv, answer_mode="poetry")
    with pytest.raises(InputError, match="uint8"):
        ChatSession(backend, image.astype(np.float32), conv)
    with pytest.raises(InputError, match="uint8"):
        ChatSession(backend, image[:, :, 0], conv)
    with pytest.raises(InputError, match="conversation's slice"):
        ChatSession(backend, image[:-1], conv)
    chat.undo()
    with pytest.raises(InputError, match="nothing to undo"):
        chat.undo()
