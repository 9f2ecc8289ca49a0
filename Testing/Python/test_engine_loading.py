"""Loading refusals: broken model descriptions and checkpoints must fail with
a ModelLoadError that names what is wrong (never load silently)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from MultiTurnSegLib.errors import ModelLoadError  # noqa: E402

P = "base_model.model."


@pytest.fixture(scope="module")
def state(tiny_model_dir):
    return torch.load(tiny_model_dir / "mediround-stage2" / "pytorch_model.bin", weights_only=True)


def variant(tmp_path: Path, model_dir: Path, state=None, **overrides) -> Path:
    """A model.json in tmp_path pointing at the fixture's parts, with the
    MediRound folder replaced by ``state`` (saved as a .bin) when given."""
    desc = json.loads((model_dir / "model.json").read_text())
    for key in ("llava_med", "clip", "medsam", "mediround"):
        desc[key] = str((model_dir / desc[key]).resolve())
    if state is not None:
        folder = tmp_path / "mediround"
        folder.mkdir()
        torch.save(state, folder / "pytorch_model.bin")
        desc["mediround"] = str(folder)
    desc.update(overrides)
    desc = {k: v for k, v in desc.items() if v is not None}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(desc))
    return path


def load(path, **kwargs):
    from MultiTurnSegLib.engine import MediRoundEngine

    return MediRoundEngine.from_model_json(path, device="cpu", **kwargs)


def test_missing_model_json(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load(tmp_path / "nope.json")


def test_model_json_lacking_a_part(tmp_path, tiny_model_dir):
    path = variant(tmp_path, tiny_model_dir, clip=None)
    with pytest.raises(ModelLoadError, match="lacks clip"):
        load(path)


def test_model_json_with_missing_path(tmp_path, tiny_model_dir):
    path = variant(tmp_path, tiny_model_dir, medsam="does-not-exist.pth")
    with pytest.raises(ModelLoadError, match="'medsam'.*does-not-exist.pth"):
        load(path)


def test_unknown_model_json_key(tmp_path, tiny_model_dir):
    path = variant(tmp_path, tiny_model_dir, vision_tower="x")
    with pytest.raises(ModelLoadError, match="vision_tower"):
        load(path)


def test_raw_deepspeed_folder_is_refused(tmp_path, tiny_model_dir):
    raw = tmp_path / "raw"
    (raw / "global_step100").mkdir(parents=True)
    (raw / "latest").write_text("global_step100")
    path = variant(tmp_path, tiny_model_dir, mediround=str(raw))
    with pytest.raises(ModelLoadError, match="zero_to_fp32"):
        load(path)


def test_missing_key_is_named(tmp_path, tiny_model_dir, state):
    broken = dict(state)
    del broken[P + "model.bbox_encoder.weight"]
    with pytest.raises(ModelLoadError, match=r"lacks .*model\.bbox_encoder\.weight"):
        load(variant(tmp_path, tiny_model_dir, broken))


def test_missing_lora_key_is_named(tmp_path, tiny_model_dir, state):
    broken = dict(state)
    del broken[P + "model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    with pytest.raises(ModelLoadError, match=r"layers\.1\.self_attn\.v_proj\.lora_B"):
        load(variant(tmp_path, tiny_model_dir, broken))


def test_renamed_key_is_unexpected(tmp_path, tiny_model_dir, state):
    broken = dict(state)
    broken[P + "model.text_hidden_fcs.0.0.weights"] = broken.pop(P + "model.text_hidden_fcs.0.0.weight")
    with pytest.raises(ModelLoadError, match=r"Unexpected.*text_hidden_fcs\.0\.0\.weights"):
        load(variant(tmp_path, tiny_model_dir, broken))


def test_key_outside_the_model_is_unexpected(tmp_path, tiny_model_dir, state):
    broken = dict(state)
    broken["model.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(ModelLoadError, match=r"model\.extra_head\.weight"):
        load(variant(tmp_path, tiny_model_dir, broken))


def test_misshaped_key_is_named(tmp_path, tiny_model_dir, state):
    broken = dict(state)
    key = P + "model.visual_model.mask_decoder.iou_token.weight"
    broken[key] = torch.zeros(2, 256)
    with pytest.raises(ModelLoadError, match=r"Mis-shaped.*mask_decoder\.iou_token\.weight \(2, 256\)"):
        load(variant(tmp_path, tiny_model_dir, broken))


def test_misshaped_lora_is_named(tmp_path, tiny_model_dir, state):
    broken = dict(state)
    broken[P + "model.layers.0.self_attn.q_proj.lora_B.default.weight"] = torch.zeros(16, 8)
    with pytest.raises(ModelLoadError, match=r"q_proj\.lora_B"):
        load(variant(tmp_path, tiny_model_dir, broken))


def test_non_weights_only_pickle_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "evil"
    folder.mkdir()
    # An arbitrary class instance: refused by weights_only=True.
    torch.save({"w": torch.zeros(1), "x": Fraction(1, 2)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only"):
        load(variant(tmp_path, tiny_model_dir, mediround=str(folder)))


def test_stage1_checkpoint(tmp_path, tiny_model_dir, state):
    stage1 = {k: v for k, v in state.items() if "mask_quality_MLP" not in k and "refine_MLP" not in k}
    path = variant(tmp_path, tiny_model_dir, stage1)
    with pytest.raises(ModelLoadError, match="mask_quality_MLP"):
        load(path, require_jcm=True)
    engine = load(path)
    info = engine.info()
    assert info["stage"] == 1 and info["jcm_available"] is False


def test_partial_jcm_is_refused(tmp_path, tiny_model_dir, state):
    broken = {k: v for k, v in state.items() if "refine_MLP" not in k}
    with pytest.raises(ModelLoadError, match=r"refine_MLP\.fc1"):
        load(variant(tmp_path, tiny_model_dir, broken))


def test_frozen_weights_missing_are_taken_from_base_files(tmp_path, tiny_model_dir, state):
    """Like the official non-strict load: the (frozen) CLIP tower may be absent."""
    partial = {k: v for k, v in state.items() if ".vision_tower." not in k}
    engine = load(variant(tmp_path, tiny_model_dir, partial))
    assert engine.info()["filled_from_base"]["clip"] > 0
    full_key = P + "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"
    torch.testing.assert_close(engine.model.clip.embeddings.class_embedding, state[full_key])


def test_two_bin_files_are_merged(tmp_path, tiny_model_dir, state):
    folder = tmp_path / "split"
    folder.mkdir()
    keys = sorted(state)
    torch.save({k: state[k] for k in keys[::2]}, folder / "a.bin")
    torch.save({k: state[k] for k in keys[1::2]}, folder / "b.bin")
    engine = load(variant(tmp_path, tiny_model_dir, mediround=str(folder)))
    assert len(engine.info()["checkpoint_files"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_cuda_requested_without_cuda(tiny_model_json):
    from MultiTurnSegLib.engine import MediRoundEngine

    with pytest.raises(ModelLoadError, match="no usable CUDA"):
        MediRoundEngine.from_model_json(tiny_model_json, device="cuda")
    with pytest.raises(ModelLoadError, match="CUDA"):
        MediRoundEngine.from_model_json(tiny_model_json, device="cpu", load_in_4bit=True)
