"""Reading volumes (NRRD, NIfTI, DICOM series) and refusing what is not a scalar 3D volume."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from MultiTurnSegLib.errors import VolumeError
from MultiTurnSegLib.imaging import AXES, Volume, extract_slice, num_slices, read_volume, volume_from_array

sitk = pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def ct(ct_chest_path):
    return read_volume(ct_chest_path)


def _write_dicom_series(image, folder, series_uid, study_uid="1.2.826.0.1.3680043.8.498.1", reverse_files=False):
    """Write a 3D int16 SimpleITK image as a CT DICOM series, one file per slice."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    iop = "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    n = image.GetDepth()
    for z in range(n):
        sl = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in [
            ("0008|0060", "CT"),
            ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"),
            ("0008|0018", f"{series_uid}.{z + 1}"),
            ("0020|000d", study_uid),
            ("0020|000e", series_uid),
            ("0020|0013", str(z + 1)),
            ("0020|0032", "\\".join(f"{v:.10f}" for v in position)),
            ("0020|0037", iop),
            ("0018|0050", f"{image.GetSpacing()[2]:.10f}"),
            ("0010|0010", "Phantom^Test"),
        ]:
            sl.SetMetaData(tag, value)
        name = n - 1 - z if reverse_files else z
        writer.SetFileName(str(folder / f"slice{name:03d}.dcm"))
        writer.Execute(sl)


def _same_slices(a: Volume, b: Volume):
    for axis in AXES:
        assert num_slices(a, axis) == num_slices(b, axis)
        for index in (0, num_slices(a, axis) // 2, num_slices(a, axis) - 1):
            np.testing.assert_array_equal(extract_slice(a, axis, index), extract_slice(b, axis, index))


def test_read_nrrd_geometry(ct, ct_chest_path):
    assert ct.shape == (34, 128, 128)
    assert ct.size_ijk == (128, 128, 34)
    np.testing.assert_allclose(ct.spacing, (3.046875954, 3.046875954, 10.0), rtol=1e-6)
    np.testing.assert_allclose(ct.ijk_to_lps[:3, :3], np.diag([-3.04687595367432, -3.04687595367432, 10.0]), rtol=1e-9)
    np.testing.assert_allclose(ct.ijk_to_lps[:3, 3], [193.09599304199222, 216.39599609374994, -340.24999999999994])
    assert str(ct_chest_path) in ct.source
    image = ct.to_sitk()
    assert image.GetSize() == (128, 128, 34)
    np.testing.assert_allclose(image.GetOrigin(), ct.origin_lps)


def test_nifti_gives_same_slices(ct, tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct.to_sitk(), str(path))
    nii = read_volume(path)
    np.testing.assert_allclose(nii.ijk_to_lps, ct.ijk_to_lps, atol=1e-4)
    _same_slices(ct, nii)


def test_dicom_folder_gives_same_slices(ct, tmp_path):
    assert ct.array.min() >= -32768 and ct.array.max() <= 32767
    image = sitk.Cast(ct.to_sitk(), sitk.sitkInt16)
    _write_dicom_series(image, tmp_path / "dicom", "1.2.826.0.1.3680043.8.498.10", reverse_files=True)
    dcm = read_volume(tmp_path / "dicom")
    assert "DICOM series" in dcm.source and "1.2.826.0.1.3680043.8.498.10" not in dcm.source  # no UIDs
    np.testing.assert_allclose(dcm.ijk_to_lps, ct.ijk_to_lps, atol=1e-3)
    _same_slices(ct, dcm)
    # a single file of the series reads the whole series
    one = read_volume(tmp_path / "dicom" / "slice005.dcm")
    _same_slices(ct, one)


def test_dicom_folder_with_two_series_reads_the_largest(ct, tmp_path, caplog):
    image = sitk.Cast(ct.to_sitk(), sitk.sitkInt16)
    _write_dicom_series(image, tmp_path / "mixed", "1.2.826.0.1.3680043.8.498.21")
    small = image[:, :, :5]
    # other series: 5 slices, different file names
    (tmp_path / "tmp_small").mkdir()
    _write_dicom_series(small, tmp_path / "tmp_small", "1.2.826.0.1.3680043.8.498.22")
    for f in (tmp_path / "tmp_small").iterdir():
        f.rename(tmp_path / "mixed" / f"other_{f.name}")
    with caplog.at_level(logging.WARNING):
        vol = read_volume(tmp_path / "mixed")
    assert vol.shape == ct.shape
    assert "1 other series" in vol.source
    messages = [r.getMessage() for r in caplog.records]
    assert any("holds 2 series" in m and "(5 files)" in m for m in messages)
    # identifiers stay out of logs: neither UIDs nor the folder path
    assert not any(uid in m for m in messages for uid in ("498.21", "498.22", str(tmp_path)))


def test_volume_from_array_like_slicer(ct):
    # Slicer: arrayFromVolume + IJKToRAS converted to LPS
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.ijk_to_lps
    vol = volume_from_array(ct.array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras)
    np.testing.assert_allclose(vol.ijk_to_ras, ijk_to_ras)
    assert vol.array is ct.array or np.shares_memory(vol.array, ct.array)
    _same_slices(ct, vol)


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match=r"no such file.*NRRD.*NIfTI.*DICOM"):
        read_volume(tmp_path / "nothere.nrrd")


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.nrrd"
    bad.write_text("this is not an image\n")
    with pytest.raises(VolumeError, match=r"broken.nrrd.*(not a readable image|could not be read)"):
        read_volume(bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VolumeError, match="NRRD"):
        read_volume(text)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_volume(tmp_path)


def test_4d_image_refused(tmp_path):
    image = sitk.Image([4, 5, 6, 2], sitk.sitkInt16)
    path = tmp_path / "timeseries.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(VolumeError, match=r"4D|vector"):
        read_volume(path)
    with pytest.raises(VolumeError, match="4D"):
        volume_from_array(np.zeros((2, 6, 5, 4)), np.eye(4))


def test_rgb_volume_refused(tmp_path):
    image = sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3)
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(VolumeError, match=r"vector/colour image with 3 components.*scalar"):
        read_volume(path)


def test_2d_image_refused(tmp_path):
    path = tmp_path / "flat.png"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(path))
    with pytest.raises(VolumeError, match="2D image.*3D volume"):
        read_volume(path)
    with pytest.raises(VolumeError, match="2D image"):
        volume_from_array(np.zeros((8, 8)), np.eye(4))


def test_bad_matrix_refused():
    with pytest.raises(VolumeError, match="singular"):
        volume_from_array(np.zeros((2, 3, 4)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(VolumeError, match="4x4"):
        volume_from_array(np.zeros((2, 3, 4)), np.eye(2))
    with pytest.raises(VolumeError, match="numeric"):
        volume_from_array(np.array([[["a"]]]), np.eye(4))
