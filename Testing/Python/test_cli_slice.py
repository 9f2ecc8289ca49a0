"""``multiturnseg slice``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from MultiTurnSegLib.cli import main


def test_slice_writes_png(ct_chest_path, tmp_path, capsys):
    out = tmp_path / "axial.png"
    assert main(["slice", str(ct_chest_path), "--axis", "axial", "--index", "17", "--window", "ct-abdomen", "-o", str(out)]) == 0
    with Image.open(out) as png:
        assert png.size == (128, 128) and png.mode == "RGB"
    assert "axial slice 17 of 0..33" in capsys.readouterr().out


def test_slice_coronal_to_scale_and_voxel_grid(ct_chest_path, tmp_path):
    scaled, grid = tmp_path / "c.png", tmp_path / "g.png"
    assert main(["slice", str(ct_chest_path), "--axis", "coronal", "--index", "64", "--window", "1500/-600", "-o", str(scaled)]) == 0
    assert main(["slice", str(ct_chest_path), "--axis", "coronal", "--index", "64", "-o", str(grid), "--voxel-grid"]) == 0
    with Image.open(scaled) as a, Image.open(grid) as b:
        assert b.size == (128, 34)
        assert a.size == (128, round(34 * 10.0 / 3.046875954))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--axis", "oblique"], "unknown slice axis 'oblique'; use one of: axial, coronal, sagittal"),
        (["--index", "34"], "valid indices are 0..33"),
        (["--window", "liver"], "unknown window preset 'liver'"),
    ],
)
def test_slice_errors_are_messages(ct_chest_path, tmp_path, capsys, extra, message):
    code = main(["slice", str(ct_chest_path), "-o", str(tmp_path / "x.png")] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("multiturnseg slice: error:")


def test_slice_missing_file_in_a_subprocess(tmp_path):
    """The installed command: message on stderr, no traceback, non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "MultiTurnSegLib", "slice", str(tmp_path / "missing.nrrd"), "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
