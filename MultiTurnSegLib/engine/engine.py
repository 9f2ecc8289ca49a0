"""MediRoundEngine: a loaded MediRound model and the sessions that use it."""

from __future__ import annotations

import time
from typing import Union

import numpy as np
import torch

from ..errors import ModelLoadError
from ._imports import hide_broken_torchvision
from . import checkpoint as ckpt
from . import devices
from .jcm import JCM_THRESHOLD
from .model import MediRoundModel, build_model
from .preprocessing import ReferenceInput, build_reference, load_clip_processor
from .session import SliceSession
from .spec import ModelSpec
from .tokenizer import MediRoundTokenizer


class MediRoundEngine:
    """Load once, then ``new_session(image)`` per slice."""

    def __init__(self, spec: ModelSpec, model: MediRoundModel, tokenizer: MediRoundTokenizer,
                 clip_processor, checkpoint: ckpt.Checkpoint, device: torch.device,
                 dtype: torch.dtype, load_in_4bit: bool = False,
                 jcm_threshold: float = JCM_THRESHOLD, load_seconds: float = 0.0):
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.clip_processor = clip_processor
        self.device = device
        self.dtype = dtype
        self.load_in_4bit = load_in_4bit
        self.jcm_threshold = float(jcm_threshold)
        self.stage = checkpoint.stage
        self._checkpoint_files = [str(p) for p in checkpoint.files]
        self._filled_from_base = dict(checkpoint.filled_from_base)
        self.load_seconds = load_seconds
        with torch.no_grad():
            self.dense_pe = model.sam.dense_positional_encoding()

    @classmethod
    def from_model_json(cls, path, *, device: Union[str, torch.device] = "auto", dtype=None,
                        load_in_4bit: bool = False, require_jcm: bool = False,
                        jcm_threshold: float = JCM_THRESHOLD) -> "MediRoundEngine":
        return cls.from_spec(ModelSpec.from_json(path), device=device, dtype=dtype,
                             load_in_4bit=load_in_4bit, require_jcm=require_jcm,
                             jcm_threshold=jcm_threshold)

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, device="auto", dtype=None, load_in_4bit: bool = False,
                  require_jcm: bool = False, jcm_threshold: float = JCM_THRESHOLD) -> "MediRoundEngine":
        """require_jcm: refuse a stage-1 checkpoint (no JCM heads) instead of
        running without Judgment & Correction."""
        return cls._build(spec, lambda: ckpt.read_mediround(spec.mediround), device=device, dtype=dtype,
                          load_in_4bit=load_in_4bit, require_jcm=require_jcm, jcm_threshold=jcm_threshold)

    @classmethod
    def from_state_dict(cls, spec: ModelSpec, state_dict, *, device="auto", dtype=None, load_in_4bit: bool = False,
                        require_jcm: bool = False, jcm_threshold: float = JCM_THRESHOLD) -> "MediRoundEngine":
        """Build from a MediRound state dict already in memory (keys as in the
        training output's ``*.bin``); ``spec.mediround`` is not read. Lets a
        full-size random model be made on the GPU without writing 15 GB."""
        return cls._build(spec, lambda: ckpt.Checkpoint(parts=ckpt.split_by_part(state_dict), files=[]),
                          device=device, dtype=dtype, load_in_4bit=load_in_4bit, require_jcm=require_jcm,
                          jcm_threshold=jcm_threshold)

    @classmethod
    def _build(cls, spec: ModelSpec, read_checkpoint, *, device, dtype, load_in_4bit, require_jcm, jcm_threshold):
        t0 = time.perf_counter()
        hide_broken_torchvision()
        dev = devices.resolve_device(device)
        dt = devices.resolve_dtype(dtype, dev)
        if load_in_4bit and dev.type != "cuda":
            raise ModelLoadError("load_in_4bit needs a CUDA GPU; this run would be on CPU.")
        tokenizer = MediRoundTokenizer(spec.llava_med / "tokenizer.model")
        checkpoint = read_checkpoint()
        if require_jcm and not checkpoint.has_jcm:
            raise ModelLoadError(
                f"Judgment & Correction (JCM) was requested, but {spec.mediround} is a stage-1 "
                "checkpoint: it has no mask_quality_MLP / refine_MLP weights. Use the stage-2 "
                "training output, or run without JCM."
            )
        clip_processor = load_clip_processor(spec.clip)
        model = build_model(spec, tokenizer, checkpoint)
        checkpoint.parts = {}  # the model holds the tensors now
        with devices.device_errors("loading the model onto the device"):
            _place(model, dev, dt, load_in_4bit)
        return cls(spec, model, tokenizer, clip_processor, checkpoint, dev, dt, load_in_4bit,
                   jcm_threshold, load_seconds=time.perf_counter() - t0)

    @property
    def jcm_available(self) -> bool:
        return self.model.jcm is not None

    def new_session(self, image_rgb: np.ndarray) -> SliceSession:
        return SliceSession(self, image_rgb)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.llm.config)

    def build_reference(self, image_rgb, mask) -> ReferenceInput:
        return build_reference(image_rgb, mask, self.clip_processor)

    @torch.no_grad()
    def reference_rows(self, crop_pixels, boxes):
        """The rows that replace [CROPPEDIMAGE] and [BBOXINPUT]: (K, hidden)
        mm_projector(CLIP CLS) of K crops (K, 3, S, S) and bbox_encoder of
        K boxes (K, 4), on the device in the model's precision."""
        model = self.model
        if len(crop_pixels) == 0:
            empty = torch.zeros((0, model.llm.config.hidden_size), device=self.device, dtype=self.dtype)
            return empty, empty
        crops = torch.as_tensor(crop_pixels).to(self.device, self.dtype)
        boxes = torch.as_tensor(boxes, dtype=torch.float32).to(self.device, self.dtype)
        return model.encode_crops(crops), model.encode_boxes(boxes)

    def info(self) -> dict:
        import peft
        import transformers

        llm_cfg = self.model.llm.config
        clip_cfg = self.model.clip.config
        enc = self.spec.sam_encoder
        return {
            "model": "MediRound",
            "stage": self.stage,
            "jcm_available": self.jcm_available,
            "jcm_threshold": self.jcm_threshold,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "gpu_name": devices.gpu_name(self.device),
            "load_in_4bit": self.load_in_4bit,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
            "dims": {
                "llm_hidden": llm_cfg.hidden_size,
                "llm_layers": llm_cfg.num_hidden_layers,
                "llm_heads": llm_cfg.num_attention_heads,
                "llm_kv_heads": llm_cfg.num_key_value_heads,
                "vocab_size": llm_cfg.vocab_size,
                "clip_hidden": clip_cfg.hidden_size,
                "clip_image_size": clip_cfg.image_size,
                "image_tokens": self.model.num_image_tokens,
                "sam_encoder": {"embed_dim": enc.embed_dim, "depth": enc.depth, "num_heads": enc.num_heads,
                                "global_attn_indexes": list(enc.global_attn_indexes)},
                "seg_dim": self.model.text_hidden_fcs[2].out_features,
            },
            "token_ids": {"[SEG]": self.tokenizer.seg_id, "[BBOXINPUT]": self.tokenizer.bbox_id,
                          "[CROPPEDIMAGE]": self.tokenizer.crop_id},
            "checkpoint_files": self._checkpoint_files,
            "filled_from_base": self._filled_from_base,
            "load_seconds": round(self.load_seconds, 3),
            "model_json": str(self.spec.source) if self.spec.source else None,
        }

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _place(model: MediRoundModel, device: torch.device, dtype: torch.dtype, load_in_4bit: bool) -> None:
    """Move to the device and precision. Rotary frequencies stay fp32 (as
    transformers keeps them); everything else, the SAM positional-encoding
    matrix included, takes ``dtype`` as in the official bf16 runs."""
    keep = {name: buf.detach().clone() for name, buf in model.named_buffers() if "inv_freq" in name}
    if load_in_4bit:
        quantized = devices.quantize_llm_4bit(model.llm, device, dtype)
        # Everything but the quantized layers: move tensor by tensor, since
        # Module.to(dtype) would also cast the packed 4-bit weights.
        for module in model.modules():
            if module in quantized:
                continue
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(p.data.to(device, dtype), requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.to(device, dtype) if b.is_floating_point() else b.to(device)
    else:
        model.to(device=device, dtype=dtype)
    for name, buf in keep.items():
        owner, attr = _owner(model, name)
        setattr(owner, attr, buf.to(device))


def _owner(module, dotted: str):
    *path, attr = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    return module, attr
