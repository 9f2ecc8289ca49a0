"""``multiturnseg chat`` and ``multiturnseg demo`` end to end on slicerio's chest CT."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from MultiTurnSegLib.cli import main  # noqa: E402

PROMPTS = ["Segment the lungs", "Segment the region inside round 1", "Segment the structure next to it"]


def _chat(ct, model, out, *extra):
    return main(["chat", str(ct), "--axis", "axial", "--slice", "17", "--window", "lung", "--model", str(model),
                 "--device", "cpu", "-o", str(out), *extra])


def test_chat_writes_segments_pngs_and_transcript(tmp_path, ct_chest_path, tiny_model_json, capsys):
    from MultiTurnSegLib.conversation import load_conversation
    from MultiTurnSegLib.imaging import extract_mask, read_volume
    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    out = tmp_path / "out.seg.nrrd"
    args = []
    for p in PROMPTS:
        args += ["--prompt", p]
    rc = _chat(ct_chest_path, tiny_model_json, out, *args, "--png-dir", str(tmp_path / "png"),
               "--transcript", str(tmp_path / "chat.json"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "R2 region inside round 1: refers to round 1" in text
    seg = read_seg_nrrd(out)
    names = [s.name for s in seg.segments]
    assert len(names) == 3 and [n.split(" ")[0] for n in names] == ["R1", "R2", "R3"]
    assert names[1] == "R2 region inside round 1"
    volume = read_volume(ct_chest_path)
    for s in seg.segments:
        on_slice = extract_mask(s.mask, volume, "axial", 17)
        assert on_slice.any() and s.mask.sum() == on_slice.sum()  # only the chat's slice
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["round_01.png", "round_02.png", "round_03.png"]
    conv = load_conversation(tmp_path / "chat.json")
    assert [t.reference.round if t.reference else None for t in conv.turns] == [None, 1, 2]
    assert conv.axis == "axial" and conv.slice_index == 17


def test_chat_bad_reference_fails_clearly_and_keeps_earlier_turns(tmp_path, ct_chest_path, tiny_model_json, capsys):
    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    out = tmp_path / "bad.seg.nrrd"
    rc = _chat(ct_chest_path, tiny_model_json, out, "--prompt", "Segment the lungs",
               "--prompt", "Segment the lesion inside round 5")
    captured = capsys.readouterr()
    assert rc != 0
    assert "round 5" in captured.err and "Traceback" not in captured.err
    assert [s.name.split(" ")[0] for s in read_seg_nrrd(out).segments] == ["R1"]


def test_chat_png_failure_stops_but_keeps_the_turns_done(tmp_path, ct_chest_path, tiny_model_json, capsys):
    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    png = tmp_path / "png"
    (png / "round_02.png").mkdir(parents=True)  # a folder where the second PNG should go
    out = tmp_path / "out.seg.nrrd"
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    rc = _chat(ct_chest_path, tiny_model_json, out, *args, "--png-dir", str(png))
    captured = capsys.readouterr()
    assert rc == 2 and "cannot write the PNG" in captured.err and "Traceback" not in captured.err
    # rounds 1 and 2 ran and are written; round 3 was not asked
    assert [s.name.split(" ")[0] for s in read_seg_nrrd(out).segments] == ["R1", "R2"]


def test_chat_script_with_explicit_reference_and_bad_script(tmp_path, ct_chest_path, tiny_model_json, capsys):
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"turns": ["Segment the lungs",
                                            {"prompt": "Segment the heart", "reference": 1, "answer": "It is [SEG]."}]}))
    out = tmp_path / "s.seg.nrrd"
    assert _chat(ct_chest_path, tiny_model_json, out, "--script", str(script), "--jcm", "off",
                 "--transcript", str(tmp_path / "t.json")) == 0
    turns = json.loads((tmp_path / "t.json").read_text())["turns"]
    assert turns[1]["answer"] == "It is [SEG]." and turns[1]["jcm_score"] is None
    script.write_text(json.dumps({"turns": [{"prompt": "x", "colour": 1}]}))
    assert _chat(ct_chest_path, tiny_model_json, out, "--script", str(script)) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["chat", str(ct_chest_path), "--prompt", "x", "-o", str(tmp_path / "x.nrrd"),
                 "--model", str(tiny_model_json)]) == 2


def test_demo_end_to_end(tmp_path, tmp_path_factory, monkeypatch, capsys):
    from PIL import Image

    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    # same cache folder as test_random_weights: the model is built once per session
    monkeypatch.setenv("MULTITURNSEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mts-cache"))
    rc = main(["demo", "-o", str(tmp_path / "demo"), "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "model.json" in text
    folder = tmp_path / "demo"
    seg = read_seg_nrrd(folder / "demo.seg.nrrd")
    assert len(seg.segments) == 3
    assert (folder / "demo_transcript.json").is_file()
    for r in (1, 2, 3):
        with Image.open(folder / f"round_{r:02d}.png") as im:
            assert im.width >= 512 and im.height > im.width  # picture + caption
    assert (tmp_path_factory.getbasetemp() / "mts-cache").is_dir()


def test_chat_on_a_dicom_series_exports_dicom_seg(tmp_path, ct_chest_path, tiny_model_json, capsys):
    """chat VOLUME=series --dicom-series series: the DICOM-SEG holds one segment
    per turn, coded from the prompt, on exactly the voxels of the .seg.nrrd."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from test_export_dicom_seg import frames_to_volume, make_ct_series

    from MultiTurnSegLib.segmentation_io import read_seg_nrrd

    series = tmp_path / "series"
    grid = make_ct_series(ct_chest_path, series)
    out = tmp_path / "chat.seg.nrrd"
    rc = main(["chat", str(series), "--axis", "axial", "--slice", "17", "--window", "lung",
               "--model", str(tiny_model_json), "--device", "cpu", "-o", str(out),
               "--prompt", "Segment the left lung", "--prompt", "Segment the nodule inside round 1",
               "--dicom-series", str(series)])
    assert rc == 0, capsys.readouterr().err
    dcm = tmp_path / "chat.dcm"
    assert f"wrote {dcm}" in capsys.readouterr().out
    ds = pydicom.dcmread(dcm)
    labels = [s.SegmentLabel for s in ds.SegmentSequence]
    assert labels == [s.name for s in read_seg_nrrd(out).segments]
    lung = ds.SegmentSequence[0]
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SNOMED: lung
    assert lung.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"  # left
    rebuilt, _ = frames_to_volume(ds, grid["shape"], grid["ijk_to_lps"])
    seg = read_seg_nrrd(out)
    from MultiTurnSegLib.imaging import read_volume
    from MultiTurnSegLib.segmentation_io import check_geometry

    check_geometry(seg, read_volume(series))
    for number, segment in enumerate(seg.segments, 1):
        np.testing.assert_array_equal(rebuilt[number], segment.mask)


@pytest.mark.parametrize("value", ["abc", 4.5, -1, True])
def test_script_slice_must_be_a_slice_index(tmp_path, value):
    from MultiTurnSegLib.cli.chat import load_script
    from MultiTurnSegLib.errors import ConversationFormatError

    script = tmp_path / "s.json"
    script.write_text(json.dumps({"slice": value, "turns": ["Segment the lungs"]}))
    with pytest.raises(ConversationFormatError, match="'slice' must be a slice index"):
        load_script(script)
    script.write_text(json.dumps({"slice": 3, "turns": ["Segment the lungs"]}))
    assert load_script(script)[1] == {"slice": 3}


def test_caption_font_for_chinese_prompts(monkeypatch, caplog):
    """Chinese prompts need a CJK font in the PNG captions: MULTITURNSEG_FONT wins,
    then the usual system CJK fonts in order; with none, the default font and a warning."""
    import logging

    from MultiTurnSegLib.cli import chat

    assert chat.needs_cjk_font(["Segment the liver", "分割左肾"])
    assert not chat.needs_cjk_font(["Segment the liver", "Ödem, œdème, отёк"])
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # in this machine image (fonts-dejavu-core)
    monkeypatch.setenv("MULTITURNSEG_FONT", dejavu)
    assert chat._font(20).path == dejavu
    monkeypatch.delenv("MULTITURNSEG_FONT")
    monkeypatch.setattr(chat, "CJK_FONTS", ("/nonexistent/NotoSansCJK.ttc", dejavu))
    assert chat._font(20, cjk=True).path == dejavu  # the first CJK font that exists
    assert not isinstance(getattr(chat._font(20), "path", None), str)  # Latin text: the default font
    monkeypatch.setattr(chat, "CJK_FONTS", ("/nonexistent/NotoSansCJK.ttc",))
    monkeypatch.setattr(chat, "_warned_no_cjk_font", False)
    with caplog.at_level(logging.WARNING, logger=chat.logger.name):
        font = chat._font(20, cjk=True)
    assert "MULTITURNSEG_FONT" in caplog.text and not isinstance(getattr(font, "path", None), str)
