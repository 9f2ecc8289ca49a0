"""The model description file (model.json): where a MediRound model's parts are."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from ..errors import ModelLoadError

PART_KEYS = ("llava_med", "clip", "medsam", "mediround")
OPTIONAL_KEYS = ("sam_encoder", "lora_alpha")


@dataclass(frozen=True)
class SamEncoderSpec:
    """Sizes of SAM's ViT image encoder (the rest is SAM's standard design)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    # SAM's fixed settings, kept here so nothing below hard-codes them.
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256


VIT_B = SamEncoderSpec()


@dataclass(frozen=True)
class ModelSpec:
    """Paths of the four parts of a MediRound model (absolute after loading)."""

    llava_med: Path
    clip: Path
    medsam: Path
    mediround: Path
    sam_encoder: SamEncoderSpec = field(default_factory=SamEncoderSpec)
    # Not stored in a checkpoint; the official training default is 16 (r = 8).
    lora_alpha: float = 16.0
    source: Optional[Path] = None

    @classmethod
    def from_json(cls, path) -> "ModelSpec":
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"Model description not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"Model description {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, base_dir=path.resolve().parent, source=path)

    @classmethod
    def from_dict(cls, data, base_dir, source: Optional[Path] = None) -> "ModelSpec":
        where = f" in {source}" if source else ""
        if not isinstance(data, dict):
            raise ModelLoadError(f"The model description{where} must be a JSON object.")
        missing = [k for k in PART_KEYS if not data.get(k)]
        if missing:
            raise ModelLoadError(
                f"The model description{where} lacks {', '.join(missing)}; it needs "
                f"{', '.join(PART_KEYS)} (paths relative to the file)."
            )
        unknown = sorted(set(data) - set(PART_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise ModelLoadError(
                f"Unknown key(s) {', '.join(unknown)} in the model description{where}; "
                f"allowed: {', '.join(PART_KEYS + OPTIONAL_KEYS)}."
            )
        base_dir = Path(base_dir)
        paths = {k: (base_dir / str(data[k])).resolve() for k in PART_KEYS}
        _check_parts(paths, where)
        try:
            lora_alpha = float(data.get("lora_alpha", 16.0))
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"lora_alpha{where} must be a number.") from exc
        return cls(
            sam_encoder=_sam_encoder(data.get("sam_encoder"), where),
            lora_alpha=lora_alpha,
            source=Path(source) if source else None,
            **paths,
        )


def _check_parts(paths, where) -> None:
    needs = {
        "llava_med": ("dir", ("config.json", "tokenizer.model")),
        "clip": ("dir", ("config.json", "preprocessor_config.json")),
        "medsam": ("file", ()),
        "mediround": ("dir", ()),
    }
    for key, (kind, files) in needs.items():
        path = paths[key]
        if kind == "dir" and not path.is_dir():
            raise ModelLoadError(f"'{key}'{where} points at {path}, which is not a folder.")
        if kind == "file" and not path.is_file():
            raise ModelLoadError(f"'{key}'{where} points at {path}, which is not a file.")
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise ModelLoadError(f"The '{key}' folder {path} lacks {', '.join(absent)}.")


def _sam_encoder(value, where) -> SamEncoderSpec:
    if value is None:
        return VIT_B
    if not isinstance(value, dict):
        raise ModelLoadError(f"'sam_encoder'{where} must be an object.")
    allowed = {"embed_dim", "depth", "num_heads", "global_attn_indexes"}
    unknown = sorted(set(value) - allowed)
    absent = sorted(allowed - set(value))
    if unknown or absent:
        raise ModelLoadError(
            f"'sam_encoder'{where} needs exactly {', '.join(sorted(allowed))}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(absent)}" if absent else "")
        )
    try:
        return SamEncoderSpec(
            embed_dim=int(value["embed_dim"]),
            depth=int(value["depth"]),
            num_heads=int(value["num_heads"]),
            global_attn_indexes=tuple(int(i) for i in value["global_attn_indexes"]),
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"'sam_encoder'{where} holds a non-integer size: {exc}") from exc
