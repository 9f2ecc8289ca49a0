"""Grey-value windowing to 8-bit, RGB images for the model, PNG overlays."""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from .slicing import check_axis, extract_slice
from .volume import Volume

#: Named windows ``(width, level)`` in Hounsfield units (CT).
WINDOW_PRESETS: Dict[str, Tuple[float, float]] = {
    "ct-abdomen": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "brain": (80.0, 40.0),
    "bone": (1800.0, 400.0),
    "mediastinum": (350.0, 50.0),
}

#: "auto": the 0.5th to 99.5th percentile of the slice's grey values (for MR and others).
AUTO_WINDOW = "auto"
AUTO_PERCENTILES = (0.5, 99.5)

WindowSpec = Union[str, Tuple[float, float], Sequence[float]]


def window_names() -> Tuple[str, ...]:
    """Names accepted as a window: the presets and "auto"."""
    return tuple(WINDOW_PRESETS) + (AUTO_WINDOW,)


def _preset_help() -> str:
    presets = ", ".join(f"{n} (W{w:g}/L{l:g})" for n, (w, l) in WINDOW_PRESETS.items())
    return f"use one of {presets}, auto, or WIDTH/LEVEL such as 400/40"


def auto_window(values: np.ndarray) -> Tuple[float, float]:
    """``(width, level)`` spanning the 0.5th-99.5th percentiles of finite ``values``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (1.0, 0.0)
    lo, hi = np.percentile(v, AUTO_PERCENTILES)
    if hi <= lo:
        # constant image: map it to black
        return (1.0, float(lo) + 0.5)
    return (float(hi - lo), float((hi + lo) / 2.0))


def parse_window(window: WindowSpec) -> Union[str, Tuple[float, float]]:
    """Normalise a window: a preset name, "auto", ``(width, level)`` or the text "W/L".

    Returns "auto" or a ``(width, level)`` tuple; raises InputError otherwise.
    """
    if isinstance(window, str):
        text = window.strip().lower()
        if text == AUTO_WINDOW:
            return AUTO_WINDOW
        if text in WINDOW_PRESETS:
            return WINDOW_PRESETS[text]
        if "/" in text:
            parts = text.split("/")
            try:
                width, level = float(parts[0]), float(parts[1])
                if len(parts) != 2:
                    raise ValueError
            except (ValueError, IndexError):
                raise InputError(f"window {window!r} is not WIDTH/LEVEL; {_preset_help()}.") from None
            return _check_width_level(width, level, window)
        raise InputError(f"unknown window preset {window!r}; {_preset_help()}.")
    try:
        width, level = (float(v) for v in window)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(f"window {window!r} is neither a preset name nor (width, level); {_preset_help()}.") from None
    return _check_width_level(width, level, window)


def _check_width_level(width: float, level: float, original) -> Tuple[float, float]:
    if not (np.isfinite(width) and np.isfinite(level)) or width <= 0:
        raise InputError(f"window {original!r}: the width must be a positive number and the level finite.")
    return (width, level)


def window_to_uint8(slice2d: np.ndarray, window: WindowSpec = AUTO_WINDOW) -> np.ndarray:
    """Map grey values to 0..255 through a window (preset name, "auto", (width, level) or "W/L").

    Values at or below ``level - width/2`` become 0, at or above ``level + width/2``
    become 255, linearly in between (rounded). NaN becomes 0.
    """
    values = np.asarray(slice2d, dtype=np.float64)
    spec = parse_window(window)
    width, level = auto_window(values) if spec == AUTO_WINDOW else spec  # type: ignore[misc]
    low = level - width / 2.0
    scaled = (values - low) * (255.0 / width)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(u8: np.ndarray) -> np.ndarray:
    """A 2D uint8 grey image as ``(H, W, 3)`` uint8 RGB (a C-contiguous copy)."""
    grey = np.asarray(u8)
    if grey.ndim == 3 and grey.shape[2] == 3 and grey.dtype == np.uint8:
        return np.ascontiguousarray(grey)
    if grey.ndim != 2:
        raise InputError(f"to_rgb needs a 2D grey image, got shape {grey.shape}.")
    if grey.dtype != np.uint8:
        raise InputError(f"to_rgb needs uint8 grey values (use window_to_uint8 first), got {grey.dtype}.")
    return np.ascontiguousarray(np.repeat(grey[:, :, np.newaxis], 3, axis=2))


def render_slice(volume: Volume, axis: str, index: int, window: WindowSpec = AUTO_WINDOW) -> np.ndarray:
    """Slice ``index`` along ``axis`` as the model sees it: ``(H, W, 3)`` uint8, voxel grid as is."""
    axis = check_axis(axis)
    parse_window(window)  # fail on a bad window before slicing
    return to_rgb(window_to_uint8(extract_slice(volume, axis, index), window))


def _color_255(color) -> np.ndarray:
    c = np.asarray(color, dtype=np.float64).reshape(-1)
    if c.shape != (3,) or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise InputError(f"a colour needs 3 non-negative numbers (r, g, b), got {color!r}.")
    if np.all(c <= 1.0) and not np.issubdtype(np.asarray(color).dtype, np.integer):
        c = c * 255.0
    if np.any(c > 255):
        raise InputError(f"colour {color!r}: use 0..1 floats or 0..255 integers.")
    return c


def _mask_outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay(
    rgb: np.ndarray,
    masks: Sequence[np.ndarray],
    colors: Sequence[Sequence[float]],
    alpha: float = 0.4,
    outline: bool = True,
) -> np.ndarray:
    """Blend coloured masks over an RGB image (a new array); later masks are drawn on top.

    ``colors`` are (r, g, b) in 0..1 (segment colours) or integers 0..255.
    With ``outline`` the mask border is drawn in the full colour.
    """
    base = to_rgb(rgb) if np.asarray(rgb).ndim == 2 else np.asarray(rgb)
    if base.ndim != 3 or base.shape[2] != 3 or base.dtype != np.uint8:
        raise InputError(f"overlay needs an (H, W, 3) uint8 image, got {base.shape} {base.dtype}.")
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
        if colors and np.ndim(colors) == 1:
            colors = [colors]  # type: ignore[list-item]
    if len(masks) != len(colors):
        raise InputError(f"overlay got {len(masks)} masks but {len(colors)} colours.")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"overlay alpha must be within 0..1, got {alpha}.")
    out = base.astype(np.float64)
    for mask, color in zip(masks, colors):
        m = np.asarray(mask, dtype=bool)
        if m.shape != base.shape[:2]:
            raise InputError(f"a mask of shape {m.shape} does not match the image {base.shape[:2]}.")
        c = _color_255(color)
        out[m] = (1.0 - alpha) * out[m] + alpha * c
        if outline:
            out[_mask_outline(m)] = c
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def physical_size(shape: Tuple[int, int], spacing: Tuple[float, float]) -> Tuple[int, int]:
    """``(height, width)`` in pixels showing a slice to scale: the finer spacing is kept."""
    rows, cols = int(shape[0]), int(shape[1])
    row_mm, col_mm = float(spacing[0]), float(spacing[1])
    pixel = min(row_mm, col_mm)
    return (max(1, int(round(rows * row_mm / pixel))), max(1, int(round(cols * col_mm / pixel))))


def save_png(path: Union[str, "os.PathLike[str]"], rgb: np.ndarray, spacing: Optional[Tuple[float, float]] = None) -> str:
    """Write an ``(H, W, 3)`` or ``(H, W)`` uint8 image as PNG; returns the path.

    With ``spacing=(row_mm, column_mm)`` the picture is stretched to physical
    proportions for viewing (bilinear); the model path never does this.
    """
    from PIL import Image

    image = np.asarray(rgb)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise InputError(f"save_png needs an (H, W, 3) or (H, W) uint8 image, got {image.shape} {image.dtype}.")
    picture = Image.fromarray(np.ascontiguousarray(image))
    if spacing is not None:
        height, width = physical_size(image.shape[:2], spacing)
        if (height, width) != image.shape[:2]:
            picture = picture.resize((width, height), Image.BILINEAR)
    path = os.fspath(path)
    try:
        picture.save(path, format="PNG")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot write the PNG {path}: {exc}") from None
    return path
