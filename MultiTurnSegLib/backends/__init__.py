"""Where turns are computed: in-process (local) or on a remote worker.

Both implement :class:`MultiTurnSegLib.backends.base.Backend`; callers cannot
tell them apart.
"""

from .base import AnswerMode, Backend, TurnResult, TurnSpec

__all__ = ["AnswerMode", "Backend", "TurnResult", "TurnSpec"]
