"""``multiturnseg chat ... --worker URL --token T`` writes the same ``.seg.nrrd`` as
``--model MODEL.json``: a real worker process serving the tiny fixture model,
the real command on slicerio's chest CT, real files compared voxel for voxel."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("torch")

from MultiTurnSegLib.cli import main  # noqa: E402

from test_worker_support import TINY_MODEL_JSON, start_worker  # noqa: E402

pytestmark = pytest.mark.slow  # a worker process and the model in this one

TOKEN = "chat-remote-token-0123456789"
# rounds 2 and 3 refer to earlier rounds in words
PROMPTS = ["Segment the lungs", "Segment the region inside round 1", "Segment the structure next to it"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The worker, started in the background (it loads the model while this process
    loads its own copy for the local run); call it to wait for the running worker."""
    token_file = tmp_path_factory.mktemp("tok") / "token.txt"
    token_file.write_text(TOKEN + "\n")
    box = {}

    def start():
        try:
            box["w"] = start_worker(["--model", str(TINY_MODEL_JSON), "--port", "0", "--token-file", str(token_file),
                                     "--device", "cpu"])
        except BaseException as exc:  # noqa: BLE001 - re-raised by get()
            box["error"] = exc

    thread = threading.Thread(target=start, daemon=True)
    thread.start()

    def get():
        thread.join(240)
        if "error" in box:
            raise box["error"]
        return box["w"]

    yield get
    thread.join(240)
    w = box.get("w")
    if w is not None:
        w.stop()
        assert not any("Traceback" in line for line in w.lines), "\n".join(w.lines)


def _chat(ct, out, *source, transcript=None):
    args = ["chat", str(ct), "--axis", "axial", "--slice", "17", "--window", "lung"]
    for p in PROMPTS:
        args += ["--prompt", p]
    args += [*source, "-o", str(out)]
    if transcript is not None:
        args += ["--transcript", str(transcript)]
    return main(args)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ct_chest_path, tiny_model_json, worker):
    """The reference: the same chat with the model in this process."""
    d = tmp_path_factory.mktemp("local")
    rc = _chat(ct_chest_path, d / "local.seg.nrrd", "--model", str(tiny_model_json), "--device", "cpu",
               transcript=d / "local.json")
    assert rc == 0
    return d / "local.seg.nrrd", d / "local.json"


# what legitimately differs between two runs of one conversation
VOLATILE = {"id", "created", "timings"}


def _comparable_tags(tags):
    """Segment tags with the encoded conversation and turn (prompt, answer, reference and
    its mask, JCM score, name, colour ...) decoded, minus ids, times and timings."""
    from MultiTurnSegLib.conversation.serialization import TAG_PREFIX, decode_from_tag

    out = {}
    for key, value in tags.items():
        if value.startswith(TAG_PREFIX):
            value = {k: v for k, v in decode_from_tag(value).items() if k not in VOLATILE}
        out[key] = value
    assert {"TerminologyEntry", "MultiTurnSeg.Round", "MultiTurnSeg.Turn"} <= set(out), sorted(out)
    return out


def _assert_same_segmentation(a_path, b_path):
    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    a, b = read_seg_nrrd(a_path), read_seg_nrrd(b_path)
    assert a.shape == b.shape and np.array_equal(a.ijk_to_lps, b.ijk_to_lps)
    assert [s.name for s in a.segments] == [s.name for s in b.segments]
    assert len(a.segments) == len(PROMPTS)
    for sa, sb in zip(a.segments, b.segments):
        assert sa.id.rsplit("_", 1)[1] == sb.id.rsplit("_", 1)[1]  # "MultiTurnSeg_<conversation id>_R<n>"
        assert sa.color == sb.color
        assert _comparable_tags(sa.tags) == _comparable_tags(sb.tags)
        assert sa.mask.shape == sb.mask.shape
        assert sa.mask.any(), sa.name  # real masks, not two empty ones
        assert np.array_equal(sa.mask, sb.mask), f"{sa.name}: {int((sa.mask != sb.mask).sum())} voxels differ"
    return a


def _assert_same_turns(a_json, b_json):
    from MultiTurnSegLib.conversation import load_conversation

    a, b = load_conversation(a_json), load_conversation(b_json)
    assert [t.answer for t in a.turns] == [t.answer for t in b.turns]
    assert [t.jcm_score for t in a.turns] == [t.jcm_score for t in b.turns]
    assert [t.jcm_refined for t in a.turns] == [t.jcm_refined for t in b.turns]
    refs = [t.reference.round if t.reference else None for t in b.turns]
    assert refs == [t.reference.round if t.reference else None for t in a.turns] == [None, 1, 2]


def test_chat_through_a_worker_writes_the_same_segments_as_the_local_model(
        tmp_path, ct_chest_path, worker, local_run, capsys):
    local_seg, local_json = local_run
    capsys.readouterr()
    remote_seg = tmp_path / "remote.seg.nrrd"
    rc = _chat(ct_chest_path, remote_seg, "--worker", worker().url, "--token", TOKEN,
               transcript=tmp_path / "remote.json")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "refers to round 1" in captured.out and "refers to round 2" in captured.out
    seg = _assert_same_segmentation(local_seg, remote_seg)
    assert seg.segments[1].name == "R2 region inside round 1"
    _assert_same_turns(local_json, tmp_path / "remote.json")


def test_token_from_the_environment(tmp_path, ct_chest_path, worker, local_run, monkeypatch, capsys):
    local_seg, _ = local_run
    monkeypatch.setenv("MULTITURNSEG_TOKEN", TOKEN)
    out = tmp_path / "env.seg.nrrd"
    rc = _chat(ct_chest_path, out, "--worker", worker().url)
    assert rc == 0, capsys.readouterr().err
    _assert_same_segmentation(local_seg, out)


@pytest.mark.parametrize("token_args, env, match", [
    (["--token", "not-the-token"], None, "rejected the token"),
    ([], "not-the-token-either", "rejected the token"),
    ([], None, "requires a token"),
])
def test_wrong_or_missing_token_is_a_clear_error(tmp_path, ct_chest_path, worker, monkeypatch, capsys,
                                                 token_args, env, match):
    if env is None:
        monkeypatch.delenv("MULTITURNSEG_TOKEN", raising=False)
    else:
        monkeypatch.setenv("MULTITURNSEG_TOKEN", env)
    out = tmp_path / "denied.seg.nrrd"
    url = worker().url
    rc = _chat(ct_chest_path, out, "--worker", url, *token_args)
    err = capsys.readouterr().err
    assert rc == 2
    assert match in err and "token" in err and url in err, err
    assert "Traceback" not in err
    assert not out.exists()
