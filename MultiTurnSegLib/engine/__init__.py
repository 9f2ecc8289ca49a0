"""MediRound engine: load a MediRound checkpoint and run multi-turn
segmentation on 2D slices (torch; imported only by the engine-side code).

    engine = MediRoundEngine.from_model_json("model.json")
    session = engine.new_session(image_rgb)          # (H, W, 3) uint8
    out = session.run_turn(TurnSpec("Segment the liver."))
    out.mask, out.answer, out.jcm_score
"""

from ._imports import hide_broken_torchvision

hide_broken_torchvision()

from .engine import MediRoundEngine  # noqa: E402
from .jcm import JCM_THRESHOLD  # noqa: E402
from .preprocessing import ReferenceInput, build_reference  # noqa: E402
from .session import SliceSession, TurnOutput  # noqa: E402
from .spec import ModelSpec, SamEncoderSpec  # noqa: E402
from .tokenizer import MediRoundTokenizer  # noqa: E402

__all__ = [
    "MediRoundEngine",
    "SliceSession",
    "TurnOutput",
    "ModelSpec",
    "SamEncoderSpec",
    "ReferenceInput",
    "build_reference",
    "MediRoundTokenizer",
    "JCM_THRESHOLD",
]
