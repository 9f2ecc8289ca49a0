"""Running turns: the glue the CLI, the Slicer module and the worker tests share.

``ChatSession(backend, image, conversation).ask("segment the lesion inside round 1")``
resolves the reference, captures the reference mask as it is now, runs the turn
on the backend with the whole history, and appends the new Turn. A failing turn
(bad prompt, bad reference, backend error) leaves the conversation as it was.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ..backends.base import AnswerMode, Backend, ProgressCallback, TurnSpec
from ..errors import BackendError, InputError, ReferenceResolutionError
from .model import Conversation, Reference, Turn, as_mask, now_iso
from .naming import segment_color_for, segment_name_for
from .references import ExplicitReference, resolve_reference

SegmentMasks = Union[Mapping[str, np.ndarray], Callable[[str], Optional[np.ndarray]]]
SegmentNames = Union[Sequence[str], Callable[[], Iterable[str]]]

JCM_POLICIES = ("always", "off")


class ChatSession:
    """Runs a conversation's turns on a backend.

    backend:        any :class:`~MultiTurnSegLib.backends.base.Backend`.
    image:          the slice as the model sees it, (H, W, 3) uint8, H x W =
                    ``conversation.image_size``.
    conversation:   the conversation to extend (modified in place).
    segment_masks:  the segments that can be referred to by name: a mapping
                    name -> (H, W) mask, or a callable name -> (H, W) mask or
                    None. It is asked when a turn runs, so an edited or
                    hand-drawn segment is referred to as it is now.
    segment_names:  names of the existing segments (a sequence or a callable
                    returning one) for finding names in prompts; defaults to
                    the mapping's keys.
    jcm:            "always" (run the Judgment & Correction head on every turn)
                    or "off".
    answer_mode:    how the answer text is obtained when ``ask`` gets none.
    """

    def __init__(
        self,
        backend: Backend,
        image: np.ndarray,
        conversation: Conversation,
        *,
        segment_masks: Optional[SegmentMasks] = None,
        segment_names: Optional[SegmentNames] = None,
        jcm: str = "always",
        answer_mode: Union[AnswerMode, str] = AnswerMode.TEMPLATE,
    ):
        if not isinstance(conversation, Conversation):
            raise InputError("ChatSession needs a Conversation")
        if jcm not in JCM_POLICIES:
            raise InputError(f"the JCM policy must be one of {', '.join(JCM_POLICIES)}; got {jcm!r}")
        try:
            self.answer_mode = AnswerMode(answer_mode)
        except ValueError:
            raise InputError(
                f"the answer mode must be one of {', '.join(m.value for m in AnswerMode)}; got {answer_mode!r}"
            ) from None
        if segment_masks is not None and not (isinstance(segment_masks, Mapping) or callable(segment_masks)):
            raise InputError("segment_masks must be a mapping or a callable name -> mask")
        self.backend = backend
        self.conversation = conversation
        self.image = self._check_image(image, conversation.image_size)
        self.segment_masks = segment_masks
        self.segment_names = segment_names
        self.jcm = jcm
        self._lock = threading.Lock()

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def _check_image(image, size) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            raise InputError("the slice image must be a numpy array")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(
                f"the slice image must be (rows, columns, 3) uint8; got shape {image.shape} and dtype {image.dtype}"
            )
        if tuple(image.shape[:2]) != tuple(size):
            raise InputError(
                f"the slice image is {image.shape[0]} x {image.shape[1]} but the conversation's slice is "
                f"{size[0]} x {size[1]}"
            )
        return image

    def known_segment_names(self) -> list:
        """Names of the existing segments (from ``segment_names`` or the mapping's keys)."""
        names = self.segment_names
        if names is None:
            names = list(self.segment_masks.keys()) if isinstance(self.segment_masks, Mapping) else []
        elif callable(names):
            names = names()
        return [n for n in names if isinstance(n, str)]

    def _segment_mask(self, name: str) -> Optional[np.ndarray]:
        source = self.segment_masks
        if source is None:
            return None
        if isinstance(source, Mapping):
            return source.get(name)
        return source(name)

    def resolve(self, prompt: str, reference: ExplicitReference = None) -> Optional[Reference]:
        """The reference ``ask`` would use for ``prompt`` (changes nothing)."""
        names = self.known_segment_names()
        explicit_name = None
        if isinstance(reference, Reference) and reference.kind == "segment":
            explicit_name = reference.segment
        elif isinstance(reference, str):
            explicit_name = reference.strip()
        if explicit_name and explicit_name not in names and self._segment_mask(explicit_name) is not None:
            names.append(explicit_name)  # a segment the callable knows but the name list does not
        return resolve_reference(prompt, self.conversation, names, explicit=reference)

    def reference_mask(self, reference: Optional[Reference]) -> Optional[np.ndarray]:
        """The (H, W) bool mask of ``reference`` as it is now (a copy), or None."""
        if reference is None:
            return None
        shape = self.conversation.image_size
        if reference.kind == "round":
            return self.conversation.turn(reference.round).mask.copy()
        mask = self._segment_mask(reference.segment)
        if mask is None:
            for turn in self.conversation.turns:  # a turn's segment that the front end does not track
                if turn.segment_name == reference.segment:
                    return turn.mask.copy()
            raise ReferenceResolutionError(
                f"segment '{reference.segment}' has no mask on this slice; {self.conversation.describe_rounds()}"
            )
        return as_mask(mask, shape, what=f"mask of segment '{reference.segment}'")

    # -- turns ---------------------------------------------------------------
    def ask(
        self,
        prompt: str,
        *,
        reference: ExplicitReference = None,
        answer: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> Turn:
        """Run one turn and append it to the conversation.

        reference: explicit reference (wins over the prompt): a Reference, a
            round number, a segment name, or "none".
        answer: assistant text with exactly one "[SEG]" to feed (teacher
            forcing); None lets the backend produce it (``answer_mode``).
        progress: called with (stage, fraction) while the backend works.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty: type what to segment, e.g. 'segment the liver'")
        prompt = prompt.strip()
        if answer is not None:
            if not isinstance(answer, str) or answer.count("[SEG]") != 1:
                raise InputError("an answer text must contain exactly one [SEG] token, e.g. 'Sure, [SEG].'")
        conv = self.conversation
        n_before = len(conv.turns)
        ref = self.resolve(prompt, reference)
        ref_mask = self.reference_mask(ref)
        history = conv.history_specs()
        started = time.perf_counter()
        result = self.backend.run_turn(
            self.image,
            history,
            TurnSpec(prompt=prompt, answer=answer, reference_mask=ref_mask),
            apply_jcm=self.jcm == "always",
            answer_mode=self.answer_mode,
            progress=progress,
        )
        elapsed = time.perf_counter() - started
        mask = np.asarray(result.mask)
        if mask.shape != tuple(conv.image_size):
            raise BackendError(
                f"the backend returned a mask of shape {mask.shape} for a {conv.image_size} slice"
            )
        round_number = n_before + 1
        timings = {str(k): float(v) for k, v in (result.timings or {}).items()}
        timings.setdefault("total", elapsed)
        turn = Turn(
            round=round_number,
            prompt=prompt,
            answer=result.answer,
            reference=ref,
            reference_mask=ref_mask,
            mask=mask.astype(bool, copy=True),
            jcm_score=None if result.jcm_score is None else float(result.jcm_score),
            jcm_refined=bool(result.jcm_refined),
            timings=timings,
            segment_name=segment_name_for(round_number, prompt),
            color=segment_color_for(round_number),
            created=now_iso(),
        )
        with self._lock:
            if len(conv.turns) != n_before:
                raise InputError("the conversation changed while the turn was running; run the turn again")
            conv.append(turn)
        return turn

    def undo(self) -> Turn:
        """Remove and return the last turn (InputError when there is none)."""
        with self._lock:
            return self.conversation.undo()
