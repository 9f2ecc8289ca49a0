#!/usr/bin/env python
"""Per-turn latency of the MediRound engine: incremental session vs the official loop.

For one conversation of ``--rounds`` turns (turn r >= 2 refers to round r-1,
template answers, JCM on every turn) it measures, in the same process on the
same weights:

- incremental: one ``SliceSession`` keeps the slice embeddings and the
  language model's key/value cache; a turn forwards only its own tokens;
- official:    every round recomputes everything from scratch, as the official
  evaluation loop does (SAM and CLIP encoders, every reference crop, the whole
  conversation so far) -- ``run_turn(full_recompute=True)``;
- first turn on a new slice: ``new_session(image)`` + round 1 (warm model);
- peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; the process's
  peak RSS (and the model's parameter bytes) on the CPU.

Models: on CUDA a full-size random MediRound (Mistral-7B, CLIP ViT-L/14-336,
SAM ViT-B) generated directly on the GPU in bf16 (no files), and the same with
a 4-bit language model (bitsandbytes); on the CPU the tiny fixture model
(Testing/Data/mediround-tiny). ``--model MODEL.json`` benchmarks any model.

    python benchmarks/bench_engine.py                # CPU: tiny model; CUDA: full-size bf16 + 4-bit
    python benchmarks/bench_engine.py --model model.json --device cuda --repeats 5
    python benchmarks/bench_engine.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {
    "warm_turn_round5_ms": 60.0,  # p50, template answer
    "first_turn_ms": 100.0,
    "speedup_round5": 5.0,
    "speedup_round10": 10.0,
    "peak_gb_bf16": 17.0,
    "peak_gb_4bit": 8.0,
}

PROMPTS = [
    "Segment the lungs in this chest CT slice.",
    "Segment the lesion inside round {prev}.",
    "Segment the structure next to it.",
    "Segment the vessel adjacent to round {prev}.",
    "Segment the region medial to the previous output.",
]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _image(size: int = 512) -> np.ndarray:
    """Mid axial slice of slicerio's chest CT, lung window, resized to size x size."""
    from PIL import Image

    from MultiTurnSegLib.cli.demo import demo_volume
    from MultiTurnSegLib.imaging import num_slices, read_volume, render_slice

    vol = read_volume(demo_volume())
    rgb = render_slice(vol, "axial", num_slices(vol, "axial") // 2, "lung")
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def _conversation(rounds: int):
    return [PROMPTS[0]] + [PROMPTS[1 + (r - 1) % (len(PROMPTS) - 1)].format(prev=r) for r in range(1, rounds)]


def run_conversation(engine, image, rounds: int, full_recompute: bool):
    """Per-round latency (s) of one conversation; round r >= 2 refers to round r-1."""
    from MultiTurnSegLib.backends.base import TurnSpec

    session = engine.new_session(image)
    times, prev = [], None
    for r, prompt in enumerate(_conversation(rounds)):
        spec = TurnSpec(prompt, reference_mask=prev if r else None)
        if r and (prev is None or not prev.any()):
            spec = TurnSpec(prompt, reference_mask=np.ones(image.shape[:2], bool))
        _sync(engine.device)
        t0 = time.perf_counter()
        out = session.run_turn(spec, apply_jcm=True, full_recompute=full_recompute)
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
        prev = out.mask
    return times


def first_turn(engine, image):
    from MultiTurnSegLib.backends.base import TurnSpec

    _sync(engine.device)
    t0 = time.perf_counter()
    session = engine.new_session(image)
    session.run_turn(TurnSpec(PROMPTS[0]), apply_jcm=True)
    _sync(engine.device)
    return time.perf_counter() - t0


def bench(engine, label: str, rounds: int, repeats: int, image) -> dict:
    import torch

    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up (kernels, allocator, caches)
    run_conversation(engine, image, min(rounds, 3), False)
    run_conversation(engine, image, min(rounds, 2), True)
    inc = [run_conversation(engine, image, rounds, False) for _ in range(repeats)]
    off = [run_conversation(engine, image, rounds, True) for _ in range(repeats)]
    other = np.ascontiguousarray(image[::-1])  # a different slice
    firsts = [first_turn(engine, other if i % 2 else image[:, ::-1].copy()) for i in range(max(3, repeats))]
    p50_inc = [statistics.median(t[r] for t in inc) for r in range(rounds)]
    p50_off = [statistics.median(t[r] for t in off) for r in range(rounds)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        peak_what = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_what = "process peak RSS"
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return {
        "label": label,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "load_in_4bit": bool(getattr(engine, "load_in_4bit", False)),
        "rounds": rounds,
        "repeats": repeats,
        "p50_incremental_ms": [1000 * t for t in p50_inc],
        "p50_official_ms": [1000 * t for t in p50_off],
        "speedup": [o / i for o, i in zip(p50_off, p50_inc)],
        "first_turn_ms_p50": 1000 * statistics.median(firsts),
        "peak_bytes": int(peak),
        "peak_what": peak_what,
        "param_bytes": int(params),
        "torch_threads": torch.get_num_threads(),
    }


def print_report(res: dict, file=sys.stdout) -> None:
    def gb(b):
        return b / 1024**3

    print(f"\n== {res['label']}: {res['device']}{' (' + res['gpu'] + ')' if res['gpu'] else ''}, {res['dtype']}"
          f"{', 4-bit LLM' if res['load_in_4bit'] else ''}; p50 of {res['repeats']} conversation(s), "
          f"{res['torch_threads']} torch thread(s)", file=file)
    print(f"{'round':>5} {'incremental ms':>15} {'official ms':>12} {'speedup':>8}", file=file)
    for r in range(res["rounds"]):
        print(f"{r + 1:>5} {res['p50_incremental_ms'][r]:>15.1f} {res['p50_official_ms'][r]:>12.1f} "
              f"{res['speedup'][r]:>7.1f}x", file=file)
    rounds = res["rounds"]
    rows = []
    if rounds >= 5:
        rows.append(("warm turn, round 5 (p50)", f"{res['p50_incremental_ms'][4]:.1f} ms",
                     f"<= {TARGETS['warm_turn_round5_ms']:.0f} ms", res["p50_incremental_ms"][4] <= TARGETS["warm_turn_round5_ms"]))
    rows.append(("first turn on a new slice (p50)", f"{res['first_turn_ms_p50']:.1f} ms",
                 f"<= {TARGETS['first_turn_ms']:.0f} ms", res["first_turn_ms_p50"] <= TARGETS["first_turn_ms"]))
    if rounds >= 5:
        rows.append(("speedup at round 5", f"{res['speedup'][4]:.1f}x", f">= {TARGETS['speedup_round5']:.0f}x",
                     res["speedup"][4] >= TARGETS["speedup_round5"]))
    if rounds >= 10:
        rows.append(("speedup at round 10", f"{res['speedup'][9]:.1f}x", f">= {TARGETS['speedup_round10']:.0f}x",
                     res["speedup"][9] >= TARGETS["speedup_round10"]))
    limit = TARGETS["peak_gb_4bit"] if res["load_in_4bit"] else TARGETS["peak_gb_bf16"]
    rows.append((f"peak memory ({res['peak_what']})", f"{gb(res['peak_bytes']):.2f} GB", f"<= {limit:.0f} GB",
                 gb(res["peak_bytes"]) <= limit))
    print(f"\n{'measure':<45} {'value':>12} {'target':>10}  status", file=file)
    for name, value, target, ok in rows:
        print(f"{name:<45} {value:>12} {target:>10}  {'met' if ok else 'MISSED'}", file=file)
    if res["device"] == "cpu":
        print("(targets are for the full-size model on a GPU; on the CPU with the tiny model they are informative)",
              file=file)


# --------------------------------------------------------------------------- full-size random model on the GPU
def full_size_engine(device: str = "cuda", load_in_4bit: bool = False, seed: int = 0):
    """A full-size random MediRound built on the GPU in bf16 (weights never touch the disk)."""
    import torch

    from MultiTurnSegLib.engine import random_weights as rw

    engine = rw.build_random_engine(rw.FULL_DIMS, seed=seed, device=device, dtype=torch.bfloat16,
                                    load_in_4bit=load_in_4bit)
    torch.cuda.empty_cache()
    return engine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model.json to benchmark (default: see above)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--no-4bit", action="store_true", help="CUDA: skip the 4-bit variant")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)

    import torch

    from MultiTurnSegLib.engine import MediRoundEngine
    from MultiTurnSegLib.engine.devices import resolve_device

    device = resolve_device(args.device)
    image = _image(args.image_size)
    results = []
    if args.model or device.type == "cpu":
        model = args.model or str(REPO / "Testing/Data/mediround-tiny/model/model.json")
        engine = MediRoundEngine.from_model_json(model, device=str(device))
        label = "tiny fixture model (Testing/Data/mediround-tiny)" if not args.model else args.model
        results.append(bench(engine, label, args.rounds, args.repeats, image))
        print_report(results[-1])
    else:
        variants = [("full-size random MediRound, bf16", False)]
        if not args.no_4bit:
            variants.append(("full-size random MediRound, 4-bit LLM", True))
        for label, four in variants:
            torch.cuda.empty_cache()
            try:
                engine = full_size_engine(str(device), load_in_4bit=four)
            except Exception as exc:  # e.g. bitsandbytes missing
                print(f"\n== {label}: not run ({type(exc).__name__}: {exc})")
                continue
            results.append(bench(engine, label, args.rounds, args.repeats, image))
            print_report(results[-1])
            engine.close()
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"targets": TARGETS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
