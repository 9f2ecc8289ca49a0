"""The Slicer module's Slicer-free helpers (MultiTurnSeg/MultiTurnSegSupport)."""

from __future__ import annotations

import re
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MultiTurnSeg"))

import MultiTurnSegSupport as support  # noqa: E402
from MultiTurnSegLib import imaging  # noqa: E402
from MultiTurnSegLib.errors import BackendError, ReferenceResolutionError  # noqa: E402


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()


def test_requirement_lists_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert sorted(r for r, _m in support.CORE_REQUIREMENTS) == sorted(project["dependencies"])
    engine = [r for r in project["optional-dependencies"]["engine"]]
    torch = [r for r in engine if _name(r) == "torch"]
    assert torch == [support.TORCH_REQUIREMENT[0]]
    assert sorted(r for r, _m in support.ENGINE_REQUIREMENTS) == sorted(r for r in engine if _name(r) != "torch")
    assert sorted(r for r, _m in support.DICOM_REQUIREMENTS) == sorted(project["optional-dependencies"]["dicom"])


def test_missing_requirements():
    def none(_name):
        return None

    missing = support.missing_requirements("local", find_spec=none)
    assert missing.torch and len(missing.pip) == len(support.CORE_REQUIREMENTS) + len(support.ENGINE_REQUIREMENTS)
    assert "torch" in missing.describe()[0]
    remote = support.missing_requirements("remote", find_spec=none)
    assert not remote.torch and len(remote.pip) == len(support.CORE_REQUIREMENTS)
    assert not support.missing_requirements("remote", find_spec=lambda n: object())
    with pytest.raises(ValueError):
        support.missing_requirements("cloud")


def _volume(direction=np.eye(3), shape=(5, 6, 7)):
    m = np.eye(4)
    m[:3, :3] = direction * 1.5
    return imaging.volume_from_array(np.zeros(shape, dtype=np.int16), m)


@pytest.mark.parametrize(
    "normal_ras, axis",
    [((0, 0, 1), "axial"), ((0, 0, -1), "axial"), ((0, 1, 0), "coronal"), ((1, 0, 0), "sagittal"), ((-1, 0, 0), "sagittal")],
)
def test_axis_for_view_lps_volume(normal_ras, axis):
    assert support.axis_for_view(_volume(), normal_ras) == axis


def test_axis_for_view_permuted_volume():
    # voxel i runs S, j runs L, k runs P (a sagittal acquisition stored oddly)
    direction = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)
    vol = _volume(direction)
    assert support.axis_for_view(vol, (0, 0, 1)) == "axial"
    assert support.axis_for_view(vol, (1, 0, 0)) == "sagittal"


def test_axis_for_view_refuses_oblique_view():
    tilted = (0.0, np.sin(np.radians(10)), np.cos(np.radians(10)))
    with pytest.raises(support.ObliqueViewError, match="oblique"):
        support.axis_for_view(_volume(), tilted, view_name="The Red view")
    # within tolerance is fine
    slight = (0.0, np.sin(np.radians(0.5)), np.cos(np.radians(0.5)))
    assert support.axis_for_view(_volume(), slight) == "axial"


def test_view_matches_library_slice_index():
    vol = _volume()
    axis = support.axis_for_view(vol, (0, 0, 1))
    center_lps = imaging.slice_center_lps(vol, axis, 3)
    assert imaging.slice_index_at(vol, axis, center_lps) == 3
    # the module converts the view's RAS centre with ras_to_lps (its own inverse)
    ras = support.ras_to_lps(center_lps)
    assert imaging.slice_index_at(vol, axis, support.ras_to_lps(ras)) == 3


def test_background_task_result_and_progress():
    seen = threading.Event()

    def work(progress):
        progress("encoding", 0.5)
        seen.wait(2)
        return 42

    task = support.BackgroundTask(work).start()
    deadline = time.monotonic() + 2
    while task.poll()[0] != "encoding" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert task.poll()[:2] == ("encoding", 0.5)
    assert not task.done
    seen.set()
    assert task.wait(5) and task.result == 42 and task.error is None


def test_background_task_runs_off_the_calling_thread():
    task = support.BackgroundTask(lambda progress: threading.get_ident()).start()
    assert task.wait(5)
    assert task.result != threading.get_ident()


def test_background_task_error_is_kept():
    def fail(progress):
        raise BackendError("worker down")

    task = support.BackgroundTask(fail).start()
    assert task.wait(5)
    assert isinstance(task.error, BackendError)


def test_background_task_cancel_stops_at_next_progress():
    release = threading.Event()
    steps = []

    def work(progress):
        release.wait(2)
        for i in range(100):
            progress("step", i / 100)
            steps.append(i)
        return "finished"

    task = support.BackgroundTask(work).start()
    task.cancel()
    release.set()
    assert task.wait(5)
    assert task.cancelled and isinstance(task.error, support.Cancelled) and steps == []


def test_jcm_text_flags_low_scores():
    assert support.jcm_text(None)[0] == "-"
    text, low, tip = support.jcm_text(0.42, refined=True)
    assert low and "low" in text and "corrected" in tip
    assert support.jcm_text(0.9)[1] is False
    assert support.jcm_text(support.JCM_LOW_THRESHOLD)[1] is True


def test_color_hex():
    assert support.color_hex((1.0, 0.5, 0.0)) == "#ff8000"


def test_error_messages():
    assert support.error_message(ReferenceResolutionError("there is no round 4")).startswith("Reference problem")
    assert support.error_message(BackendError("refused")).startswith("Worker problem")
    assert "Out of memory" in support.error_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert "Could not reach" in support.error_message(ConnectionRefusedError("refused"))


@pytest.mark.parametrize(
    "index, count, expected",
    [(20, 40, (15, 25)), (2, 40, (0, 7)), (38, 40, (33, 39)), (0, 1, (0, 0)), (3, 4, (0, 3)), (7, 0, (0, 0))],
)
def test_default_propagation_range_is_clamped(index, count, expected):
    assert support.default_propagation_range(index, count) == expected


def test_propagation_record_round_trip():
    text = support.propagation_record("abc", "axial", 17, 15, 19, (15, 16, 17, 18, 19), 3, [(16, 2, 0.41), (18, 1, None)])
    assert support.PARAMETER_PROPAGATION in support.PARAMETER_NAMES
    record = support.parse_propagation_record(text)
    assert record == {
        "conversation": "abc", "axis": "axial", "source": 17, "first": 15, "last": 19,
        "slices": [15, 16, 17, 18, 19], "rounds": 3, "flagged": [(16, 2, 0.41), (18, 1, None)],
    }
    for bad in ("", None, "not json", "[1, 2]", '{"conversation": "abc"}', '{"conversation":"a","axis":"axial",'
                '"source":"x","first":0,"last":1,"rounds":1}'):
        assert support.parse_propagation_record(bad) is None


def test_flagged_text():
    assert support.flagged_text([]) == ""
    assert support.flagged_text([(12, 2, 0.412), (14, 1, None)]) == "slice 12 R2 (0.41), slice 14 R1"
    many = [(k, 1, 0.5) for k in range(20)]
    assert support.flagged_text(many, limit=3).endswith("slice 2 R1 (0.50), and 17 more")


def test_background_task_kind():
    assert support.BackgroundTask(lambda progress: None).kind == ""
    assert support.BackgroundTask(lambda progress: None, kind="turn").kind == "turn"


def test_truncated_propagation_record_after_undo():
    text = support.propagation_record("abc", "axial", 17, 15, 19, (15, 16, 17, 18, 19), 3, [(16, 2, 0.41), (18, 3, None)])
    record = support.parse_propagation_record(text)
    assert support.truncated_propagation_record(None, 2) is None
    assert support.truncated_propagation_record(record, 3) is None  # nothing propagated was undone
    assert support.truncated_propagation_record(record, 0) == ""
    shorter = support.parse_propagation_record(support.truncated_propagation_record(record, 2))
    assert shorter == {**record, "rounds": 2, "flagged": [(16, 2, 0.41)]}


def test_worker_info_text():
    info = {"model": "MediRound", "device": "cuda:0", "jcm_available": True, "other": 1}
    assert support.worker_info_text(info) == "model: MediRound; device: cuda:0; jcm_available: True"
    assert support.worker_info_text({"other": 1}) == '{"other": 1}'
