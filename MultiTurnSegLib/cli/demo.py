"""``multiturnseg demo``: the whole pipeline in one command, no download.

Builds (once; cached) a tiny MediRound model with RANDOM weights in the
official on-disk layout, then runs a three-turn conversation on the chest CT
that ships with slicerio (mid axial slice, lung window): the lungs, the region
inside round 1, the structure next to it. Writes the ``.seg.nrrd``, one PNG per
turn and the transcript. The masks of a random model are meaningless; the
demo shows the workflow and the files, not segmentation quality.

Cache folder: ``$MULTITURNSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/multiturnseg``,
else ``~/.cache/multiturnseg``; the model lives in
``random-model-v<builder version>-seed<seed>/`` there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_PROMPTS = (
    "Segment the lungs in this chest CT slice.",
    "Segment the region inside round 1.",
    "Segment the structure next to it.",
)
DEMO_WINDOW = "lung"
CACHE_ENV = "MULTITURNSEG_CACHE_DIR"

RANDOM_WARNING = """\
NOTE: this demo uses a MediRound model with RANDOM weights (built locally, {size}).
Its masks and JCM scores are MEANINGLESS: they show the workflow and the output
files, not segmentation quality. To run a real MediRound checkpoint, write a
model.json such as

  {{
    "llava_med": "/models/llava-med-v1.5-mistral-7b",
    "clip":      "/models/clip-vit-large-patch14-336",
    "medsam":    "/models/medsam_vit_b.pth",
    "mediround": "/models/mediround-stage2"
  }}

(paths relative to the file are fine; "mediround" is the training output folder
holding the *.bin written by DeepSpeed's zero_to_fp32) and run e.g.

  multiturnseg chat CT.nrrd --axis axial --window lung --model model.json \\
      --prompt "Segment the lungs" --prompt "Segment the lesion inside round 1" \\
      -o out.seg.nrrd --png-dir out_png --transcript out.json
"""


def cache_dir() -> Path:
    """MultiTurnSeg's cache folder (not created)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "multiturnseg"
    return Path.home() / ".cache" / "multiturnseg"


def demo_model_json(seed: int = 0, out=None) -> Path:
    """The cached random demo model (built on first use)."""
    from ..engine.random_weights import BUILDER_VERSION, build_random_model

    folder = cache_dir() / f"random-model-v{BUILDER_VERSION}-seed{seed}"
    if not (folder / "model.json").is_file():
        print(f"building the random demo model in {folder} (once) ...", file=out or sys.stdout)
    return build_random_model(folder, seed=seed)


def demo_volume() -> Path:
    from ..errors import InputError

    try:
        import slicerio
    except ImportError:  # pragma: no cover - slicerio is a core dependency
        raise InputError("the demo needs the package slicerio (pip install slicerio)") from None
    path = Path(slicerio.__file__).resolve().parent / "data" / "CTChest4.nrrd"
    if not path.is_file():
        raise InputError(f"slicerio's sample CT {path} is missing; reinstall slicerio")
    return path


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="try everything with a random-weight model on a sample chest CT (no download)",
        description=(
            "Build (once, cached) a tiny MediRound model with random weights and run a three-turn "
            "conversation on slicerio's sample chest CT: writes demo.seg.nrrd, one PNG per turn and "
            "the transcript. The masks of a random model are meaningless."
        ),
    )
    parser.add_argument("-o", "--output-dir", default="multiturnseg-demo", metavar="DIR",
                        help="folder for the outputs (default ./multiturnseg-demo)")
    parser.add_argument("--model", metavar="MODEL.json",
                        help="use this model instead of the random one (e.g. real weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model (default 0)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..backends.local import LocalBackend
    from .chat import ScriptTurn, run_chat

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    volume = demo_volume()
    random_model = not args.model
    model_json = Path(args.model) if args.model else demo_model_json(args.seed)
    if random_model:
        print(RANDOM_WARNING.format(size="about 45 MB"))
    print(f"model: {model_json}")
    backend = LocalBackend.from_model_json(model_json, device=args.device)
    try:
        outcome = run_chat(
            backend,
            volume,
            [ScriptTurn(prompt=p) for p in DEMO_PROMPTS],
            out_dir / "demo.seg.nrrd",
            axis="axial",
            slice_index=None,
            window=DEMO_WINDOW,
            png_dir=out_dir,
            transcript=out_dir / "demo_transcript.json",
            jcm="always",
            answer_mode="template",
            picture_title="RANDOM-WEIGHT DEMO MODEL: masks are meaningless" if random_model else None,
        )
    finally:
        backend.close()
    if outcome.error is not None:
        raise outcome.error
    if random_model:
        print("\nReminder: random weights -> meaningless masks. See above for pointing MultiTurnSeg at real weights.")
    print(f"outputs in {out_dir.resolve()}")
    return 0
