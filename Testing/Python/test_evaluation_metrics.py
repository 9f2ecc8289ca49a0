"""Dice / gIoU / cIoU on hand-made masks (official MR-MedSeg definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from MultiTurnSegLib.evaluation.metrics import MetricAccumulator, format_metrics_table, score_masks


def _mask(shape, *boxes):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_identical_masks_score_one():
    m = _mask((10, 10), (2, 6, 2, 6))
    s = score_masks(m, m)
    assert (s.intersection, s.union) == (16, 16)
    assert s.iou == 1.0 and s.dice == 1.0


def test_both_empty_scores_one():
    z = np.zeros((5, 7), bool)
    s = score_masks(z, z)
    assert s.union == 0 and s.iou == 1.0 and s.dice == 1.0


def test_one_empty_scores_zero():
    m = _mask((5, 5), (0, 2, 0, 2))
    z = np.zeros((5, 5), bool)
    assert score_masks(m, z).iou == 0.0 and score_masks(m, z).dice == 0.0
    assert score_masks(z, m).iou == 0.0 and score_masks(z, m).dice == 0.0


def test_partial_overlap():
    p = _mask((10, 10), (0, 4, 0, 4))  # 16 px
    g = _mask((10, 10), (2, 6, 2, 6))  # 16 px, 4 overlap
    s = score_masks(p, g)
    assert (s.intersection, s.union) == (4, 28)
    assert s.iou == pytest.approx(4 / 28)
    assert s.dice == pytest.approx(8 / 32)


def test_uint8_0_255_masks_accepted_and_shape_checked():
    p = _mask((4, 4), (0, 2, 0, 2)).astype(np.uint8) * 255
    s = score_masks(p, p > 0)
    assert s.iou == 1.0
    with pytest.raises(ValueError):
        score_masks(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        score_masks(np.zeros((3,)), np.zeros((3,)))


def test_accumulator_giou_vs_ciou_per_round_and_overall():
    acc = MetricAccumulator()
    big_p = _mask((20, 20), (0, 10, 0, 10))  # 100 px
    big_g = _mask((20, 20), (0, 10, 0, 5))  # 50 px inside -> IoU 0.5
    small_p = _mask((20, 20), (0, 1, 0, 1))  # 1 px
    small_g = _mask((20, 20), (5, 6, 5, 6))  # disjoint -> IoU 0
    acc.add(0, big_p, big_g)
    acc.add(0, small_p, small_g)
    z = np.zeros((20, 20), bool)
    acc.add(1, z, z)  # both empty -> 1
    summary = acc.summary()
    r0, r1 = summary["rounds"]
    assert r0["round"] == 0 and r0["n"] == 2
    assert r0["giou"] == pytest.approx((0.5 + 0.0) / 2)
    assert r0["ciou"] == pytest.approx(50 / (100 + 2))
    assert r0["dice"] == pytest.approx((2 * 50 / 150 + 0.0) / 2)
    assert r1["giou"] == 1.0 and r1["dice"] == 1.0 and r1["ciou"] == 1.0  # empty union -> 1
    overall = summary["overall"]
    assert overall["n"] == 3
    assert overall["giou"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert overall["ciou"] == pytest.approx(50 / 102)
    table = format_metrics_table(summary)
    assert "all" in table and table.count("\n") == 3
    assert " 1 " in table.splitlines()[1]  # rounds printed 1-based


def test_empty_accumulator_is_nan():
    s = MetricAccumulator().summary()
    assert s["rounds"] == [] and math.isnan(s["overall"]["giou"])
