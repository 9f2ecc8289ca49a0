"""Reading a MediRound training output and checking it against the model.

The official loader merges every ``*.bin`` of the folder into the PEFT-wrapped
model with ``strict=False``. Here the same files are read, every key is routed
to the part of the model it belongs to, and anything that would have been
silently ignored or broken (unknown keys, wrong shapes) is refused by name.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Tuple

import torch

from ..errors import ModelLoadError

PEFT_PREFIX = "base_model.model."

# Checkpoint name prefix (after PEFT_PREFIX) -> part of the assembled model.
# Order matters: the first matching prefix wins, the language model last.
_ROUTES: Tuple[Tuple[str, str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "clip", ""),
    ("model.visual_model.", "sam", ""),
    ("model.mm_projector.", "mm_projector", ""),
    ("model.text_hidden_fcs.0.", "text_hidden_fcs", ""),
    ("model.bbox_encoder.", "bbox_encoder", ""),
    ("model.mask_quality_MLP.", "jcm", "quality."),
    ("model.refine_MLP.", "jcm", "refine."),
    ("model.", "llm", "model."),
    ("lm_head.", "llm", "lm_head."),
)
PARTS = ("llm", "lora", "clip", "mm_projector", "sam", "text_hidden_fcs", "bbox_encoder", "jcm")
_LORA_MARKERS = (".lora_A.default.", ".lora_B.default.")


@dataclass
class Checkpoint:
    """A MediRound state dict split by model part (names local to each part)."""

    parts: Dict[str, Dict[str, torch.Tensor]]
    files: List[Path]
    filled_from_base: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        # Decided once: the tensors are released after loading.
        self.has_jcm = bool(self.parts.get("jcm"))

    @property
    def stage(self) -> int:
        return 2 if self.has_jcm else 1


def read_mediround(folder) -> Checkpoint:
    """Merge every ``*.bin`` of a training output folder and split it by part."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.bin") if p.is_file())
    if not files:
        raise ModelLoadError(
            f"The MediRound folder {folder} holds no *.bin weight file. It looks like a raw "
            "DeepSpeed checkpoint (or the wrong folder): run DeepSpeed's zero_to_fp32.py in it "
            "(python zero_to_fp32.py . pytorch_model.bin) and point 'mediround' at the folder "
            "holding the resulting .bin."
        )
    merged: Dict[str, torch.Tensor] = {}
    for path in files:
        merged.update(load_torch_file(path))  # later files win, as in the official loader
    return Checkpoint(parts=split_by_part(merged), files=files)


def load_torch_file(path) -> Dict[str, torch.Tensor]:
    """A pickled state dict, read with ``weights_only=True`` (never more)."""
    path = Path(path)
    try:
        # mmap avoids a second in-memory copy of multi-GB files; only the
        # zip-based format supports it.
        mmap = zipfile.is_zipfile(path)
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} cannot be read as a PyTorch state dict with weights_only=True "
            f"(it must hold tensors only): {exc}"
        ) from exc
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(f"{path} does not hold a flat dict of tensors.")
    return data


def split_by_part(state: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    parts: Dict[str, Dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    unexpected = []
    for key, tensor in state.items():
        routed = route(key)
        if routed is None:
            unexpected.append(key)
            continue
        part, local = routed
        parts[part][local] = tensor
    if unexpected:
        raise ModelLoadError(
            "The MediRound checkpoint holds keys that belong to no part of a MediRound model: "
            + name_some(unexpected)
            + f". Keys must start with '{PEFT_PREFIX}' (the PEFT-wrapped model as saved by the "
            "official training code)."
        )
    return parts


def route(key: str):
    """(part, key local to that part) for a checkpoint key, None if unknown."""
    if not key.startswith(PEFT_PREFIX):
        return None
    name = key[len(PEFT_PREFIX):]
    if any(m in name for m in _LORA_MARKERS):
        return ("lora", name) if name.startswith("model.layers.") else None
    for prefix, part, local_prefix in _ROUTES:
        if name.startswith(prefix):
            return part, local_prefix + name[len(prefix):]
    return None


def name_some(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more} ({len(keys)} in all)"


def check_part(part: str, given: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[int, ...]]):
    """Refuse unknown and mis-shaped keys; return the names that are missing."""
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        raise ModelLoadError(
            f"Unexpected key(s) for the {part} part of the MediRound checkpoint: "
            + name_some(_checkpoint_names(part, unexpected))
            + ". The checkpoint does not match this model description (other sizes or another model)."
        )
    misshaped = [
        f"{n} {tuple(given[k].shape)} (model expects {tuple(expected[k])})"
        for k, n in zip(given, _checkpoint_names(part, list(given)))
        if tuple(given[k].shape) != tuple(expected[k])
    ]
    if misshaped:
        raise ModelLoadError(
            f"Mis-shaped tensor(s) in the {part} part of the MediRound checkpoint: "
            + name_some(misshaped, limit=3)
            + ". Check that model.json points at the LLaVA-Med, CLIP and MedSAM the checkpoint was trained from"
            + (" (and its 'sam_encoder' sizes)." if part == "sam" else ".")
        )
    return [k for k in expected if k not in given]


def missing_error(part: str, missing: List[str]) -> ModelLoadError:
    return ModelLoadError(
        f"The MediRound checkpoint lacks {part} weight(s): "
        + name_some(_checkpoint_names(part, missing))
        + ". Is it a complete training output (zero_to_fp32 of the final step)?"
    )


def _checkpoint_names(part: str, keys: List[str]) -> List[str]:
    """Local part keys back to the names used in the checkpoint file (``route`` inverted)."""
    routes = [(prefix, local) for prefix, p, local in _ROUTES if p == part]

    def back(key: str) -> str:
        for prefix, local in routes:
            if key.startswith(local):
                return prefix + key[len(local):]
        return key  # LoRA keys are kept as they are

    return [PEFT_PREFIX + back(k) for k in keys]


def fill_missing_from_base(part: str, given: Dict[str, torch.Tensor], missing: List[str], base, expected):
    """Take still-missing frozen weights from the base files, as the official
    loader implicitly does (it builds from them, then loads non-strictly).

    ``base``: callable taking the wanted local keys and returning {local key:
    tensor} (at least those it has) for this part, or None.
    Returns the number of tensors filled; raises if some stay missing.
    """
    if not missing:
        return 0
    source = base(set(missing)) if base is not None else {}
    filled = 0
    for key in missing:
        tensor = source.get(key)
        if tensor is not None and tuple(tensor.shape) == tuple(expected[key]):
            given[key] = tensor
            filled += 1
    still = [k for k in missing if k not in given]
    if still:
        raise missing_error(part, still)
    return filled
