"""``multiturnseg eval``: the official MR-MedSeg multi-round evaluation.

    multiturnseg eval DATA.json --dataset-dir DIR --model MODEL.json
        [--jcm-policy referenced|always|off] [--dump OUT.npz] [--metrics OUT.json]
        [--device auto|cpu|cuda] [--dtype fp32|bf16] [--limit N]

Prints Dice, gIoU and cIoU per round and overall (the paper's tables).

``--dump`` writes the captured arrays of every conversation as ``.npz`` (names,
shapes and NaN conventions of the golden fixtures' ``expected.npz``):

- one conversation in DATA.json: exactly the file given (``OUT.npz``);
- several: ``OUT_0000.npz``, ``OUT_0001.npz`` ... next to it (the number is the
  conversation's position in DATA.json, 0-based, zero-padded to 4 digits);
- a path that does not end in ``.npz`` is a folder: ``DIR/sample_0000.npz`` ...

``--metrics`` writes the numbers as JSON (per round, overall, the official
print-out names such as ``giou_round_0``/``ciou_all``, and per conversation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    from ..evaluation.runner import JCM_POLICIES  # numpy only; the engine is imported in run()

    parser = subparsers.add_parser(
        "eval",
        help="official MR-MedSeg multi-round evaluation (Dice, gIoU, cIoU per round)",
        description=(
            "Evaluate a MediRound model on a file in the official MR-MedSeg format (MediRound's "
            "--eval_json) the way the official code does: teacher-forced answers, later references "
            "rebuilt from the predicted masks, Judgment & Correction per --jcm-policy. Prints Dice, gIoU "
            "and cIoU per round and overall."
        ),
        epilog=(
            "Dumps (--dump): one conversation -> OUT.npz; several -> OUT_0000.npz, OUT_0001.npz, ... "
            "(position in DATA.json); a path not ending in .npz is a folder holding sample_0000.npz, ..."
        ),
    )
    parser.add_argument("data", metavar="DATA.json", help="conversations in the official MR-MedSeg JSON format")
    parser.add_argument("--dataset-dir", metavar="DIR", default=None,
                        help="folder the image/mask paths are relative to (default: the JSON file's folder)")
    parser.add_argument("--model", required=True, metavar="MODEL.json", help="model description file")
    parser.add_argument("--jcm-policy", default="referenced", choices=JCM_POLICIES,
                        help="JCM on round r only when a later turn refers to it (official evaluation, default), "
                        "on every round (paper's Algorithm 1), or never")
    parser.add_argument("--dump", metavar="OUT.npz", help="write the captured arrays of every conversation")
    parser.add_argument("--metrics", metavar="OUT.json", help="write the metrics as JSON")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="weight precision (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--load-in-4bit", action="store_true", help="4-bit language model (bitsandbytes, CUDA)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N conversations")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def dump_path(dump: str, index: int, n_samples: int) -> Path:
    """Where the dump of conversation ``index`` goes (see the module docstring)."""
    path = Path(dump)
    if path.suffix.lower() != ".npz":
        return path / f"sample_{index:04d}.npz"
    if n_samples == 1:
        return path
    return path.with_name(f"{path.stem}_{index:04d}.npz")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import InputError
    from ..evaluation.dataset import load_official_json
    from ..evaluation.metrics import format_metrics_table

    samples = load_official_json(args.data, args.dataset_dir)
    if args.limit is not None:
        if args.limit < 1:
            raise InputError("--limit must be at least 1")
        samples = samples[: args.limit]
    n_rounds = sum(s.num_rounds for s in samples)
    print(f"{args.data}: {len(samples)} conversation(s), {n_rounds} round(s); JCM policy {args.jcm_policy}")
    if args.dump:
        target = Path(args.dump)
        folder = target if target.suffix.lower() != ".npz" else target.parent
        folder.mkdir(parents=True, exist_ok=True)

    from ..engine import MediRoundEngine
    from ..evaluation.runner import run_official_evaluation

    engine = MediRoundEngine.from_model_json(args.model, device=args.device, dtype=args.dtype,
                                             load_in_4bit=bool(args.load_in_4bit))
    info = engine.info()
    print(f"model: {args.model} (stage {info.get('stage')}, {info.get('dtype')} on {info.get('device')})")
    written = []

    def on_sample(res):
        if args.dump and res.arrays is not None:
            path = dump_path(args.dump, res.index, len(samples))
            np.savez_compressed(path, **res.arrays)
            written.append(path)

    result = run_official_evaluation(
        engine, samples, jcm_policy=args.jcm_policy, progress=not args.no_progress,
        capture=bool(args.dump), on_sample=on_sample, keep_arrays=False,
    )
    print(format_metrics_table(result.metrics, title=f"MR-MedSeg metrics ({len(samples)} conversation(s)):"))
    print(f"{result.seconds:.1f} s ({result.seconds / max(1, n_rounds):.3f} s per round)")
    if written:
        shown = str(written[0]) if len(written) == 1 else f"{written[0]} ... {written[-1]}"
        print(f"wrote {len(written)} dump(s): {shown}")
    if args.metrics:
        out = Path(args.metrics)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = result.to_json()
        data.update({"data": str(args.data), "model": str(args.model), "engine": {
            k: info.get(k) for k in ("stage", "dtype", "device", "load_in_4bit", "versions")}})
        out.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0
