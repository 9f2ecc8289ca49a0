"""Pixels in: CLIP and SAM preprocessing, and the crop + box of a reference.

Every step reproduces the official pipeline bit for bit (PIL resizing, the
same rounding, the same order of operations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import InputError
from ._imports import hide_broken_torchvision

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
FALLBACK_MAX_PIXELS = 9  # at most this many non-zero pixels -> use the whole image


def check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(
            f"The slice image must be an (H, W, 3) uint8 RGB array, got shape {image.shape} "
            f"and dtype {image.dtype}."
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError("The slice image is empty.")
    return np.ascontiguousarray(image)


def check_mask(mask, image_hw: Tuple[int, int], what: str = "reference mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(image_hw):
        raise InputError(
            f"The {what} has shape {mask.shape}, but the slice is {tuple(image_hw)} (H, W)."
        )
    return mask.astype(bool, copy=False)


# ---- CLIP -------------------------------------------------------------------

def load_clip_processor(clip_dir):
    """The PIL-based CLIP image processor of the CLIP folder (bit-exact with
    the training preprocessing, unlike the torchvision-backed default)."""
    hide_broken_torchvision()
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(str(clip_dir))


def default_clip_processor():
    """openai/clip-vit-large-patch14-336's settings, for use without a CLIP folder."""
    hide_broken_torchvision()
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3
    )


def clip_pixels(processor, image_rgb: np.ndarray) -> torch.Tensor:
    """(3, S, S) float32 CLIP input of an RGB image (array or PIL)."""
    return processor.preprocess(image_rgb, return_tensors="pt")["pixel_values"][0]


# ---- SAM --------------------------------------------------------------------

def sam_resize_hw(h: int, w: int, long_side: int = 1024) -> Tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_pixels(image_rgb: np.ndarray, img_size: int = 1024) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(1, 3, S, S) float32 SAM input and the resized (h, w) before padding."""
    from PIL import Image

    h, w = sam_resize_hw(*image_rgb.shape[:2], long_side=img_size)
    resized = np.array(Image.fromarray(image_rgb).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(resized).permute(2, 0, 1).contiguous()
    mean = torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    x = (x - mean) / std
    x = torch.nn.functional.pad(x, (0, img_size - w, 0, img_size - h))
    return x.unsqueeze(0), (h, w)


# ---- references -------------------------------------------------------------

@dataclass
class ReferenceInput:
    """What a referring turn feeds for the mask it refers to.

    crop_rgb:    the masked, cropped, square-padded uint8 image.
    crop_pixels: its (3, 336, 336) CLIP input.
    box:         float64 [x0/W, y0/H, x1/W, y1/H] of the mask (max inclusive).
    fallback:    the mask covered at most 9 non-zero pixels, so the whole image
                 was used.
    """

    crop_rgb: np.ndarray
    crop_pixels: torch.Tensor
    box: np.ndarray
    fallback: bool


def build_reference(image_rgb, mask, processor=None) -> ReferenceInput:
    """Crop and box for a turn that refers to ``mask`` on ``image_rgb``."""
    image = check_image(image_rgb)
    mask = check_mask(mask, image.shape[:2])
    masked = image * mask[..., None].astype(np.uint8)
    fallback = int((masked[..., 0] > 0).sum()) <= FALLBACK_MAX_PIXELS
    if fallback:
        masked = image
        mask = np.ones_like(mask)
    crop = square_crop(masked)
    if processor is None:
        processor = default_clip_processor()
    from PIL import Image

    pixels = clip_pixels(processor, Image.fromarray(crop))
    return ReferenceInput(crop_rgb=crop, crop_pixels=pixels, box=mask_box(mask), fallback=fallback)


def square_crop(masked: np.ndarray, region: Optional[np.ndarray] = None) -> np.ndarray:
    """Bounding box of ``region`` ((H, W) bool; default: the pixels non-zero in
    any channel), zero-padded at the bottom/right to a square."""
    if region is None:
        region = masked.any(axis=2)
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    if rows.size == 0:  # an all-black image: nothing to cut, keep it whole
        cropped = masked
    else:
        cropped = masked[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    side = max(cropped.shape[:2])
    square = np.zeros((side, side, masked.shape[2]), dtype=masked.dtype)
    square[: cropped.shape[0], : cropped.shape[1]] = cropped
    return square


def mask_box(mask: np.ndarray) -> np.ndarray:
    """[xmin/W, ymin/H, xmax/W, ymax/H] (float64, max inclusive) of a non-empty mask."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise InputError("Cannot take the box of an empty mask.")
    return np.array([xs.min() / w, ys.min() / h, xs.max() / w, ys.max() / h], dtype=np.float64)
