"""Windowing, RGB, PNG overlays, and the three CTChest4 pictures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from MultiTurnSegLib.errors import InputError
from MultiTurnSegLib.imaging import (
    AXES,
    WINDOW_PRESETS,
    auto_window,
    num_slices,
    overlay,
    parse_window,
    read_volume,
    render_slice,
    save_png,
    slice_shape,
    slice_spacing,
    to_rgb,
    window_to_uint8,
)


@pytest.fixture(scope="module")
def ct(ct_chest_path):
    return read_volume(ct_chest_path)


def test_presets_are_the_documented_ones():
    assert WINDOW_PRESETS == {
        "ct-abdomen": (400.0, 40.0),
        "lung": (1500.0, -600.0),
        "brain": (80.0, 40.0),
        "bone": (1800.0, 400.0),
        "mediastinum": (350.0, 50.0),
    }


def test_window_maps_linearly_and_clips():
    values = np.array([[-1000.0, -160.0, 41.0, 240.0, 3000.0, np.nan]])
    u8 = window_to_uint8(values, "ct-abdomen")
    assert u8.dtype == np.uint8
    assert u8.tolist() == [[0, 0, 128, 255, 255, 0]]
    assert window_to_uint8(values, (400, 40)).tolist() == u8.tolist()
    assert window_to_uint8(values, "400/40").tolist() == u8.tolist()
    assert parse_window(" Lung ") == (1500.0, -600.0)


def test_auto_window_uses_robust_percentiles():
    rng = np.random.default_rng(0)
    values = rng.normal(500, 50, size=(64, 64))
    values[0, 0] = 1e6  # an outlier must not flatten the picture
    u8 = window_to_uint8(values, "auto")
    assert 100 < u8.mean() < 155
    assert (u8 == 255).mean() < 0.01 and (u8 == 0).mean() < 0.01
    width, level = auto_window(values)
    assert 200 < width < 400 and 480 < level < 520
    assert window_to_uint8(np.full((3, 3), 7.0), "auto").tolist() == [[0] * 3] * 3


@pytest.mark.parametrize("bad", ["liver", "400", "a/b", "0/40", (-1, 3), (1, 2, 3), None])
def test_bad_window(bad):
    with pytest.raises(InputError) as info:
        window_to_uint8(np.zeros((2, 2)), bad)
    if bad == "liver":
        message = str(info.value)
        for name in WINDOW_PRESETS:
            assert name in message
        assert "auto" in message and "WIDTH/LEVEL" in message


def test_to_rgb():
    u8 = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb(u8)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == u8).all() and (rgb[..., 2] == u8).all()
    with pytest.raises(InputError, match="uint8"):
        to_rgb(u8.astype(float))


def test_render_every_axis_of_ct(ct, tmp_path):
    for axis in AXES:
        index = num_slices(ct, axis) // 2
        rgb = render_slice(ct, axis, index, "lung")
        assert rgb.shape == slice_shape(ct, axis) + (3,) and rgb.dtype == np.uint8
        assert 20 < rgb.mean() < 235 and rgb.std() > 30  # a real picture, not blank
        path = save_png(tmp_path / f"{axis}.png", rgb, spacing=slice_spacing(ct, axis))
        with Image.open(path) as png:
            width, height = png.size
        row_mm, col_mm = slice_spacing(ct, axis)
        # to scale: height / width equals the physical proportion
        assert height / width == pytest.approx(rgb.shape[0] * row_mm / (rgb.shape[1] * col_mm), rel=0.02)
    assert render_slice(ct, "axial", 0).shape == (128, 128, 3)  # auto window by default


def test_overlay_and_png_round_trip(tmp_path):
    rgb = to_rgb(np.full((10, 12), 100, np.uint8))
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:9] = True
    out = overlay(rgb, [mask], [(1.0, 0.0, 0.0)], alpha=0.5, outline=False)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[5, 5].tolist() == [178, 50, 50]
    framed = overlay(rgb, [mask], [(0, 255, 0)], alpha=0.5)
    assert framed[2, 3].tolist() == [0, 255, 0]  # outline in full colour
    assert framed[5, 5].tolist() == [50, 178, 50]
    path = save_png(tmp_path / "o.png", out)
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), out)
    with pytest.raises(InputError, match="2 masks but 1 colours"):
        overlay(rgb, [mask, mask], [(1, 0, 0)])
    with pytest.raises(InputError, match="does not match"):
        overlay(rgb, [mask[:5]], [(1, 0, 0)])
    with pytest.raises(InputError, match="cannot write"):
        save_png(tmp_path / "no" / "such" / "dir.png", out)
