"""``.seg.nrrd`` with non-ASCII (Chinese) segment names and tags.

Slicer stores header text as UTF-8; pynrrd (under slicerio) writes ASCII only
and drops non-ASCII bytes when reading. Our reader/writer must keep every
character, leave the data untouched and leave all-ASCII files exactly as
slicerio writes them.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import slicerio

from MultiTurnSegLib.errors import InputError
from MultiTurnSegLib.segmentation_io import STATUS_TAG, Segmentation, read_seg_nrrd, write_seg_nrrd

NAMES = ["R1 肝脏", "R2 左肾内的病灶"]
TAGS = [
    {STATUS_TAG: "inprogress", "MultiTurnSeg.Prompt": "分割肝脏", "来源": "第1轮"},
    {"MultiTurnSeg.Prompt": "segment the lesion in 左肾, 直径 > 2 cm (第2轮)", "Note": "plain ascii"},
]


def _segmentation(overlap: bool = False) -> Segmentation:
    seg = Segmentation(ijk_to_lps=np.diag([0.8, 0.8, 2.5, 1.0]) + np.array([[0, 0, 0, -10], [0, 0, 0, 20], [0, 0, 0, 5], [0, 0, 0, 0]]), shape=(4, 5, 6))
    a = np.zeros(seg.shape, dtype=bool)
    a[1:3, 1:4, 2:5] = True
    b = np.zeros(seg.shape, dtype=bool)
    b[2:4, 0:1, 0:3] = True
    if overlap:
        b[1, 1, 2] = True  # overlaps a -> second layer (4D file)
    seg.add_segment(NAMES[0], a, (0.8, 0.2, 0.2), tags=TAGS[0])
    seg.add_segment(NAMES[1], b, (0.2, 0.6, 0.9), tags=TAGS[1], id="病灶_1")
    return seg


def _header_and_data(path):
    content = path.read_bytes()
    end = content.index(b"\n\n")
    return content[:end], content[end:]


def _drop_timestamp(content: bytes) -> bytes:
    # pynrrd writes "# on <UTC time>(GMT)." -- the only part that may differ between two writes
    return re.sub(rb"# on [^\n]*\(GMT\)\.\n", b"", content, count=1)


@pytest.mark.parametrize("overlap", [False, True])
def test_round_trip_keeps_every_character(tmp_path, overlap):
    seg = _segmentation(overlap)
    path = tmp_path / "unicode.seg.nrrd"
    write_seg_nrrd(path, seg)
    back = read_seg_nrrd(path)
    assert [s.name for s in back.segments] == NAMES
    assert [s.id for s in back.segments] == ["Segment_1", "病灶_1"]
    for original, read in zip(seg.segments, back.segments):
        assert read.tags == original.tags
        np.testing.assert_array_equal(read.mask, original.mask)
        assert read.color == pytest.approx(original.color)
    assert back.get("R2 左肾内的病灶").id == "病灶_1"
    np.testing.assert_allclose(back.ijk_to_lps, seg.ijk_to_lps)
    assert max(s.layer for s in back.segments) == (1 if overlap else 0)


def test_header_holds_utf8_and_data_is_slicerio_readable(tmp_path):
    seg = _segmentation()
    path = tmp_path / "unicode.seg.nrrd"
    write_seg_nrrd(path, seg)
    header, _ = _header_and_data(path)
    assert "Segment0_Name:=R1 肝脏\n".encode("utf-8") in header
    assert "Segment1_Name:=R2 左肾内的病灶\n".encode("utf-8") in header
    assert "Segment1_ID:=病灶_1\n".encode("utf-8") in header
    assert "MultiTurnSeg.Prompt:segment the lesion in 左肾, 直径 > 2 cm (第2轮)|".encode("utf-8") in header
    assert "来源:第1轮|".encode("utf-8") in header
    assert b"MTSU8" not in header  # no placeholder left behind

    # slicerio/pynrrd alone still parse the file: names lose their Chinese characters there
    # (their limitation) but voxels and geometry are the same.
    raw = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in raw["segments"]] == ["R1", "R2"]
    back = read_seg_nrrd(path)
    np.testing.assert_allclose(raw["ijkToLPS"], back.ijk_to_lps)
    for segment in back.segments:
        info = next(s for s in raw["segments"] if s["labelValue"] == segment.label_value)
        np.testing.assert_array_equal(raw["voxels"].transpose(2, 1, 0) == info["labelValue"], segment.mask)


def test_hand_edited_utf8_header_reads_correctly(tmp_path):
    """A file as Slicer writes it: UTF-8 bytes put into an ASCII header by hand."""
    seg = _segmentation()
    seg.segments[0].name, seg.segments[1].name = "liver", "lesion"
    seg.segments[0].tags = {"Prompt": "PROMPT0"}
    seg.segments[1].id = "Segment_2"
    seg.segments[1].tags = {}
    path = tmp_path / "ascii.seg.nrrd"
    write_seg_nrrd(path, seg)
    header, data = _header_and_data(path)
    header = header.replace(b"Segment0_Name:=liver\n", "Segment0_Name:=肝脏 liver\n".encode("utf-8"))
    header = header.replace(b"Prompt:PROMPT0|", "Prompt:请分割肝脏（含血管）|".encode("utf-8"))
    header = header.replace(b"Segment1_Name:=lesion\n", "Segment1_Name:=左肾病灶\n".encode("utf-8"))
    edited = tmp_path / "edited.seg.nrrd"
    edited.write_bytes(header + data)

    back = read_seg_nrrd(edited)
    assert [s.name for s in back.segments] == ["肝脏 liver", "左肾病灶"]
    assert back.segments[0].tags == {"Prompt": "请分割肝脏（含血管）"}
    for original, read in zip(seg.segments, back.segments):
        np.testing.assert_array_equal(read.mask, original.mask)


def test_header_that_is_not_utf8_is_a_clear_error(tmp_path):
    seg = _segmentation()
    seg.segments[0].name = "liver"
    path = tmp_path / "ascii.seg.nrrd"
    write_seg_nrrd(path, seg)
    header, data = _header_and_data(path)
    gbk = tmp_path / "gbk.seg.nrrd"
    gbk.write_bytes(header.replace(b"Segment0_Name:=liver", b"Segment0_Name:=" + "肝脏".encode("gbk")) + data)
    with pytest.raises(InputError, match="not UTF-8"):
        read_seg_nrrd(gbk)
    # a non-UTF-8 comment is ignored like any comment
    commented = tmp_path / "comment.seg.nrrd"
    commented.write_bytes(header.replace(b"\n", b"\n# \xe9t\xe9\n", 1) + data)
    assert [s.name for s in read_seg_nrrd(commented).segments] == ["liver", NAMES[1]]


def _ascii_segmentation(overlap: bool) -> Segmentation:
    seg = _segmentation(overlap)
    for index, segment in enumerate(seg.segments):
        segment.id = f"Segment_{index + 1}"
        segment.name = f"R{index + 1} liver"
        segment.tags = {STATUS_TAG: "completed", "MultiTurnSeg.Prompt": "segment the liver"}
    seg.extra["MultiTurnSeg_Note"] = "ascii only"
    return seg


def _ours_and_slicerio_direct(tmp_path, monkeypatch, seg):
    """Write ``seg`` with write_seg_nrrd, capturing the dict it hands slicerio,
    and write that dict with slicerio directly too. Returns (ours, direct, dict)."""
    passed = []
    real_write = slicerio.write_segmentation

    def spy(file, segmentation, **kwargs):
        passed.append((copy.deepcopy(segmentation), kwargs))
        return real_write(file, segmentation, **kwargs)

    monkeypatch.setattr(slicerio, "write_segmentation", spy)
    ours = tmp_path / "ours.seg.nrrd"
    write_seg_nrrd(ours, seg)
    monkeypatch.undo()
    (out, kwargs), = passed
    direct = tmp_path / "direct.seg.nrrd"
    slicerio.write_segmentation(str(direct), out, **kwargs)
    return ours, direct, out


@pytest.mark.parametrize("overlap", [False, True])
def test_ascii_files_are_exactly_what_slicerio_writes(tmp_path, monkeypatch, overlap):
    ours, direct, out = _ours_and_slicerio_direct(tmp_path, monkeypatch, _ascii_segmentation(overlap))
    assert [s["name"] for s in out["segments"]] == ["R1 liver", "R2 liver"]  # no placeholders
    assert _drop_timestamp(ours.read_bytes()) == _drop_timestamp(direct.read_bytes())


def test_slicer_file_rewritten_unchanged_vs_slicerio(tmp_path, monkeypatch, slicer_segmentation_path):
    """An all-ASCII file from Slicer: our write equals slicerio's write of the same dict."""
    seg = read_seg_nrrd(slicer_segmentation_path)
    ours, direct, _out = _ours_and_slicerio_direct(tmp_path, monkeypatch, seg)
    assert _drop_timestamp(ours.read_bytes()) == _drop_timestamp(direct.read_bytes())
    assert [s.name for s in read_seg_nrrd(ours).segments] == [s.name for s in seg.segments]
