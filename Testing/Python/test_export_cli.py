"""``multiturnseg export`` on .seg.nrrd files (ours and Slicer's), and a real
conversation with the tiny MediRound model exported to DICOM-SEG."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
sitk = pytest.importorskip("SimpleITK")

from MultiTurnSegLib.cli import main  # noqa: E402
from MultiTurnSegLib.errors import ExportError  # noqa: E402
from MultiTurnSegLib.export import export_conversation_dicom_seg, terminology_entry_for  # noqa: E402
from test_export_dicom_seg import frames_to_volume, make_ct_series, make_masks  # noqa: E402


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory, ct_chest_path):
    folder = tmp_path_factory.mktemp("ctcli") / "series"
    return {"folder": folder, **make_ct_series(ct_chest_path, folder, seed=11)}


def test_cli_exports_our_seg_nrrd(ct_series, tmp_path, capsys):
    from MultiTurnSegLib.segmentation_io import Segmentation, read_seg_nrrd, write_seg_nrrd

    masks = make_masks(ct_series["shape"], seed=5)
    # segmentation_io cannot write non-ASCII names into .seg.nrrd yet (pynrrd writes ASCII headers);
    # the Chinese name is exported directly in test_export_dicom_seg.
    masks[2] = (masks[2][0], "R3 liver (gan zang)", masks[2][2], masks[2][3])
    seg = Segmentation(ijk_to_lps=ct_series["ijk_to_lps"], shape=ct_series["shape"])
    for sid, name, color, mask in masks:
        entry = terminology_entry_for(name)
        seg.add_segment(name, mask, color, tags={"TerminologyEntry": entry}, id=sid)
    # a hand-edited terminology wins over the name: this segment is called "R1 liver" but tagged spleen
    seg.segments[0].tags["TerminologyEntry"] = terminology_entry_for("spleen")
    path = tmp_path / "chat.seg.nrrd"
    write_seg_nrrd(path, seg)
    assert read_seg_nrrd(path).segments[2].name == "R3 liver (gan zang)"
    out = tmp_path / "chat_seg.dcm"
    rc = main(["export", str(path), "--dicom-series", str(ct_series["folder"]), "-o", str(out), "--creator", "Doe^Jane"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "R6 nothing here" in text and "warning" in text
    assert "Kidney, Left" in text
    ds = hd.seg.segread(str(out))
    assert [d.SegmentLabel for d in ds.SegmentSequence] == [m[1] for m in masks[:5]]
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"  # the tag: spleen
    assert ds.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # liver
    assert ds.ContentCreatorName == "Doe^Jane"
    rebuilt, _ = frames_to_volume(ds, ct_series["shape"], ct_series["ijk_to_lps"])
    for n, (_, name, _, mask) in enumerate(masks[:5], start=1):
        assert np.array_equal(rebuilt[n], mask), name


def test_cli_exports_slicer_written_seg_nrrd(ct_series, slicer_segmentation_path, tmp_path, capsys):
    """slicerio's Segmentation.seg.nrrd was saved by Slicer on CTChest4 (i to the right):
    its voxels are our series' voxels, flipped; its TerminologyEntry tags are Slicer's."""
    out = tmp_path / "slicer_seg.dcm"
    rc = main(["export", str(slicer_segmentation_path), "-d", str(ct_series["folder"]), "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    ds = hd.seg.segread(str(out))
    by_label = {d.SegmentLabel: d for d in ds.SegmentSequence}
    right = by_label["right lung"]
    assert right.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert right.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert by_label["ribs"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "113197003"
    # voxels: compare with the .seg.nrrd read on its own grid, flipped onto the series grid
    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    slicer_seg = read_seg_nrrd(slicer_segmentation_path)
    rebuilt, _ = frames_to_volume(ds, ct_series["shape"], ct_series["ijk_to_lps"])
    numbers = {d.SegmentLabel: int(d.SegmentNumber) for d in ds.SegmentSequence}
    for s in slicer_seg.segments:
        if not s.mask.any():
            continue
        assert np.array_equal(rebuilt[numbers[s.name]], s.mask[:, ::-1, ::-1]), s.name


def test_cli_errors_are_one_line(tmp_path, slicer_segmentation_path, capsys):
    (tmp_path / "readme.txt").write_text("not dicom")
    rc = main(["export", str(slicer_segmentation_path), "--dicom-series", str(tmp_path), "-o", str(tmp_path / "o.dcm")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "not a DICOM series" in err and "Traceback" not in err
    rc = main(["export", str(tmp_path / "missing.seg.nrrd"), "--dicom-series", str(tmp_path), "-o", str(tmp_path / "o.dcm")])
    assert rc == 2 and "no such segmentation file" in capsys.readouterr().err


def test_cli_geometry_mismatch(ct_series, tmp_path, capsys):
    from MultiTurnSegLib.segmentation_io import Segmentation, write_seg_nrrd

    a = ct_series["ijk_to_lps"].copy()
    a[:3, 3] += (0.0, 0.0, 5.0)  # half a slice off
    seg = Segmentation(ijk_to_lps=a, shape=ct_series["shape"])
    mask = np.zeros(ct_series["shape"], bool)
    mask[3, 4, 5] = True
    seg.add_segment("liver", mask, (1, 0, 0))
    write_seg_nrrd(tmp_path / "off.seg.nrrd", seg)
    rc = main(["export", str(tmp_path / "off.seg.nrrd"), "-d", str(ct_series["folder"]), "-o", str(tmp_path / "o.dcm")])
    assert rc == 2
    assert "origin differs" in capsys.readouterr().err


@pytest.mark.slow
def test_real_conversation_exported(ct_series, tiny_model_json, tmp_path):
    """Three turns with the tiny MediRound model on the CT series, exported as DICOM-SEG."""
    engine_mod = pytest.importorskip("MultiTurnSegLib.engine")
    from MultiTurnSegLib.backends.local import LocalBackend
    from MultiTurnSegLib.conversation import ChatSession, Conversation, conversation_segments
    from MultiTurnSegLib.imaging import read_volume, render_slice, slice_shape

    volume = read_volume(ct_series["folder"])
    axis, index, window = "axial", 17, (400.0, 40.0)
    image = render_slice(volume, axis, index, window)
    conv = Conversation(
        volume=str(ct_series["folder"]), axis=axis, slice_index=index,
        image_size=slice_shape(volume, axis), window=window,
    )
    backend = LocalBackend(engine_mod.MediRoundEngine.from_model_json(tiny_model_json))
    chat = ChatSession(backend, image, conv)
    chat.ask("Segment the liver.")
    chat.ask("segment the lesion inside round 1")
    chat.ask("分割左肾")
    segments = conversation_segments(conv, volume, terminology=terminology_entry_for)
    nonempty = [s for s in segments if s.mask.any()]
    out = tmp_path / "conversation.dcm"
    if not nonempty:
        with pytest.raises(ExportError, match="every segment is empty"):
            export_conversation_dicom_seg(conv, volume, ct_series["folder"], out)
        pytest.skip("the tiny model drew nothing on this slice; the all-empty error was checked instead")
    result = export_conversation_dicom_seg(conv, volume, ct_series["folder"], out)
    ds = hd.seg.segread(str(out))
    assert [d.SegmentLabel for d in ds.SegmentSequence] == [s.name for s in nonempty]
    assert [s.label for s in result.segments] == [s.name for s in nonempty]
    expected_codes = {
        segments[0].name: "10200004",  # liver
        segments[1].name: "52988006",  # lesion
        segments[2].name: "64033007",  # kidney (left)
    }
    for d in ds.SegmentSequence:
        assert d.SegmentedPropertyTypeCodeSequence[0].CodeValue == expected_codes[d.SegmentLabel]
        assert d.SegmentAlgorithmType == "SEMIAUTOMATIC"
    rebuilt, _ = frames_to_volume(ds, volume.shape, volume.ijk_to_lps)
    for n, s in enumerate(nonempty, start=1):
        assert np.array_equal(rebuilt[n], s.mask), s.name
        assert set(np.nonzero(s.mask.reshape(s.mask.shape[0], -1).any(axis=1))[0]) == {index}
