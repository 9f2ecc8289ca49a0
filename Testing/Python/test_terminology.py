"""The terminology table and lookup: coverage, well-formed codes, Slicer's tag format."""

from __future__ import annotations

import re

import pytest

from MultiTurnSegLib.export import terminology as T
from MultiTurnSegLib.export.terminology import (
    BOTH,
    LEFT,
    RIGHT,
    load_table,
    lookup,
    match_or_generic,
    parse_slicer_terminology_entry,
    terminology_entry_for,
)

# (English, Chinese, SNOMED CT type code, laterality modifier or None)
REQUIRED = [
    ("liver", "肝脏", "10200004", None),
    ("liver", "肝", "10200004", None),
    ("spleen", "脾脏", "78961009", None),
    ("left kidney", "左肾", "64033007", LEFT),
    ("kidney right", "右肾", "64033007", RIGHT),
    ("right kidney", "右侧肾脏", "64033007", RIGHT),
    ("pancreas", "胰腺", "15776009", None),
    ("gallbladder", "胆囊", "28231008", None),
    ("stomach", "胃", "69695003", None),
    ("duodenum", "十二指肠", "38848004", None),
    ("esophagus", "食管", "32849002", None),
    ("oesophagus", "食道", "32849002", None),
    ("aorta", "主动脉", "15825003", None),
    ("inferior vena cava", "下腔静脉", "64131007", None),
    ("heart", "心脏", "80891009", None),
    ("left ventricle", "左心室", "87878005", None),
    ("right ventricle", "右心室", "53085002", None),
    ("left atrium", "左心房", "82471001", None),
    ("right atrium", "右心房", "73829009", None),
    ("myocardium", "心肌", "74281007", None),
    ("left lung", "左肺", "39607008", LEFT),
    ("right lung", "右肺", "39607008", RIGHT),
    ("both lungs", "双肺", "39607008", BOTH),
    ("trachea", "气管", "44567001", None),
    ("brain", "大脑", "12738006", None),
    ("brainstem", "脑干", "119238007", None),
    ("spinal cord", "脊髓", "2748008", None),
    ("left hippocampus", "左侧海马", "5366008", LEFT),
    ("optic chiasm", "视交叉", "244453006", None),
    ("right optic nerve", "右侧视神经", "18234004", RIGHT),
    ("left eye", "左眼球", "79652003", LEFT),
    ("right lens", "右侧晶状体", "78076003", RIGHT),
    ("thyroid gland", "甲状腺", "69748006", None),
    ("left adrenal gland", "左肾上腺", "23451007", LEFT),
    ("urinary bladder", "膀胱", "89837001", None),
    ("prostate", "前列腺", "41216001", None),
    ("peripheral zone", "外周带", "279706003", None),
    ("transition zone", "移行带", "399384005", None),
    ("mandible", "下颌骨", "91609006", None),
    ("left parotid gland", "左侧腮腺", "45289007", LEFT),
    ("right submandibular gland", "右侧颌下腺", "54019009", RIGHT),
    ("left cochlea", "左侧耳蜗", "80169004", LEFT),
]

# (English, Chinese, SNOMED CT type code)
LESIONS = [
    ("tumor", "肿瘤", "108369006"),
    ("mass", "肿块", "4147007"),
    ("cyst", "囊肿", "367643001"),
    ("nodule", "结节", "27925004"),
    ("lesion", "病灶", "52988006"),
    ("necrosis", "坏死", "6574001"),
    ("edema", "水肿", "79654002"),
    ("hemorrhage", "出血", "50960005"),
    ("infection", "感染", "52988006"),
    ("COVID-19 lesion", "新冠肺炎病灶", "52988006"),
]


@pytest.mark.parametrize("en, zh, code, side", REQUIRED, ids=[r[0] + "/" + r[1] for r in REQUIRED])
def test_required_structures_resolve_in_english_and_chinese(en, zh, code, side):
    for text in (en, zh, f"Please segment the {en} on this slice.", f"请分割{zh}"):
        m = lookup(text)
        assert m is not None, text
        assert not m.generic
        assert m.type.value == code, (text, m)
        assert m.category.value in ("123037004", "85756007"), text
        assert m.type_modifier == side, (text, m.type_modifier)
        assert m.anatomic_region is None


@pytest.mark.parametrize("en, zh, code", LESIONS, ids=[r[0] for r in LESIONS])
def test_lesion_words(en, zh, code):
    for text in (en, zh):
        m = lookup(text)
        assert m is not None and m.type.value == code, text
        assert m.category == T.Code("SCT", "49755003", "Morphologically Altered Structure")


def test_lesion_with_structure_gets_anatomic_region_and_side():
    m = lookup("segment the tumor in the left kidney")
    assert (m.type.value, m.anatomic_region.value, m.anatomic_region_modifier) == ("108369006", "64033007", LEFT)
    assert m.type_modifier is None
    m = lookup("肝脏肿瘤")
    assert (m.type.value, m.anatomic_region.value) == ("108369006", "10200004")
    m = lookup("covid-19 infection in the right lung")
    assert (m.type.value, m.anatomic_region.value, m.anatomic_region_modifier) == ("52988006", "39607008", RIGHT)
    assert lookup("COVID lesion").anatomic_region.value == "39607008"  # implied region
    # a segment name from a conversation: round prefix and reference ignored
    m = lookup("R2 lesion inside round 1")
    assert m.type.value == "52988006" and m.anatomic_region is None


def test_longest_and_precoordinated_names_win():
    assert lookup("左肾上腺").type.value == "23451007"  # not "肾" (kidney)
    assert lookup("gall bladder").type.value == "28231008"  # not bladder
    assert lookup("submandibular gland").type.value == "54019009"  # not mandible
    assert lookup("下颌下腺").type.value == "54019009"
    m = lookup("left lateral ventricle")
    assert m.type.value == "66720007" and m.type_modifier == LEFT
    assert lookup("left ventricle").type_modifier is None
    assert lookup("Parotid_L").type_modifier == LEFT  # TG-263 style names
    assert lookup("Cochlea_R").type_modifier == RIGHT


def test_unknown_text_gets_generic_code_and_keeps_label():
    assert lookup("the blob near the corner") is None
    m = match_or_generic("the blob near the corner")
    assert m.generic and m.label == "the blob near the corner"
    assert (m.category.value, m.type.value) == ("85756007", "85756007")
    entry = terminology_entry_for("the blob near the corner")
    assert entry.split("~")[1:3] == ["SCT^85756007^Tissue", "SCT^85756007^Tissue"]
    assert terminology_entry_for("") is None
    m = lookup("abnormal area")
    assert m.generic and m.type.value == "49755003" and m.label == "abnormal area"


def test_slicer_tag_format_matches_slicer_files(slicer_segmentation_path):
    """Our tags for the structures in slicerio's Slicer-written file are Slicer's tags, character for character."""
    slicerio = pytest.importorskip("slicerio")
    seg = slicerio.read_segmentation(str(slicer_segmentation_path), skip_voxels=True)
    from slicerio.segmentation import terminology_entry_to_string

    tags = {s["name"]: terminology_entry_to_string(s["terminology"]) for s in seg["segments"]}
    for name in ("ribs", "right lung", "left lung", "tissue"):
        assert terminology_entry_for(name) == tags[name], name
    # and back: a Slicer tag parses to the same codes
    m = parse_slicer_terminology_entry(tags["right lung"])
    assert (m.type.value, m.type_modifier) == ("39607008", RIGHT)
    # a lesion with a region, as in Slicer's documentation example
    assert terminology_entry_for("mass in the right adrenal gland") == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass~^^"
        "~Anatomic codes - DICOM master list~SCT^23451007^Adrenal gland~SCT^24028007^Right"
    )
    # slicerio parses every tag we make into 7 parts
    for e in load_table():
        for name in e.names_en[:1]:
            parts = terminology_entry_for(name).split("~")
            assert len(parts) == 7 and "|" not in "~".join(parts)


def _verhoeff_ok(number: str) -> bool:
    d = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ]
    p = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ]
    c = 0
    for i, ch in enumerate(reversed(number)):
        c = d[c][p[i % 8][int(ch)]]
    return c == 0


def test_table_codes_are_well_formed():
    table = load_table()
    assert len(table) >= 60
    ids = [e.id for e in table]
    assert len(ids) == len(set(ids))
    seen_names = {}
    for e in table:
        assert e.source, e.id
        assert e.names_en and (e.names_zh or e.kind == "generic"), e.id
        for code in (e.category, e.type, e.region):
            if code is None:
                continue
            assert code.scheme in ("SCT", "DCM", "NCIt"), (e.id, code)
            assert code.meaning and "^" not in code.meaning and "~" not in code.meaning
            if code.scheme == "SCT":
                assert re.fullmatch(r"[1-9][0-9]{5,17}", code.value), (e.id, code)
                assert _verhoeff_ok(code.value), (e.id, code)  # SNOMED CT check digit
                assert code.value[-3:-1] in ("00", "10"), (e.id, code)  # concept partition
            elif code.scheme == "DCM":
                assert re.fullmatch(r"[0-9]{5,6}", code.value), (e.id, code)
        assert e.category.value in ("123037004", "85756007", "49755003"), e.id
        if e.kind == "lesion":
            assert e.category.value == "49755003", e.id
        for name in e.names_en + e.names_zh:
            key = T.normalize(name)
            assert seen_names.setdefault(key, e.id) == e.id, f"{name!r} is in both {seen_names[key]} and {e.id}"
    for code in (LEFT, RIGHT, BOTH):
        assert _verhoeff_ok(code.value)


def test_codes_agree_with_dicom_where_dicom_lists_them():
    """Types that DICOM PS3.16 lists (pydicom's tables) carry the same code value."""
    concepts = pytest.importorskip("pydicom.sr._concepts_dict").concepts
    known = {code for entries in concepts["SCT"].values() for code in entries}
    checked = 0
    for e in load_table():
        if e.type.scheme == "SCT" and e.type.value in known:
            checked += 1
    # all but a few (myocardium, cochlea: from TG-263/SegDB) are DICOM concepts
    missing = [e.id for e in load_table() if e.type.scheme == "SCT" and e.type.value not in known]
    assert set(missing) <= {"myocardium", "cochlea"}, missing
    assert checked >= 60


def test_terminology_imports_no_heavy_modules():
    import subprocess
    import sys

    code = (
        "import sys; import MultiTurnSegLib.export as e; e.lookup('liver'); "
        "print(sorted(m for m in ('highdicom', 'pydicom', 'torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "highdicom" not in out and "pydicom" not in out and "torch" not in out
