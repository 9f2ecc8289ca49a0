"""A MediRound model with random weights, written in the official on-disk layout.

``build_random_model(out_dir, seed=0)`` writes everything a real MediRound user
has on disk, only tiny and random:

    out_dir/
      model.json                         the file MultiTurnSeg is pointed at
      llava-med/                         LLaVA-Med v1.5 (Mistral) directory
        config.json                      model_type llava_mistral, tiny dims
        generation_config.json
        model.safetensors                language model + mm_projector
        tokenizer.model                  a small sentencepiece BPE model (byte fallback)
        tokenizer_config.json, special_tokens_map.json
      clip-vit-large-patch14-336/        CLIP vision tower directory
        config.json, model.safetensors   CLIPVisionModel, keys vision_model.*
        preprocessor_config.json         old-style keys, as openai's file
      medsam_vit_b.pth                   plain SAM state dict (tiny image encoder,
                                         standard prompt encoder and mask decoder)
      mediround-stage2/pytorch_model.bin stage-2 training output: full state dict of the
                                         PEFT-wrapped model (base_model.model.*), LoRA unmerged
      RANDOM_MODEL.md                    what this is

The tokenizer is trained here with sentencepiece's trainer on generated
medical prompt text; MediRound's three added tokens get the ids n, n+1, n+2
where n is its vocabulary size. Weights are drawn from ``torch.Generator``s
seeded from ``seed`` (no dependence on torch's default initialisers) and
scaled so that every part visibly matters and masks are neither empty nor
full; the same seed gives the same files. The masks mean nothing.

``random_mediround_state_dict`` gives the same kind of weights in memory (any
size, any device/dtype), which the benchmark uses to build a full-size model on
a GPU without writing 15 GB of files.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from ._imports import sam_modeling  # re-exported: part of this module's public names
from .preprocessing import SAM_PIXEL_MEAN, SAM_PIXEL_STD

BUILDER_VERSION = 1

__all__ = [
    "BUILDER_VERSION",
    "RandomModelDims",
    "TINY_DIMS",
    "FULL_DIMS",
    "build_random_model",
    "random_mediround_state_dict",
    "train_random_tokenizer",
    "sam_modeling",
]

LLAVA_DIR = "llava-med"
CLIP_DIR = "clip-vit-large-patch14-336"
MEDSAM_FILE = "medsam_vit_b.pth"
MEDIROUND_DIR = "mediround-stage2"

LORA_R = 8
LORA_ALPHA = 16


@dataclass(frozen=True)
class RandomModelDims:
    """Sizes of a random MediRound model."""

    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 1000  # sentencepiece vocabulary (MediRound adds 3 tokens after it)
    clip_hidden: int = 32
    clip_intermediate: int = 128
    clip_layers: int = 3
    clip_heads: int = 4
    sam_embed_dim: int = 32
    sam_depth: int = 2
    sam_heads: int = 2
    sam_global_attn: Tuple[int, ...] = (1,)
    out_dim: int = 256  # SAM prompt space

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY_DIMS = RandomModelDims()
# Mistral-7B + CLIP ViT-L/14-336 + SAM ViT-B (the real MediRound sizes).
FULL_DIMS = RandomModelDims(
    hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000,
    clip_hidden=1024, clip_intermediate=4096, clip_layers=24, clip_heads=16,
    sam_embed_dim=768, sam_depth=12, sam_heads=12, sam_global_attn=(2, 5, 8, 11),
)


# --------------------------------------------------------------------------- SAM classes
def _sam_spec(dims: RandomModelDims):
    from .spec import SamEncoderSpec

    return SamEncoderSpec(embed_dim=dims.sam_embed_dim, depth=dims.sam_depth, num_heads=dims.sam_heads,
                          global_attn_indexes=tuple(dims.sam_global_attn), out_chans=dims.out_dim)


def _build_sam(dims: RandomModelDims, device=None):
    """The engine's SAM (image encoder of these sizes, standard prompt encoder/decoder)."""
    import torch

    from .sam import MedSAM

    with torch.device(device or "cpu"):
        return MedSAM(_sam_spec(dims))


def _sam_shapes(dims: RandomModelDims) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of ``Sam.state_dict()`` for these encoder sizes (built on the meta device)."""
    sam = _build_sam(dims, device="meta")
    return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


# --------------------------------------------------------------------------- weights
class _Rand:
    """Deterministic tensor factory: one generator per named part."""

    def __init__(self, seed: int, part: str, device, dtype):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = dtype
        # Stable per-part seed (Python's hash() is salted per process).
        digest = sum((i + 1) * ord(c) for i, c in enumerate(part))
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed((int(seed) * 1_000_003 + digest) % (2**63 - 1))

    def normal(self, shape, std=1.0, mean=0.0):
        t = self.torch.randn(tuple(shape), generator=self.gen, device=self.device, dtype=self.torch.float32)
        return (t * std + mean).to(self.dtype)

    def uniform(self, shape, bound):
        t = self.torch.rand(tuple(shape), generator=self.gen, device=self.device, dtype=self.torch.float32)
        return ((t * 2 - 1) * bound).to(self.dtype)

    def linear(self, out_f, in_f, gain=1.0, bias=True):
        """PyTorch's default Linear init (uniform, bound 1/sqrt(fan_in)) times ``gain``."""
        b = 1.0 / math.sqrt(in_f)
        w = self.uniform((out_f, in_f), b * gain)
        return (w, self.uniform((out_f,), b)) if bias else (w, None)

    def norm(self, n):
        return self.normal((n,), 0.1, 1.0), self.normal((n,), 0.1)


def _llm_base(dims: RandomModelDims, rnd: _Rand) -> Dict[str, "object"]:
    """LLaVA-Med's own tensors (before MediRound): embed, layers, norm, lm_head, mm_projector."""
    H, I, hd = dims.hidden, dims.intermediate, dims.head_dim
    kv = dims.kv_heads * hd
    sd = {"model.embed_tokens.weight": rnd.normal((dims.vocab, H), 0.02)}
    # Decoder projections: std = g / sqrt(fan_in); g chosen so that attention is
    # sharp and every layer changes the hidden state visibly (q/k larger).
    g_qk, g = 2.0, 0.7
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rnd.normal((H, H), g_qk / math.sqrt(H))
        sd[p + "self_attn.k_proj.weight"] = rnd.normal((kv, H), g_qk / math.sqrt(H))
        sd[p + "self_attn.v_proj.weight"] = rnd.normal((kv, H), g / math.sqrt(H))
        sd[p + "self_attn.o_proj.weight"] = rnd.normal((H, H), g / math.sqrt(H))
        sd[p + "mlp.gate_proj.weight"] = rnd.normal((I, H), g / math.sqrt(H))
        sd[p + "mlp.up_proj.weight"] = rnd.normal((I, H), g / math.sqrt(H))
        sd[p + "mlp.down_proj.weight"] = rnd.normal((H, I), g / math.sqrt(I))
        sd[p + "input_layernorm.weight"] = rnd.normal((H,), 0.1, 1.0)
        sd[p + "post_attention_layernorm.weight"] = rnd.normal((H,), 0.1, 1.0)
    sd["model.norm.weight"] = rnd.normal((H,), 0.1, 1.0)
    w, b = rnd.linear(H, dims.clip_hidden)
    sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"] = w, b
    w, b = rnd.linear(H, H)
    sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"] = w, b
    sd["lm_head.weight"] = rnd.normal((dims.vocab, H), 0.02)
    return sd


def _clip_tensors(dims: RandomModelDims, rnd: _Rand) -> Dict[str, "object"]:
    """CLIPVisionModel tensors with the checkpoint names ``vision_model.*``."""
    H, I = dims.clip_hidden, dims.clip_intermediate
    n_pos = (336 // 14) ** 2 + 1
    p = "vision_model."
    sd = {
        p + "embeddings.class_embedding": rnd.normal((H,), H**-0.5),
        p + "embeddings.patch_embedding.weight": rnd.normal((H, 3, 14, 14), 0.02),
        p + "embeddings.position_embedding.weight": rnd.normal((n_pos, H), 0.02),
    }
    sd[p + "pre_layrnorm.weight"], sd[p + "pre_layrnorm.bias"] = rnd.norm(H)
    for i in range(dims.clip_layers):
        q = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[q + f"self_attn.{name}.weight"] = rnd.normal((H, H), H**-0.5)
            sd[q + f"self_attn.{name}.bias"] = rnd.normal((H,), 0.02)
        sd[q + "layer_norm1.weight"], sd[q + "layer_norm1.bias"] = rnd.norm(H)
        sd[q + "mlp.fc1.weight"] = rnd.normal((I, H), H**-0.5)
        sd[q + "mlp.fc1.bias"] = rnd.normal((I,), 0.02)
        sd[q + "mlp.fc2.weight"] = rnd.normal((H, I), I**-0.5)
        sd[q + "mlp.fc2.bias"] = rnd.normal((H,), 0.02)
        sd[q + "layer_norm2.weight"], sd[q + "layer_norm2.bias"] = rnd.norm(H)
    sd[p + "post_layernorm.weight"], sd[p + "post_layernorm.bias"] = rnd.norm(H)
    return sd


_SAM_EMBEDDINGS = (
    "prompt_encoder.point_embeddings.", "prompt_encoder.not_a_point_embed.", "prompt_encoder.no_mask_embed.",
    "mask_decoder.iou_token.", "mask_decoder.mask_tokens.",
)


def _sam_tensors(dims: RandomModelDims, rnd: _Rand) -> Dict[str, "object"]:
    shapes = _sam_shapes(dims)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("pos_embed") or ".rel_pos_" in key:
            sd[key] = rnd.normal(shape, 0.1)
        elif key.endswith("positional_encoding_gaussian_matrix") or key.startswith(_SAM_EMBEDDINGS):
            sd[key] = rnd.normal(shape, 1.0)
        elif key.startswith("mask_decoder.output_upscaling.") and len(shape) == 4:
            # ConvTranspose2d(k=2, s=2) [in, out, 2, 2]: equal taps, so the
            # upscaled mask has no checkerboard; x2 gain.
            w = rnd.uniform(shape[:2], 2.0 / math.sqrt(shape[0]))
            sd[key] = w[:, :, None, None].expand(shape).contiguous()
        elif len(shape) >= 2:
            fan_in = int(shape[1] * math.prod(shape[2:]))
            sd[key] = rnd.uniform(shape, 1.0 / math.sqrt(fan_in))
        elif key.endswith(".weight"):  # 1-D weight = a norm layer
            sd[key] = rnd.normal(shape, 0.1, 1.0)
        else:  # bias
            sib = shapes.get(key[: -len("bias")] + "weight")
            if sib is not None and len(sib) == 1:
                sd[key] = rnd.normal(shape, 0.1)
            else:
                fan_in = int(sib[1] * math.prod(sib[2:])) if sib is not None else shape[0]
                sd[key] = rnd.uniform(shape, 1.0 / math.sqrt(fan_in))
    # The hypernetwork of the single-mask output decides how large the logits
    # are: scale it so that masks are confident (|logit| of several units).
    for key in list(sd):
        if key.startswith("mask_decoder.output_hypernetworks_mlps.0.layers.2."):
            sd[key] = sd[key] * 40.0
    return sd


def _mediround_extras(dims: RandomModelDims, rnd: _Rand) -> Dict[str, "object"]:
    """MediRound's own modules: [SEG] projection, box encoder, JCM heads, LoRA, new rows."""
    torch = rnd.torch
    H, D = dims.hidden, dims.out_dim
    sd = {}
    w, b = rnd.linear(H, H)
    sd["model.text_hidden_fcs.0.0.weight"], sd["model.text_hidden_fcs.0.0.bias"] = w, b
    w, b = rnd.linear(D, H, gain=8.0)
    sd["model.text_hidden_fcs.0.2.weight"], sd["model.text_hidden_fcs.0.2.bias"] = w, b
    w, b = rnd.linear(H, 4)
    sd["model.bbox_encoder.weight"], sd["model.bbox_encoder.bias"] = w, b
    # Judgment: sigmoid(MLP(token)); bias near the 0.6 threshold so that some
    # rounds are refined and others not.
    w, b = rnd.linear(512, D)
    sd["model.mask_quality_MLP.fc1.weight"], sd["model.mask_quality_MLP.fc1.bias"] = w, b
    w, b = rnd.linear(512, 512)
    sd["model.mask_quality_MLP.fc2.weight"], sd["model.mask_quality_MLP.fc2.bias"] = w, b
    w, _ = rnd.linear(1, 512, gain=30.0, bias=False)
    sd["model.mask_quality_MLP.fc3.weight"] = w
    sd["model.mask_quality_MLP.fc3.bias"] = torch.full((1,), 0.4, dtype=rnd.dtype, device=rnd.device)
    # Correction: close to the identity (GELU(t) - GELU(-t) = t), plus noise.
    eye = torch.eye(D, dtype=torch.float32, device=rnd.device)
    fc1 = torch.cat([eye, -eye], 0)
    fc2 = torch.cat([torch.cat([eye, -eye], 1), torch.cat([-eye, eye], 1)], 0)
    fc3 = torch.cat([eye, -eye], 1)
    for name, base, bias_std in (("fc1", fc1, 0.02), ("fc2", fc2, 0.02), ("fc3", fc3, 0.2)):
        sd[f"model.refine_MLP.{name}.weight"] = (base.to(rnd.dtype) + rnd.normal(base.shape, 0.02))
        sd[f"model.refine_MLP.{name}.bias"] = rnd.normal((base.shape[0],), bias_std)
    kv = dims.kv_heads * dims.head_dim
    for i in range(dims.layers):
        for proj, out_f in (("q_proj", H), ("v_proj", kv)):
            p = f"model.layers.{i}.self_attn.{proj}."
            sd[p + "lora_A.default.weight"] = rnd.uniform((LORA_R, H), 1.0 / math.sqrt(H))
            sd[p + "lora_B.default.weight"] = rnd.normal((out_f, LORA_R), 0.02)
    return sd


def random_mediround_state_dict(dims: RandomModelDims = TINY_DIMS, seed: int = 0, device="cpu", dtype=None,
                                with_parts: bool = False, calibrate: bool = False):
    """The stage-2 state dict of a random MediRound model, keys WITHOUT ``base_model.model.``.

    Keys are those of the official checkpoint after the prefix
    (``model.embed_tokens.weight`` [vocab+3, H], ``model.layers.N.*`` with LoRA
    unmerged, ``model.vision_tower.vision_tower.vision_model.*``,
    ``model.visual_model.*``, ``model.text_hidden_fcs.*``, ``model.bbox_encoder.*``,
    ``model.mask_quality_MLP.*``, ``model.refine_MLP.*``, ``lm_head.weight``).

    With ``with_parts=True`` also returns the base files' tensors
    ``(stage2, llava_base, clip, sam_base)``; the base LLM rows and mask decoder
    differ slightly from stage 2, as after real stage-1 training.

    ``calibrate`` shifts two biases so masks cover about a third of a slice and
    JCM scores straddle the 0.6 threshold, using random stand-in [SEG] tokens
    (``build_random_model`` calibrates with tokens from the model's own
    language model instead). It runs SAM on two synthetic images: leave it off
    where only speed matters.
    """
    import torch

    dtype = dtype or torch.float32
    llava = _llm_base(dims, _Rand(seed, "llm", device, dtype))
    clip = _clip_tensors(dims, _Rand(seed, "clip", device, dtype))
    sam = _sam_tensors(dims, _Rand(seed, "sam", device, dtype))
    extras = _mediround_extras(dims, _Rand(seed, "mediround", device, dtype))
    pert = _Rand(seed, "stage2", device, dtype)

    sd = {}
    for k, v in llava.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            new_rows = pert.normal((3, v.shape[1]), 0.02)
            sd[k] = torch.cat([v + pert.normal(v.shape, 0.005), new_rows], 0)
        else:
            sd[k] = v
    for k, v in clip.items():
        sd["model.vision_tower.vision_tower." + k] = v
    for k, v in sam.items():
        if k.startswith("mask_decoder."):
            v = v + pert.normal(v.shape, 0.01)
        sd["model.visual_model." + k] = v
    sd.update(extras)
    if calibrate:
        _calibrate(sd, dims, seed)
    if with_parts:
        return sd, llava, clip, sam
    return sd


# --------------------------------------------------------------------------- calibration
def _calibration_images(n: int = 2):
    """Synthetic SAM inputs (1, 3, 1024, 1024): a chest-like phantom and a
    brain-like one, resized/normalized/padded as real slices are."""
    import numpy as np
    import torch

    out = []
    yy, xx = np.mgrid[0:683, 0:1024].astype(np.float64)
    cy, cx = 683 / 2.0, 1024 / 2.0

    def ellipse(y0, x0, ry, rx):
        return ((yy - y0) / ry) ** 2 + ((xx - x0) / rx) ** 2 <= 1.0

    for k in range(n):
        img = np.zeros((683, 1024), np.float64)
        if k % 2 == 0:  # chest: body, two dark lungs, bright spine, heart
            img[ellipse(cy, cx, 300, 470)] = 110
            img[ellipse(cy - 20, cx - 220, 200, 150)] = 15
            img[ellipse(cy - 20, cx + 220, 200, 150)] = 15
            img[ellipse(cy + 40, cx + 40, 110, 120)] = 140
            img[ellipse(cy + 230, cx, 50, 50)] = 240
        else:  # head: skull ring, brain, ventricles
            img[ellipse(cy, cx, 320, 280)] = 230
            img[ellipse(cy, cx, 295, 255)] = 95
            img[ellipse(cy - 30, cx - 40, 80, 25)] = 30
            img[ellipse(cy - 30, cx + 40, 80, 25)] = 30
        img += 6.0 * np.sin(xx / 37.0 + k) * np.cos(yy / 23.0)
        img = np.clip(img, 0, 255)
        rgb = np.repeat(img[None], 3, 0)
        mean = np.array(SAM_PIXEL_MEAN)[:, None, None]
        std = np.array(SAM_PIXEL_STD)[:, None, None]
        x = np.zeros((3, 1024, 1024), np.float32)
        x[:, :683, :] = (rgb - mean) / std
        out.append(torch.from_numpy(x)[None])
    return out


def _text_hidden_fcs(sd, hidden):
    import torch.nn.functional as F

    w0, b0 = sd["model.text_hidden_fcs.0.0.weight"].float().cpu(), sd["model.text_hidden_fcs.0.0.bias"].float().cpu()
    w2, b2 = sd["model.text_hidden_fcs.0.2.weight"].float().cpu(), sd["model.text_hidden_fcs.0.2.bias"].float().cpu()
    return F.relu(hidden @ w0.T + b0) @ w2.T + b2


_CALIBRATION_PROMPTS = [
    ("Segment the lungs in this chest CT slice.", "Sure, "),
    ("Segment the liver.", "It is "),
    ("Please segment the heart.", "The segmentation output is "),
    ("Segment the spine in this CT.", "Sure, "),
    ("Outline the aorta.", ""),
    ("分割肝脏", "Sure, "),
]


def _seg_tokens(sd, dims: RandomModelDims, sp_bytes: bytes):
    """[SEG] embeddings of first-round prompts on the chest phantom, computed
    with transformers' Mistral and CLIP classes on these weights (LoRA merged
    by hand). Only used to calibrate; approximate preprocessing is enough."""
    import numpy as np
    import sentencepiece as spm
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from ._imports import hide_broken_torchvision

    hide_broken_torchvision()
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    scale = LORA_ALPHA / LORA_R
    llm_sd = {}
    for k, v in sd.items():
        if k.startswith(("model.layers.", "lm_head.")) or k in ("model.embed_tokens.weight", "model.norm.weight"):
            if ".lora_" in k:
                continue
            v = v.float().cpu()
            a_key = k.replace(".weight", ".lora_A.default.weight")
            if a_key in sd:
                b_key = k.replace(".weight", ".lora_B.default.weight")
                v = v + scale * sd[b_key].float().cpu() @ sd[a_key].float().cpu()
            llm_sd[k] = v
    cfg = MistralConfig(
        vocab_size=dims.vocab + 3, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
        rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
        max_position_embeddings=32768,
    )
    llm = MistralForCausalLM(cfg).eval()
    llm.load_state_dict(llm_sd, strict=True)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=dims.clip_hidden, intermediate_size=dims.clip_intermediate, num_hidden_layers=dims.clip_layers,
        num_attention_heads=dims.clip_heads, image_size=336, patch_size=14, hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )).eval()
    prefix = "model.vision_tower.vision_tower."
    clip_sd = {k[len(prefix):]: v.float().cpu() for k, v in sd.items() if k.startswith(prefix)}
    if not any(k.startswith("vision_model.") for k in clip.state_dict()):
        clip_sd = {k[len("vision_model."):]: v for k, v in clip_sd.items()}
    clip.load_state_dict(clip_sd, strict=False)
    # chest phantom -> 336 x 336 CLIP pixels
    x = _calibration_images(1)[0][0, :, :683, 170:853]  # normalized SAM pixels, centre square
    mean = torch.tensor(SAM_PIXEL_MEAN)[:, None, None]
    std = torch.tensor(SAM_PIXEL_STD)[:, None, None]
    rgb = (x * std + mean).clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
    pic = np.asarray(Image.fromarray(rgb).resize((336, 336), Image.BICUBIC), np.float32) / 255.0
    o_mean = torch.tensor(_CLIP_PREPROCESSOR["image_mean"])[:, None, None]
    o_std = torch.tensor(_CLIP_PREPROCESSOR["image_std"])[:, None, None]
    pixels = (torch.from_numpy(pic).permute(2, 0, 1) - o_mean) / o_std
    with torch.no_grad():
        feats = clip(pixel_values=pixels[None], output_hidden_states=True).hidden_states[-2][0, 1:]
        w0, b0 = sd["model.mm_projector.0.weight"].float().cpu(), sd["model.mm_projector.0.bias"].float().cpu()
        w2, b2 = sd["model.mm_projector.2.weight"].float().cpu(), sd["model.mm_projector.2.bias"].float().cpu()
        image_rows = F.gelu(feats @ w0.T + b0) @ w2.T + b2
        emb = llm.get_input_embeddings()
        hidden = []
        for prompt, answer in _CALIBRATION_PROMPTS:
            before = [1] + sp.encode("[INST] ")
            after = sp.encode("\n " + prompt + " [/INST] " + answer) if answer else sp.encode("\n " + prompt + " [/INST]")
            embeds = torch.cat([emb(torch.tensor(before)), image_rows, emb(torch.tensor(after))])
            out = llm.model(inputs_embeds=embeds[None]).last_hidden_state[0, -1]
            hidden.append(out)
        return _text_hidden_fcs(sd, torch.stack(hidden))


def _calibrate(sd: Dict[str, "object"], dims: RandomModelDims, seed: int, tokens=None, target_area: float = 0.35,
               jcm_center: float = 0.6) -> dict:
    """Shift two biases of the stage-2 weights so that masks cover about
    ``target_area`` of a slice and JCM scores spread around ``jcm_center``.

    The mask logit of a pixel is h . f(x) (h from the decoder's hypernetwork,
    f the upscaled image features); random weights give h . mean(f) a large
    offset (all-full or all-empty masks). Adding -offset * mean(f) / |mean(f)|^2
    to the hypernetwork's last bias removes it while keeping the spatial
    variation. ``tokens``: (N, 256) [SEG] embeddings from the model's own
    language model (see ``_seg_tokens``); random stand-ins if None.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    prefix = "model.visual_model."
    sam = _build_sam(dims)
    sam.load_state_dict({k[len(prefix):]: v.float().cpu() for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    sam.eval()
    if tokens is None:
        hidden = torch.randn(6, dims.hidden, generator=gen) * sd["model.norm.weight"].float().cpu()
        tokens = _text_hidden_fcs(sd, hidden)
    tokens = tokens.float().cpu()

    bias_key = "model.visual_model.mask_decoder.output_hypernetworks_mlps.0.layers.2.bias"
    md = sam.mask_decoder
    captured = []
    hook = md.output_upscaling.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    report = {}
    try:
        with torch.no_grad():
            embeddings = [sam.image_encoder(img) for img in _calibration_images()]
            pe = sam.prompt_encoder.get_dense_pe()
            sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
            logits, feats = [], []
            for emb in embeddings:
                captured.clear()
                low, _ = md(image_embeddings=emb, image_pe=pe,
                            sparse_prompt_embeddings=torch.cat([sparse.expand(len(tokens), -1, -1), tokens[:, None]], 1),
                            dense_prompt_embeddings=dense, multimask_output=False)
                rows = 171  # the image part of the padded square (683 of 1024 rows)
                logits.append(low[:, 0, :rows, :])
                feats.append(captured[0][:, :, :rows, :])
            logits, feats = torch.cat(logits), torch.cat(feats)
            fbar = feats.mean(dim=(0, 2, 3))
            direction = fbar / fbar.pow(2).sum()
            # The logits are linear in the bias: logit' = logit + shift . f(x).
            gain = torch.einsum("c,bchw->bhw", direction, feats)
            total = torch.zeros_like(direction)
            for _ in range(4):
                current = logits + torch.einsum("c,bchw->bhw", total, feats)
                offset = torch.quantile(current.flatten()[::5].float(), 1.0 - target_area)
                total = total - offset * direction
            del gain
            md.output_hypernetworks_mlps[0].layers[2].bias.add_(total)
            final = logits + torch.einsum("c,bchw->bhw", total, feats)
            report["mask_area"] = round(float((final > 0).float().mean()), 3)
            report["mask_area_per_case"] = [round(float(a), 3) for a in (final > 0).float().mean(dim=(1, 2))]
            # JCM: quality MLP pre-sigmoid values of the simulated tokens
            def mlp(prefix, x):
                x = F.gelu(x @ sd[prefix + "fc1.weight"].float().cpu().T + sd[prefix + "fc1.bias"].float().cpu())
                x = F.gelu(x @ sd[prefix + "fc2.weight"].float().cpu().T + sd[prefix + "fc2.bias"].float().cpu())
                return x @ sd[prefix + "fc3.weight"].float().cpu().T + sd[prefix + "fc3.bias"].float().cpu()

            pre = mlp("model.mask_quality_MLP.", tokens)[:, 0]
            center = math.log(jcm_center / (1.0 - jcm_center))
            jshift = float(center - pre.median())
    finally:
        hook.remove()
    new_bias = md.output_hypernetworks_mlps[0].layers[2].bias.detach()
    ref = sd[bias_key]
    sd[bias_key] = new_bias.to(device=ref.device, dtype=ref.dtype)
    key = "model.mask_quality_MLP.fc3.bias"
    sd[key] = sd[key] + torch.tensor(jshift, dtype=sd[key].dtype, device=sd[key].device)
    report["jcm_bias_shift"] = jshift
    return report


# --------------------------------------------------------------------------- tokenizer
_ORGANS = [
    "liver", "spleen", "left kidney", "right kidney", "kidneys", "pancreas", "gallbladder", "stomach",
    "aorta", "inferior vena cava", "portal vein", "heart", "left lung", "right lung", "lungs", "trachea",
    "esophagus", "mediastinum", "bladder", "prostate", "uterus", "rectum", "colon", "small bowel",
    "vertebra", "spinal cord", "rib", "sternum", "adrenal gland", "thyroid", "brain", "ventricle",
    "lesion", "tumor", "nodule", "cyst", "mass", "vessel", "lymph node", "pleural effusion", "bone",
    "muscle", "fat", "airway", "bronchus", "pulmonary artery", "left atrium", "right ventricle",
]
_RELATIONS = [
    "inside", "next to", "adjacent to", "posterior to", "anterior to", "left of", "right of",
    "medial to", "lateral to", "above", "below", "surrounding", "within", "near", "behind", "in front of",
]
_REFS = [
    "the previous output", "round 1", "round 2", "round 3", "instance 1", "instance 2", "it", "the last result",
    "the segmented region", "the first segment", "the second segment",
]
_MODALITIES = ["CT", "MRI", "abdominal CT", "chest CT", "brain MRI", "pelvic MRI", "ultrasound", "X-ray"]
_VERBS = ["Segment", "Please segment", "Can you segment", "Show", "Outline", "Find", "Mark", "Where is"]
_ANSWERS = ["Sure,", "It is", "The segmentation output is", "Here it is:", "OK,"]
_CHINESE = [
    "分割肝脏", "分割第1轮中的病灶", "分割它旁边的结构", "请分割肺部", "分割脾脏", "分割肾脏", "分割前一轮结果内部的病变",
    "分割主动脉", "分割心脏", "第2轮", "实例1", "在这张CT切片中", "分割纵隔",
]


def _corpus() -> Iterator[str]:
    n = 0
    for i, organ in enumerate(_ORGANS):
        for j, mod in enumerate(_MODALITIES):
            verb = _VERBS[(i + j) % len(_VERBS)]
            yield f"[INST] {verb} the {organ} in this {mod} slice. [/INST] {_ANSWERS[(i + j) % len(_ANSWERS)]} . </s>"
            n += 1
        for j, rel in enumerate(_RELATIONS):
            ref = _REFS[(i + j) % len(_REFS)]
            verb = _VERBS[(i * 3 + j) % len(_VERBS)]
            yield f"[INST] {verb} the {organ} {rel} {ref}. [/INST] {_ANSWERS[(i + 2 * j) % len(_ANSWERS)]} . </s>"
            yield f"{verb.lower()} the {organ} {rel} round {1 + (i + j) % 9}, then the {_ORGANS[(i + j + 1) % len(_ORGANS)]}"
    for k, zh in enumerate(_CHINESE):
        yield f"[INST] {zh}。 [/INST] 好的, . </s>"
        yield zh + "，" + _CHINESE[(k + 1) % len(_CHINESE)]
    for d in range(100):
        yield f"Segment the structure number {d} on slice {d * 7 % 113} of {d * 13 % 97}."


def train_random_tokenizer(vocab_size: int = 1000) -> bytes:
    """A sentencepiece BPE model trained on generated prompt text (Mistral-like settings).

    unk=0, bos=1, eos=2, no pad piece, byte fallback, digits split, whitespace
    kept as is, a dummy prefix space. Vocabularies larger than the corpus can
    fill are padded with unused pieces ``<unused_N>`` (only the size matters
    for a benchmark). Deterministic.
    """
    import sentencepiece as spm

    base = min(vocab_size, 1000)
    filler = [f"<unused_{i}>" for i in range(vocab_size - base)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=filler,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentencepiece_length=16,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    return model.getvalue()


# --------------------------------------------------------------------------- files
def _llava_config(dims: RandomModelDims) -> dict:
    return {
        "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": dims.hidden,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": dims.intermediate,
        "max_position_embeddings": 32768,
        "mm_hidden_size": dims.clip_hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": CLIP_DIR,
        "model_type": "llava_mistral",
        "num_attention_heads": dims.heads,
        "num_hidden_layers": dims.layers,
        "num_key_value_heads": dims.kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vocab_size": dims.vocab,
    }


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {str(i): dict(_special(t), special=True) for i, t in enumerate(["<unk>", "<s>", "</s>"])},
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": True,
    "model_max_length": 2048,
    "pad_token": "<unk>",
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
    "padding_side": "right",
}
_SPECIAL_TOKENS_MAP = {
    "bos_token": _special("<s>"), "eos_token": _special("</s>"), "unk_token": _special("<unk>"), "pad_token": _special("<unk>"),
}
# Byte for byte the content of openai/clip-vit-large-patch14-336's file (old-style keys).
_CLIP_PREPROCESSOR = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
}


def _clip_config(dims: RandomModelDims) -> dict:
    return {
        "architectures": ["CLIPVisionModel"],
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": dims.clip_hidden,
        "image_size": 336,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": dims.clip_intermediate,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": dims.clip_heads,
        "num_channels": 3,
        "num_hidden_layers": dims.clip_layers,
        "patch_size": 14,
        "projection_dim": dims.clip_hidden,
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


_README = """# Random-weight MediRound model (MultiTurnSeg demo)

Built by `MultiTurnSegLib.engine.random_weights.build_random_model` (builder
version {version}, seed {seed}). It has the on-disk layout of a real MediRound
installation (LLaVA-Med directory, CLIP directory, MedSAM `.pth`, stage-2
training output, `model.json`) but tiny sizes and RANDOM weights: its masks
and JCM scores mean nothing. It exists to try MultiTurnSeg end to end without
downloading 15 GB of weights.

To use real weights, write a `model.json` like this one whose paths point at
your LLaVA-Med v1.5 Mistral directory, the CLIP ViT-L/14-336 directory, the
MedSAM ViT-B `.pth` and your MediRound training output folder (holding the
`*.bin` written by `zero_to_fp32`), without the `sam_encoder` entry.
"""


def _sam_encoder_entry(dims: RandomModelDims) -> dict:
    return {
        "embed_dim": dims.sam_embed_dim,
        "depth": dims.sam_depth,
        "num_heads": dims.sam_heads,
        "global_attn_indexes": list(dims.sam_global_attn),
    }


def _is_vit_b(dims: RandomModelDims) -> bool:
    from .spec import VIT_B

    return _sam_spec(dims) == VIT_B


def build_random_engine(dims: RandomModelDims = TINY_DIMS, seed: int = 0, device="auto", dtype=None,
                        load_in_4bit: bool = False, calibrate: bool = False):
    """A random MediRound engine built in memory: the weights are made on the
    target device and never touch the disk (only configs and the tokenizer go
    to a temporary folder). The benchmark uses it for full-size models on a GPU."""
    from . import devices
    from .engine import MediRoundEngine
    from .spec import ModelSpec

    skeleton = Path(tempfile.mkdtemp(prefix="mts-random-engine-"))
    try:
        for d in (LLAVA_DIR, CLIP_DIR, MEDIROUND_DIR):
            (skeleton / d).mkdir()
        (skeleton / MEDSAM_FILE).write_bytes(b"")  # every SAM tensor comes from the state dict
        _write_json(skeleton / LLAVA_DIR / "config.json", _llava_config(dims))
        (skeleton / LLAVA_DIR / "tokenizer.model").write_bytes(train_random_tokenizer(dims.vocab))
        _write_json(skeleton / CLIP_DIR / "config.json", _clip_config(dims))
        _write_json(skeleton / CLIP_DIR / "preprocessor_config.json", _CLIP_PREPROCESSOR)
        description = {"llava_med": LLAVA_DIR, "clip": CLIP_DIR, "medsam": MEDSAM_FILE, "mediround": MEDIROUND_DIR}
        if not _is_vit_b(dims):
            description["sam_encoder"] = _sam_encoder_entry(dims)
        spec = ModelSpec.from_dict(description, base_dir=skeleton)
        dev = devices.resolve_device(device)
        dt = devices.resolve_dtype(dtype, dev)
        state = random_mediround_state_dict(dims, seed=seed, device=dev, dtype=dt, calibrate=calibrate)
        state = {"base_model.model." + k: v for k, v in state.items()}
        return MediRoundEngine.from_state_dict(spec, state, device=dev, dtype=dt, load_in_4bit=load_in_4bit)
    finally:
        shutil.rmtree(skeleton, ignore_errors=True)




def build_random_model(out_dir: Union[str, Path], seed: int = 0, dims: RandomModelDims = TINY_DIMS,
                       overwrite: bool = False, calibrate: bool = True) -> Path:
    """Write a random MediRound model into ``out_dir``; return the path of its ``model.json``.

    If ``out_dir`` already holds a complete model from this builder version,
    seed and sizes it is reused. The folder is assembled next to ``out_dir``
    and renamed into place, so an interrupted build never leaves a half model.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    stamp = {"builder": "multiturnseg.random_weights", "version": BUILDER_VERSION, "seed": int(seed), "dims": asdict(dims)}
    stamp["dims"]["sam_global_attn"] = list(dims.sam_global_attn)
    stamp_file = out_dir / "random_model.json"
    if out_dir.is_dir() and not overwrite:
        try:
            if json.loads(stamp_file.read_text()) == stamp and (out_dir / "model.json").is_file():
                return out_dir / "model.json"
        except (OSError, ValueError):
            pass
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=str(out_dir.parent)))
    os.chmod(tmp, 0o755)
    try:
        sp_bytes = train_random_tokenizer(dims.vocab)
        stage2, llava, clip, sam = random_mediround_state_dict(dims, seed, "cpu", torch.float32, with_parts=True,
                                                               calibrate=False)
        if calibrate:
            _calibrate(stage2, dims, seed, tokens=_seg_tokens(stage2, dims, sp_bytes))

        d = tmp / LLAVA_DIR
        d.mkdir()
        _write_json(d / "config.json", _llava_config(dims))
        _write_json(d / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                                   "transformers_version": "4.36.2"})
        save_file({k: v.contiguous() for k, v in llava.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "tokenizer.model").write_bytes(sp_bytes)
        _write_json(d / "tokenizer_config.json", _TOKENIZER_CONFIG)
        _write_json(d / "special_tokens_map.json", _SPECIAL_TOKENS_MAP)

        d = tmp / CLIP_DIR
        d.mkdir()
        _write_json(d / "config.json", _clip_config(dims))
        save_file({k: v.contiguous() for k, v in clip.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        _write_json(d / "preprocessor_config.json", _CLIP_PREPROCESSOR)

        torch.save({k: v.contiguous() for k, v in sam.items()}, str(tmp / MEDSAM_FILE))

        d = tmp / MEDIROUND_DIR
        d.mkdir()
        torch.save({"base_model.model." + k: v.contiguous() for k, v in stage2.items()}, str(d / "pytorch_model.bin"))

        model_json = {"llava_med": LLAVA_DIR, "clip": CLIP_DIR, "medsam": MEDSAM_FILE, "mediround": MEDIROUND_DIR}
        if not _is_vit_b(dims):
            model_json["sam_encoder"] = _sam_encoder_entry(dims)
        _write_json(tmp / "model.json", model_json)
        (tmp / "RANDOM_MODEL.md").write_text(_README.format(version=BUILDER_VERSION, seed=seed), encoding="utf-8")
        _write_json(tmp / "random_model.json", stamp)

        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "model.json"
