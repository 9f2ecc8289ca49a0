"""Which earlier result a prompt refers to.

MediRound takes at most one reference per turn: an earlier round's mask (or any
segment's mask). ``resolve_reference`` reads it from the prompt, in English or
Chinese:

* a round by number: "round 2", "round #2", "round two", "the 2nd round",
  "the second round", "instance 2", "turn 2", "output of round 2", "R2",
  "第2轮", "第二轮", "第十二轮", "第2个结果", "实例2";
* the previous round: "the previous result/output/segmentation/mask/round",
  "the last one", "the latest result", "上一轮", "前一轮", "上一个结果",
  "之前的结果";
* a pronoun, weaker than everything above (it defers to a round or segment
  named in the same prompt): "its", "it" (not "it is", "is it", "it's", nor
  "the spleen and its hilum", where "its" points inside the prompt), "它",
  "它的" (not "其它" = "other", nor "脾脏和它的血管");
* a segment by name (case-insensitive, longest match, whole words), including
  segments drawn by hand: their names come in ``segment_names``. A name that is
  what the prompt asks to segment ("segment the liver" while a segment "Liver"
  exists) is not a reference; "the lesion inside the liver", "the liver's
  lobe" and "肝脏内的病灶" are.

Round 1 cannot take a reference (MediRound sees the whole slice in round 1 and
gets a reference crop from round 2 on), so in round 1 segment names are just
words for the model, and an explicit reference, a pronoun, "the previous ..."
or a round number is an error.

``explicit`` (a Reference, a round number, a segment name or "none") wins over
the prompt. Errors (ReferenceResolutionError) say what exists; nothing is
changed on error.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError, ReferenceResolutionError
from .model import Conversation, Reference
from .naming import _strip_request

ExplicitReference = Union[None, Reference, int, str]

NO_REFERENCE_WORDS = frozenset({"none", "no", "off", "no reference", "无", "不引用", "无引用"})
AUTO_WORDS = frozenset({"", "auto", "automatic", "自动"})

# ---------------------------------------------------------------------------
# numbers

_EN_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20,
}
_EN_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12,
    "thirteenth": 13, "fourteenth": 14, "fifteenth": 15, "sixteenth": 16,
    "seventeenth": 17, "eighteenth": 18, "nineteenth": 19, "twentieth": 20,
}
_CN_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_NUM = "[〇零一二两三四五六七八九十百]+"


def chinese_number(text: str) -> int:
    """Value of a Chinese numeral up to 999 ("十二" -> 12, "二十三" -> 23, "一百零五" -> 105)."""
    if text.isdecimal():  # not isdigit: int() refuses digits such as "²"
        return int(text)
    total, current = 0, 0
    for ch in text:
        if ch in _CN_DIGITS:
            current = _CN_DIGITS[ch]
        elif ch == "十":
            total += (current or 1) * 10
            current = 0
        elif ch == "百":
            total += (current or 1) * 100
            current = 0
        else:
            raise InputError(
                f"{text!r} is not a number: use digits or Chinese numerals (一, 二, ... 十, 百) up to 999"
            )
    return total + current


def _number(text: str) -> int:
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    if text in _EN_NUMBERS:
        return _EN_NUMBERS[text]
    if text in _EN_ORDINALS:
        return _EN_ORDINALS[text]
    m = re.fullmatch(r"(\d+)(?:st|nd|rd|th)", text)
    if m:
        return int(m.group(1))
    return chinese_number(text)


# ---------------------------------------------------------------------------
# patterns (applied to the NFKC-normalised, lower-cased prompt)

_LB = r"(?<![a-z0-9_])"  # ASCII word boundaries: CJK characters count as boundaries
_RB = r"(?![a-z0-9_])"
_EN_NUM = r"(?P<num>\d+|" + "|".join(_EN_NUMBERS) + r")"
_EN_ORD = r"(?P<ord>\d+(?:st|nd|rd|th)|" + "|".join(_EN_ORDINALS) + r")"
_UNIT_AFTER = r"(?!\s*-?(?:(?:cm|mm|m)(?![a-z])|centimet|millimet|%|×|x\s*\d|by\s+\d))"
_ROUND_NOUNS = r"(?:round|instance|turn|result|output|segmentation|mask|answer|prediction)"

_ROUND_PATTERNS: Tuple[re.Pattern, ...] = (
    # round 2, round #2, round no. 2, round two, instance 2, turn 2, round2
    re.compile(
        _LB + r"(?P<pre>(?:the|a|an)\s+)?(?:round|instance|turn)s?\s*(?:#|no\.?|number|num\.?)?\s*"
        + _EN_NUM + _RB + _UNIT_AFTER
    ),
    # result 2, output 2 (digits only)
    re.compile(_LB + r"(?:result|output)\s*(?:#|no\.?|number)?\s*(?P<num>\d+)" + _RB + _UNIT_AFTER),
    # the 2nd round, the second round, first output
    re.compile(_LB + _EN_ORD + r"\s+" + _ROUND_NOUNS + _RB),
    # R2, r12
    re.compile(_LB + r"r(?P<num>\d{1,3})" + _RB),
    # 第2轮, 第二轮, 第十二轮, 第 2 回合, 第2个结果, 第二次
    re.compile(
        r"第\s*(?P<num>\d+|" + _CN_NUM + r")\s*"
        r"(?:轮|回合|次|步|个?实例|个?结果|个?输出|个?分割|个?掩码|个?掩膜|个?mask)"
    ),
    # 实例2, 实例 二, 轮次3
    re.compile(r"(?:实例|轮次)\s*(?P<num>\d+|" + _CN_NUM + r")"),
)

_PREVIOUS_PATTERNS: Tuple[re.Pattern, ...] = (
    re.compile(
        _LB + r"(?:previous|prior|preceding|last|latest|most\s+recent|earlier)\s+"
        r"(?:one|result|output|segmentation|segment|mask|round|turn|answer|prediction|region|instance|step|area|object)s?"
        + _RB
    ),
    re.compile(_LB + r"previously\s+(?:segmented|found|identified|detected|outlined|delineated|marked)" + _RB),
    re.compile(r"(?:上一?|前一)(?:轮|回合|次|步)"),
    re.compile(r"最后一轮"),
    re.compile(
        r"(?:上一?个|前一个|之前的?|前面的?|刚才的?|刚刚的?|最后一?个|最近的?|最新的?|上述的?)\s*"
        r"(?:结果|输出|分割结果|分割|掩码|掩膜|mask|区域|实例|目标|对象)"
    ),
)

_PRONOUN_PATTERNS: Tuple[re.Pattern, ...] = (
    re.compile(_LB + r"its" + r"(?![a-z0-9_'])"),
    re.compile(
        r"(?<!\bis\s)(?<!\bwas\s)(?<!\bdoes\s)(?<!\bdid\s)(?<!\bcan\s)(?<!\bif\s)"
        + _LB + r"it" + r"(?![a-z0-9_'])"
        r"(?!\s+(?:is|was|be|has|had|seems|appears|looks|can|could|should|would|may|might|will|does|did|must)"
        + _RB + r")"
    ),
    re.compile(r"(?<!其)它(?:们)?(?:的)?"),
)

# "the spleen and its hilum", "脾脏和它的血管": the pronoun points inside the prompt.
_IN_PROMPT_ANTECEDENT = re.compile(
    r"(?:(?<![a-z0-9_])(?:and|with|including|plus|along\s+with|together\s+with|as\s+well\s+as)\s+|(?:和|及|与|以及|连同|包括))$"
)

# After a segment name, these mark it as a reference even in object position.
_REFERENCE_MARKERS_AFTER = re.compile(
    r"^(?:'s|s'|\s*(?:的|之|内|中|里|旁|周|附近|上|下|左|右|前|后|外|边|侧|区域))"
)
_OBJECT_PREFIX_LEFTOVER = re.compile(r"^[\s,;:，、]*$")


@dataclass(frozen=True)
class _Found:
    start: int
    end: int
    reference: Reference
    text: str


def _normalise(prompt: str) -> str:
    text = unicodedata.normalize("NFKC", str(prompt))
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return text.lower()


def _key(name: str) -> str:
    return _normalise(name).strip()


def _known_names(conversation: Conversation, segment_names: Iterable[str]) -> Tuple[List[str], Dict[str, int]]:
    """Supplied segment names (deduplicated, in order) and turn segment names (normalised key -> round)."""
    supplied: List[str] = []
    for name in segment_names or ():
        if isinstance(name, str) and name.strip() and name not in supplied:
            supplied.append(name)
    turn_names: Dict[str, int] = {}
    for turn in conversation.turns:
        key = _key(turn.segment_name)
        if key and key not in turn_names:
            turn_names[key] = turn.round
    return supplied, turn_names


def _describe_existing(conversation: Conversation, supplied: Sequence[str]) -> str:
    text = conversation.describe_rounds()
    turn_names = {_key(t.segment_name) for t in conversation.turns}
    others = [n for n in supplied if _key(n) not in turn_names]
    if others:
        shown = ", ".join(f"'{n}'" for n in others[:12])
        if len(others) > 12:
            shown += f", and {len(others) - 12} more"
        text += f"; other segments: {shown}"
    return text


def _segment_reference(
    name_lower: str, supplied: Sequence[str], turn_names: Dict[str, int], conversation: Conversation
) -> Reference:
    """The reference for a segment name (case-insensitive): a supplied segment, else the turn's round."""
    exact = [n for n in supplied if _key(n) == name_lower]
    if len(exact) > 1:
        listed = " and ".join(f"'{n}'" for n in exact)
        raise ReferenceResolutionError(
            f"the reference is ambiguous: segments {listed} differ only in upper/lower case; "
            "rename one or pick the reference explicitly"
        )
    if exact:
        return Reference.to_segment(exact[0])
    return Reference.to_round(turn_names[name_lower])


def _find_segment_names(
    text: str, supplied: Sequence[str], turn_names: Dict[str, int], conversation: Conversation
) -> Tuple[List[_Found], List[Tuple[int, int]]]:
    """Segment names in ``text`` (longest, non-overlapping). Returns (references, every matched span)."""
    candidates: List[Tuple[int, int, str]] = []
    keys = {_key(n) for n in supplied} | set(turn_names)
    for key in keys:
        if not key:
            continue
        pattern = re.escape(key)
        if re.match(r"[a-z0-9_]", key[0]):
            pattern = _LB + pattern
        if re.match(r"[a-z0-9_]", key[-1]):
            pattern = pattern + _RB
        for m in re.finditer(pattern, text):
            candidates.append((m.start(), m.end(), key))
    candidates.sort(key=lambda c: (-(c[1] - c[0]), c[0]))
    taken: List[Tuple[int, int, str]] = []
    for start, end, key in candidates:
        if any(start < e and s < end for s, e, _ in taken):
            continue
        taken.append((start, end, key))
    taken.sort()
    found: List[_Found] = []
    for start, end, key in taken:
        before = _strip_request(text[:start].strip())
        is_object = bool(_OBJECT_PREFIX_LEFTOVER.match(before))
        if is_object and not _REFERENCE_MARKERS_AFTER.match(text[end:]):
            continue  # what the prompt asks to segment, not what it refers to
        found.append(_Found(start, end, _segment_reference(key, supplied, turn_names, conversation), text[start:end]))
    return found, [(s, e) for s, e, _ in taken]


def _blank(text: str, spans: Sequence[Tuple[int, int]]) -> str:
    chars = list(text)
    for start, end in spans:
        for i in range(start, end):
            chars[i] = " "
    return "".join(chars)


def _find_rounds(text: str) -> List[_Found]:
    found: List[_Found] = []
    for pattern in _ROUND_PATTERNS:
        for m in pattern.finditer(text):
            groups = m.groupdict()
            raw = groups.get("num") or groups.get("ord")
            if groups.get("pre") and raw and not raw.isdigit():
                continue  # "the round one": "round" is an adjective here
            value = _number(raw)
            if value < 1:
                raise ReferenceResolutionError(
                    f"rounds are numbered from 1 (\"{m.group(0).strip()}\" names round {value})"
                )
            found.append(_Found(m.start(), m.end(), Reference.to_round(value), m.group(0).strip()))
    return found


def _find_any(text: str, patterns: Sequence[re.Pattern]) -> List[Tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group(0).strip()) for p in patterns for m in p.finditer(text)]


def _check_exists(found: _Found, conversation: Conversation, supplied: Sequence[str]) -> None:
    ref = found.reference
    if ref.kind == "round" and ref.round > len(conversation.turns):
        raise ReferenceResolutionError(
            f"\"{found.text}\": there is no round {ref.round}; {_describe_existing(conversation, supplied)}"
        )


def _resolve_explicit(
    explicit, conversation: Conversation, supplied: Sequence[str], turn_names: Dict[str, int]
) -> Optional[Reference]:
    existing = lambda: _describe_existing(conversation, supplied)  # noqa: E731
    if isinstance(explicit, Reference):
        if explicit.kind == "round":
            if explicit.round > len(conversation.turns):
                raise ReferenceResolutionError(f"there is no round {explicit.round}; {existing()}")
            return explicit
        return _explicit_name(explicit.segment, conversation, supplied, turn_names, existing, name_only=True)
    if isinstance(explicit, (bool, np.bool_)):
        raise ReferenceResolutionError(f"an explicit reference is a round number, a segment name or 'none'; got {explicit!r}")
    if isinstance(explicit, (int, np.integer)):
        value = int(explicit)
        if value < 1:
            raise ReferenceResolutionError(f"rounds are numbered from 1; got {value}")
        if value > len(conversation.turns):
            raise ReferenceResolutionError(f"there is no round {value}; {existing()}")
        return Reference.to_round(value)
    if isinstance(explicit, str):
        return _explicit_name(explicit, conversation, supplied, turn_names, existing)
    raise ReferenceResolutionError(
        f"an explicit reference is a round number, a segment name or 'none'; got {type(explicit).__name__}"
    )


def _explicit_name(name, conversation, supplied, turn_names, existing, name_only=False) -> Optional[Reference]:
    stripped = name.strip()
    if stripped in supplied:
        return Reference.to_segment(stripped)
    key = _key(stripped)
    if key in {_key(n) for n in supplied} or key in turn_names:
        return _segment_reference(key, supplied, turn_names, conversation)
    if name_only:
        raise ReferenceResolutionError(f"there is no segment named '{stripped}'; {existing()}")
    if key in NO_REFERENCE_WORDS:
        return None
    m = re.fullmatch(r"(?:r|round\s*)?(\d+)", key)
    if m:
        return _resolve_explicit(int(m.group(1)), conversation, supplied, turn_names)
    raise ReferenceResolutionError(f"there is no segment named '{stripped}'; {existing()}")


def resolve_reference(
    prompt: str,
    conversation: Conversation,
    segment_names: Iterable[str] = (),
    explicit: ExplicitReference = None,
) -> Optional[Reference]:
    """The earlier result ``prompt`` refers to, or None.

    segment_names: names of the segments that exist now (including hand-drawn
        ones); names of the conversation's own turns are always known. A name
        among ``segment_names`` resolves to a segment reference (its current
        mask is used); a turn's segment name that is not among them resolves to
        that turn's round.
    explicit: wins over the prompt: a Reference, a round number (int or "2",
        "R2"), a segment name, "none" (force no reference) or "auto"/"" (read
        the prompt).

    Raises ReferenceResolutionError for a round or segment that does not
    exist, a pronoun or "the previous ..." in the first round, and prompts
    naming two different earlier results.
    """
    supplied, turn_names = _known_names(conversation, segment_names)
    if explicit is not None:
        if not (isinstance(explicit, str) and explicit.strip().lower() in AUTO_WORDS):
            return _resolve_explicit(explicit, conversation, supplied, turn_names)

    if not isinstance(prompt, str):
        raise ReferenceResolutionError("the prompt must be text")
    text = _normalise(prompt)
    named, spans = _find_segment_names(text, supplied, turn_names, conversation)
    rest = _blank(text, spans)
    rounds = _find_rounds(rest)
    previous = _find_any(rest, _PREVIOUS_PATTERNS)
    pronouns = [p for p in _find_any(rest, _PRONOUN_PATTERNS) if not _IN_PROMPT_ANTECEDENT.search(rest[: p[0]])]

    n_turns = len(conversation.turns)
    if previous and n_turns == 0:
        raise ReferenceResolutionError(
            f"\"{previous[0][2]}\" refers to an earlier result, but this is the first round of the conversation: "
            "there is nothing to refer to yet"
        )
    strong: List[_Found] = named + rounds + [
        _Found(s, e, Reference.to_round(n_turns), t) for s, e, t in previous
    ]
    for found in strong:
        _check_exists(found, conversation, supplied)

    distinct: List[Reference] = []
    for found in strong:
        if found.reference not in distinct:
            distinct.append(found.reference)
    if len(distinct) > 1:
        # A segment that is a turn's own segment and that turn's round are the same result.
        segment_rounds = {
            turn_names[_key(r.segment)] for r in distinct if r.kind == "segment" and _key(r.segment) in turn_names
        }
        distinct = [r for r in distinct if not (r.kind == "round" and r.round in segment_rounds)]
    if len(distinct) > 1:
        mentions: List[str] = []
        for found in sorted(strong, key=lambda f: f.start):
            label = f"\"{found.text}\" ({found.reference.describe()})"
            if label not in mentions:
                mentions.append(label)
        raise ReferenceResolutionError(
            "the prompt refers to more than one earlier result: " + ", ".join(mentions)
            + "; MediRound takes one reference per turn: name only one, or pick the reference explicitly"
        )
    if distinct:
        return distinct[0]
    if pronouns:
        if n_turns == 0:
            raise ReferenceResolutionError(
                f"\"{pronouns[0][2]}\" refers to an earlier result, but this is the first round of the "
                "conversation: say what to segment instead"
            )
        return Reference.to_round(n_turns)
    return None
