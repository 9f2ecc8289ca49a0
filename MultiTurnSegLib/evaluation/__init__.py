"""The official MR-MedSeg evaluation (MediRound's multi-round protocol).

    samples = load_official_json("eval.json", dataset_dir)
    result = run_official_evaluation(engine, samples, jcm_policy="referenced")
    print(format_metrics_table(result.metrics))

``dataset`` and ``metrics`` need numpy and Pillow only; ``runner`` drives a
:class:`~MultiTurnSegLib.engine.MediRoundEngine` (torch), imported lazily.
"""

from .dataset import OfficialSample, OfficialTurn, load_gt_mask, load_official_json, load_rgb_image, parse_official_samples
from .metrics import MetricAccumulator, SampleScore, format_metrics_table, score_masks

__all__ = [
    "OfficialSample",
    "OfficialTurn",
    "load_official_json",
    "parse_official_samples",
    "load_rgb_image",
    "load_gt_mask",
    "MetricAccumulator",
    "SampleScore",
    "score_masks",
    "format_metrics_table",
    "run_official_evaluation",
    "evaluate_sample",
    "JCM_POLICIES",
]


def __getattr__(name):  # lazy: the runner is only needed with an engine
    if name in ("run_official_evaluation", "evaluate_sample", "JCM_POLICIES", "EvaluationResult", "SampleResult",
                "CAPTURED_KEYS"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
