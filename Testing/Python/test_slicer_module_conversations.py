"""One conversation per slice, run without Slicer: stand-in MRML objects and the real tiny model.

The chosen view's slice decides the current conversation; turns, undo and new conversations act on
it only; a turn finished after the view moved lands in the conversation it was started on; all
conversations go through the parameter node (scene save and reload).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from test_slicer_module_propagation import local_requirements, make_backend, real_backend, scene  # noqa: F401  (fixtures)

AXIS = "axial"
SLICE_A, SLICE_B = 3, 8


class View:
    """The slice the Red view shows (no layout manager in these tests)."""

    def __init__(self, index):
        self.index = index

    def __call__(self, volume, view_name):
        return (AXIS, self.index)


@pytest.fixture
def chat(scene, local_requirements, make_backend, monkeypatch):  # noqa: F811
    backend = make_backend()
    logic = scene.module.MultiTurnSegLogic()
    logic.setInputs(scene.volume_node, scene.segmentation_node, "Red", "lung")
    logic._backend, logic._backendKey = backend, ("local", os.path.abspath(__file__), "cpu")
    config = {"kind": "local", "model_path": __file__, "device": "cpu", "url": "", "token": ""}
    view = View(SLICE_A)
    monkeypatch.setattr(logic, "sliceShownInView", view)

    def ask(prompt):
        task = logic.startTurn(prompt, scene.support.REFERENCE_NONE, config)
        assert task.wait(60)
        return task

    return logic, view, ask, backend


def _show(logic, view, index):
    view.index = index
    return logic.updateShownSlice()


def test_each_slice_has_its_own_conversation(scene, chat):
    logic, view, ask, _backend = chat
    assert logic.finishTask(ask("Segment the lungs")).startswith("Round 1")
    assert logic.finishTask(ask("Segment the heart")).startswith("Round 2")
    a = logic.conversation
    assert (a.axis, a.slice_index, len(a.turns)) == (AXIS, SLICE_A, 2)
    # Another slice: no conversation there yet, and sending starts one (no error).
    assert _show(logic, view, SLICE_B) and logic.conversation is None
    assert not _show(logic, view, SLICE_B)  # same slice again: nothing to refresh
    assert logic.finishTask(ask("Segment the liver")).startswith("Round 1")
    b = logic.conversation
    assert b is not a and b.id != a.id and (b.slice_index, len(b.turns)) == (SLICE_B, 1)
    assert len(a.turns) == 2
    assert logic.conversationsOfVolume(scene.volume_node.GetID()) == [a, b]
    # Switching the shown slice switches the current conversation.
    assert _show(logic, view, SLICE_A) and logic.conversation is a
    assert _show(logic, view, SLICE_B) and logic.conversation is b
    # Segment ids never collide: three turns, three segments.
    ids = {logic.turnSegmentId(scene.segmentation_node, t, c) for c in (a, b) for t in c.turns}
    assert None not in ids and len(ids) == 3 and ids <= set(scene.arrays)


def test_undo_and_new_conversation_act_on_the_shown_slice_only(scene, chat):
    logic, view, ask, _backend = chat
    logic.finishTask(ask("Segment the lungs"))
    logic.finishTask(ask("Segment the heart"))
    a = logic.conversation
    a_ids = [logic.turnSegmentId(scene.segmentation_node, t, a) for t in a.turns]
    _show(logic, view, SLICE_B)
    logic.finishTask(ask("Segment the liver"))
    logic.finishTask(ask("Segment the spleen"))
    b = logic.conversation
    b_last = logic.turnSegmentId(scene.segmentation_node, b.turns[-1], b)
    turn = logic.undoLastTurn()
    assert turn.round == 2 and len(b.turns) == 1 and b_last not in scene.arrays
    assert len(a.turns) == 2 and all(i in scene.arrays for i in a_ids)
    # New conversation on B: B's chat goes, its segment stays; A is untouched.
    b_first = logic.turnSegmentId(scene.segmentation_node, b.turns[0], b)
    logic.newConversation()
    assert logic.conversation is None and b_first in scene.arrays
    assert logic.conversations == [a]
    _show(logic, view, SLICE_A)
    assert logic.conversation is a and len(a.turns) == 2


def test_turn_finished_after_the_view_moved_lands_on_its_slice(scene, chat):
    logic, view, ask, _backend = chat
    logic.finishTask(ask("Segment the lungs"))
    a = logic.conversation
    _show(logic, view, SLICE_B)
    logic.finishTask(ask("Segment the liver"))
    b = logic.conversation
    # Started on A, finished while the view shows B.
    _show(logic, view, SLICE_A)
    task = ask("Segment the heart")
    _show(logic, view, SLICE_B)
    assert logic.finishTask(task).startswith("Round 2")
    assert len(a.turns) == 2 and a.turns[-1].prompt == "Segment the heart"
    assert len(b.turns) == 1 and logic.conversation is b
    segment_id = logic.turnSegmentId(scene.segmentation_node, a.turns[-1], a)
    assert scene.writes[-1] == segment_id
    mask = scene.arrays[segment_id]
    from MultiTurnSegLib.imaging import extract_mask, num_slices

    assert all(not extract_mask(mask, scene.volume, AXIS, k).any() for k in range(num_slices(scene.volume, AXIS)) if k != SLICE_A)
    # A first turn on a new slice C, finished after moving away: C gets its conversation.
    _show(logic, view, 10)
    task = ask("Segment the spine")
    _show(logic, view, SLICE_A)
    logic.finishTask(task)
    assert logic.conversation is a and len(a.turns) == 2
    assert logic.conversationOn((scene.volume_node.GetID(), AXIS, 10)).turns[0].prompt == "Segment the spine"


def test_turn_discarded_when_its_slice_conversation_was_replaced(scene, chat):
    logic, view, ask, _backend = chat
    logic.finishTask(ask("Segment the lungs"))
    a = logic.conversation
    task = ask("Segment the heart")
    _show(logic, view, SLICE_B)
    logic.loadConversations()  # same stored state: the object is kept
    assert logic.conversationById(a.id) is a
    other = a.copy()
    logic.conversations = [other]  # e.g. a scene imported while the turn ran
    with pytest.raises(ValueError, match="conversation changed while the turn was running"):
        logic.finishTask(task)
    assert len(other.turns) == 1 and logic.conversations == [other]


def test_parameter_node_round_trip_of_several_conversations(scene, chat):
    logic, view, ask, _backend = chat
    logic.finishTask(ask("Segment the lungs"))
    logic.finishTask(ask("Segment the heart"))
    _show(logic, view, SLICE_B)
    logic.finishTask(ask("Segment the liver"))
    saved = [c.copy() for c in logic.conversations]
    # A scene loaded again: a fresh logic reads every conversation back.
    reloaded = scene.module.MultiTurnSegLogic()
    monkey_view = View(SLICE_A)
    reloaded.sliceShownInView = monkey_view
    assert reloaded.loadConversation() is None  # no slice resolved yet
    assert reloaded.conversations == saved
    reloaded.updateShownSlice()
    assert reloaded.conversation == saved[0] and len(reloaded.conversation.turns) == 2
    monkey_view.index = SLICE_B
    assert reloaded.updateShownSlice() and reloaded.conversation == saved[1]
    # A propagation record per conversation; one's record does not hide the other's.
    support = scene.support
    reloaded._setPropagationRecord(saved[0].id, support.propagation_record(saved[0].id, AXIS, SLICE_A, 2, 4, (2, 3, 4), 2))
    reloaded._setPropagationRecord(saved[1].id, support.propagation_record(saved[1].id, AXIS, SLICE_B, 7, 9, (7, 8, 9), 1))
    assert reloaded.propagationRecord()["first"] == 7
    assert reloaded.propagationRecord(reloaded.conversationById(saved[0].id))["first"] == 2
    reloaded._setPropagationRecord(saved[1].id, "")
    assert reloaded.propagationRecord() is None and logic.propagationRecord(logic.conversations[0])["last"] == 4


def test_scene_of_the_single_conversation_format_is_read(scene, chat):
    logic, view, ask, _backend = chat
    logic.finishTask(ask("Segment the lungs"))
    from MultiTurnSegLib.conversation import conversation_to_json_text

    conversation = logic.conversation
    old = {"Conversation": conversation_to_json_text(conversation, indent=None)}
    scene.parameters.pop(scene.support.PARAMETER_CONVERSATIONS)
    scene.parameters.update(old)
    reloaded = scene.module.MultiTurnSegLogic()
    assert reloaded.loadConversations() == [conversation]
    reloaded.saveConversations()
    assert scene.parameters["Conversation"] == "" and scene.parameters[scene.support.PARAMETER_CONVERSATIONS]


def test_unreadable_entry_leaves_the_others(scene, chat):
    logic, view, ask, _backend = chat
    logic.finishTask(ask("Segment the lungs"))
    _show(logic, view, SLICE_B)
    logic.finishTask(ask("Segment the liver"))
    import json

    entries = json.loads(scene.parameters[scene.support.PARAMETER_CONVERSATIONS])
    entries[0]["turns"] = "not a list"
    scene.parameters[scene.support.PARAMETER_CONVERSATIONS] = json.dumps(entries)
    reloaded = scene.module.MultiTurnSegLogic()
    assert [c.slice_index for c in reloaded.loadConversations()] == [SLICE_B]
    assert np.array_equal(reloaded.conversations[0].turns[0].mask, logic.conversations[1].turns[0].mask)
