"""DICOM-SEG export: a real CT series (from slicerio's CTChest4), masks on it,
export, then read back with highdicom and with dcmqi (what Slicer uses)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
sitk = pytest.importorskip("SimpleITK")

from MultiTurnSegLib import __version__  # noqa: E402
from MultiTurnSegLib.errors import ExportError  # noqa: E402
from MultiTurnSegLib.export import dicom_seg  # noqa: E402
from MultiTurnSegLib.export.dicom_seg import match_grid, read_dicom_series, write_dicom_seg  # noqa: E402

try:
    from MultiTurnSegLib.segmentation_io import Segmentation
except ImportError:  # pragma: no cover - other engineer's module absent
    Segmentation = None


# --------------------------------------------------------------------------- the CT series


def make_ct_series(ct_path: Path, folder: Path, seed: int = 7) -> dict:
    """Write CTChest4 as a CT DICOM series (standard axial orientation, shuffled
    random file names, instance numbers running against position). Returns
    the series grid (shape, ijk_to_lps) and the file of each slice."""
    image = sitk.ReadImage(str(ct_path))
    array = sitk.GetArrayFromImage(image)  # [k, j, i]
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # CTChest4 runs i towards R and j towards A (direction diag(-1,-1,1)); write the
    # series the usual way (rows towards L, columns towards P): flip i and j.
    assert np.allclose(direction, np.diag([-1, -1, 1]), atol=1e-6)
    nk, nj, ni = array.shape
    std = array[:, ::-1, ::-1]
    origin_std = origin + direction @ (np.array([ni - 1, nj - 1, 0]) * spacing)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, for_uid = (pydicom.uid.generate_uid() for _ in range(3))
    rng = random.Random(seed)
    intercept = -1024
    files = []
    for k in range(nk):
        ipp = origin_std + np.array([0.0, 0.0, k * spacing[2]])
        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds = pydicom.dataset.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = "ACC123"
        ds.Modality = "CT"
        ds.Manufacturer = "TestScanner"
        ds.ReferringPhysicianName = ""
        ds.PatientName = "Chest^Test"
        ds.PatientID = "MTS0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.SeriesDescription = "CT chest"
        ds.InstanceNumber = nk - k  # against the position order on purpose
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{ipp[2]:.6f}"
        ds.PixelSpacing = [f"{spacing[1]:.10g}", f"{spacing[0]:.10g}"]  # row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:.10g}"
        ds.KVP = "120"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(intercept), "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = (std[k].astype(np.int32) - intercept).astype(np.int16).tobytes()
        name = folder / f"{uuid.UUID(int=rng.getrandbits(128)).hex}.dcm"
        ds.save_as(str(name), enforce_file_format=True)
        files.append(name)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(spacing)
    matrix[:3, 3] = origin_std
    return {
        "shape": (nk, nj, ni),
        "ijk_to_lps": matrix,
        "files": files,  # in slice (k) order
        "series_uid": series_uid,
        "native_ijk_to_lps": np.vstack([np.hstack([direction @ np.diag(spacing), origin[:, None]]), [0, 0, 0, 1]]),
        "hu": std.astype(np.int32),
    }


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory, ct_chest_path):
    folder = tmp_path_factory.mktemp("ct") / "series"
    return {"folder": folder, **make_ct_series(ct_chest_path, folder)}


class _Seg:
    """A minimal stand-in with segmentation_io.Segmentation's attributes."""

    def __init__(self, ijk_to_lps, shape, segments):
        self.ijk_to_lps, self.shape, self.segments = np.asarray(ijk_to_lps, float), tuple(shape), segments


class _Segment:
    def __init__(self, id, name, color, mask, tags=None):
        self.id, self.name, self.color, self.mask, self.tags = id, name, color, mask, tags or {}


def make_masks(shape, seed=0):
    """Named test masks [k, j, i]: overlap, Chinese name, unknown structure, one empty."""
    nk, nj, ni = shape
    rng = np.random.default_rng(seed)
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    liver = ((kk - 15) / 8.0) ** 2 + ((jj - 70) / 25.0) ** 2 + ((ii - 40) / 20.0) ** 2 <= 1.0
    lesion = np.zeros(shape, bool)
    lesion[12:18, 60:75, 35:50] = True  # overlaps "liver"
    lesion &= rng.random(shape) < 0.7
    chinese = ((kk - 20) / 6.0) ** 2 + ((jj - 50) / 15.0) ** 2 + ((ii - 90) / 12.0) ** 2 <= 1.0
    unknown = np.zeros(shape, bool)
    unknown[0, 0:5, 0:3] = True  # first slice, corner
    unknown[nk - 1, nj - 4:, ni - 6:] = True  # last slice, opposite corner
    unknown[7, 100, 3] = True
    kidney = np.zeros(shape, bool)
    kidney[25:31, 80:95, 95:110] = rng.random((6, 15, 15)) < 0.5
    empty = np.zeros(shape, bool)
    return [
        ("Segment_1", "R1 liver", (0.87, 0.51, 0.40), liver),
        ("Segment_2", "R2 lesion inside round 1", (0.95, 0.2, 0.2), lesion),
        ("Segment_3", "肝脏", (0.2, 0.8, 0.3), chinese),
        ("Segment_4", "R4 the blob near the corner", (0.3, 0.3, 0.9), unknown),
        ("Segment_5", "R5 kidney left", (0.9, 0.9, 0.1), kidney),
        ("Segment_6", "R6 nothing here", (0.5, 0.5, 0.5), empty),
    ]


def make_segmentation(ijk_to_lps, shape, masks):
    if Segmentation is not None:
        seg = Segmentation(ijk_to_lps=np.asarray(ijk_to_lps, float), shape=shape)
        for sid, name, color, mask in masks:
            seg.add_segment(name, mask, color, id=sid)
        return seg
    return _Seg(ijk_to_lps, shape, [_Segment(*m) for m in masks])


def frames_to_volume(seg_ds, shape, ijk_to_lps):
    """Rebuild {segment number: [k, j, i] mask} from the SEG's frames and their
    ImagePositionPatient; also return {k: referenced SOPInstanceUID}."""
    inv = np.linalg.inv(ijk_to_lps)
    pixels = seg_ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    out = {}
    refs = {}
    for f, frame in enumerate(seg_ds.PerFrameFunctionalGroupsSequence):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        ijk = inv @ np.append(ipp, 1.0)
        assert np.allclose(ijk[:2], 0, atol=1e-3) and abs(ijk[2] - round(ijk[2])) < 1e-3, ijk
        k = int(round(ijk[2]))
        vol = out.setdefault(number, np.zeros(shape, bool))
        vol[k] |= pixels[f].astype(bool)
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        refs.setdefault(k, set()).add(str(src))
    return out, refs


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def exported(ct_series, tmp_path_factory):
    """The series re-read by MultiTurnSeg's own reader (as a chat would), masks on it, exported."""
    from MultiTurnSegLib.imaging import read_volume

    volume = read_volume(ct_series["folder"])
    assert volume.shape == ct_series["shape"]
    assert np.allclose(volume.ijk_to_lps, ct_series["ijk_to_lps"], atol=1e-4)
    assert np.array_equal(volume.array, ct_series["hu"])
    masks = make_masks(volume.shape)
    seg = make_segmentation(volume.ijk_to_lps, volume.shape, masks)
    out = tmp_path_factory.mktemp("seg") / "seg.dcm"
    result = write_dicom_seg(seg, ct_series["folder"], out, content_creator_name="Reader^Radiology")
    return {"result": result, "masks": masks, "path": out, "volume": volume}


def test_series_reader_sorts_by_position(ct_series):
    series = read_dicom_series(ct_series["folder"])
    assert series.shape == ct_series["shape"]
    assert np.allclose(series.ijk_to_lps, ct_series["ijk_to_lps"], atol=1e-4)
    assert [p.name for p in series.files] == [p.name for p in ct_series["files"]]
    # file names are random: their sorted order is not the slice order
    assert sorted(p.name for p in series.files) != [p.name for p in series.files]


def test_highdicom_readback_voxel_exact(exported, ct_series):
    result, masks = exported["result"], exported["masks"]
    assert [s.label for s in result.segments] == [m[1] for m in masks[:5]]
    assert result.skipped == ["R6 nothing here"]
    assert any("R6 nothing here" in w for w in result.warnings)

    seg = hd.seg.segread(str(exported["path"]))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.Modality == "SEG"
    assert seg.ContentCreatorName == "Reader^Radiology"
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert seg.FrameOfReferenceUID == pydicom.dcmread(str(ct_series["files"][0])).FrameOfReferenceUID
    assert seg.SeriesInstanceUID != ct_series["series_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series["series_uid"]

    descs = seg.SegmentSequence
    assert [d.SegmentLabel for d in descs] == [m[1] for m in masks[:5]]
    for d in descs:
        assert d.SegmentAlgorithmType == "SEMIAUTOMATIC"
        assert d.SegmentAlgorithmName == "MediRound"
        algo = d.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "MediRound" and algo.AlgorithmVersion == __version__
        assert len(d.RecommendedDisplayCIELabValue) == 3
    codes = [
        (d.SegmentedPropertyCategoryCodeSequence[0].CodeValue, d.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        for d in descs
    ]
    assert codes[0] == ("123037004", "10200004")  # liver
    assert codes[1] == ("49755003", "52988006")  # lesion
    assert codes[2] == ("123037004", "10200004")  # 肝脏
    assert codes[3] == ("85756007", "85756007")  # unknown: generic tissue, label kept
    assert codes[4] == ("123037004", "64033007")  # kidney ...
    mod = descs[4].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (mod.CodingSchemeDesignator, mod.CodeValue, mod.CodeMeaning) == ("SCT", "7771000", "Left")
    # colours: CIELab of the segment's RGB, round-tripping to about the same RGB
    rgb = hd.color.CIELabColor.from_dicom_value(descs[0].RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(np.array(rgb) / 255.0, masks[0][2], atol=0.02)

    volume = exported["volume"]
    rebuilt, refs = frames_to_volume(seg, volume.shape, volume.ijk_to_lps)
    for number, (_, name, _, mask) in enumerate(masks[:5], start=1):
        assert np.array_equal(rebuilt[number], mask), name
    # empty frames omitted: one frame per (segment, non-empty slice)
    expected_frames = sum(int(m[3].reshape(m[3].shape[0], -1).any(axis=1).sum()) for m in masks[:5])
    assert int(seg.NumberOfFrames) == expected_frames
    # each frame references the instance at its position (not the file order)
    uid_at = {k: str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for k, f in enumerate(ct_series["files"])}
    for k, uids in refs.items():
        assert uids == {uid_at[k]}


def test_highdicom_get_volume_matches(exported):
    """highdicom's own geometry reconstruction (get_volume) puts the same voxels in the same places."""
    seg = hd.seg.segread(str(exported["path"]))
    vol = exported["volume"]
    hv = seg.get_volume(combine_segments=False)
    arr = hv.array  # (slices, rows, cols, segments) on the frames' extent, highdicom's axis order
    m = np.linalg.inv(vol.ijk_to_lps) @ hv.affine  # highdicom index -> our (i, j, k)
    assert np.allclose(np.abs(m[:3, :3]).sum(axis=0), 1, atol=1e-4)  # a signed permutation
    assert np.allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-4)
    assert np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-3)
    idx = np.indices(arr.shape[:3]).reshape(3, -1)
    ijk = np.round(m[:3, :3] @ idx + m[:3, 3:4]).astype(int)
    for n, (_, name, _, mask) in enumerate(exported["masks"][:5]):
        rebuilt = np.zeros(mask.shape, bool)
        rebuilt[ijk[2], ijk[1], ijk[0]] = arr[..., n].reshape(-1).astype(bool)
        assert np.array_equal(rebuilt, mask), name


def _segimage2itkimage():
    exe = shutil.which("segimage2itkimage") or str(Path(sys.executable).parent / "segimage2itkimage")
    return exe if Path(exe).exists() else None


@pytest.mark.slow
def test_dcmqi_readback_same_masks_same_geometry(exported, tmp_path):
    exe = _segimage2itkimage()
    if exe is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi)")
    out = tmp_path / "dcmqi"
    out.mkdir()
    proc = subprocess.run(
        [exe, "--inputDICOM", str(exported["path"]), "--outputDirectory", str(out), "--prefix", "seg", "-t", "nrrd"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((out / "seg-meta.json").read_text(encoding="utf-8"))
    attrs = [a for group in meta["segmentAttributes"] for a in group]
    assert [a["SegmentLabel"] for a in attrs] == [m[1] for m in exported["masks"][:5]]
    assert attrs[4]["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == "7771000"
    assert attrs[0]["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "10200004"
    assert attrs[0]["SegmentAlgorithmType"] == "SEMIAUTOMATIC"
    assert attrs[0]["SegmentAlgorithmName"] == "MediRound"

    vol = exported["volume"]
    spacing = np.linalg.norm(vol.ijk_to_lps[:3, :3], axis=0)
    direction = (vol.ijk_to_lps[:3, :3] / spacing).flatten()
    for n, (_, name, _, mask) in enumerate(exported["masks"][:5], start=1):
        img = sitk.ReadImage(str(out / f"seg-{n}.nrrd"))
        assert np.allclose(img.GetSpacing(), spacing, atol=1e-4), name
        assert np.allclose(img.GetDirection(), direction, atol=1e-5), name
        assert np.allclose(img.GetOrigin(), vol.ijk_to_lps[:3, 3], atol=1e-3), (name, img.GetOrigin())
        arr = sitk.GetArrayFromImage(img)
        assert arr.shape == mask.shape, name
        assert np.array_equal(arr > 0, mask), name


def test_native_flipped_grid_exports_same_voxels(ct_series, tmp_path):
    """A segmentation on CTChest4's own grid (i to the right, j to the front)
    covers the same voxels as the series; it is exported flipped into place."""
    nk, nj, ni = ct_series["shape"]
    masks = make_masks(ct_series["shape"], seed=3)[:2]
    native = [(sid, name, color, m[:, ::-1, ::-1].copy()) for sid, name, color, m in masks]
    seg = make_segmentation(ct_series["native_ijk_to_lps"], ct_series["shape"], native)
    out = tmp_path / "flipped.dcm"
    write_dicom_seg(seg, ct_series["folder"], out)
    ds = hd.seg.segread(str(out))
    rebuilt, _ = frames_to_volume(ds, ct_series["shape"], ct_series["ijk_to_lps"])
    for n, (_, name, _, mask) in enumerate(masks, start=1):
        assert np.array_equal(rebuilt[n], mask), name


def test_grid_mapping_axis_permutation(ct_series):
    series = read_dicom_series(ct_series["folder"])
    a = ct_series["ijk_to_lps"]
    nk, nj, ni = ct_series["shape"]
    # a grid whose i runs along the series' slices backwards, k along columns
    perm = np.eye(4)
    perm[:3, :3] = a[:3, :3][:, [2, 1, 0]] * np.array([-1, 1, 1])
    perm[:3, 3] = a[:3, 3] + a[:3, 2] * (nk - 1)
    mapping = match_grid((ni, nj, nk), perm, series)
    assert mapping.axis == (2, 1, 0) and mapping.flip == (True, False, False)
    rng = np.random.default_rng(1)
    series_mask = rng.random((nk, nj, ni)) < 0.1
    # the same voxels indexed on the permuted grid: [k'=i, j, i'=nk-1-k]
    permuted = np.transpose(series_mask[::-1], (2, 1, 0))
    assert np.array_equal(mapping.to_series(permuted), series_mask)


# --------------------------------------------------------------------------- errors


def test_error_not_a_dicom_folder(tmp_path, ct_chest_path):
    (tmp_path / "notes.txt").write_text("hello")
    shutil.copy(ct_chest_path, tmp_path / "ct.nrrd")
    seg = _Seg(np.eye(4), (2, 2, 2), [_Segment("s", "liver", (1, 0, 0), np.ones((2, 2, 2), bool))])
    with pytest.raises(ExportError, match="not a DICOM series"):
        write_dicom_seg(seg, tmp_path, tmp_path / "out.dcm")
    with pytest.raises(ExportError, match="no such folder"):
        write_dicom_seg(seg, tmp_path / "missing", tmp_path / "out.dcm")
    with pytest.raises(ExportError, match="is a file"):
        write_dicom_seg(seg, tmp_path / "ct.nrrd", tmp_path / "out.dcm")


def _one_segment(ijk_to_lps, shape):
    mask = np.zeros(shape, bool)
    mask[1, 2, 3] = True
    return _Seg(ijk_to_lps, shape, [_Segment("s", "liver", (1, 0, 0), mask)])


@pytest.mark.parametrize(
    "change, word",
    [
        ("size", "size differs"),
        ("spacing", "spacing differs"),
        ("origin", "origin differs"),
        ("orientation", "orientation differs"),
    ],
)
def test_error_geometry_mismatch_says_which(ct_series, tmp_path, change, word):
    a = ct_series["ijk_to_lps"].copy()
    shape = ct_series["shape"]
    if change == "size":
        shape = (shape[0] - 1, shape[1], shape[2])
    elif change == "spacing":
        a[:3, 0] *= 1.1
    elif change == "origin":
        a[:3, 3] += np.array([1.5, 0, 0])
    elif change == "orientation":
        c, s = np.cos(0.3), np.sin(0.3)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        a[:3, :3] = rot @ a[:3, :3]
    with pytest.raises(ExportError, match=word):
        write_dicom_seg(_one_segment(a, shape), ct_series["folder"], tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_error_all_segments_empty(ct_series, tmp_path, caplog):
    shape = ct_series["shape"]
    seg = _Seg(
        ct_series["ijk_to_lps"], shape,
        [_Segment("a", "R1 liver", (1, 0, 0), np.zeros(shape, bool)), _Segment("b", "R2 spleen", (0, 1, 0), np.zeros(shape, bool))],
    )
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ExportError, match="every segment is empty"):
            write_dicom_seg(seg, ct_series["folder"], tmp_path / "x.dcm")
    assert "R1 liver" in caplog.text


def test_error_multiple_series_needs_choice(ct_series, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(ct_series["folder"], both / "a")
    for f in ct_series["files"][:5]:
        ds = pydicom.dcmread(str(both / "a" / f.name))
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(str(both / f"other_{f.name}"))
    # the 34-slice series fits the segmentation's grid, the 5-slice one does not: chosen automatically
    series = read_dicom_series(both, prefer_shape=ct_series["shape"])
    assert series.series_uid == ct_series["series_uid"]
    with pytest.raises(ExportError, match="2 image series"):
        read_dicom_series(both)
    assert read_dicom_series(both, "1.2.3.4.5").shape[0] == 5
