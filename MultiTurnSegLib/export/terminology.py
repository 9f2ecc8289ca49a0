"""Terminology codes for segments: from a prompt or segment name to SNOMED CT codes.

The table lives in ``Resources/Terminology/terminology.csv`` (see the README
beside it for columns and sources). :func:`lookup` finds the structure and/or
lesion a text names, in English or Chinese, with laterality; the result gives
the DICOM-SEG codes (:class:`TermMatch`) and Slicer's ``TerminologyEntry`` tag
(:meth:`TermMatch.slicer_terminology_entry`). Pure Python, no numpy.
"""

from __future__ import annotations

import csv
import functools
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..errors import MultiTurnSegError
from ..resources import resource_path

TABLE_NAME = "terminology.csv"

SLICER_CONTEXTS = {
    "SlicerGeneralAnatomy": "Segmentation category and type - 3D Slicer General Anatomy list",
    "DICOMMaster": "Segmentation category and type - DICOM master list",
}
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


class Code(NamedTuple):
    """A coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    @classmethod
    def parse(cls, text: str) -> "Code":
        parts = text.split("^")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise ValueError(f"not a SCHEME^value^meaning code: {text!r}")
        return cls(*(p.strip() for p in parts))

    def slicer(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    def to_highdicom(self):
        """As a ``highdicom.sr.CodedConcept`` (imports highdicom)."""
        from highdicom.sr import CodedConcept

        return CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


LEFT = Code("SCT", "7771000", "Left")
RIGHT = Code("SCT", "24028007", "Right")
BOTH = Code("SCT", "51440002", "Right and left")
EMPTY_CODE = "^^"


@dataclass(frozen=True)
class TermEntry:
    """One row of the terminology table."""

    id: str
    kind: str  # "structure" | "lesion" | "generic"
    category: Code
    type: Code
    paired: bool
    region: Optional[Code]
    context: str
    names_en: Tuple[str, ...]
    names_zh: Tuple[str, ...]
    source: str

    @property
    def context_name(self) -> str:
        return SLICER_CONTEXTS[self.context]


@dataclass(frozen=True)
class TermMatch:
    """Codes found for a text.

    ``category``/``type``/``type_modifier`` are the segmented property codes;
    ``anatomic_region``/``anatomic_region_modifier`` locate a lesion (a lesion
    named with a structure: "tumor in the left kidney"). ``label`` is a short
    English label ("left kidney", "liver neoplasm") or, for a generic match,
    the text itself. ``generic`` is true when the text named nothing known.
    """

    text: str
    label: str
    category: Code
    type: Code
    type_modifier: Optional[Code] = None
    anatomic_region: Optional[Code] = None
    anatomic_region_modifier: Optional[Code] = None
    context_name: str = SLICER_CONTEXTS["SlicerGeneralAnatomy"]
    entry_id: str = ""
    region_entry_id: str = ""
    source: str = ""
    generic: bool = False
    matched: Tuple[str, ...] = field(default=())

    def slicer_terminology_entry(self) -> str:
        """Slicer's ``TerminologyEntry`` tag value (7 ``~``-separated parts)."""

        def c(code: Optional[Code]) -> str:
            return code.slicer() if code is not None else EMPTY_CODE

        return "~".join(
            [
                self.context_name,
                c(self.category),
                c(self.type),
                c(self.type_modifier),
                ANATOMIC_CONTEXT,
                c(self.anatomic_region),
                c(self.anatomic_region_modifier if self.anatomic_region is not None else None),
            ]
        )


# --------------------------------------------------------------------------- table


def _split_names(text: str) -> Tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split("|") if n.strip())


@functools.lru_cache(maxsize=4)
def load_table(path: Optional[str] = None) -> Tuple[TermEntry, ...]:
    """Read the terminology table (default: the shipped ``terminology.csv``)."""
    table = Path(path) if path else resource_path("Terminology", TABLE_NAME)
    entries: List[TermEntry] = []
    try:
        with open(table, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    except OSError as exc:
        raise MultiTurnSegError(f"Terminology table {table} cannot be read: {exc}") from None
    seen = set()
    for n, row in enumerate(rows, start=2):
        try:
            entry = TermEntry(
                id=row["id"].strip(),
                kind=row["kind"].strip(),
                category=Code.parse(row["category"]),
                type=Code.parse(row["type"]),
                paired=row["laterality"].strip() == "paired",
                region=Code.parse(row["region"]) if row["region"].strip() else None,
                context=row["context"].strip(),
                names_en=_split_names(row["names_en"]),
                names_zh=_split_names(row["names_zh"]),
                source=row["source"].strip(),
            )
        except (KeyError, ValueError, AttributeError) as exc:
            raise MultiTurnSegError(f"{table}, line {n}: malformed terminology row ({exc})") from None
        if entry.kind not in ("structure", "lesion", "generic") or entry.context not in SLICER_CONTEXTS:
            raise MultiTurnSegError(f"{table}, line {n}: unknown kind or context in row {entry.id!r}")
        if entry.id in seen:
            raise MultiTurnSegError(f"{table}, line {n}: duplicate id {entry.id!r}")
        seen.add(entry.id)
        entries.append(entry)
    return tuple(entries)


def entry(entry_id: str) -> TermEntry:
    """The table row with this id (KeyError if none)."""
    for e in load_table():
        if e.id == entry_id:
            return e
    raise KeyError(entry_id)


# --------------------------------------------------------------------------- matching

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def _has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def normalize(text: str) -> str:
    """Lower case; punctuation, dashes and underscores become single spaces."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = re.sub(r"[^\w\u3400-\u9fff\uf900-\ufaff]+", " ", text)
    text = text.replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


class _Hit(NamedTuple):
    entry: TermEntry
    start: int
    end: int
    name: str
    cjk: bool


@functools.lru_cache(maxsize=4)
def _patterns(table_path: Optional[str] = None):
    en: List[Tuple[re.Pattern, TermEntry, str]] = []
    zh: List[Tuple[str, TermEntry]] = []
    for e in load_table(table_path):
        for name in e.names_en:
            norm = normalize(name)
            if not norm:
                continue
            body = r"\s".join(re.escape(w) for w in norm.split(" "))
            en.append((re.compile(r"(?<![\w])" + body + r"(?:s|es)?(?![\w])"), e, norm))
        for name in e.names_zh:
            zh.append((normalize(name).replace(" ", ""), e))
    return en, zh


def _hits(norm: str, table_path: Optional[str] = None) -> List[_Hit]:
    en, zh = _patterns(table_path)
    hits: List[_Hit] = []
    for pattern, e, name in en:
        for m in pattern.finditer(norm):
            hits.append(_Hit(e, m.start(), m.end(), name, False))
    if _has_cjk(norm):
        for name, e in zh:
            start = norm.find(name)
            while start >= 0:
                hits.append(_Hit(e, start, start + len(name), name, True))
                start = norm.find(name, start + 1)
    return hits


def _best(hits: Sequence[_Hit]) -> Optional[_Hit]:
    """The first-named match; of matches starting at the same place, the longest."""
    if not hits:
        return None
    return min(hits, key=lambda h: (h.start, -(h.end - h.start)))


def _not_inside(hit: _Hit, others: Sequence[_Hit]) -> bool:
    """False if ``hit`` lies within a longer hit of another entry (e.g. "肾" in "肾上腺")."""
    for o in others:
        if o is hit or o.entry is hit.entry:
            continue
        if o.start <= hit.start and hit.end <= o.end and (o.end - o.start) > (hit.end - hit.start):
            return False
    return True


_EN_SIDE = {
    "left": LEFT, "lt": LEFT, "sinister": LEFT,
    "right": RIGHT, "rt": RIGHT, "dexter": RIGHT,
    "bilateral": BOTH, "both": BOTH, "bilaterally": BOTH,
}
_ZH_SIDE = (("双侧", BOTH), ("两侧", BOTH), ("双", BOTH), ("左", LEFT), ("右", RIGHT))


def _laterality(norm: str, hit: _Hit, all_hits: Sequence[_Hit]) -> Optional[Code]:
    """Side word nearest the structure: up to 3 words before or after it (English),
    or within 3 characters before it (Chinese: 左肾, 左侧肾脏, 双肺)."""
    # Do not read a side word that belongs to another match ("left ventricle").
    def free(pos: int) -> bool:
        return not any(o.start <= pos < o.end for o in all_hits if o is not hit)

    candidates: List[Tuple[int, Code]] = []
    if hit.cjk or _has_cjk(norm[max(0, hit.start - 3):hit.start]):
        window_start = max(0, hit.start - 3)
        before = norm[window_start:hit.start]
        for word, code in _ZH_SIDE:
            pos = before.rfind(word)
            if pos >= 0 and free(window_start + pos):
                candidates.append((len(before) - pos, code))
        after = norm[hit.end:hit.end + 3]
        for word, code in _ZH_SIDE:
            pos = after.find(word)
            if pos == 0 and word in ("左", "右") and after[1:2] in ("侧", ""):
                candidates.append((1, code))
    for m in re.finditer(r"[a-z]+", norm):
        code = _EN_SIDE.get(m.group(0))
        if code is None and m.group(0) in ("l", "r") and m.start() >= hit.end and not norm[hit.end:m.start()].strip():
            code = LEFT if m.group(0) == "l" else RIGHT  # TG-263 style: Parotid_L, Cochlea_R
        if code is None or not free(m.start()):
            continue
        if m.end() <= hit.start:
            distance = len(norm[m.end():hit.start].split())
        elif m.start() >= hit.end:
            distance = len(norm[hit.end:m.start()].split())
        else:
            continue
        if distance <= 3:
            candidates.append((distance + 1, code))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1]


def _side_word(code: Optional[Code]) -> str:
    return {LEFT.value: "left ", RIGHT.value: "right ", BOTH.value: "bilateral "}.get(
        code.value if code else "", ""
    )


_ROUND_PREFIX = re.compile(r"^\s*r\d+\s+", re.IGNORECASE)


def lookup(text: str, table_path: Optional[str] = None) -> Optional[TermMatch]:
    """Codes for the structure and/or lesion a prompt or segment name names.

    English or Chinese; laterality from "left/right/bilateral" or 左/右/双.
    A segment name's round prefix ("R2 lesion inside round 1") is ignored.
    Returns None when the text names nothing in the table (see :func:`match_or_generic`).
    """
    if not text or not text.strip():
        return None
    norm = normalize(_ROUND_PREFIX.sub("", text))
    hits = _hits(norm, table_path)
    hits = [h for h in hits if _not_inside(h, hits)]
    structures = [h for h in hits if h.entry.kind == "structure"]
    lesions = [h for h in hits if h.entry.kind == "lesion"]
    generics = [h for h in hits if h.entry.kind == "generic"]
    structure = _best(structures)
    lesion = _best(lesions)
    side = None
    if structure is not None and structure.entry.paired:
        side = _laterality(norm, structure, hits)

    if lesion is not None:
        le = lesion.entry
        region = le.region
        region_modifier = None
        region_id = ""
        label = le.type.meaning.lower()
        if structure is not None:
            se = structure.entry
            # A lesion "in" a tissue (bone, muscle) or an organ: the structure is its region.
            region = se.type
            region_modifier = side
            region_id = se.id
            label = f"{_side_word(side)}{se.type.meaning.lower()} {label}"
        elif region is not None:
            region_id = "default"
        return TermMatch(
            text=text,
            label=label,
            category=le.category,
            type=le.type,
            anatomic_region=region,
            anatomic_region_modifier=region_modifier if region is not None else None,
            context_name=le.context_name,
            entry_id=le.id,
            region_entry_id=region_id,
            source=le.source,
            matched=tuple(h.name for h in (lesion, structure) if h is not None),
        )
    if structure is not None:
        se = structure.entry
        return TermMatch(
            text=text,
            label=f"{_side_word(side)}{se.type.meaning.lower()}",
            category=se.category,
            type=se.type,
            type_modifier=side,
            anatomic_region=se.region,
            context_name=se.context_name,
            entry_id=se.id,
            source=se.source,
            matched=(structure.name,),
        )
    g = _best(generics)
    if g is not None:
        return _generic_from(g.entry, text, matched=(g.name,))
    return None


def _generic_from(e: TermEntry, text: str, matched: Tuple[str, ...] = ()) -> TermMatch:
    return TermMatch(
        text=text,
        label=text.strip(),
        category=e.category,
        type=e.type,
        context_name=e.context_name,
        entry_id=e.id,
        source=e.source,
        generic=True,
        matched=matched,
    )


def generic_match(text: str) -> TermMatch:
    """The generic "Tissue" codes, keeping ``text`` as the label."""
    return _generic_from(entry("tissue"), text)


def match_or_generic(text: str) -> TermMatch:
    """:func:`lookup`, or the generic "Tissue" codes with the text as label."""
    return lookup(text) or generic_match(text or "")


def terminology_entry_for(prompt_or_name: str) -> Optional[str]:
    """Slicer ``TerminologyEntry`` tag for a prompt or segment name.

    Text naming nothing known gets Slicer's generic Tissue entry (what Slicer
    gives new segments); None only for empty text.
    """
    if not prompt_or_name or not prompt_or_name.strip():
        return None
    return match_or_generic(prompt_or_name).slicer_terminology_entry()


def parse_slicer_terminology_entry(tag: str) -> Optional[TermMatch]:
    """A Slicer ``TerminologyEntry`` tag value back to codes (None if malformed/empty)."""
    parts = (tag or "").split("~")
    if len(parts) != 7:
        return None

    def code(p: str) -> Optional[Code]:
        fields = p.split("^")
        if len(fields) != 3 or not fields[0] or not fields[1]:
            return None
        return Code(fields[0], fields[1], fields[2] or fields[1])

    category, type_ = code(parts[1]), code(parts[2])
    if category is None or type_ is None:
        return None
    region = code(parts[5])
    return TermMatch(
        text=tag,
        label=type_.meaning,
        category=category,
        type=type_,
        type_modifier=code(parts[3]),
        anatomic_region=region,
        anatomic_region_modifier=code(parts[6]) if region is not None else None,
        context_name=parts[0] or SLICER_CONTEXTS["SlicerGeneralAnatomy"],
        entry_id="",
        source="TerminologyEntry tag",
    )


__all__ = [
    "Code",
    "TermEntry",
    "TermMatch",
    "LEFT",
    "RIGHT",
    "BOTH",
    "SLICER_CONTEXTS",
    "load_table",
    "entry",
    "normalize",
    "lookup",
    "generic_match",
    "match_or_generic",
    "terminology_entry_for",
    "parse_slicer_terminology_entry",
]
