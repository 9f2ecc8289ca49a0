"""MediRound engine against the golden cases of the official code, and the
incremental session (cache reuse, undo, extend, rollback, generation).

The tiny model is loaded once for this module (loading is the slow part).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from MultiTurnSegLib.backends.base import DEFAULT_ANSWER_TEMPLATE, AnswerMode, TurnSpec  # noqa: E402
from MultiTurnSegLib.errors import InferenceError, InputError  # noqa: E402

CASES = ("single", "chain3")


@pytest.fixture(scope="module")
def engine(tiny_model_json):
    from MultiTurnSegLib.engine import MediRoundEngine

    return MediRoundEngine.from_model_json(tiny_model_json, device="cpu")


def load_case(cases_dir: Path, name: str):
    folder = cases_dir / name
    case = json.loads((folder / "case.json").read_text())
    image = np.array(Image.open(folder / case["image"]).convert("RGB"))
    return case, image, np.load(folder / "expected.npz")


def run_official(session, turns, policy="referenced", **kwargs):
    """Official evaluation semantics: teacher-forced answers, references
    rebuilt from the predicted mask of the referenced round, JCM on round r
    only when a later turn refers to r."""
    outs = []
    for r, turn in enumerate(turns):
        ref = outs[turn["ref"]].mask if turn.get("ref") is not None else None
        referenced = any(t.get("ref") == r for t in turns[r + 1:])
        jcm = referenced if policy == "referenced" else policy == "always"
        outs.append(session.run_turn(TurnSpec(turn["prompt"], turn["answer"], ref), apply_jcm=jcm, **kwargs))
    return outs


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


@pytest.mark.parametrize("name", CASES)
def test_parity_with_official_golden_case(engine, fixture_cases_dir, name):
    case, image, exp = load_case(fixture_cases_dir, name)
    session = engine.new_session(image)
    # Slice encodings.
    assert tuple(session.image_size_hw) == tuple(exp["image_size_hw"])
    assert tuple(session.sam_resize_hw) == tuple(exp["sam_resize_hw"])
    assert maxdiff(session.images_clip, exp["images_clip"]) < 1e-6
    assert maxdiff(session.clip_image_features, exp["clip_image_features"]) < 1e-5
    assert maxdiff(session.sam_image_embedding, exp["sam_image_embedding"]) < 1e-4

    turns = case["turns"]
    outs = run_official(session, turns)
    np.testing.assert_array_equal(outs[-1].input_ids, exp["input_ids"])
    for r, out in enumerate(outs):
        np.testing.assert_array_equal(out.input_ids, exp["input_ids"][: len(out.input_ids)])
        assert (out.jcm_score is not None) == bool(exp["jcm_ran"][r])
        assert out.jcm_refined == bool(exp["jcm_refined"][r])
        if exp["jcm_ran"][r]:
            assert abs(out.jcm_score - float(exp["jcm_score"][r])) < 1e-5
        assert maxdiff(out.llm_hidden_before_seg, exp["llm_hidden_before_seg"][r]) < 1e-4
        assert maxdiff(out.seg_embedding, exp["seg_embedding"][r]) < 1e-4
        assert maxdiff(out.sam_text_embed, exp["sam_text_embed"][r]) < 1e-4
        assert maxdiff(out.low_res_logits, exp["low_res_logits"][r]) < 2e-4
        assert out.logits.shape == exp["logits"][r].shape
        assert maxdiff(out.logits, exp["logits"][r]) < 2e-4
        sure = np.abs(exp["logits"][r]) >= 2e-4
        np.testing.assert_array_equal(out.mask[sure], exp["mask"][r][sure])
        assert out.answer == turns[r]["answer"]
        ref = turns[r].get("ref")
        if ref is None:
            assert out.ref_box is None and out.crop_features.shape[0] == 0
            continue
        # The reference this turn consumed was rebuilt from round `ref`'s prediction.
        assert out.fallback == bool(exp["fallback"][ref])
        np.testing.assert_allclose(out.ref_box, exp["ref_box_f64"][ref], rtol=0, atol=1e-12)
        assert maxdiff(out.ref_crop, exp["ref_crop"][ref]) < 1e-6
        slot = int(exp["input_ref_slot"][r])
        assert maxdiff(out.crop_features[0], exp["crop_features"][r][slot]) < 1e-5
        assert maxdiff(out.box_features[0], exp["box_features"][r][slot]) < 1e-5


def _four_turns(case):
    return case["turns"] + [{"prompt": "Segment the spleen.", "answer": "It is [SEG].", "ref": None}]


def test_incremental_equals_full_recompute(engine, fixture_cases_dir):
    case, image, _ = load_case(fixture_cases_dir, "chain3")
    turns = _four_turns(case)
    inc = run_official(engine.new_session(image), turns, policy="always")
    full = run_official(engine.new_session(image), turns, policy="always", full_recompute=True)
    for a, b in zip(inc, full):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert maxdiff(a.seg_embedding, b.seg_embedding) < 1e-4
        assert abs(a.jcm_score - b.jcm_score) < 1e-5 and a.jcm_refined == b.jcm_refined
        assert maxdiff(a.logits, b.logits) < 2e-4
        sure = np.abs(b.logits) >= 2e-4
        np.testing.assert_array_equal(a.mask[sure], b.mask[sure])


def test_full_recompute_then_incremental_continues(engine, fixture_cases_dir):
    case, image, exp = load_case(fixture_cases_dir, "chain3")
    session = engine.new_session(image)
    turns = case["turns"]
    first = session.run_turn(TurnSpec(turns[0]["prompt"], turns[0]["answer"]), full_recompute=True)
    second = session.run_turn(TurnSpec(turns[1]["prompt"], turns[1]["answer"], first.mask))
    assert maxdiff(second.logits, exp["logits"][1]) < 2e-4


def test_undo_then_rerun_gives_same_result(engine, fixture_cases_dir):
    case, image, _ = load_case(fixture_cases_dir, "chain3")
    session = engine.new_session(image)
    outs = run_official(session, case["turns"])
    ids_before = session.input_ids.copy()
    memory = session.memory_bytes()
    last = session.undo()
    assert session.n_turns == 2 and last.answer == case["turns"][2]["answer"]
    assert len(session.input_ids) < len(ids_before)
    again = session.run_turn(last, apply_jcm=False)
    np.testing.assert_array_equal(session.input_ids, ids_before)
    assert session.memory_bytes() == memory
    assert maxdiff(again.logits, outs[-1].logits) < 1e-6
    np.testing.assert_array_equal(again.mask, outs[-1].mask)


def test_truncate_keeps_prefix(engine, fixture_cases_dir):
    case, image, _ = load_case(fixture_cases_dir, "chain3")
    session = engine.new_session(image)
    outs = run_official(session, case["turns"])
    session.truncate(1)
    assert session.n_turns == 1 and len(session.fed_turns) == 1
    spec = TurnSpec(case["turns"][1]["prompt"], case["turns"][1]["answer"], outs[0].mask)
    again = session.run_turn(spec)
    assert maxdiff(again.logits, outs[1].logits) < 1e-6
    session.truncate(0)
    assert session.n_turns == 0 and session.input_ids.size == 0
    with pytest.raises(InputError):
        session.truncate(3)
    with pytest.raises(InputError):
        session.undo()


def test_extend_prefix_then_run_equals_running_all(engine, fixture_cases_dir):
    case, image, _ = load_case(fixture_cases_dir, "chain3")
    all_outs = run_official(engine.new_session(image), case["turns"])
    session = engine.new_session(image)
    t = case["turns"]
    session.extend(TurnSpec(t[0]["prompt"], t[0]["answer"]))
    session.extend(TurnSpec(t[1]["prompt"], t[1]["answer"], all_outs[0].mask))
    assert [s.prompt for s in session.fed_turns] == [t[0]["prompt"], t[1]["prompt"]]
    out = session.run_turn(TurnSpec(t[2]["prompt"], t[2]["answer"], all_outs[1].mask), apply_jcm=False)
    np.testing.assert_array_equal(out.input_ids, all_outs[2].input_ids)
    assert maxdiff(out.logits, all_outs[2].logits) < 1e-5
    np.testing.assert_array_equal(out.mask, all_outs[2].mask)
    with pytest.raises(InputError):
        session.extend(TurnSpec("Segment the liver."))  # history turns need their answer


def test_failed_turns_leave_session_unchanged(engine, fixture_cases_dir, monkeypatch):
    case, image, exp = load_case(fixture_cases_dir, "chain3")
    session = engine.new_session(image)
    t = case["turns"]
    first = session.run_turn(TurnSpec(t[0]["prompt"], t[0]["answer"]))
    ids, memory = session.input_ids.copy(), session.memory_bytes()

    with pytest.raises(InputError):  # reference mask of the wrong shape
        session.run_turn(TurnSpec(t[1]["prompt"], t[1]["answer"], np.ones((5, 5), bool)))

    # A failure after the language model already ran (here: out of memory in SAM).
    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.model.sam, "decode", oom)
    with pytest.raises(InferenceError, match="4-bit"):
        session.run_turn(TurnSpec(t[1]["prompt"], t[1]["answer"], first.mask))
    monkeypatch.undo()
    assert session.n_turns == 1
    np.testing.assert_array_equal(session.input_ids, ids)
    assert session.memory_bytes() == memory
    second = session.run_turn(TurnSpec(t[1]["prompt"], t[1]["answer"], first.mask))
    assert maxdiff(second.logits, exp["logits"][1]) < 2e-4


def test_template_answer_and_input_checks(engine, fixture_cases_dir):
    _, image, _ = load_case(fixture_cases_dir, "single")
    session = engine.new_session(image)
    with pytest.raises(InputError, match="shape"):  # a reference on another grid than the slice
        session.run_turn(TurnSpec("Segment the liver.", reference_mask=np.zeros(image.shape[:2][::-1], bool)))
    with pytest.raises(InputError):
        session.run_turn(TurnSpec("Segment [SEG] the liver."))
    with pytest.raises(InputError):
        session.run_turn(TurnSpec("Segment the liver.", answer="No segmentation."))
    with pytest.raises(InputError):
        engine.new_session(image[..., 0])
    out = session.run_turn(TurnSpec("Segment the liver."))
    assert out.answer == DEFAULT_ANSWER_TEMPLATE
    assert session.fed_turns[0].answer == DEFAULT_ANSWER_TEMPLATE
    assert out.mask.shape == image.shape[:2] and out.mask.dtype == bool
    assert out.jcm_score is not None  # apply_jcm defaults to True on a stage-2 model
    assert {"llm", "sam_decode", "total"} <= set(out.timings)
    # An empty reference (nothing predicted) falls back to the whole image.
    ref = session.run_turn(TurnSpec("Segment the lesion inside.", reference_mask=np.zeros(image.shape[:2], bool)))
    assert ref.fallback is True
    np.testing.assert_allclose(ref.ref_box, [0, 0, 299 / 300, 199 / 200])


def test_generate_mode_feeds_a_replayable_answer(engine, fixture_cases_dir):
    _, image, _ = load_case(fixture_cases_dir, "single")
    session = engine.new_session(image)
    out = session.run_turn(TurnSpec("Segment the liver."), answer_mode=AnswerMode.GENERATE, max_new_tokens=6)
    assert out.answer_generated and out.answer.count("[SEG]") == 1
    assert out.seg_appended == (not out.answer.endswith("[SEG].") or out.seg_appended)
    assert "generate" in out.timings
    # The fed turn replays to the same ids and mask.
    replay = engine.new_session(image)
    again = replay.run_turn(session.fed_turns[0])
    np.testing.assert_array_equal(again.input_ids, out.input_ids)
    np.testing.assert_array_equal(again.mask, out.mask)


def test_generate_mode_builds_a_reference_once(engine, fixture_cases_dir, monkeypatch):
    _, image, _ = load_case(fixture_cases_dir, "single")
    session = engine.new_session(image)
    first = session.run_turn(TurnSpec("Segment the liver."))
    calls = []
    build = engine.build_reference
    monkeypatch.setattr(engine, "build_reference", lambda *a: calls.append(1) or build(*a))
    out = session.run_turn(TurnSpec("Segment the lesion inside it.", reference_mask=first.mask),
                           answer_mode=AnswerMode.GENERATE, max_new_tokens=4)
    assert len(calls) == 1 and out.answer_generated and out.ref_box is not None


def test_lora_merged_as_w_plus_scaled_ba(engine, tiny_model_dir):
    state = torch.load(tiny_model_dir / "mediround-stage2" / "pytorch_model.bin", weights_only=True)
    p = "base_model.model.model.layers.0.self_attn."
    for proj in ("q_proj", "v_proj"):
        w = state[p + proj + ".weight"]
        a = state[p + proj + ".lora_A.default.weight"]
        b = state[p + proj + ".lora_B.default.weight"]
        merged = getattr(engine.model.llm.model.layers[0].self_attn, proj).weight
        torch.testing.assert_close(merged, w + 2.0 * (b @ a), rtol=0, atol=1e-6)
    k = engine.model.llm.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(k, state[p + "k_proj.weight"], rtol=0, atol=0)


def test_info(engine):
    info = engine.info()
    assert info["stage"] == 2 and info["jcm_available"] is True
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["gpu_name"] is None
    assert set(info["versions"]) == {"torch", "transformers", "peft"}
    assert info["token_ids"] == {"[SEG]": 32000, "[BBOXINPUT]": 32001, "[CROPPEDIMAGE]": 32002}
    assert info["dims"]["image_tokens"] == 576 and info["dims"]["vocab_size"] == 32003
    json.dumps(info)


def test_bf16_path_runs_close_to_fp32(tiny_model_json, fixture_cases_dir):
    """bf16 (the CUDA default) exercised on CPU: positional encoding in bf16 as
    in the official bf16 runs; masks stay close to the fp32 golden ones."""
    from MultiTurnSegLib.engine import MediRoundEngine

    case, image, exp = load_case(fixture_cases_dir, "single")
    eng = MediRoundEngine.from_model_json(tiny_model_json, device="cpu", dtype="bfloat16")
    assert eng.dense_pe.dtype == torch.bfloat16
    assert eng.model.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.bfloat16
    rotary = [b for n, b in eng.model.llm.named_buffers() if "inv_freq" in n]
    assert rotary and all(b.dtype == torch.float32 for b in rotary)
    turn = TurnSpec(case["turns"][0]["prompt"], case["turns"][0]["answer"])
    out = eng.new_session(image).run_turn(turn, apply_jcm=False)
    assert out.logits.dtype == np.float32
    assert np.mean(out.mask != exp["mask"][0]) < 0.02


def test_first_turn_can_refer_to_a_hand_drawn_mask(engine, fixture_cases_dir):
    """Round 1 may refer to a segment the user drew: the slice comes first,
    then the crop and box of that segment; incremental equals full recompute."""
    case, image, exp = load_case(fixture_cases_dir, "chain3")
    drawn = np.zeros(image.shape[:2], bool)
    drawn[40:120, 60:200] = True
    spec = TurnSpec("Segment the lesion inside the drawn region.", "Sure, [SEG].", drawn)
    inc = engine.new_session(image).run_turn(spec)
    full = engine.new_session(image).run_turn(spec, full_recompute=True)
    tok = engine.info()["token_ids"]
    ids = list(inc.input_ids)
    image_at = ids.index(-200)
    assert ids[image_at + 1: image_at + 3] == [28705, 13]  # "<image>\n" then the reference markers
    assert ids.index(tok["[CROPPEDIMAGE]"]) > image_at and ids.index(tok["[BBOXINPUT]"]) > image_at
    np.testing.assert_allclose(inc.ref_box, [60 / 300, 40 / 200, 199 / 300, 119 / 200], atol=1e-6)
    assert maxdiff(inc.logits, full.logits) < 2e-4
    # The reference changes the answer: the same prompt without it gives other logits.
    plain = engine.new_session(image).run_turn(TurnSpec(spec.prompt, spec.answer))
    assert maxdiff(inc.logits, plain.logits) > 1e-3
