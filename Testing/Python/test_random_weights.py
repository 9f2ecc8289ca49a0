"""The random-weight MediRound model: official on-disk layout, loadable, deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from MultiTurnSegLib.engine import random_weights as rw  # noqa: E402


@pytest.fixture(scope="module")
def model_json(tmp_path_factory, monkeypatch_module):
    # Shared with test_cli_chat_demo (same session cache folder) so the model is built once.
    cache = tmp_path_factory.getbasetemp() / "mts-cache"
    monkeypatch_module.setenv("MULTITURNSEG_CACHE_DIR", str(cache))
    from MultiTurnSegLib.cli.demo import demo_model_json

    return demo_model_json(seed=0)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_layout_is_the_official_one(model_json):
    root = model_json.parent
    spec = json.loads(model_json.read_text())
    assert {k: spec[k] for k in ("llava_med", "clip", "medsam", "mediround")} == {
        "llava_med": "llava-med", "clip": "clip-vit-large-patch14-336", "medsam": "medsam_vit_b.pth",
        "mediround": "mediround-stage2"}
    for rel in ("llava-med/config.json", "llava-med/model.safetensors", "llava-med/tokenizer.model",
                "llava-med/tokenizer_config.json", "llava-med/special_tokens_map.json",
                "clip-vit-large-patch14-336/config.json", "clip-vit-large-patch14-336/model.safetensors",
                "clip-vit-large-patch14-336/preprocessor_config.json", "medsam_vit_b.pth",
                "mediround-stage2/pytorch_model.bin"):
        assert (root / rel).is_file(), rel
    cfg = json.loads((root / "llava-med/config.json").read_text())
    assert cfg["model_type"] == "llava_mistral" and cfg["vocab_size"] == rw.TINY_DIMS.vocab
    pre = json.loads((root / "clip-vit-large-patch14-336/preprocessor_config.json").read_text())
    assert pre["size"] == 336 and pre["crop_size"] == 336  # old-style keys, as openai's file
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(root / "llava-med/tokenizer.model"))
    assert sp.get_piece_size() == rw.TINY_DIMS.vocab and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    sd = torch.load(root / "mediround-stage2/pytorch_model.bin", weights_only=True)
    assert all(k.startswith("base_model.model.") for k in sd)
    n, h = rw.TINY_DIMS.vocab, rw.TINY_DIMS.hidden
    assert sd["base_model.model.model.embed_tokens.weight"].shape == (n + 3, h)
    assert sd["base_model.model.lm_head.weight"].shape == (n + 3, h)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in sd
    assert not any("base_layer" in k for k in sd)
    for part in ("mask_quality_MLP.fc3.bias", "refine_MLP.fc1.weight", "text_hidden_fcs.0.2.weight",
                 "bbox_encoder.weight", "visual_model.mask_decoder.iou_token.weight",
                 "vision_tower.vision_tower.vision_model.post_layernorm.weight", "mm_projector.2.bias"):
        assert f"base_model.model.model.{part}" in sd, part
    sam = torch.load(root / "medsam_vit_b.pth", weights_only=True)
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in sam and len(sam) == 174


def test_engine_loads_it_and_masks_are_neither_empty_nor_full(model_json):
    from MultiTurnSegLib.backends.base import TurnSpec
    from MultiTurnSegLib.engine import MediRoundEngine

    engine = MediRoundEngine.from_model_json(model_json, device="cpu")
    assert engine.stage == 2 and engine.info()["token_ids"]["[SEG]"] == rw.TINY_DIMS.vocab
    yy, xx = np.mgrid[0:90, 0:140]
    grey = np.where(((yy - 45) / 40) ** 2 + ((xx - 70) / 60) ** 2 < 1, 120, 10).astype(np.uint8)
    grey[30:60, 40:60] = 20
    image = np.repeat(grey[..., None], 3, axis=2)
    session = engine.new_session(image)
    out = session.run_turn(TurnSpec("Segment the liver."))
    assert out.mask.shape == (90, 140) and out.mask.dtype == bool
    assert 0.01 < out.mask.mean() < 0.99
    assert out.jcm_score is not None and 0.0 <= out.jcm_score <= 1.0
    out2 = session.run_turn(TurnSpec("Segment the lesion inside round 1.", reference_mask=out.mask))
    assert out2.mask.shape == (90, 140) and 0.01 < out2.mask.mean() < 0.99


def test_weights_and_tokenizer_are_deterministic():
    a = rw.random_mediround_state_dict(rw.TINY_DIMS, seed=3)
    b = rw.random_mediround_state_dict(rw.TINY_DIMS, seed=3)
    c = rw.random_mediround_state_dict(rw.TINY_DIMS, seed=4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])
    assert rw.train_random_tokenizer(600) == rw.train_random_tokenizer(600)


def test_build_is_reused_and_stamped(model_json):
    stamp = json.loads((model_json.parent / "random_model.json").read_text())
    assert stamp["version"] == rw.BUILDER_VERSION and stamp["seed"] == 0
    mtime = (model_json.parent / "mediround-stage2/pytorch_model.bin").stat().st_mtime_ns
    assert rw.build_random_model(model_json.parent, seed=0) == model_json
    assert (model_json.parent / "mediround-stage2/pytorch_model.bin").stat().st_mtime_ns == mtime


def test_in_memory_engine_equals_the_same_model_loaded_from_files(tmp_path):
    """build_random_engine (the GPU benchmark's full-size path, here at tiny
    size on the CPU) builds exactly the model build_random_model writes."""
    from MultiTurnSegLib.backends.base import TurnSpec
    from MultiTurnSegLib.engine import MediRoundEngine
    from MultiTurnSegLib.engine import random_weights as rw

    in_memory = rw.build_random_engine(rw.TINY_DIMS, seed=3, device="cpu")
    from_files = MediRoundEngine.from_model_json(rw.build_random_model(tmp_path / "m", seed=3, calibrate=False),
                                                 device="cpu")
    assert in_memory.info()["stage"] == 2 and in_memory.info()["dims"] == from_files.info()["dims"]
    image = (np.random.default_rng(0).integers(0, 255, (90, 140, 1)) * np.ones((1, 1, 3))).astype(np.uint8)
    outs = []
    for engine in (in_memory, from_files):
        session = engine.new_session(image)
        first = session.run_turn(TurnSpec("Segment the liver."))
        outs.append((first, session.run_turn(TurnSpec("Segment the lesion inside round 1.", reference_mask=first.mask))))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a.logits, b.logits)
        assert a.jcm_score == b.jcm_score
