"""``.seg.nrrd``: Slicer's own files in, files Slicer (and slicerio) read back out."""

from __future__ import annotations

import re

import nrrd
import numpy as np
import pytest
import slicerio

from MultiTurnSegLib.errors import InputError, VolumeError
from MultiTurnSegLib.imaging import extract_mask, insert_mask, read_volume, slice_shape, volume_from_array
from MultiTurnSegLib.segmentation_io import (
    STATUS_TAG,
    TERMINOLOGY_TAG,
    Segment,
    Segmentation,
    check_geometry,
    labelmap_for_volume,
    read_seg_nrrd,
    volume_geometry,
    write_seg_nrrd,
)

NAMES = [
    "ribs",
    "cervical vertebral column",
    "thoracic vertebral column",
    "lumbar vertebral column",
    "right lung",
    "left lung",
    "tissue",
]


@pytest.fixture(scope="module")
def ct(ct_chest_path):
    return read_volume(ct_chest_path)


@pytest.fixture(scope="module")
def slicer_seg(slicer_segmentation_path):
    return read_seg_nrrd(slicer_segmentation_path)


@pytest.fixture(scope="module")
def overlapping(slicer_overlapping_segmentation_path):
    return read_seg_nrrd(slicer_overlapping_segmentation_path)


def _raw_segment_fields(path):
    header = nrrd.read_header(str(path))
    fields = {}
    for key, value in header.items():
        m = re.match(r"Segment(\d+)_(.+)", key)
        if m:
            fields.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return header, fields


def _slicerio_masks_kji(path):
    data = slicerio.read_segmentation(str(path))
    return data, {s["id"]: slicerio.segment_mask(data, s["id"]).transpose(2, 1, 0) for s in data["segments"]}


def test_read_slicer_file(slicer_seg, slicer_segmentation_path, ct):
    assert [s.name for s in slicer_seg.segments] == NAMES
    assert [s.id for s in slicer_seg.segments] == [f"Segment_{n}" for n in range(1, 8)]
    assert slicer_seg.shape == ct.shape
    check_geometry(slicer_seg, ct)
    _header, raw = _raw_segment_fields(slicer_segmentation_path)
    _data, masks = _slicerio_masks_kji(slicer_segmentation_path)
    for n, segment in enumerate(slicer_seg.segments):
        assert segment.color == pytest.approx(tuple(float(v) for v in raw[n]["Color"].split()))
        raw_tags = dict(t.split(":", 1) for t in raw[n]["Tags"].split("|") if t)
        assert segment.tags == raw_tags  # TerminologyEntry kept verbatim
        assert segment.layer == 0 and segment.label_value == n + 1
        assert segment.mask.dtype == bool and segment.mask.shape == ct.shape
        assert segment.mask.any()
        np.testing.assert_array_equal(segment.mask, masks[segment.id])
    assert "~SCT^113197003^Rib~" in slicer_seg.segments[0].terminology
    assert slicer_seg.segments[4].tags[TERMINOLOGY_TAG].startswith(
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^39607008^Lung~SCT^24028007^Right"
    )
    assert slicer_seg.segments[0].tags[STATUS_TAG] == "inprogress"
    assert slicer_seg.extra["masterRepresentation"] == "Binary labelmap"


def test_segments_lie_where_the_anatomy_is(slicer_seg, ct):
    """The right lung segment is on the image left of an axial slice (patient right), over air."""
    labelmap = np.zeros(ct.shape, np.uint8)
    labelmap[slicer_seg.get("right lung").mask] = 1
    labelmap[slicer_seg.get("left lung").mask] = 2
    right = extract_mask(labelmap, ct, "axial", 17, value=1)
    left = extract_mask(labelmap, ct, "axial", 17, value=2)
    cols = np.arange(right.shape[1])
    assert cols[right.any(axis=0)].mean() < right.shape[1] / 2 < cols[left.any(axis=0)].mean()
    assert ct.array[slicer_seg.get("right lung").mask].mean() < -500  # air-filled


def test_read_overlapping_layers(overlapping, slicer_overlapping_segmentation_path, ct):
    names = [s.name for s in overlapping.segments]
    assert names == NAMES + ["overlapping sphere"]
    sphere = overlapping.get("overlapping sphere")
    assert (sphere.layer, sphere.label_value) == (1, 1)
    assert sphere.tags[TERMINOLOGY_TAG].startswith("Segmentation category and type - DICOM master list~SCT^260787004^Physical object")
    check_geometry(overlapping, ct)
    counts = sum(s.mask.astype(np.int32) for s in overlapping.segments)
    assert counts.max() == 2  # voxels in two segments
    assert np.any(sphere.mask & overlapping.get("tissue").mask)
    _data, masks = _slicerio_masks_kji(slicer_overlapping_segmentation_path)
    for s in overlapping.segments:
        np.testing.assert_array_equal(s.mask, masks[s.id])


@pytest.mark.parametrize("which", ["slicer_seg", "overlapping"])
def test_write_reads_back_identically(which, request, tmp_path):
    original = request.getfixturevalue(which)
    path = tmp_path / "out.seg.nrrd"
    write_seg_nrrd(path, original)
    # slicerio's view
    data, masks = _slicerio_masks_kji(path)
    np.testing.assert_allclose(data["ijkToLPS"], original.ijk_to_lps)
    assert [s["name"] for s in data["segments"]] == [s.name for s in original.segments]
    for s, d in zip(original.segments, data["segments"]):
        assert d["id"] == s.id
        assert d["color"] == pytest.approx(list(s.color))
        assert d["status"] == s.tags[STATUS_TAG]
        assert slicerio.segmentation.terminology_entry_to_string(d["terminology"]) == s.tags[TERMINOLOGY_TAG]
        np.testing.assert_array_equal(masks[s.id], s.mask)
    # ours
    again = read_seg_nrrd(path)
    assert again.shape == original.shape
    for a, b in zip(original.segments, again.segments):
        assert (a.id, a.name, a.tags, a.layer, a.label_value) == (b.id, b.name, b.tags, b.layer, b.label_value)
        assert a.color == pytest.approx(b.color)
        assert (a.name_auto_generated, a.color_auto_generated) == (b.name_auto_generated, b.color_auto_generated)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert again.extra["conversionParameters"] == original.extra["conversionParameters"]


def test_written_header_has_slicer_fields(ct, tmp_path):
    seg = Segmentation.for_volume(ct)
    mask = np.zeros(ct.shape, bool)
    mask[10, 20:30, 40:50] = True
    seg.add_segment("R1 liver", mask, (0.9, 0.2, 0.1), tags={"MultiTurnSeg.Round": "1"})
    path = write_seg_nrrd(tmp_path / "h.seg.nrrd", seg)
    header, raw = _raw_segment_fields(path)
    assert header["space"] == "left-posterior-superior"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert header["dimension"] == 3 and list(header["sizes"]) == [128, 128, 34]
    fields = raw[0]
    assert {"ID", "Name", "Color", "Tags", "Extent", "Layer", "LabelValue", "NameAutoGenerated", "ColorAutoGenerated"} <= set(fields)
    assert fields["ID"] == "Segment_1" and fields["Name"] == "R1 liver"
    assert fields["Extent"] == "0 127 0 127 0 33"
    assert fields["Tags"] == "MultiTurnSeg.Round:1|"


def test_write_overlapping_segments_makes_layers(ct, tmp_path):
    seg = Segmentation.for_volume(ct)
    a = np.zeros(ct.shape, bool)
    a[5:15, 30:60, 30:60] = True
    b = np.zeros(ct.shape, bool)
    b[10:20, 50:80, 50:80] = True  # overlaps a
    c = np.zeros(ct.shape, bool)
    c[25:30, 0:10, 0:10] = True  # overlaps nothing
    for name, mask, color in (("a", a, (1, 0, 0)), ("b", b, (0, 1, 0)), ("c", c, (0, 0, 1))):
        seg.add_segment(name, mask, color)
    path = write_seg_nrrd(tmp_path / "ov.seg.nrrd", seg)
    assert [(s.layer, s.label_value) for s in seg.segments] == [(0, 1), (1, 1), (0, 2)]
    header = nrrd.read_header(str(path))
    assert header["dimension"] == 4 and header["kinds"] == ["list", "domain", "domain", "domain"]
    _data, masks = _slicerio_masks_kji(path)
    for s in seg.segments:
        np.testing.assert_array_equal(masks[s.id], s.mask)
    back = read_seg_nrrd(path)
    assert np.any(back.get("a").mask & back.get("b").mask)


def test_inconsistent_layout_is_repacked(ct, tmp_path):
    seg = Segmentation.for_volume(ct)
    a = np.zeros(ct.shape, bool)
    a[0, 0, :10] = True
    b = np.zeros(ct.shape, bool)
    b[0, 0, 5:20] = True
    seg.segments = [
        Segment("x", "x", (1, 0, 0), a, layer=0, label_value=1),
        Segment("y", "y", (0, 1, 0), b, layer=0, label_value=2),  # claims layer 0 but overlaps x
    ]
    write_seg_nrrd(tmp_path / "r.seg.nrrd", seg)
    back = read_seg_nrrd(tmp_path / "r.seg.nrrd")
    np.testing.assert_array_equal(back.get("x").mask, a)
    np.testing.assert_array_equal(back.get("y").mask, b)


def test_slice_mask_to_segment_and_back(ct, tmp_path):
    """A model mask on a coronal slice -> labelmap -> .seg.nrrd -> the same 2D mask."""
    rng = np.random.default_rng(3)
    mask2d = rng.random(slice_shape(ct, "coronal")) < 0.3
    labelmap = labelmap_for_volume(ct)
    insert_mask(labelmap, ct, "coronal", 70, mask2d)
    seg = Segmentation.for_volume(ct)
    seg.add_segment("R1 something", labelmap.astype(bool), (0.5, 0.5, 0.5))
    back = read_seg_nrrd(write_seg_nrrd(tmp_path / "m.seg.nrrd", seg))
    check_geometry(back, ct)
    np.testing.assert_array_equal(extract_mask(back.segments[0].mask, volume_geometry(back), "coronal", 70), mask2d)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "tags,message",
    [
        ({"bad:key": "v"}, r"tag name 'bad:key' is not allowed.*':' or '\|'"),
        ({"bad|key": "v"}, r"tag name 'bad\|key' is not allowed"),
        ({"": "v"}, "tag name '' is not allowed"),
        ({"Note": "a|b"}, r"value of tag 'Note' \('a\|b'\) is not allowed"),
        ({"Note": "line\nbreak"}, "value of tag 'Note'"),
    ],
)
def test_bad_tags_are_refused(ct, tmp_path, tags, message):
    seg = Segmentation.for_volume(ct)
    seg.add_segment("R1 liver", np.zeros(ct.shape, bool), (1, 0, 0), tags=tags)
    with pytest.raises(InputError, match=message):
        write_seg_nrrd(tmp_path / "t.seg.nrrd", seg)
    assert not (tmp_path / "t.seg.nrrd").exists()


def test_colon_in_tag_value_is_fine(ct, tmp_path):
    seg = Segmentation.for_volume(ct)
    seg.add_segment("s", np.zeros(ct.shape, bool), (1, 0, 0), tags={"Prompt": "segment: the liver"})
    back = read_seg_nrrd(write_seg_nrrd(tmp_path / "c.seg.nrrd", seg))
    assert back.segments[0].tags == {"Prompt": "segment: the liver"}
    assert not back.segments[0].mask.any()


def test_other_bad_segments(ct, tmp_path):
    seg = Segmentation.for_volume(ct)
    seg.add_segment("a", np.zeros(ct.shape, bool), (1, 0, 0), id="same")
    with pytest.raises(InputError, match="already exists"):
        seg.add_segment("b", np.zeros(ct.shape, bool), (1, 0, 0), id="same")
    seg.segments.append(Segment("same", "b", (1, 0, 0), np.zeros(ct.shape, bool)))
    with pytest.raises(InputError, match="unique; repeated: same"):
        write_seg_nrrd(tmp_path / "d.seg.nrrd", seg)
    seg.segments = [Segment("x", "x", (1.0, 2.0, 0.0), np.zeros(ct.shape, bool))]
    with pytest.raises(InputError, match=r"colour .* within 0\.\.1"):
        write_seg_nrrd(tmp_path / "d.seg.nrrd", seg)
    seg.segments = [Segment("x", "x", (1.0, 0.0, 0.0), np.zeros((2, 2, 2), bool))]
    with pytest.raises(InputError, match="mask shape"):
        write_seg_nrrd(tmp_path / "d.seg.nrrd", seg)
    with pytest.raises(InputError, match="mask shape"):
        seg.add_segment("y", np.zeros((2, 2, 2), bool), (1, 0, 0))


def test_mismatched_geometry_refused(slicer_seg, ct):
    shifted = volume_from_array(ct.array, ct.ijk_to_lps + np.pad(np.ones((3, 1)) * 5.0, ((0, 1), (3, 0))))
    with pytest.raises(InputError, match=r"does not match the volume.*placed differently"):
        check_geometry(slicer_seg, shifted)
    smaller = volume_from_array(ct.array[:10], ct.ijk_to_lps)
    with pytest.raises(InputError, match="grid sizes differ"):
        check_geometry(slicer_seg, smaller)


def test_unreadable_segmentation_files(tmp_path, ct_chest_path):
    with pytest.raises(VolumeError, match="no such segmentation file"):
        read_seg_nrrd(tmp_path / "none.seg.nrrd")
    bad = tmp_path / "bad.seg.nrrd"
    bad.write_text("not nrrd")
    with pytest.raises(VolumeError, match="not a readable .seg.nrrd"):
        read_seg_nrrd(bad)


def test_non_numeric_colour_is_refused(ct, tmp_path):
    seg = Segmentation(ijk_to_lps=ct.ijk_to_lps, shape=ct.shape)
    seg.segments = [Segment("x", "x", ("red", 0, 0), np.zeros(ct.shape, bool))]
    with pytest.raises(InputError, match=r"colour .* within 0\.\.1"):
        write_seg_nrrd(tmp_path / "c.seg.nrrd", seg)


def test_failed_write_keeps_the_existing_file(ct, tmp_path, monkeypatch):
    import os

    path = tmp_path / "keep.seg.nrrd"
    seg = Segmentation.for_volume(ct)
    seg.add_segment("R1 肝脏", np.zeros(ct.shape, bool), (1, 0, 0))
    write_seg_nrrd(path, seg)
    before = path.read_bytes()

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    seg.segments[0].name = "R1 liver"
    with pytest.raises(InputError, match="cannot write the segmentation"):
        write_seg_nrrd(path, seg)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.seg.nrrd"]  # no temporary file left
