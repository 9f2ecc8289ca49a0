"""The module's Propagate logic, run without Slicer: stub MRML objects, a stub backend, a synthetic volume.

Checks the flow the self-test cannot check in CI: the scene is read in the main
thread before the background task, the 3D masks go into the conversation's
existing segments (the conversation's own slice keeps its hand edits), and a
cancelled or failed propagation changes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MultiTurnSeg"))

from MultiTurnSegLib.backends.base import Backend  # noqa: E402
from MultiTurnSegLib.conversation import ChatSession, Conversation, PropagationError, Reference  # noqa: E402
from MultiTurnSegLib.errors import InferenceError  # noqa: E402
from MultiTurnSegLib.imaging import extract_mask, insert_mask, num_slices, render_slice, volume_from_array  # noqa: E402

AXIS, SOURCE = "axial", 6


class SpyBackend(Backend):
    """The real tiny MediRound model, recording each turn it is given; call
    number ``fail_at`` fails instead (failure injection: the CPU model cannot
    run out of GPU memory on demand)."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.calls, self.fail_at = inner, [], fail_at

    def info(self):
        return self.inner.info()

    def run_turn(self, image, history, turn, **kw):
        self.calls.append(turn)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise InferenceError("out of GPU memory")
        return self.inner.run_turn(image, history, turn, **kw)


@pytest.fixture(scope="module")
def real_backend(tiny_model_json):
    from MultiTurnSegLib.backends.local import LocalBackend
    from MultiTurnSegLib.engine import MediRoundEngine

    return LocalBackend(MediRoundEngine.from_model_json(tiny_model_json, device="cpu"))


@pytest.fixture
def make_backend(real_backend):
    return lambda fail_at=None: SpyBackend(real_backend, fail_at)


class Scene:
    """The few MRML objects the logic touches, as plain Python."""

    def __init__(self, volume):
        self.volume, self.arrays, self.writes, self.parameters, self.references = volume, {}, [], {}, {}
        scene = self

        class Matrix:
            def __init__(self):
                self.m = np.eye(4)

            def GetElement(self, r, c):
                return self.m[r, c]

        class VolumeNode:
            def GetID(self):
                return "vtkMRMLScalarVolumeNode1"

            def GetName(self):
                return "CT"

            def GetParentTransformNode(self):
                return None

            def GetIJKToRASMatrix(self, m):
                m.m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.ijk_to_lps

        class Segment:
            def __init__(self, name, color):
                self.name, self.color, self.tags = name, list(color), {}

            def GetName(self):
                return self.name

            def SetName(self, name):
                self.name = name

            def GetColor(self):
                return self.color

            def SetColor(self, *color):
                self.color = list(color)

            def SetTag(self, key, value):
                self.tags[key] = value

            def SetTerminology(self, entry):
                self.tags["TerminologyEntry"] = entry

        class Segmentation:
            def __init__(self):
                self.segments = {}

            def GetNumberOfSegments(self):
                return len(self.segments)

            def GetNthSegmentID(self, i):
                return list(self.segments)[i]

            def GetSegment(self, segment_id):
                return self.segments.get(segment_id)

            def AddEmptySegment(self, segment_id, name, color):
                self.segments[segment_id] = Segment(name, color)
                scene.arrays[segment_id] = np.zeros(volume.shape, np.uint8)
                return segment_id

            def RemoveSegment(self, segment_id):
                del self.segments[segment_id], scene.arrays[segment_id]

        class SegmentationNode:
            def __init__(self):
                self.segmentation = Segmentation()

            def GetID(self):
                return "vtkMRMLSegmentationNode1"

            def GetSegmentation(self):
                return self.segmentation

            def GetNodeReference(self, role):  # the reference geometry is set
                return scene.volume_node

            def GetName(self):
                return "Chat"

        class ParameterNode:
            def GetParameter(self, name):
                return scene.parameters.get(name, "")

            def SetParameter(self, name, value):
                scene.parameters[name] = value

            def GetNodeReference(self, role):
                return scene.nodes.get(scene.references.get(role))

            def SetNodeReferenceID(self, role, node_id):
                scene.references[role] = node_id

        self.Matrix, self.parameter_node = Matrix, ParameterNode()
        self.volume_node, self.segmentation_node = VolumeNode(), SegmentationNode()
        self.nodes = {self.volume_node.GetID(): self.volume_node, self.segmentation_node.GetID(): self.segmentation_node}

    def GetNodeByID(self, node_id):
        return self.nodes.get(node_id)

    def update(self, array, segmentation_node, segment_id, volume_node):
        self.writes.append(segment_id)
        self.arrays[segment_id] = np.asarray(array).astype(np.uint8)


@pytest.fixture
def scene(monkeypatch):
    rng = np.random.default_rng(0)
    volume = volume_from_array(rng.integers(-1000, 1000, size=(12, 48, 40)).astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0]))
    s = Scene(volume)

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    class Logic(Base):
        def getParameterNode(self):
            return s.parameter_node

    slicer = types.ModuleType("slicer")
    slicer.mrmlScene = s
    slicer.vtkMRMLSegmentationNode = types.SimpleNamespace(GetReferenceImageGeometryReferenceRole=lambda: "referenceImageGeometryRef")
    slicer.app = types.SimpleNamespace(processEvents=lambda: None)
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self, *a: None})
    util.arrayFromVolume = lambda node: volume.array
    util.arrayFromSegmentBinaryLabelmap = lambda node, segment_id, volume_node: s.arrays[segment_id].copy()
    util.updateSegmentBinaryLabelmapFromArray = s.update
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = scripted.ScriptedLoadableModuleWidget = scripted.ScriptedLoadableModuleTest = Base
    scripted.ScriptedLoadableModuleLogic = Logic
    slicer.util, slicer.i18n = util, i18n
    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4 = s.Matrix
    for name, module in {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n, "slicer.ScriptedLoadableModule": scripted,
                         "vtk": vtk, "qt": types.ModuleType("qt"), "ctk": types.ModuleType("ctk")}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("MultiTurnSeg_under_test", REPO / "MultiTurnSeg" / "MultiTurnSeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    s.module, s.support = module, module.support
    return s


def _setup(scene, backend):
    """A three-round conversation on SOURCE (round 2 refers to round 1's segment, round 3 to a hand-drawn one)."""
    volume, seg = scene.volume, scene.segmentation_node.GetSegmentation()
    logic = scene.module.MultiTurnSegLogic()
    logic.setInputs(scene.volume_node, scene.segmentation_node, "Red", "lung")
    hand = seg.AddEmptySegment("hand", "Hand drawn", (0.0, 0.0, 1.0))
    for k in range(num_slices(volume, AXIS)):
        block = np.zeros((48, 40), bool)
        block[30:36, k:k + 10] = True
        insert_mask(scene.arrays[hand], volume, AXIS, k, block, 1)
    image = render_slice(volume, AXIS, SOURCE, "lung")
    conversation = Conversation(volume=scene.volume_node.GetID(), axis=AXIS, slice_index=SOURCE,
                                image_size=image.shape[:2], window="lung")
    masks = {"Hand drawn": extract_mask(scene.arrays[hand], volume, AXIS, SOURCE)}
    session = ChatSession(backend, image, conversation, segment_masks=masks)
    session.ask("Segment the lungs", reference="none")
    masks[conversation.turns[0].segment_name] = conversation.turns[0].mask
    session.ask("Segment the region next to it", reference=Reference.to_segment(conversation.turns[0].segment_name))
    session.ask("Segment what is inside", reference=Reference.to_segment("Hand drawn"))
    for turn in conversation.turns:
        logic._writeTurnSegment(scene.segmentation_node, scene.volume_node, volume, conversation, turn)
    logic.conversation = conversation
    logic.saveConversation()
    ids = [logic.turnSegmentId(scene.segmentation_node, turn) for turn in conversation.turns]
    # A hand edit of round 1 on the conversation's slice.
    edit = np.zeros((48, 40), bool)
    edit[10:20, 10:20] = True
    scene.arrays[ids[0]][:] = 0
    insert_mask(scene.arrays[ids[0]], volume, AXIS, SOURCE, edit, 1)
    # The backend is "loaded" already: the config's key matches it.
    config = {"kind": "local", "model_path": __file__, "device": "cpu", "url": "", "token": ""}
    logic._backend, logic._backendKey = backend, ("local", os.path.abspath(__file__), "cpu")
    scene.writes.clear()
    backend.calls.clear()
    return logic, config, ids, hand, edit


def _slices_with_content(scene, array):
    return [k for k in range(num_slices(scene.volume, AXIS)) if extract_mask(array, scene.volume, AXIS, k).any()]


@pytest.fixture
def local_requirements(monkeypatch, scene):
    # _backendFactory checks the packages Slicer would need installed; this test hands it a backend directly.
    monkeypatch.setattr(scene.support, "missing_requirements", lambda *a, **k: scene.support.MissingPackages())


def test_propagation_writes_the_conversation_segments(scene, local_requirements, make_backend):
    backend = make_backend()
    logic, config, ids, hand, edit = _setup(scene, backend)
    before, conversation = {k: v.copy() for k, v in scene.arrays.items()}, logic.conversation.copy()
    message = logic.runPropagationAndWait(4, 8, config)
    result = logic.lastPropagation
    assert result.slices == (4, 5, 6, 7, 8) and len(backend.calls) == 12  # 4 slices x 3 rounds, SOURCE not redone
    assert message.startswith("Propagated 3 round(s) to axial slices 4..8 (5 slices).")
    if result.flagged():  # slices whose answers JCM corrected are listed for a second look
        listed = message.split("corrected a poor answer on:")[1]
        assert all(f"slice {k}" in listed for k, _r, _s in result.flagged())
    else:
        assert "corrected a poor answer" not in message
    assert sorted(scene.writes) == sorted(ids)  # the conversation's segments only, each once
    segmentation = scene.segmentation_node.GetSegmentation()
    for turn, segment_id, mask3d in zip(conversation.turns, ids, result.masks):
        assert segmentation.GetSegment(segment_id).GetName() == turn.segment_name
        assert _slices_with_content(scene, scene.arrays[segment_id]) == [4, 5, 6, 7, 8]
        for k in result.slices:
            expected = extract_mask(before[segment_id] if k == SOURCE else mask3d, scene.volume, AXIS, k)
            assert np.array_equal(extract_mask(scene.arrays[segment_id], scene.volume, AXIS, k), expected)
    assert np.array_equal(extract_mask(scene.arrays[ids[0]], scene.volume, AXIS, SOURCE), edit)  # hand edit kept
    assert np.array_equal(scene.arrays[hand], before[hand])
    assert logic.conversation == conversation
    # Round 3 got the hand-drawn segment's content on each slice, read before the task started.
    refs = [t.reference_mask for t in backend.calls if t.prompt == "Segment what is inside"]
    assert all(np.array_equal(r, extract_mask(before[hand], scene.volume, AXIS, k)) for r, k in zip(refs, (4, 5, 7, 8)))
    record = logic.propagationRecord()
    assert (record["first"], record["last"], record["rounds"], record["slices"]) == (4, 8, 3, [4, 5, 6, 7, 8])
    assert record["flagged"] == [(k, r, s) for k, r, s in result.flagged()]
    logic.undoLastTurn()
    assert logic.propagationRecord()["rounds"] == 2


def _assert_unchanged(scene, logic, before, conversation):
    assert scene.writes == [] and logic.conversation == conversation
    assert all(np.array_equal(before[k], scene.arrays[k]) for k in before)
    assert logic.propagationRecord() is None


def test_cancelled_propagation_changes_nothing(scene, local_requirements, make_backend):
    logic, config, _ids, _hand, _edit = _setup(scene, make_backend())
    before, conversation = {k: v.copy() for k, v in scene.arrays.items()}, logic.conversation.copy()
    task = logic.startPropagation(0, 11, config)
    task.cancel()
    assert task.wait(30)
    assert "cancelled" in logic.finishTask(task)
    _assert_unchanged(scene, logic, before, conversation)


def test_failed_propagation_changes_nothing(scene, local_requirements, make_backend):
    backend = make_backend()
    logic, config, _ids, _hand, _edit = _setup(scene, backend)
    backend.fail_at = 5
    before, conversation = {k: v.copy() for k, v in scene.arrays.items()}, logic.conversation.copy()
    task = logic.startPropagation(4, 8, config)
    deadline = time.monotonic() + 30
    while not task.done and time.monotonic() < deadline:
        task.wait(0.05)
    with pytest.raises(PropagationError, match="slice 5, round 2"):
        logic.finishTask(task)
    assert "round 2" in scene.support.error_message(task.error)
    _assert_unchanged(scene, logic, before, conversation)


def test_refused_before_starting(scene, local_requirements, make_backend):
    logic, config, ids, hand, _edit = _setup(scene, make_backend())
    with pytest.raises(Exception, match="outside the volume"):
        logic.startPropagation(10, 12, config)
    segmentation = scene.segmentation_node.GetSegmentation()
    segmentation.RemoveSegment(hand)
    with pytest.raises(ValueError, match="refers to segment 'Hand drawn', which no longer exists"):
        logic.startPropagation(4, 8, config)
    segmentation.RemoveSegment(ids[1])
    with pytest.raises(ValueError, match="segment of round 2 .* was deleted"):
        logic.startPropagation(4, 8, config)
    assert scene.writes == [] and logic._pendingPropagation is None


def test_reference_to_a_renamed_round_segment_follows_the_round(scene, local_requirements, make_backend):
    # Round 2 was asked after round 1's segment had been renamed: its reference names "liver".
    backend = make_backend()
    logic, config, ids, _hand, _edit = _setup(scene, backend)
    logic.conversation.turns[1].reference = Reference.to_segment("liver")
    scene.segmentation_node.GetSegmentation().GetSegment(ids[0]).SetName("liver")
    logic.runPropagationAndWait(5, 7, config)
    refs = [t.reference_mask for t in backend.calls if t.prompt == "Segment the region next to it"]
    round1 = [extract_mask(logic.lastPropagation.masks[0], scene.volume, AXIS, k) for k in (5, 7)]
    assert len(refs) == 2 and all(np.array_equal(a, b) for a, b in zip(refs, round1))
    assert logic.conversation.turns[1].reference == Reference.to_segment("liver")  # only the working copy changed


# --- turns and reloads while a task runs ---------------------------------------------


def _start_turn(scene, logic, config, monkeypatch):
    # The Red view shows the conversation's slice (no layout manager in these tests).
    monkeypatch.setattr(logic, "sliceShownInView", lambda volume, view: (AXIS, SOURCE))
    task = logic.startTurn("Segment the heart", scene.support.REFERENCE_NONE, config)
    assert task.wait(60)
    return task


def test_reloading_the_stored_conversation_keeps_a_running_propagation(scene, local_requirements, make_backend):
    logic, config, ids, _hand, _edit = _setup(scene, make_backend())
    task = logic.startPropagation(5, 7, config)
    logic.loadConversation()  # what re-entering the module does while the task runs
    assert task.wait(60)
    assert logic.finishTask(task).startswith("Propagated 3 round(s)")
    assert sorted(scene.writes) == sorted(ids)


def test_turn_adds_one_segment(scene, local_requirements, make_backend, monkeypatch):
    logic, config, ids, _hand, _edit = _setup(scene, make_backend())
    task = _start_turn(scene, logic, config, monkeypatch)
    assert logic.finishTask(task).startswith("Round 4")
    turn = logic.conversation.turns[-1]
    assert turn.round == 4 and turn.reference is None
    segment_id = logic.turnSegmentId(scene.segmentation_node, turn)
    assert scene.writes == [segment_id] and segment_id not in ids
    assert _slices_with_content(scene, scene.arrays[segment_id]) in ([], [SOURCE])
    stored, _problems = scene.support.conversations_from_json_text(scene.parameters[scene.support.PARAMETER_CONVERSATIONS])
    assert [c.id for c in stored] == [logic.conversation.id] and stored[0].turns[-1].round == 4


def test_failed_segment_write_keeps_turn_and_segments_as_they_were(scene, local_requirements, make_backend, monkeypatch):
    logic, config, _ids, _hand, _edit = _setup(scene, make_backend())
    segments, conversation = set(scene.arrays), logic.conversation.copy()
    stored = scene.parameters[scene.support.PARAMETER_CONVERSATIONS]
    task = _start_turn(scene, logic, config, monkeypatch)

    def broken(*args):
        raise RuntimeError("cannot write the labelmap")

    monkeypatch.setattr(scene.module.slicer.util, "updateSegmentBinaryLabelmapFromArray", broken)
    with pytest.raises(RuntimeError, match="cannot write"):
        logic.finishTask(task)
    assert set(scene.arrays) == segments and logic.conversation == conversation
    assert scene.parameters[scene.support.PARAMETER_CONVERSATIONS] == stored


def test_turn_result_is_discarded_when_another_conversation_was_loaded(scene, local_requirements, make_backend, monkeypatch):
    logic, config, _ids, _hand, _edit = _setup(scene, make_backend())
    segments = set(scene.arrays)
    task = _start_turn(scene, logic, config, monkeypatch)
    other = logic.conversation.copy()
    other.undo()
    logic.conversation = other  # e.g. a scene imported while the turn ran
    with pytest.raises(ValueError, match="conversation changed while the turn was running"):
        logic.finishTask(task)
    assert set(scene.arrays) == segments and logic.conversation is other and len(other.turns) == 2


def test_failed_turn_keeps_the_loaded_backend(scene, local_requirements, make_backend, monkeypatch):
    backend = make_backend()
    logic, config, _ids, _hand, _edit = _setup(scene, backend)
    backend.fail_at = 1  # the turn's first call
    logic._backend = logic._backendKey = None  # not loaded yet: the turn loads it
    key = ("local", "model.json", "cpu")
    monkeypatch.setattr(logic, "_backendFactory", lambda config: (key, lambda: backend))
    task = _start_turn(scene, logic, config, monkeypatch)
    with pytest.raises(InferenceError):
        logic.finishTask(task)
    assert (logic._backend, logic._backendKey) == (backend, key) and scene.writes == []
