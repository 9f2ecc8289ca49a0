"""The official MR-MedSeg multi-round evaluation, on the incremental engine.

Semantics of the official ``validate_multi_turn_med_seg`` (stage 2):

- rounds run in order with the reference answers fed as they are (teacher
  forcing; nothing is generated);
- after round r is predicted, every later turn that refers to round r gets its
  crop and box rebuilt from round r's *predicted* mask (the whole image when at
  most 9 pixels of the masked image are non-zero in channel 0);
- Judgment & Correction runs on round r according to ``jcm_policy``:
  ``"referenced"`` (the official evaluation: only when a later turn refers to
  round r), ``"always"`` (the paper's Algorithm 1) or ``"off"``;
- the round's mask is ``logits > 0``, scored against the round's ground truth.

The official code recomputes the whole conversation for every round. Attention
is causal, so running the turns one after another on one
:class:`~MultiTurnSegLib.engine.SliceSession` (key/value cache kept, slice
encoded once) gives the same numbers for a fraction of the cost; the GT masks
that seed the references in the official code never reach a [SEG] read-out.

With ``capture=True`` every sample also yields the arrays of the official
run under the names, shapes, dtypes and NaN conventions of the golden
fixtures' ``expected.npz`` (see :data:`CAPTURED_KEYS`), for a ``.npz`` dump.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError
from .dataset import OfficialSample, load_gt_mask
from .metrics import MetricAccumulator, SampleScore, score_masks

log = logging.getLogger(__name__)

JCM_POLICIES = ("referenced", "always", "off")

CAPTURED_KEYS = (
    "input_ids", "seg_token_positions", "image_size_hw", "sam_resize_hw", "images_clip",
    "input_round_ind", "input_ref_slot", "init_ref_crops", "init_ref_boxes",
    "seg_embedding", "llm_hidden_before_seg", "sam_text_embed",
    "jcm_ran", "jcm_score", "jcm_refined", "low_res_logits", "logits", "mask",
    "referenced", "fallback", "ref_box", "ref_box_f64", "ref_crop",
    "clip_image_features", "crop_features", "box_features", "sam_image_embedding", "mask_area",
)


@dataclass
class SampleResult:
    """One conversation's outcome."""

    index: int
    image_path: str
    masks: np.ndarray  # (R, H, W) bool predictions
    scores: List[SampleScore]
    jcm_scores: List[Optional[float]]
    jcm_refined: List[bool]
    seconds: float
    arrays: Optional[Dict[str, np.ndarray]] = None  # with capture=True
    warnings: List[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "image": self.image_path,
            "seconds": round(self.seconds, 4),
            "warnings": list(self.warnings),
            "rounds": [
                {
                    "round": r,
                    "dice": s.dice,
                    "iou": s.iou,
                    "intersection": s.intersection,
                    "union": s.union,
                    "pred_area": s.pred_area,
                    "gt_area": s.gt_area,
                    "jcm_score": self.jcm_scores[r],
                    "jcm_refined": bool(self.jcm_refined[r]),
                }
                for r, s in enumerate(self.scores)
            ],
        }


@dataclass
class EvaluationResult:
    jcm_policy: str
    metrics: dict  # MetricAccumulator.summary()
    samples: List[SampleResult]
    seconds: float

    def official_names(self) -> Dict[str, float]:
        """The numbers under the names the official loop prints (giou_round_0 ..., giou_all)."""
        out: Dict[str, float] = {}
        for entry in self.metrics["rounds"]:
            r = entry["round"]
            out[f"giou_round_{r}"] = entry["giou"]
            out[f"ciou_round_{r}"] = entry["ciou"]
            out[f"dice_round_{r}"] = entry["dice"]
        overall = self.metrics["overall"]
        out["giou_all"], out["ciou_all"], out["dice_all"] = overall["giou"], overall["ciou"], overall["dice"]
        return out

    def to_json(self) -> dict:
        return {
            "jcm_policy": self.jcm_policy,
            "n_samples": len(self.samples),
            "seconds": round(self.seconds, 3),
            "rounds": self.metrics["rounds"],
            "overall": self.metrics["overall"],
            "official_names": self.official_names(),
            "samples": [s.to_json() for s in self.samples],
        }


def _jcm_flags(sample: OfficialSample, policy: str, jcm_available: bool) -> List[bool]:
    n = sample.num_rounds
    if not jcm_available or policy == "off":
        return [False] * n
    if policy == "always":
        return [True] * n
    referenced = {t.ref for t in sample.turns if t.ref is not None}
    return [r in referenced for r in range(n)]


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _seed_reference(engine, image: np.ndarray, mask_path, box_path):
    """Crop pixels and box the official *dataset* builds from a GT mask (the
    teacher-forced seeds): crop by the mask's bounding box (no fallback),
    box from the BOX-ENCODE mask's 255 pixels."""
    from PIL import Image

    from ..engine.preprocessing import clip_pixels, mask_box, square_crop

    with Image.open(mask_path) as m:
        mask = np.asarray(m.convert("L")) != 0
    if not mask.any():
        raise InputError(f"the reference seed mask {mask_path} is empty")
    square = square_crop(image * mask[..., None].astype(np.uint8), region=mask)
    pixels = clip_pixels(engine.clip_processor, Image.fromarray(square)).numpy()
    box = mask_box(load_gt_mask(box_path))
    return pixels.astype(np.float32), box


def _check_policy(jcm_policy: str) -> None:
    if jcm_policy not in JCM_POLICIES:
        raise InputError(f"the JCM policy must be one of {', '.join(JCM_POLICIES)}; got {jcm_policy!r}")


def evaluate_sample(engine, sample: OfficialSample, jcm_policy: str = "referenced", capture: bool = False,
                    image: Optional[np.ndarray] = None, gt_masks: Optional[np.ndarray] = None) -> SampleResult:
    """Run one conversation the official way (see the module docstring)."""
    from ..backends.base import TurnSpec

    _check_policy(jcm_policy)
    t0 = time.perf_counter()
    image = sample.load_image() if image is None else image
    gt_masks = sample.load_gt_masks(image.shape) if gt_masks is None else gt_masks
    R = sample.num_rounds
    H, W = image.shape[:2]
    jcm_flags = _jcm_flags(sample, jcm_policy, bool(getattr(engine, "jcm_available", True)))
    session = engine.new_session(image)
    outs = []
    masks = np.zeros((R, H, W), bool)
    for r, turn in enumerate(sample.turns):
        ref_mask = masks[turn.ref] if turn.ref is not None else None
        out = session.run_turn(
            TurnSpec(prompt=turn.prompt, answer=turn.answer, reference_mask=ref_mask), apply_jcm=jcm_flags[r]
        )
        mask = np.asarray(out.mask, bool)
        if mask.shape != (H, W):
            raise InputError(f"{sample.name}: the model returned a {mask.shape} mask for a {H}x{W} slice")
        masks[r] = mask
        outs.append(out)
    scores = [score_masks(masks[r], gt_masks[r]) for r in range(R)]
    result = SampleResult(
        index=sample.index,
        image_path=str(sample.image_path),
        masks=masks,
        scores=scores,
        jcm_scores=[None if o.jcm_score is None else float(o.jcm_score) for o in outs],
        jcm_refined=[bool(o.jcm_refined) for o in outs],
        seconds=0.0,
        warnings=list(sample.warnings),
    )
    if capture:
        result.arrays = _capture(engine, session, sample, image, outs, masks, jcm_flags)
    result.seconds = time.perf_counter() - t0
    return result


def _capture(engine, session, sample: OfficialSample, image, outs, masks, jcm_flags) -> Dict[str, np.ndarray]:
    R = sample.num_rounds
    H, W = image.shape[:2]
    tok = engine.tokenizer
    hidden = int(engine.model.bbox_encoder.out_features)
    ids = np.asarray(outs[-1].input_ids, dtype=np.int64)
    a: Dict[str, np.ndarray] = {}
    a["input_ids"] = ids
    a["seg_token_positions"] = np.flatnonzero(ids == tok.seg_id).astype(np.int64)
    a["image_size_hw"] = np.array([H, W], np.int64)
    a["sam_resize_hw"] = np.array(session.sam_resize_hw, np.int64)
    a["images_clip"] = _np(session.images_clip).astype(np.float32)
    crop_shape = a["images_clip"].shape  # (3, S, S): crops go through the same CLIP processor
    # reference slots: human turns with 'ind', in order
    slot_turns = [r for r, t in enumerate(sample.turns) if t.ref is not None]
    K = len(slot_turns)
    a["input_round_ind"] = np.array([-1 if t.ref is None else t.ref for t in sample.turns], np.int64)
    slot_of = {r: k for k, r in enumerate(slot_turns)}
    a["input_ref_slot"] = np.array([slot_of.get(r, -1) for r in range(R)], np.int64)
    init_crops = np.full((K, *crop_shape), np.nan, np.float32)
    init_boxes = np.full((K, 4), np.nan, np.float64)
    for k, r in enumerate(slot_turns):
        t = sample.turns[r]
        try:
            init_crops[k], init_boxes[k] = _seed_reference(engine, image, t.seed_ref_mask_path, t.seed_box_mask_path)
        except (OSError, InputError) as exc:
            log.warning("%s: cannot build the teacher-forced seed of round %d (%s); NaN in the dump", sample.name, r, exc)
    a["init_ref_crops"], a["init_ref_boxes"] = init_crops, init_boxes

    def stack(name, shape, dtype=np.float32):
        return np.stack([np.asarray(getattr(o, name), dtype=dtype).reshape(shape) for o in outs])

    a["seg_embedding"] = stack("seg_embedding", (-1,))
    a["llm_hidden_before_seg"] = stack("llm_hidden_before_seg", (-1,))
    a["sam_text_embed"] = stack("sam_text_embed", (-1,))
    a["jcm_ran"] = np.array([o.jcm_score is not None for o in outs], bool)
    a["jcm_score"] = np.array([np.nan if o.jcm_score is None else o.jcm_score for o in outs], np.float32)
    a["jcm_refined"] = np.array([bool(o.jcm_refined) for o in outs], bool)
    a["low_res_logits"] = stack("low_res_logits", np.shape(outs[0].low_res_logits))
    a["logits"] = stack("logits", (H, W))
    a["mask"] = masks.copy()
    referenced = np.zeros(R, bool)
    fallback = np.zeros(R, bool)
    ref_box64 = np.full((R, 4), np.nan, np.float64)
    ref_crop = np.full((R, *crop_shape), np.nan, np.float32)
    pred_crop_rows = np.full((K, hidden), np.nan, np.float32)
    pred_box_rows = np.full((K, hidden), np.nan, np.float32)
    for k, r in enumerate(slot_turns):
        o, src = outs[r], sample.turns[r].ref
        if not referenced[src]:
            referenced[src] = True
            fallback[src] = bool(o.fallback)
            ref_box64[src] = np.asarray(o.ref_box, np.float64)
            ref_crop[src] = np.asarray(o.ref_crop, np.float32)
        if o.crop_features is not None and len(o.crop_features):
            pred_crop_rows[k] = np.asarray(o.crop_features, np.float32).reshape(-1, hidden)[0]
            pred_box_rows[k] = np.asarray(o.box_features, np.float32).reshape(-1, hidden)[0]
    a["referenced"] = referenced
    a["fallback"] = fallback
    a["ref_box"] = ref_box64.astype(np.float32)
    a["ref_box_f64"] = ref_box64
    a["ref_crop"] = ref_crop
    a["clip_image_features"] = _np(session.clip_image_features).astype(np.float32)
    # Round r's full official forward holds every slot: slot k carries the
    # prediction-based reference once its referenced round is done (ind < r),
    # the teacher-forced GT seed before that.
    seed_crop_rows, seed_box_rows = map(_np, engine.reference_rows(np.nan_to_num(init_crops),
                                                                   np.nan_to_num(init_boxes)))
    seed_crop_rows[np.isnan(init_crops).any(axis=(1, 2, 3))] = np.nan
    seed_box_rows[np.isnan(init_boxes).any(1)] = np.nan
    crop_features = np.zeros((R, K, hidden), np.float32)
    box_features = np.zeros((R, K, hidden), np.float32)
    for r in range(R):
        for k, t in enumerate(slot_turns):
            done = sample.turns[t].ref < r
            crop_features[r, k] = pred_crop_rows[k] if done else seed_crop_rows[k]
            box_features[r, k] = pred_box_rows[k] if done else seed_box_rows[k]
    a["crop_features"], a["box_features"] = crop_features, box_features
    a["sam_image_embedding"] = _np(session.sam_image_embedding).reshape(-1, *session.sam_image_embedding.shape[-2:]).astype(np.float32)
    a["mask_area"] = masks.reshape(R, -1).sum(1).astype(np.int64)
    return a


def run_official_evaluation(
    engine,
    samples: Sequence[OfficialSample],
    jcm_policy: str = "referenced",
    progress: bool = True,
    capture: bool = False,
    on_sample: Optional[Callable[[SampleResult], None]] = None,
    keep_arrays: bool = True,
) -> EvaluationResult:
    """Evaluate every sample; per-round and overall Dice / gIoU / cIoU.

    capture:    collect the expected.npz-style arrays of every sample.
    on_sample:  called with each SampleResult as soon as it is done (e.g. to
                write its dump); with ``keep_arrays=False`` the arrays are
                dropped afterwards to bound memory on large datasets.
    progress:   a tqdm progress bar (on stderr) with the running gIoU.
    """
    _check_policy(jcm_policy)  # before the first sample, so an empty list is checked too
    if jcm_policy != "off" and not getattr(engine, "jcm_available", True):
        log.warning("the checkpoint has no JCM heads (stage 1): evaluating without Judgment & Correction")
    t0 = time.perf_counter()
    acc = MetricAccumulator()
    results: List[SampleResult] = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), unit="conv", desc="evaluating", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    iou_sum, iou_n = 0.0, 0
    try:
        for sample in samples:
            res = evaluate_sample(engine, sample, jcm_policy=jcm_policy, capture=capture)
            for w in res.warnings:
                log.warning("%s: %s", sample.name, w)
            for r, s in enumerate(res.scores):
                acc.add_score(r, s)
                iou_sum, iou_n = iou_sum + s.iou, iou_n + 1
            if on_sample is not None:
                on_sample(res)
            if not keep_arrays:
                res.arrays = None
            results.append(res)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(gIoU=f"{iou_sum / max(1, iou_n):.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return EvaluationResult(jcm_policy=jcm_policy, metrics=acc.summary(), samples=results,
                            seconds=time.perf_counter() - t0)
