"""The assembled MediRound network and its forward pieces.

Built from the libraries' own classes: transformers' Mistral and CLIP vision
tower, segment-anything's SAM parts, plus MediRound's small heads. Weights come
from the MediRound checkpoint (see checkpoint.py); LoRA is merged into the
language model with peft for inference.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..errors import ModelLoadError
from . import checkpoint as ckpt
from ._imports import hide_broken_torchvision
from .jcm import JudgmentCorrection
from .sam import PROMPT_DIM, MedSAM
from .spec import ModelSpec

LORA_TARGETS = ("q_proj", "v_proj")
# LLaVA-Med config keys that MistralConfig understands (the llava_* ones it does not).
_MISTRAL_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "rope_theta", "rope_parameters", "sliding_window",
    "attention_dropout", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)


@contextmanager
def params_on_meta():
    """Create parameters on the meta device (no memory, no random init cost);
    buffers stay real so computed ones (e.g. rotary frequencies) are valid."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(module._parameters[name])
            module._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def mistral_config(llava_dir: Path, vocab_size: int):
    hide_broken_torchvision()
    from transformers import MistralConfig

    try:
        raw = json.loads((Path(llava_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Cannot read {llava_dir}/config.json: {exc}") from exc
    kwargs = {k: raw[k] for k in _MISTRAL_KEYS if k in raw}
    return MistralConfig(vocab_size=vocab_size, use_cache=True, **kwargs), raw


def clip_config(clip_dir: Path):
    hide_broken_torchvision()
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(str(clip_dir))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read the CLIP config in {clip_dir}: {exc}") from exc


class MediRoundModel(nn.Module):
    """All MediRound modules; see the contract for what each one does."""

    def __init__(self, llm_config, clip_cfg, spec: ModelSpec, mm_hidden_size: int, with_jcm: bool):
        super().__init__()
        from transformers import CLIPVisionModel, MistralForCausalLM

        hidden = llm_config.hidden_size
        self.llm = MistralForCausalLM(llm_config)
        self.clip = CLIPVisionModel(clip_cfg)
        self.mm_projector = nn.Sequential(nn.Linear(mm_hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.sam = MedSAM(spec.sam_encoder)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, PROMPT_DIM), nn.Dropout(0.0)
        )
        self.bbox_encoder = nn.Linear(4, hidden)
        self.jcm: Optional[JudgmentCorrection] = JudgmentCorrection(PROMPT_DIM) if with_jcm else None
        patches = (clip_cfg.image_size // clip_cfg.patch_size) ** 2
        self.num_image_tokens = patches  # what one <image> expands to

    # --- pieces of the forward ------------------------------------------------

    def clip_layer(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate CLIP layer (before post-layernorm), CLS first."""
        out = self.clip(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, patches, hidden) projected patch features (CLS dropped)."""
        return self.mm_projector(self.clip_layer(pixels)[:, 1:])

    def encode_crops(self, pixels: torch.Tensor) -> torch.Tensor:
        """(K, hidden) projected CLS features of reference crops."""
        return self.mm_projector(self.clip_layer(pixels)[:, 0])

    def encode_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.bbox_encoder(boxes)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def seg_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text_hidden_fcs(hidden)


def build_model(spec: ModelSpec, tokenizer, checkpoint: ckpt.Checkpoint) -> MediRoundModel:
    """Build on the meta device, check and load every weight, merge LoRA."""
    llm_cfg, raw_llava = mistral_config(spec.llava_med, tokenizer.vocab_size)
    clip_cfg = clip_config(spec.clip)
    mm_hidden = int(raw_llava.get("mm_hidden_size", clip_cfg.hidden_size))
    with params_on_meta():
        model = MediRoundModel(llm_cfg, clip_cfg, spec, mm_hidden, with_jcm=checkpoint.has_jcm)
    parts = checkpoint.parts
    filled = {}
    bases = _base_sources(spec)
    for name, module in _part_modules(model).items():
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = ckpt.check_part(name, parts[name], expected)
        if missing:
            filled[name] = ckpt.fill_missing_from_base(name, parts[name], missing, bases.get(name), expected)
        module.load_state_dict(parts[name], strict=True, assign=True)
    checkpoint.filled_from_base = {k: v for k, v in filled.items() if v}
    model.llm = _merge_lora(model.llm, parts["lora"], spec.lora_alpha)
    model.eval().requires_grad_(False)
    return model


def _part_modules(model: MediRoundModel) -> Dict[str, nn.Module]:
    mods = {
        "llm": model.llm,
        "clip": model.clip,
        "mm_projector": model.mm_projector,
        "sam": model.sam,
        "text_hidden_fcs": model.text_hidden_fcs,
        "bbox_encoder": model.bbox_encoder,
    }
    if model.jcm is not None:
        mods["jcm"] = model.jcm
    return mods


def _base_sources(spec: ModelSpec):
    """Lazy readers of the base files for frozen weights a checkpoint may omit;
    each reads only the keys asked for (the LLaVA-Med files are ~15 GB)."""
    from safetensors import safe_open

    def safetensors_part(folder: Path, prefix: str):
        def read(wanted):
            out = {}
            for f in sorted(Path(folder).glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        local = key[len(prefix):]
                        if key.startswith(prefix) and local in wanted:
                            out[local] = st.get_tensor(key)
            return out

        return read

    def sam(wanted):
        return {k: v for k, v in ckpt.load_torch_file(spec.medsam).items() if k in wanted}

    return {
        "clip": safetensors_part(spec.clip, "vision_model."),
        "mm_projector": safetensors_part(spec.llava_med, "model.mm_projector."),
        "llm": safetensors_part(spec.llava_med, ""),
        "sam": sam,
    }


def _merge_lora(llm, lora: Dict[str, torch.Tensor], alpha: float):
    """Wrap q_proj/v_proj with peft LoRA, load the adapters, merge them in."""
    expected = set()
    for i in range(llm.config.num_hidden_layers):
        for t in LORA_TARGETS:
            for ab in ("lora_A", "lora_B"):
                expected.add(f"model.layers.{i}.self_attn.{t}.{ab}.default.weight")
    unexpected = sorted(set(lora) - expected)
    if unexpected:
        raise ModelLoadError("Unexpected LoRA key(s) in the MediRound checkpoint: " + ckpt.name_some(
            [ckpt.PEFT_PREFIX + k for k in unexpected]))
    missing = sorted(expected - set(lora))
    if missing:
        raise ckpt.missing_error("LoRA", missing)
    ranks = {int(v.shape[0]) for k, v in lora.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ModelLoadError(f"LoRA adapters of the checkpoint have mixed ranks {sorted(ranks)}.")
    rank = ranks.pop()
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 marks deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = get_peft_model(llm, cfg)
    state = {"base_model.model." + k: v for k, v in lora.items()}
    own = {k: tuple(v.shape) for k, v in wrapped.state_dict().items() if ".lora_" in k}
    bad = [f"{ckpt.PEFT_PREFIX}{k[len('base_model.model.'):]} {tuple(v.shape)} (expects {own.get(k)})"
           for k, v in state.items() if own.get(k) != tuple(v.shape)]
    if bad:
        raise ModelLoadError("Mis-shaped LoRA tensor(s) in the MediRound checkpoint: " + ckpt.name_some(bad, 3))
    result = wrapped.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelLoadError("LoRA keys peft did not accept: " + ckpt.name_some(result.unexpected_keys))
    return wrapped.merge_and_unload()
