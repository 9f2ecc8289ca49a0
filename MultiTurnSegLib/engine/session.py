"""One slice, one conversation: incremental MediRound turns.

The slice's SAM image embedding and CLIP patch features are computed once; the
language model's key/value cache of all earlier turns is kept, so a turn only
forwards its own tokens. Attention is causal, so the hidden state read out for
a turn's [SEG] (at the token before it) equals the one of a full forward over
the whole conversation, which ``full_recompute=True`` performs for comparison.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..backends.base import DEFAULT_ANSWER_TEMPLATE, AnswerMode, TurnResult, TurnSpec
from ..errors import InferenceError, InputError
from . import prompt as tpl
from .devices import device_errors
from .preprocessing import ReferenceInput, check_image, check_mask, clip_pixels, sam_pixels
from .sam import postprocess_logits
from .tokenizer import IMAGE_TOKEN_ID, SEG

if TYPE_CHECKING:  # pragma: no cover
    from .engine import MediRoundEngine

MAX_NEW_TOKENS = 48  # bound for AnswerMode.GENERATE


@dataclass
class TurnOutput(TurnResult):
    """A turn's result plus the intermediate numbers (names as in expected.npz)."""

    round_index: int = 0
    answer_generated: bool = False
    seg_appended: bool = False  # generation never produced [SEG]; it was appended
    input_ids: Optional[np.ndarray] = None  # whole conversation so far, int64
    seg_embedding: Optional[np.ndarray] = None  # (256,) before JCM
    llm_hidden_before_seg: Optional[np.ndarray] = None  # (hidden,)
    sam_text_embed: Optional[np.ndarray] = None  # (256,) given to SAM
    low_res_logits: Optional[np.ndarray] = None  # (1, 256, 256)
    logits: Optional[np.ndarray] = None  # (H, W) float32
    crop_features: Optional[np.ndarray] = None  # (K, hidden) rows inserted in this forward
    box_features: Optional[np.ndarray] = None  # (K, hidden)
    ref_box: Optional[np.ndarray] = None  # float64 [4] of this turn's reference
    ref_crop: Optional[np.ndarray] = None  # (3, 336, 336) of this turn's reference
    fallback: Optional[bool] = None  # this turn's reference used the whole image


@dataclass
class _Turn:
    spec: TurnSpec  # as fed (answer filled in)
    ids_start: int  # conversation ids before this turn
    cache_start: int  # cached (expanded) positions before this turn


@dataclass
class _Prepared:
    spec: TurnSpec
    ids: List[int]
    reference: Optional[ReferenceInput]


class SliceSession:
    """Conversation state on one slice. Create with ``engine.new_session(image)``."""

    def __init__(self, engine: "MediRoundEngine", image_rgb: np.ndarray):
        self.engine = engine
        self.image = check_image(image_rgb)
        self.image_size_hw: Tuple[int, int] = tuple(self.image.shape[:2])
        self.timings: Dict[str, float] = {}
        with device_errors("encoding the slice"), torch.no_grad():
            self._encode_slice()
        self._cache = engine.new_cache()
        self._ids: List[int] = []
        self._turns: List[_Turn] = []

    # --- public state ---------------------------------------------------------

    @property
    def fed_turns(self) -> List[TurnSpec]:
        return [t.spec for t in self._turns]

    @property
    def n_turns(self) -> int:
        return len(self._turns)

    @property
    def input_ids(self) -> np.ndarray:
        return np.asarray(self._ids, dtype=np.int64)

    def memory_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (
            self.images_clip, self.clip_image_features, self.sam_image_embedding))
        for layer in getattr(self._cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return int(total)

    # --- turns ----------------------------------------------------------------

    def run_turn(self, spec: TurnSpec, *, apply_jcm: bool = True,
                 answer_mode: AnswerMode = AnswerMode.TEMPLATE,
                 full_recompute: bool = False, max_new_tokens: int = MAX_NEW_TOKENS) -> TurnOutput:
        """Feed one turn and decode its mask. On any failure the session is
        left as it was."""
        t0 = time.perf_counter()
        generated, appended = False, False
        timings: Dict[str, float] = {}
        spec = self._check_spec(spec, need_answer=False)
        state = self._snapshot()
        try:
            with device_errors("running the turn"), torch.no_grad():
                # Built once: generation and the fed turn use the same reference.
                reference = self._reference(spec, timings)
                if spec.answer is None:
                    if AnswerMode(answer_mode) is AnswerMode.GENERATE:
                        t = time.perf_counter()
                        answer, appended = self._generate_answer(spec, reference, max_new_tokens)
                        timings["generate"] = time.perf_counter() - t
                        generated = True
                    else:
                        answer = DEFAULT_ANSWER_TEMPLATE
                    spec = replace(spec, answer=answer)
                prepared = self._prepare(spec, not self._turns, reference)
                if full_recompute:
                    hidden, offsets, crop_rows, box_rows = self._recompute_all(prepared, timings)
                else:
                    hidden, offsets, crop_rows, box_rows = self._forward([prepared], self._cache, timings)
                self._record(prepared)
                out = self._decode(prepared, hidden, offsets[-1], apply_jcm, timings)
        except BaseException:
            self._restore(state)
            raise
        out.crop_features = crop_rows
        out.box_features = box_rows
        out.answer_generated, out.seg_appended = generated, appended
        timings["total"] = time.perf_counter() - t0
        out.timings = timings
        return out

    def extend(self, spec: TurnSpec) -> None:
        """Feed a history turn (teacher forced, answer required) without decoding a mask."""
        spec = self._check_spec(spec, need_answer=True)
        state = self._snapshot()
        try:
            with device_errors("feeding a history turn"), torch.no_grad():
                prepared = self._prepare(spec, not self._turns, self._reference(spec, {}))
                self._forward([prepared], self._cache, {})
                self._record(prepared)
        except BaseException:
            self._restore(state)
            raise

    def truncate(self, n_turns: int) -> None:
        """Keep only the first ``n_turns`` turns."""
        if not 0 <= n_turns <= len(self._turns):
            raise InputError(f"Cannot keep {n_turns} turns of a conversation with {len(self._turns)}.")
        if n_turns == len(self._turns):
            return
        cut = self._turns[n_turns]
        self._crop_cache(cut.cache_start)
        del self._ids[cut.ids_start:]
        del self._turns[n_turns:]

    def undo(self) -> TurnSpec:
        """Forget the last turn; returns it."""
        if not self._turns:
            raise InputError("There is no turn to undo on this slice.")
        last = self._turns[-1].spec
        self.truncate(len(self._turns) - 1)
        return last

    # --- internals ------------------------------------------------------------

    def _encode_slice(self) -> None:
        """Sets images_clip, clip_image_features, sam_image_embedding, sam_resize_hw."""
        eng, model = self.engine, self.engine.model
        t = time.perf_counter()
        images_clip = clip_pixels(eng.clip_processor, self.image)
        clip_feats = model.encode_image(images_clip.unsqueeze(0).to(eng.device, eng.dtype))[0]
        self.timings["clip_image"] = time.perf_counter() - t
        t = time.perf_counter()
        pixels, resize_hw = sam_pixels(self.image, model.sam.img_size)
        sam_embed = model.sam.image_encoder(pixels.to(eng.device, eng.dtype))[0]
        self.timings["sam_image_encoder"] = time.perf_counter() - t
        self.images_clip, self.clip_image_features = images_clip, clip_feats
        self.sam_image_embedding, self.sam_resize_hw = sam_embed, resize_hw

    def _check_spec(self, spec: TurnSpec, need_answer: bool) -> TurnSpec:
        if not isinstance(spec, TurnSpec):
            raise InputError("A turn must be given as a TurnSpec.")
        tpl.check_prompt(spec.prompt)
        if spec.answer is None and need_answer:
            raise InputError("A history turn needs the answer text that was fed (with [SEG]).")
        if spec.answer is not None:
            tpl.check_answer(spec.answer)
        if spec.reference_mask is not None:
            check_mask(spec.reference_mask, self.image_size_hw)
        return spec

    def _reference(self, spec: TurnSpec, timings) -> Optional[ReferenceInput]:
        if spec.reference_mask is None:
            return None
        t = time.perf_counter()
        reference = self.engine.build_reference(self.image, spec.reference_mask)
        timings["reference"] = time.perf_counter() - t
        return reference

    def _prepare(self, spec: TurnSpec, first: bool, reference: Optional[ReferenceInput]) -> _Prepared:
        text = tpl.render_turn(spec.prompt, spec.answer, first=first, refers=reference is not None)
        return _Prepared(spec=spec, ids=self.engine.tokenizer.encode(text, add_bos=first), reference=reference)

    def _forward(self, turns: List[_Prepared], cache, timings):
        """Forward the turns' tokens after ``cache``; returns the last hidden
        states (post-norm), each turn's expanded offset map and the inserted
        reference rows."""
        eng, model = self.engine, self.engine.model
        refs = [p.reference for p in turns if p.reference is not None]
        t = time.perf_counter()
        if refs:
            crop_rows, box_rows = eng.reference_rows(torch.stack([r.crop_pixels for r in refs]),
                                                     np.stack([r.box for r in refs]))
        else:
            crop_rows, box_rows = eng.reference_rows([], [])
        timings["reference_features"] = time.perf_counter() - t
        t = time.perf_counter()
        ids = [i for p in turns for i in p.ids]
        embeds, expanded = self._embed(ids, crop_rows, box_rows)
        out = model.llm.model(inputs_embeds=embeds.unsqueeze(0), past_key_values=cache, use_cache=True)
        timings["llm"] = time.perf_counter() - t
        offsets, k = [], 0
        for p in turns:
            offsets.append(expanded[k:k + len(p.ids)])
            k += len(p.ids)
        return (out.last_hidden_state[0], offsets, _np(crop_rows), _np(box_rows))

    def _embed(self, ids: List[int], crop_rows, box_rows):
        """Input embeddings: <image> expands to the CLIP patch features, then
        [CROPPEDIMAGE]/[BBOXINPUT] rows are replaced in order of appearance.
        Returns the embeddings and, for every id, its expanded position."""
        model, tok = self.engine.model, self.engine.tokenizer
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.engine.device)
        text = model.embed_tokens(ids_t.clamp(min=0))
        pieces, expanded, pos, last = [], [], 0, 0
        for i, idx in enumerate(ids):
            expanded.append(pos)
            if idx == IMAGE_TOKEN_ID:
                pieces.append(text[last:i])
                pieces.append(self.clip_image_features.to(text.dtype))
                last = i + 1
                pos += self.clip_image_features.shape[0]
            else:
                pos += 1
        pieces.append(text[last:])
        embeds = torch.cat(pieces, dim=0) if len(pieces) > 1 else text
        expanded = np.asarray(expanded, dtype=np.int64)
        ids_np = np.asarray(ids)
        for token_id, rows, what in ((tok.crop_id, crop_rows, "crop"), (tok.bbox_id, box_rows, "box")):
            where = expanded[ids_np == token_id]
            if len(where) != rows.shape[0]:
                raise InferenceError(f"Internal error: {len(where)} {what} tokens but {rows.shape[0]} rows.")
            if len(where):
                embeds = embeds.clone() if embeds is text else embeds
                embeds[torch.as_tensor(where, device=embeds.device)] = rows.to(embeds.dtype)
        return embeds, expanded

    def _decode(self, p: _Prepared, hidden, expanded, apply_jcm: bool, timings) -> TurnOutput:
        eng, model, tok = self.engine, self.engine.model, self.engine.tokenizer
        seg_at = p.ids.index(tok.seg_id)
        # LISA's convention: the [SEG] feature is the state of the token before it.
        # ``expanded`` indexes into ``hidden`` (both cover the forwarded tokens).
        before = hidden[int(expanded[seg_at - 1])]
        t = time.perf_counter()
        seg = model.seg_embedding(before)
        token, score, refined = seg, None, False
        if apply_jcm and model.jcm is not None:
            token, score, refined = model.jcm(seg.unsqueeze(0), eng.jcm_threshold)
            token = token[0]
        timings["jcm"] = time.perf_counter() - t
        t = time.perf_counter()
        low_res = model.sam.decode(token.unsqueeze(0), self.sam_image_embedding.unsqueeze(0), eng.dense_pe)
        timings["sam_decode"] = time.perf_counter() - t
        t = time.perf_counter()
        logits = postprocess_logits(low_res, self.sam_resize_hw, self.image_size_hw, model.sam.img_size)
        logits_np = _np(logits)
        timings["postprocess"] = time.perf_counter() - t
        ref = p.reference
        return TurnOutput(
            mask=logits_np > 0,
            answer=p.spec.answer,
            jcm_score=score,
            jcm_refined=refined,
            round_index=len(self._turns) - 1,
            input_ids=self.input_ids,
            seg_embedding=_np(seg),
            llm_hidden_before_seg=_np(before),
            sam_text_embed=_np(token),
            low_res_logits=_np(low_res[0]),
            logits=logits_np,
            ref_box=None if ref is None else ref.box.copy(),
            ref_crop=None if ref is None else ref.crop_pixels.numpy(),
            fallback=None if ref is None else ref.fallback,
        )

    def _record(self, p: _Prepared) -> None:
        # Cached positions so far: every id is one, each <image> one per patch.
        n_img = self._ids.count(IMAGE_TOKEN_ID)
        cache_start = len(self._ids) + n_img * (self.clip_image_features.shape[0] - 1)
        self._turns.append(_Turn(spec=p.spec, ids_start=len(self._ids), cache_start=cache_start))
        self._ids.extend(p.ids)

    def _recompute_all(self, prepared: _Prepared, timings):
        """The official way: everything from scratch (slice encoders, every
        reference crop, the whole conversation); the session continues from
        the recomputed cache."""
        t = time.perf_counter()
        self._encode_slice()
        timings["slice_encoders"] = time.perf_counter() - t
        history = [self._prepare(tr.spec, i == 0, self._reference(tr.spec, {})) for i, tr in enumerate(self._turns)]
        turns = history + [prepared]
        cache = self.engine.new_cache()
        hidden, offsets, crop_rows, box_rows = self._forward(turns, cache, timings)
        self._cache = cache
        return hidden, offsets, crop_rows, box_rows

    # --- rollback -------------------------------------------------------------

    def _snapshot(self):
        layers = [(getattr(l, "keys", None), getattr(l, "values", None)) for l in getattr(self._cache, "layers", [])]
        return (self._cache, layers, len(self._ids), len(self._turns),
                (self.images_clip, self.clip_image_features, self.sam_image_embedding, self.sam_resize_hw))

    def _restore(self, state) -> None:
        cache, layers, n_ids, n_turns, slice_state = state
        self._cache = cache
        # update() concatenates into new tensors, so the old ones are intact:
        # putting them back restores the cache exactly, even after a forward
        # that failed half-way through its layers.
        for layer, (k, v) in zip(getattr(cache, "layers", []), layers):
            layer.keys, layer.values = k, v
            if k is None:
                layer.is_initialized = False
        del self._ids[n_ids:]
        del self._turns[n_turns:]
        (self.images_clip, self.clip_image_features, self.sam_image_embedding, self.sam_resize_hw) = slice_state

    def _crop_cache(self, length: int) -> None:
        for layer in getattr(self._cache, "layers", []):
            n = layer.get_seq_length()
            if n > length:
                layer.crop(length - n)
                # crop() leaves views of the old tensors; copy so the memory is
                # really released (and memory_bytes() stays truthful).
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()

    # --- generation -----------------------------------------------------------

    def _generate_answer(self, spec: TurnSpec, reference: Optional[ReferenceInput],
                         max_new_tokens: int) -> Tuple[str, bool]:
        """Greedy answer up to [SEG]; the cache is put back afterwards (the turn
        is then fed teacher-forced with the text, so a replay of fed_turns
        reproduces it exactly). Returns (answer, seg_appended)."""
        eng, model, tok = self.engine, self.engine.model, self.engine.tokenizer
        first = not self._turns
        question = tpl.render_question(spec.prompt, first=first, refers=reference is not None)
        p = _Prepared(spec=spec, ids=tok.encode(question, add_bos=first), reference=reference)
        state = self._snapshot()
        banned = [i for i in (tok.bos_id, tok.unk_id, tok.bbox_id, tok.crop_id) if i >= 0]
        generated: List[int] = []
        found = False
        try:
            hidden, _, _, _ = self._forward([p], self._cache, {})
            for _ in range(max(1, int(max_new_tokens))):
                logits = model.llm.lm_head(hidden[-1]).float()
                logits[banned] = float("-inf")
                nxt = int(torch.argmax(logits))
                if nxt == tok.seg_id:
                    found = True
                    break
                if nxt == tok.eos_id:
                    break
                generated.append(nxt)
                emb = model.embed_tokens(torch.tensor([nxt], device=eng.device))
                hidden = model.llm.model(inputs_embeds=emb.unsqueeze(0), past_key_values=self._cache,
                                         use_cache=True).last_hidden_state[0]
        finally:
            self._restore(state)
        text = tok.decode(generated)
        for reserved in tpl._RESERVED:
            text = text.replace(reserved, "")
        if found:
            return text + SEG + ".", False
        text = text.strip()
        return (text + " " if text else "") + SEG + ".", True


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
