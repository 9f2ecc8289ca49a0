"""Names and colours of the segments that turns become.

``segment_name_for(2, "Segment the lesion inside round 1.")`` gives
``R2 lesion inside round 1``: the round, then the prompt without the leading
request ("please segment the ...", "分割") and trailing punctuation, kept short.
Colours come from a fixed palette of well-separated colours, cycling.
"""

from __future__ import annotations

import re
from typing import Tuple

from ..errors import InputError

MAX_NAME_LENGTH = 48

# Leading politeness / request phrases (English), removed repeatedly.
_EN_LEADING = re.compile(
    r"^(?:"
    r"please|kindly|now|next|then|also|and|ok(?:ay)?|"
    r"(?:can|could|would|will)\s+you(?:\s+please)?|"
    r"i\s+(?:want|would\s+like|need)\s+(?:you\s+)?to|"
    r"help\s+me(?:\s+to)?|"
    r"(?:let'?s|let\s+us)|"
    r"segment(?:ation\s+of)?|seg|delineate|outline|contour|mask|mark|highlight|"
    r"identify|locate|find|detect|show(?:\s+me)?|give\s+me|annotate|extract|draw|"
    r"label|trace|select|isolate|"
    r"where\s+is|what\s+is|"
    r"the|a|an"
    r")\b[\s,:;]*",
    re.IGNORECASE,
)
# Leading request phrases (Chinese), removed repeatedly.
_ZH_LEADING = re.compile(r"^(?:请你?|麻烦你?|帮我|帮忙|给我|再|然后|接着|现在|分割出?|勾画出?|标出|标注出?|找出|定位|识别出?|显示出?)[\s，,:：]*")
_TRAILING = re.compile(r"[\s.,;:!?。，；：！？、]+$")
_TRAILING_PLEASE = re.compile(r"[\s,]+please$", re.IGNORECASE)

# Well-separated colours (Kelly / Tableau inspired), r, g, b in 0..1.
PALETTE: Tuple[Tuple[float, float, float], ...] = (
    (0.902, 0.098, 0.294),  # red
    (0.235, 0.706, 0.294),  # green
    (0.263, 0.388, 0.847),  # blue
    (1.000, 0.882, 0.098),  # yellow
    (0.961, 0.510, 0.192),  # orange
    (0.569, 0.118, 0.706),  # purple
    (0.275, 0.941, 0.941),  # cyan
    (0.941, 0.196, 0.902),  # magenta
    (0.737, 0.965, 0.047),  # lime
    (0.980, 0.745, 0.831),  # pink
    (0.000, 0.502, 0.502),  # teal
    (0.604, 0.388, 0.141),  # brown
)


def _strip_request(text: str) -> str:
    previous = None
    while previous != text:
        previous = text
        text = _EN_LEADING.sub("", text, count=1)
        text = _ZH_LEADING.sub("", text, count=1)
        text = text.lstrip(" ,;:-")
    return text


def describe_prompt(prompt: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """The prompt shortened to what it asks for (no leading request, no trailing punctuation)."""
    text = " ".join(str(prompt).split())  # collapse whitespace and newlines
    text = _strip_request(text)
    previous = None
    while previous != text:
        previous = text
        text = _TRAILING.sub("", text)
        text = _TRAILING_PLEASE.sub("", text)
    if len(text) > max_length:
        cut = text[: max_length - 3]
        space = cut.rfind(" ")
        if space >= max_length // 2:
            cut = cut[:space]
        text = cut.rstrip(" ,;:-") + "..."
    return text


def segment_name_for(round_number: int, prompt: str) -> str:
    """``R<round> <what the prompt asks for>``, at most about 48 characters.

    >>> segment_name_for(2, "Please segment the lesion inside round 1.")
    'R2 lesion inside round 1'
    """
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
        raise InputError(f"round numbers start at 1; got {round_number!r}")
    prefix = f"R{round_number}"
    text = describe_prompt(prompt, max(8, MAX_NAME_LENGTH - len(prefix) - 1))
    return f"{prefix} {text}" if text else prefix


def segment_color_for(round_number: int) -> Tuple[float, float, float]:
    """Colour of round ``round_number``'s segment: the palette, cycling (round 1 -> first colour)."""
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
        raise InputError(f"round numbers start at 1; got {round_number!r}")
    return PALETTE[(round_number - 1) % len(PALETTE)]
