"""Where and in which precision the model runs, and device failures in words."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from ..errors import InferenceError, InputError, ModelLoadError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; refuse CUDA where there is none."""
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={device!r} was requested but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}); use device='cpu' or 'auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif dev.type != "cpu":
        raise InputError(f"Unsupported device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'.")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the official inference precision), fp32 on CPU, unless given."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError as exc:
        raise InputError(f"Unknown dtype {dtype!r}; use float32 or bfloat16.") from exc


def gpu_name(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextmanager
def device_errors(what: str):
    """Turn device out-of-memory into an InferenceError that says what to try."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
        if not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise InferenceError(
            f"Out of memory while {what}. Try loading the language model in 4-bit "
            "(load_in_4bit / --4bit), a smaller slice or fewer turns on it, or close other "
            "programs that use the GPU."
        ) from exc


def quantize_llm_4bit(llm, device: torch.device, compute_dtype: torch.dtype):
    """Replace the decoder's Linear layers by bitsandbytes NF4 layers on
    ``device``; returns the new layers."""
    if device.type != "cuda":
        raise ModelLoadError("4-bit loading needs a CUDA GPU (bitsandbytes); this run is on CPU.")
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - any import failure means unusable
        raise ModelLoadError(
            "4-bit loading needs the 'bitsandbytes' package: pip install 'multiturnseg[quantization]' "
            f"({exc})."
        ) from exc
    from torch import nn

    quantized = set()
    for layer in llm.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                             quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                q = q.to(device)  # moving to CUDA quantizes
                setattr(parent, name, q)
                quantized.add(q)
    return quantized
