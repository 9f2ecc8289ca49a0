"""The one interface every inference backend implements.

A request is self-contained: the 8-bit RGB slice, every earlier turn as the
model saw it (prompt, the answer text that was fed, the mask it referred to)
and the new turn. Backends may cache by content (slice embedding, key/value
cache of a conversation prefix) but never depend on state a restart loses.

This module imports numpy only (no torch): the Slicer client uses it.
"""

from __future__ import annotations

import abc
import enum
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

ProgressCallback = Callable[[str, float], None]
"""Called with a short stage name and a fraction in [0, 1]."""

log = logging.getLogger(__name__)


def report_progress(progress: Optional[ProgressCallback], stage: str, fraction: float) -> None:
    """Call ``progress`` if given; a broken progress display must not fail the turn."""
    if progress is not None:
        try:
            progress(stage, float(fraction))
        except Exception:
            log.debug("progress callback failed", exc_info=True)


class AnswerMode(str, enum.Enum):
    """How the assistant answer of a turn is obtained when the caller gives none."""

    TEMPLATE = "template"  # a fixed answer ("Sure, [SEG].")
    GENERATE = "generate"  # greedy generation until [SEG]


DEFAULT_ANSWER_TEMPLATE = "Sure, [SEG]."


@dataclass(frozen=True)
class TurnSpec:
    """One turn as the model sees it.

    prompt:          the user's text, without image or reference tokens.
    answer:          the assistant text containing exactly one "[SEG]"; None lets
                     the backend produce it (template or generation). Turns in a
                     history always carry the answer that was actually fed.
    reference_mask:  (H, W) bool mask this turn refers to (its crop and box are
                     built from it), or None for a turn that refers to nothing.
    """

    prompt: str
    answer: Optional[str] = None
    reference_mask: Optional[np.ndarray] = None


@dataclass
class TurnResult:
    """What a backend returns for one turn."""

    mask: np.ndarray  # (H, W) bool
    answer: str  # answer text that was fed to the model (contains "[SEG]")
    jcm_score: Optional[float]  # None when JCM did not run
    jcm_refined: bool  # the [SEG] token was replaced by the correction MLP
    timings: dict = field(default_factory=dict)  # stage name -> seconds


class Backend(abc.ABC):
    """Computes MediRound turns."""

    @abc.abstractmethod
    def info(self) -> dict:
        """Model and runtime description (stage, jcm_available, dtype, device, versions, limits)."""

    @abc.abstractmethod
    def run_turn(
        self,
        image: np.ndarray,
        history: Sequence[TurnSpec],
        turn: TurnSpec,
        *,
        apply_jcm: bool = True,
        answer_mode: AnswerMode = AnswerMode.TEMPLATE,
        progress: Optional[ProgressCallback] = None,
    ) -> TurnResult:
        """Run ``turn`` after ``history`` on ``image`` ((H, W, 3) uint8).

        apply_jcm: run the Judgment & Correction head on this turn's [SEG]
        token (ignored, with jcm_score None, for a stage-1 checkpoint).
        """

    def close(self) -> None:
        """Release resources (connections, GPU memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
