"""Reader of the official MR-MedSeg JSON format."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from MultiTurnSegLib.errors import ConversationFormatError, InputError
from MultiTurnSegLib.evaluation.dataset import load_gt_mask, load_official_json, load_rgb_image


@pytest.mark.parametrize("case", ["single", "chain3"])
def test_fixture_cases_parse_like_case_json(fixture_cases_dir, case):
    folder = fixture_cases_dir / case
    case_json = json.loads((folder / "case.json").read_text())
    (sample,) = load_official_json(folder / "eval.json", folder)
    assert sample.warnings == []
    assert sample.image_path == folder / case_json["image"]
    got = [{"prompt": t.prompt, "answer": t.answer, "ref": t.ref} for t in sample.turns]
    assert got == case_json["turns"]
    image = sample.load_image()
    assert image.shape == (case_json["image_height"], case_json["image_width"], 3) and image.dtype == np.uint8
    gts = sample.load_gt_masks(image.shape)
    assert gts.shape == (len(got),) + image.shape[:2] and gts.dtype == bool and gts.any()
    # the official rendering of every user turn
    for t, rendered in zip(sample.turns, case_json["prompt_text"].split("[INST] ")[1:]):
        assert rendered.startswith(t.human_text + " [/INST] " + t.answer)


def _write_case(tmp_path, conversations, task="segmentation"):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 10), 100, np.uint8)).save(tmp_path / "images" / "a.png")
    m = np.zeros((8, 10), np.uint8)
    m[2:5, 3:7] = 255
    Image.fromarray(m).save(tmp_path / "masks" / "m0.png")
    Image.fromarray(m).save(tmp_path / "masks" / "m1.png")
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"task": task, "base": "[null]", "conversations": conversations}]))
    return path


GOOD = [
    {"from": "human", "value": "[IMAGE256:images/a.png] Segment the liver."},
    {"from": "gpt", "value": "Sure, [MASK-DECODE:masks/m0.png]."},
    {"from": "human", "value": "[MASK-ENCODE:masks/m0.png][BOX-ENCODE:masks/m0.png] Segment the lesion inside it.", "ind": 0},
    {"from": "gpt", "value": "It is [REF-DECODE:masks/m0.png][MASK-DECODE:masks/m1.png]."},
]


def test_good_file_and_grey_image_as_rgb(tmp_path):
    (s,) = load_official_json(_write_case(tmp_path, GOOD), tmp_path)
    assert [t.answer for t in s.turns] == ["Sure, [SEG].", "It is [SEG]."]
    assert [t.ref for t in s.turns] == [None, 0]
    assert s.turns[1].human_text == "[CROPPEDIMAGE][BBOXINPUT] Segment the lesion inside it."
    img = s.load_image()
    assert img.shape == (8, 10, 3) and (img == 100).all()
    assert s.load_gt_masks().sum() == 24


def _mutate(i, **changes):
    conv = [dict(t) for t in GOOD]
    conv[i].update(changes)
    for k, v in list(conv[i].items()):
        if v is None:
            del conv[i][k]
    return conv


@pytest.mark.parametrize(
    "conv, words",
    [
        (GOOD[:3], "even"),
        (_mutate(0, value="Segment the liver."), "IMAGE256"),
        (_mutate(2, ind=None), "without 'ind'"),
        (_mutate(2, ind=1), "earlier round"),
        (_mutate(2, ind="0"), "integer"),
        (_mutate(2, value="[MASK-ENCODE:masks/m0.png] Segment it."), "BOX-ENCODE"),
        (_mutate(3, value="It is done."), "MASK-DECODE"),
        (_mutate(3, value="[MASK-DECODE:masks/m1.png] and [MASK-DECODE:masks/m0.png]"), "more than one"),
        (_mutate(1, **{"from": "human"}), "'gpt'"),
        (_mutate(2, value="[IMAGE256:images/a.png] again"), "only once"),
        (_mutate(0, value="[IMAGE256:] Segment"), "malformed"),
    ],
)
def test_malformed_conversations_are_refused(tmp_path, conv, words):
    path = _write_case(tmp_path, conv)
    with pytest.raises(ConversationFormatError) as err:
        load_official_json(path, tmp_path)
    assert words in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_task_bad_json_and_missing_files(tmp_path):
    with pytest.raises(ConversationFormatError, match="task"):
        load_official_json(_write_case(tmp_path, GOOD, task="vqa"), tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ConversationFormatError, match="not valid JSON"):
        load_official_json(bad, tmp_path)
    path = _write_case(tmp_path, GOOD)
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(InputError, match="missing file"):
        load_official_json(path, tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_official_json(tmp_path / "nope.json", tmp_path)


def test_markers_elsewhere_warn(tmp_path):
    conv = _mutate(0, value="Segment the liver.[IMAGE256:images/a.png]")
    (s,) = load_official_json(_write_case(tmp_path, conv), tmp_path)
    assert s.turns[0].prompt == "Segment the liver."
    assert s.warnings and "token ids may differ" in s.warnings[0]


def test_mask_values(tmp_path):
    m = np.zeros((4, 4), np.uint8)
    m[0, 0] = 1
    Image.fromarray(m).save(tmp_path / "one.png")
    with pytest.raises(InputError, match="0/255"):
        load_gt_mask(tmp_path / "one.png")
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert load_gt_mask(tmp_path / "rgb.png").sum() == 1
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="Cannot read"):
        load_rgb_image(tmp_path / "junk.png")
