"""Engine building blocks: tokenizer, template, preprocessing, model.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from MultiTurnSegLib.errors import InputError, ModelLoadError  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from MultiTurnSegLib.engine.tokenizer import MediRoundTokenizer

    return MediRoundTokenizer(tiny_model_dir / "llava-med" / "tokenizer.model")


@pytest.mark.parametrize("name", ["single", "chain3"])
def test_tokenizer_and_template_reproduce_training_ids(tokenizer, fixture_cases_dir, name):
    from MultiTurnSegLib.engine import prompt

    case = json.loads((fixture_cases_dir / name / "case.json").read_text())
    expected = np.load(fixture_cases_dir / name / "expected.npz")["input_ids"]
    assert tokenizer.encode(case["prompt_text"]) == expected.tolist()
    # Turn by turn rendering and tokenizing gives the same text and ids.
    text, ids = "", []
    for r, turn in enumerate(case["turns"]):
        part = prompt.render_turn(turn["prompt"], turn["answer"], first=r == 0, refers=turn["ref"] is not None)
        text += part
        ids += tokenizer.encode(part, add_bos=r == 0)
    assert text == case["prompt_text"]
    assert ids == expected.tolist()


def test_added_token_ids_follow_the_base_vocabulary(tokenizer):
    n = tokenizer.sp.get_piece_size()
    assert (tokenizer.seg_id, tokenizer.bbox_id, tokenizer.crop_id) == (n, n + 1, n + 2)
    assert tokenizer.vocab_size == n + 3
    ids = tokenizer.encode("It is [SEG].", add_bos=False)
    assert tokenizer.seg_id in ids and tokenizer.decode(ids).strip() == "It is [SEG]."


def test_prompt_checks():
    from MultiTurnSegLib.engine import prompt

    with pytest.raises(InputError):
        prompt.check_prompt("look at <image>")
    with pytest.raises(InputError):
        prompt.check_answer("[SEG] and [SEG]")
    # A first turn referring to a (hand-drawn) segment shows the slice, then the reference.
    assert prompt.user_message("x", first=True, refers=True) == "<image>\n [CROPPEDIMAGE][BBOXINPUT] x"
    assert prompt.check_answer("Sure, [SEG].") == "Sure, [SEG]."


def test_sam_resize_rounding():
    from MultiTurnSegLib.engine.preprocessing import sam_pixels, sam_resize_hw

    assert sam_resize_hw(200, 300) == (683, 1024)
    assert sam_resize_hw(512, 512) == (1024, 1024)
    x, hw = sam_pixels(np.zeros((200, 300, 3), np.uint8))
    assert tuple(x.shape) == (1, 3, 1024, 1024) and hw == (683, 1024)
    assert float(x[0, 0, 700, 0]) == 0.0  # padding is zero after normalization


def _image():
    img = np.zeros((40, 60, 3), np.uint8)
    img[5:30, 10:50] = 100
    return img


def test_reference_crop_and_box():
    from MultiTurnSegLib.engine import build_reference

    mask = np.zeros((40, 60), bool)
    mask[10:20, 20:24] = True
    ref = build_reference(_image(), mask)
    assert not ref.fallback
    np.testing.assert_array_equal(ref.box, [20 / 60, 10 / 40, 23 / 60, 19 / 40])  # max inclusive
    assert ref.box.dtype == np.float64
    assert ref.crop_rgb.shape == (10, 10, 3)  # 10 x 4 cut, padded to a square
    assert (ref.crop_rgb[:, :4] == 100).all() and (ref.crop_rgb[:, 4:] == 0).all()
    assert tuple(ref.crop_pixels.shape) == (3, 336, 336)


@pytest.mark.parametrize("n_pixels, fallback", [(0, True), (9, True), (10, False)])
def test_reference_fallback_rule(n_pixels, fallback):
    from MultiTurnSegLib.engine import build_reference

    mask = np.zeros((40, 60), bool)
    mask.reshape(-1)[np.ravel_multi_index((np.full(n_pixels, 12), 15 + np.arange(n_pixels)), mask.shape)] = True
    ref = build_reference(_image(), mask)
    assert ref.fallback is fallback
    if fallback:
        np.testing.assert_array_equal(ref.box, [0, 0, 59 / 60, 39 / 40])
        assert ref.crop_rgb.shape == (40, 40, 3)  # non-zero part of the whole image


def test_square_crop_of_a_given_region():
    from MultiTurnSegLib.engine.preprocessing import square_crop

    region = np.zeros((40, 60), bool)
    region[2:8, 0:3] = True  # includes black pixels: the cut follows the region, not the pixels
    crop = square_crop(_image(), region)
    assert crop.shape == (6, 6, 3) and (crop[:, 3:] == 0).all()
    assert square_crop(_image()).shape == (40, 40, 3)  # default: non-zero pixels, 25 x 40 cut


def test_checkpoint_names_invert_the_routing():
    from MultiTurnSegLib.engine import checkpoint as ckpt

    p = ckpt.PEFT_PREFIX
    for key in (p + "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding",
                p + "model.visual_model.mask_decoder.iou_token.weight", p + "model.mm_projector.0.bias",
                p + "model.text_hidden_fcs.0.2.weight", p + "model.bbox_encoder.weight",
                p + "model.mask_quality_MLP.fc1.weight", p + "model.refine_MLP.fc3.bias",
                p + "model.embed_tokens.weight", p + "lm_head.weight",
                p + "model.layers.1.self_attn.v_proj.lora_B.default.weight"):
        part, local = ckpt.route(key)
        assert ckpt._checkpoint_names(part, [local]) == [key]


def test_base_readers_read_only_the_keys_asked_for(tiny_model_json):
    from MultiTurnSegLib.engine.model import _base_sources
    from MultiTurnSegLib.engine.spec import ModelSpec

    bases = _base_sources(ModelSpec.from_json(tiny_model_json))
    assert set(bases["clip"]({"embeddings.class_embedding", "no.such.key"})) == {"embeddings.class_embedding"}
    assert set(bases["llm"]({"model.norm.weight"})) == {"model.norm.weight"}
    assert set(bases["sam"]({"mask_decoder.iou_token.weight"})) == {"mask_decoder.iou_token.weight"}


def test_reference_mask_shape_is_checked():
    from MultiTurnSegLib.engine import build_reference

    with pytest.raises(InputError, match="shape"):
        build_reference(_image(), np.zeros((3, 3), bool))


def test_model_json_parsing(tmp_path, tiny_model_json):
    from MultiTurnSegLib.engine import ModelSpec
    from MultiTurnSegLib.engine.spec import VIT_B

    spec = ModelSpec.from_json(tiny_model_json)
    assert spec.sam_encoder.embed_dim == 32 and spec.sam_encoder.global_attn_indexes == (1,)
    assert spec.llava_med.is_absolute() and spec.mediround.is_dir()
    desc = json.loads(tiny_model_json.read_text())
    del desc["sam_encoder"]
    base = tiny_model_json.parent
    desc = {k: str(base / v) for k, v in desc.items()}
    (tmp_path / "m.json").write_text(json.dumps(desc))
    assert ModelSpec.from_json(tmp_path / "m.json").sam_encoder == VIT_B
    desc["sam_encoder"] = {"embed_dim": 32}
    (tmp_path / "m.json").write_text(json.dumps(desc))
    with pytest.raises(ModelLoadError, match="missing"):
        ModelSpec.from_json(tmp_path / "m.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ModelSpec.from_json(tmp_path / "bad.json")


def test_sam_modeling_loads_without_package_root():
    import sys

    from MultiTurnSegLib.engine._imports import sam_modeling

    modeling = sam_modeling()
    assert hasattr(modeling, "ImageEncoderViT") and hasattr(modeling, "MaskDecoder")
    assert "segment_anything.predictor" not in sys.modules
