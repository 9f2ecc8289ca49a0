"""The ``mistral_instruct`` conversation template (LLaMA-2 style, empty system
prompt, no separator, ``</s>`` after every answer), one turn at a time.

Rendering turn by turn and concatenating gives exactly the official rendering
of the whole conversation; since every turn ends with ``</s>`` (a special
token), tokenizing turn by turn also gives exactly the same ids.
"""

from __future__ import annotations

from ..errors import InputError
from .tokenizer import ADDED_TOKENS, BBOX, CROP, IMAGE, SEG

IMAGE_PREFIX = IMAGE + "\n "  # round 1 shows the slice
REFERENCE_PREFIX = CROP + BBOX + " "  # a turn that refers to an earlier output
_RESERVED = ADDED_TOKENS + (IMAGE, "<s>", "</s>", "<unk>", "[INST]", "[/INST]")


def user_message(prompt: str, *, first: bool, refers: bool) -> str:
    # A first turn that refers to a segment (e.g. one drawn by hand) carries
    # both markers, in the order the official dataset would substitute them.
    return (IMAGE_PREFIX if first else "") + (REFERENCE_PREFIX if refers else "") + prompt


def render_question(prompt: str, *, first: bool, refers: bool) -> str:
    """The user part of a turn, up to where the assistant starts."""
    return f"[INST] {user_message(prompt, first=first, refers=refers)} [/INST]"


def render_turn(prompt: str, answer: str, *, first: bool, refers: bool) -> str:
    return render_question(prompt, first=first, refers=refers) + f" {answer} </s>"


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("A turn needs a non-empty text prompt.")
    found = [s for s in _RESERVED if s in prompt]
    if found:
        raise InputError(
            f"The prompt contains reserved model token(s) {', '.join(found)}; "
            "remove them (references are given as masks, not as tokens)."
        )
    return prompt


def check_answer(answer) -> str:
    if not isinstance(answer, str):
        raise InputError("The answer text must be a string containing [SEG].")
    if answer.count(SEG) != 1:
        raise InputError(f"The answer text must contain [SEG] exactly once, got: {answer!r}.")
    found = [s for s in _RESERVED if s != SEG and s in answer]
    if found:
        raise InputError(f"The answer contains reserved model token(s) {', '.join(found)}.")
    return answer
