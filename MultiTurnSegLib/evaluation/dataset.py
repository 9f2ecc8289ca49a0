"""Reader of the official MR-MedSeg conversation format (MediRound's ``--eval_json``).

A file is a JSON list of samples; each sample is

    {"task": "segmentation", "base": "[null]", "conversations": [
        {"from": "human", "value": "[IMAGE256:images/a.png] Segment the liver."},
        {"from": "gpt",   "value": "Sure, [MASK-DECODE:masks/a_0.png]."},
        {"from": "human", "value": "[MASK-ENCODE:masks/a_0.png][BOX-ENCODE:masks/a_0.png] Segment the lesion inside it.",
         "ind": 0},
        {"from": "gpt",   "value": "It is [REF-DECODE:masks/a_0.png][MASK-DECODE:masks/a_1.png]."}]}

and the official dataset code turns it into model text as follows (this module
does the same):

- human turns: ``[IMAGE256:path]`` becomes ``<image>\\n`` (the slice; only in
  the first turn), ``[MASK-ENCODE:path]`` becomes ``[CROPPEDIMAGE]`` and
  ``[BOX-ENCODE:path]`` becomes ``[BBOXINPUT]``; ``ind`` is the 0-based round
  whose mask the turn refers to.
- assistant turns: ``[MASK-DECODE:path]`` becomes ``[SEG]`` (``path`` is the
  round's ground-truth mask) and ``[REF-DECODE:path]`` is deleted, so
  ``"It is [REF-DECODE:a][MASK-DECODE:b]."`` is fed as ``"It is [SEG]."``.

Paths are relative to the dataset directory (absolute paths also work).
Images are read as 8-bit RGB (grey PNGs are copied to three channels, as the
official ``cv2.imread`` does); ground-truth masks are 0/255 PNGs whose
foreground is the value 255. The masks named in ``MASK-ENCODE``/``BOX-ENCODE``
only seed the teacher-forced initial references, which the evaluation always
replaces by the predicted mask of the referenced round before use; they are
recorded but never read.

A turn's ``prompt`` is the human text with its image/reference markers and the
one space that follows them removed: the engine puts ``<image>\\n `` or
``[CROPPEDIMAGE][BBOXINPUT] `` back in front, which reproduces the official
token ids exactly for texts written like the MR-MedSeg files (markers first,
then one space). Texts with markers elsewhere are accepted with a warning
(``Sample.warnings``) because the token ids may then differ slightly.

numpy + Pillow only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import ConversationFormatError, InputError

__all__ = [
    "OfficialTurn",
    "OfficialSample",
    "load_official_json",
    "parse_official_samples",
    "load_rgb_image",
    "load_gt_mask",
]

BRACKET_TYPES = ("IMAGE256", "MASK-ENCODE", "BOX-ENCODE", "MASK-DECODE", "REF-DECODE")
_BRACKET_RE = re.compile(r"\[[^\]]+\]")
_MARKER_RE = re.compile(r"^\[(IMAGE256|MASK-ENCODE|BOX-ENCODE|MASK-DECODE|REF-DECODE):(.*)\]$", re.S)

IMAGE_TEXT = "<image>\n"
CROP_TEXT = "[CROPPEDIMAGE]"
BOX_TEXT = "[BBOXINPUT]"
SEG_TEXT = "[SEG]"
_REFERENCE_TEXT = {"MASK-ENCODE": CROP_TEXT, "BOX-ENCODE": BOX_TEXT}  # human-turn marker -> model text


@dataclass
class OfficialTurn:
    """One round: the user turn and the assistant answer that follows it."""

    prompt: str  # user text without markers (what a user would type)
    answer: str  # teacher-forced assistant text, exactly one "[SEG]"
    ref: Optional[int]  # 0-based round this turn refers to ('ind'), None if none
    human_text: str  # the user turn exactly as the official code renders it
    gt_mask_path: Path  # the MASK-DECODE target
    seed_ref_mask_path: Optional[Path] = None  # MASK-ENCODE path (teacher-forced seed only)
    seed_box_mask_path: Optional[Path] = None  # BOX-ENCODE path (teacher-forced seed only)
    ref_decode_path: Optional[Path] = None  # REF-DECODE path (not used by the evaluation)


@dataclass
class OfficialSample:
    """One conversation on one slice."""

    index: int  # position in the JSON list
    image_path: Path
    turns: List[OfficialTurn]
    raw: dict = field(repr=False, default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    @property
    def num_rounds(self) -> int:
        return len(self.turns)

    @property
    def name(self) -> str:
        return f"sample {self.index} ({self.image_path.name})"

    def load_image(self) -> np.ndarray:
        """(H, W, 3) uint8."""
        return load_rgb_image(self.image_path)

    def load_gt_masks(self, image_shape: Optional[Sequence[int]] = None) -> np.ndarray:
        """(R, H, W) bool ground-truth masks, one per round."""
        masks = [load_gt_mask(t.gt_mask_path) for t in self.turns]
        shape = tuple(image_shape[:2]) if image_shape is not None else masks[0].shape
        for r, m in enumerate(masks):
            if m.shape != shape:
                raise InputError(
                    f"{self.name}: ground-truth mask of round {r + 1} ({self.turns[r].gt_mask_path}) is "
                    f"{m.shape[1]}x{m.shape[0]} pixels but the image is {shape[1]}x{shape[0]}; "
                    "masks must have the size of the slice image."
                )
        return np.stack(masks, 0)


def load_rgb_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (grey copied to 3 channels).

    16-bit images are reduced to 8 bits by dropping the low byte, as OpenCV's
    ``imread`` (used by the official code) does.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image file {path} does not exist.")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img).astype(np.int64)
                arr = np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if mode == "F":
                raise InputError(f"Image {path} holds floating-point pixels; an 8-bit image is expected.")
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except InputError:
        raise
    except Exception as exc:  # PIL raises many types
        raise InputError(f"Cannot read image {path}: {exc}") from exc
    return np.ascontiguousarray(rgb)


def load_gt_mask(path: Union[str, Path]) -> np.ndarray:
    """Read a 0/255 mask PNG as (H, W) bool (foreground = 255, as the official code)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Mask file {path} does not exist.")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except Exception as exc:
        raise InputError(f"Cannot read mask {path}: {exc}") from exc
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4) and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise InputError(f"Mask {path} has {arr.shape[2]} different channels; a grey 0/255 mask is expected.")
    if arr.ndim != 2:
        raise InputError(f"Mask {path} has shape {arr.shape}; a 2D 0/255 mask is expected.")
    mask = arr == 255
    if not mask.any() and np.any(arr != 0):
        # e.g. a 0/1 mask: the official code would silently score it as empty.
        raise InputError(
            f"Mask {path} has non-zero pixels but none equal to 255; MR-MedSeg masks are 0/255 "
            f"(values found: {sorted(np.unique(arr).tolist())[:6]})."
        )
    return mask


def _find_brackets(text: str) -> List[str]:
    return [b for b in _BRACKET_RE.findall(text) if any(kind in b for kind in BRACKET_TYPES)]


def _split_marker(bracket: str, where: str):
    m = _MARKER_RE.match(bracket)
    if not m or not m.group(2).strip():
        raise ConversationFormatError(f"{where}: malformed marker {bracket!r} (expected e.g. [MASK-DECODE:masks/x.png]).")
    return m.group(1), m.group(2).strip()


def _resolve(dataset_dir: Path, rel: str) -> Path:
    return Path(os.path.join(str(dataset_dir), rel))


def _render_human(prompt: str, first: bool, ref: bool) -> str:
    """The user turn as the engine renders it from a plain prompt."""
    if first:
        return IMAGE_TEXT + " " + prompt
    if ref:
        return CROP_TEXT + BOX_TEXT + " " + prompt
    return prompt


def _parse_sample(index: int, item, dataset_dir: Path, check_files: bool) -> OfficialSample:
    where = f"sample {index}"
    if not isinstance(item, dict):
        raise ConversationFormatError(f"{where}: expected an object with 'conversations', got {type(item).__name__}.")
    task = item.get("task", "segmentation")
    if task != "segmentation":
        raise ConversationFormatError(f"{where}: task {task!r} is not supported (only 'segmentation').")
    conv = item.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ConversationFormatError(f"{where}: 'conversations' must be a non-empty list of turns.")
    if len(conv) % 2:
        raise ConversationFormatError(
            f"{where}: {len(conv)} turns; a conversation alternates human and gpt turns, so their number must be even."
        )
    warnings: List[str] = []
    image_path: Optional[Path] = None
    turns: List[OfficialTurn] = []
    for r in range(len(conv) // 2):
        h, g = conv[2 * r], conv[2 * r + 1]
        for t, who in ((h, "human"), (g, "gpt")):
            if not isinstance(t, dict) or t.get("from") != who or not isinstance(t.get("value"), str):
                raise ConversationFormatError(
                    f"{where}, round {r + 1}: expected a {who!r} turn with a text 'value', got {str(t)[:120]!r}."
                )
        # ---- human turn
        text = h["value"]
        rendered = text
        seeds = {}  # MASK-ENCODE / BOX-ENCODE -> path
        has_image = False
        for b in _find_brackets(text):
            kind, rel = _split_marker(b, f"{where}, round {r + 1} (human)")
            if kind == "IMAGE256":
                if r != 0 or has_image:
                    raise ConversationFormatError(
                        f"{where}, round {r + 1}: [IMAGE256:...] may appear only once, in the first turn "
                        "(a conversation is about one slice)."
                    )
                has_image = True
                image_path = _resolve(dataset_dir, rel)
                rendered = rendered.replace(b, IMAGE_TEXT)
            elif kind in _REFERENCE_TEXT:
                if kind in seeds:
                    raise ConversationFormatError(f"{where}, round {r + 1}: more than one [{kind}:...] in a turn.")
                seeds[kind] = _resolve(dataset_dir, rel)
                rendered = rendered.replace(b, _REFERENCE_TEXT[kind])
            else:
                raise ConversationFormatError(f"{where}, round {r + 1}: {kind} belongs in a gpt turn, not a human turn.")
        if r == 0 and not has_image:
            raise ConversationFormatError(f"{where}: the first human turn must name the slice with [IMAGE256:path].")
        has_crop, has_box = "MASK-ENCODE" in seeds, "BOX-ENCODE" in seeds
        ind = h.get("ind")
        ref: Optional[int] = None
        if ind is not None:
            if isinstance(ind, bool) or not isinstance(ind, int):
                raise ConversationFormatError(f"{where}, round {r + 1}: 'ind' must be an integer round index, got {ind!r}.")
            if not 0 <= ind < r:
                raise ConversationFormatError(
                    f"{where}, round {r + 1}: 'ind' = {ind} does not name an earlier round "
                    f"(0-based; allowed 0..{r - 1})." if r else f"{where}: the first turn cannot refer to an earlier round."
                )
            if not (has_crop and has_box):
                raise ConversationFormatError(
                    f"{where}, round {r + 1}: a turn with 'ind' needs both [MASK-ENCODE:...] and [BOX-ENCODE:...]."
                )
            ref = ind
        elif has_crop or has_box:
            raise ConversationFormatError(
                f"{where}, round {r + 1}: [MASK-ENCODE]/[BOX-ENCODE] without 'ind' (which round it refers to)."
            )
        # prompt = human text without markers and the single space after them
        prompt = text
        for b in _find_brackets(text):
            prompt = prompt.replace(b, "")
        stripped = prompt[1:] if prompt.startswith(" ") else prompt
        expected = _render_human(stripped, r == 0, ref is not None)
        if expected != rendered:
            warnings.append(
                f"round {r + 1}: markers are not at the start of the user text followed by one space; "
                f"it is fed as {expected!r} instead of {rendered!r} (token ids may differ from the official code)."
            )
        prompt = stripped
        if not prompt.strip():
            raise ConversationFormatError(f"{where}, round {r + 1}: the user turn has no text besides its markers.")
        # ---- gpt turn
        gtext = g["value"]
        answer = gtext
        gt_path = ref_decode = None
        brackets = _find_brackets(gtext)
        for b in brackets:
            kind, rel = _split_marker(b, f"{where}, round {r + 1} (gpt)")
            if kind == "MASK-DECODE":
                if gt_path is not None:
                    raise ConversationFormatError(f"{where}, round {r + 1}: more than one [MASK-DECODE:...] in an answer.")
                gt_path = _resolve(dataset_dir, rel)
                answer = answer.replace(b, SEG_TEXT)
            elif kind == "REF-DECODE":
                if ref_decode is not None:
                    raise ConversationFormatError(f"{where}, round {r + 1}: more than one [REF-DECODE:...] in an answer.")
                ref_decode = _resolve(dataset_dir, rel)
                answer = answer.replace(b, "")
            else:
                raise ConversationFormatError(f"{where}, round {r + 1}: {kind} belongs in a human turn, not an answer.")
        if gt_path is None:
            raise ConversationFormatError(
                f"{where}, round {r + 1}: the answer {gtext[:80]!r} has no [MASK-DECODE:path] (the round's ground truth)."
            )
        if answer.count(SEG_TEXT) != 1:
            raise ConversationFormatError(f"{where}, round {r + 1}: the answer must contain exactly one [SEG] after conversion.")
        turns.append(
            OfficialTurn(
                prompt=prompt,
                answer=answer,
                ref=ref,
                human_text=rendered,
                gt_mask_path=gt_path,
                seed_ref_mask_path=seeds.get("MASK-ENCODE"),
                seed_box_mask_path=seeds.get("BOX-ENCODE"),
                ref_decode_path=ref_decode,
            )
        )
    assert image_path is not None
    if check_files:
        missing = [str(image_path)] if not image_path.is_file() else []
        missing += [str(t.gt_mask_path) for t in turns if not t.gt_mask_path.is_file()]
        if missing:
            raise InputError(
                f"{where}: missing file(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                f"(paths are relative to the dataset directory {dataset_dir})."
            )
    return OfficialSample(index=index, image_path=image_path, turns=turns, raw=item, warnings=warnings)


def parse_official_samples(data, dataset_dir: Union[str, Path], check_files: bool = True) -> List[OfficialSample]:
    """Parse already-loaded JSON (a list of samples, or one sample object)."""
    dataset_dir = Path(dataset_dir)
    if isinstance(data, dict) and "conversations" in data:
        data = [data]
    if not isinstance(data, list):
        raise ConversationFormatError("An MR-MedSeg file must hold a JSON list of conversations.")
    if not data:
        raise ConversationFormatError("The MR-MedSeg file holds no conversation.")
    return [_parse_sample(i, item, dataset_dir, check_files) for i, item in enumerate(data)]


def load_official_json(path: Union[str, Path], dataset_dir: Union[str, Path, None] = None,
                       check_files: bool = True) -> List[OfficialSample]:
    """Read an MR-MedSeg JSON file. ``dataset_dir`` defaults to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Evaluation file {path} does not exist.")
    if dataset_dir is None:
        dataset_dir = path.parent
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise InputError(f"Dataset directory {dataset_dir} does not exist.")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConversationFormatError(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConversationFormatError(f"{path} is not UTF-8 text: {exc}") from exc
    try:
        return parse_official_samples(data, dataset_dir, check_files=check_files)
    except ConversationFormatError as exc:
        raise ConversationFormatError(f"{path}: {exc}") from None
