"""Segmentation metrics of the MediRound paper tables (MR-MedSeg).

Per round and overall (all rounds of all samples pooled):

- **Dice**: mean over samples of ``2 |P ∩ G| / (|P| + |G|)``;
- **gIoU**: mean over samples of ``|P ∩ G| / |P ∪ G|``;
- **cIoU**: total intersection over total union (pixels pooled over samples).

A sample whose prediction and ground truth are both empty scores 1 for Dice
and gIoU (as in the official evaluation loop, which adds 1 where the union is
empty). If the pooled union of a whole group is empty, its cIoU is reported
as 1.0 (the official loop would print 0 there; such a group never occurs in a
real benchmark). The official loop adds tiny epsilons (1e-5, 1e-6, 1e-10) to
the denominators; these change results by far less than 1e-4 and are left
out here.

numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

__all__ = [
    "SampleScore",
    "score_masks",
    "MetricAccumulator",
    "format_metrics_table",
]


@dataclass(frozen=True)
class SampleScore:
    """Scores of one predicted mask against its ground truth."""

    intersection: int
    union: int
    pred_area: int
    gt_area: int

    @property
    def iou(self) -> float:
        if self.union == 0:
            return 1.0
        return self.intersection / self.union

    @property
    def dice(self) -> float:
        if self.union == 0:
            return 1.0
        return 2.0 * self.intersection / (self.pred_area + self.gt_area)


def _as_bool_mask(mask, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool:
        arr = arr != 0
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D mask, got shape {arr.shape}")
    return arr


def score_masks(pred, gt) -> SampleScore:
    """Intersection/union/areas of two (H, W) masks (bool, or non-zero = inside)."""
    p = _as_bool_mask(pred, "prediction")
    g = _as_bool_mask(gt, "ground truth")
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in size")
    inter = int(np.count_nonzero(p & g))
    pa = int(np.count_nonzero(p))
    ga = int(np.count_nonzero(g))
    return SampleScore(intersection=inter, union=pa + ga - inter, pred_area=pa, gt_area=ga)


@dataclass
class _Group:
    scores: List[SampleScore] = field(default_factory=list)

    def summary(self) -> dict:
        n = len(self.scores)
        if n == 0:
            return {"n": 0, "dice": float("nan"), "giou": float("nan"), "ciou": float("nan")}
        inter = sum(s.intersection for s in self.scores)
        union = sum(s.union for s in self.scores)
        return {
            "n": n,
            "dice": float(np.mean([s.dice for s in self.scores])),
            "giou": float(np.mean([s.iou for s in self.scores])),
            "ciou": float(inter / union) if union > 0 else 1.0,
            "intersection": int(inter),
            "union": int(union),
        }


class MetricAccumulator:
    """Collects per-round scores; ``summary()`` gives per-round and overall metrics.

    Rounds are 0-based here (the official print-out's ``round_0`` is the first
    turn).
    """

    def __init__(self) -> None:
        self._rounds: Dict[int, _Group] = {}
        self._all = _Group()

    def add(self, round_index: int, pred, gt) -> SampleScore:
        score = score_masks(pred, gt)
        self.add_score(round_index, score)
        return score

    def add_score(self, round_index: int, score: SampleScore) -> None:
        self._rounds.setdefault(int(round_index), _Group()).scores.append(score)
        self._all.scores.append(score)

    @property
    def num_scores(self) -> int:
        return len(self._all.scores)

    def summary(self) -> dict:
        rounds = []
        for r in sorted(self._rounds):
            entry = {"round": r}
            entry.update(self._rounds[r].summary())
            rounds.append(entry)
        return {"rounds": rounds, "overall": self._all.summary()}


def format_metrics_table(summary: dict, title: Optional[str] = None) -> str:
    """A plain-text table: one line per round (1-based, as users count) and 'all'."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'round':>7} {'samples':>8} {'Dice':>8} {'gIoU':>8} {'cIoU':>8}")
    for entry in summary.get("rounds", []):
        lines.append(
            f"{entry['round'] + 1:>7} {entry['n']:>8} {entry['dice']:>8.4f} {entry['giou']:>8.4f} {entry['ciou']:>8.4f}"
        )
    overall = summary.get("overall", {})
    if overall:
        lines.append(
            f"{'all':>7} {overall['n']:>8} {overall['dice']:>8.4f} {overall['giou']:>8.4f} {overall['ciou']:>8.4f}"
        )
    return "\n".join(lines)
