"""``multiturnseg chat``: a scripted multi-turn conversation on one slice of a volume.

One turn per prompt; a prompt refers to an earlier result in words ("round 1",
"the previous output", "it", a segment's name, Chinese phrasing too) or
explicitly in a script. Writes every turn as a segment of a ``.seg.nrrd``
(``R1 lungs``, ``R2 region inside round 1`` ...), optionally one PNG per turn
and the conversation transcript (JSON, reloadable).

Script format (``--script S.json``): a list of turns, or an object with a
``turns`` list (and optionally ``axis``, ``slice``, ``window`` used when the
command line does not give them). A turn is a prompt string or an object::

    {"prompt": "Segment the lesion inside round 1",
     "reference": 1,            # optional: round number, "R1", a segment name, "none" or "auto"
     "answer": "It is [SEG]."}  # optional: teacher-forced answer text (one [SEG])

If a turn fails (for example it refers to a round that does not exist), the
turns done so far are still written, the error is reported and the command
exits with a non-zero status.

``--propagate START:STOP`` then replays the whole conversation on slices START
to STOP (inclusive, same axis; see ``conversation.propagation``) and writes 3D
segments instead of the single-slice ones (same names, colours and tags; the
chat's own slice keeps its masks). A range outside the volume is refused before
any turn runs (exit 2, nothing written). If propagation fails or is interrupted
part-way, the single-slice segments are written and the command exits non-zero.
PNGs and the transcript are always of the chat's own slice.
"""

from __future__ import annotations

import argparse
import json
import logging
import numbers
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

ALLOWED_TURN_KEYS = {"prompt", "reference", "answer"}


@dataclass
class ScriptTurn:
    prompt: str
    reference: Union[None, int, str] = None
    answer: Optional[str] = None


@dataclass
class ChatOutcome:
    """What ``run_chat`` produced."""

    conversation: object
    segmentation_path: Optional[Path] = None
    dicom_seg_path: Optional[Path] = None
    png_paths: List[Path] = field(default_factory=list)
    transcript_path: Optional[Path] = None
    propagation: Optional[object] = None  # conversation.PropagationResult with --propagate
    error: Optional[BaseException] = None


# --------------------------------------------------------------------------- parser
def add_model_arguments(parser: argparse.ArgumentParser, *, remote: bool = True) -> None:
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group(required=False)
    source.add_argument("--model", metavar="MODEL.json", help="model description file (local inference)")
    if remote:
        source.add_argument("--worker", metavar="URL", help="URL of a MultiTurnSeg worker (remote inference)")
        group.add_argument("--token", help="the worker's bearer token (or set MULTITURNSEG_TOKEN)")
    group.add_argument("--device", default="auto", help="local inference: auto, cpu, cuda or cuda:N (default auto)")
    group.add_argument(
        "--dtype", default=None, choices=("fp32", "bf16", "fp16"),
        help="local inference: weight precision (default: bf16 on a GPU, fp32 on the CPU)",
    )
    group.add_argument("--load-in-4bit", action="store_true", help="local inference: 4-bit language model (bitsandbytes, CUDA)")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat",
        help="run a multi-turn conversation on one slice and write the segments",
        description=(
            "Run MediRound on one slice of a volume, one turn per prompt; later prompts can refer to "
            "earlier results ('round 1', 'the previous output', 'it', a segment name). Writes a .seg.nrrd "
            "with one segment per turn (named like 'R2 lesion inside round 1'), optional PNGs of every "
            "turn and a JSON transcript."
        ),
        epilog=(
            "Example: multiturnseg chat ct.nrrd --axis axial --slice 40 --window lung --model model.json "
            "--prompt 'Segment the lungs' --prompt 'Segment the lesion inside round 1' -o out.seg.nrrd "
            "--png-dir pngs --transcript chat.json"
        ),
    )
    parser.add_argument("volume", help="volume file (NRRD, NIfTI, ...) or DICOM series folder")
    parser.add_argument("--axis", default=None, help="axial, coronal or sagittal (default axial)")
    parser.add_argument("--slice", type=int, default=None, dest="slice_index",
                        help="slice index along the axis, 0-based (default: the middle slice)")
    parser.add_argument("--window", default=None,
                        help="window preset (ct-abdomen, lung, brain, bone, mediastinum, auto) or WIDTH/LEVEL "
                        "(default auto)")
    turns = parser.add_mutually_exclusive_group(required=True)
    turns.add_argument("--prompt", action="append", metavar="TEXT", help="a turn's prompt (repeat for more turns)")
    turns.add_argument("--script", metavar="S.json", help="JSON file with the turns (see 'multiturnseg chat --help')")
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT.seg.nrrd", help="segmentation file to write")
    parser.add_argument("--png-dir", metavar="DIR", help="write one PNG per turn (slice with all segments so far)")
    parser.add_argument("--transcript", metavar="OUT.json", help="write the conversation (reloadable JSON)")
    parser.add_argument("--dicom-series", metavar="DIR",
                        help="also export the segments as DICOM-SEG referencing this DICOM series "
                             "(the series VOLUME was read from)")
    parser.add_argument("--dicom-seg-output", metavar="OUT.dcm",
                        help="DICOM-SEG file to write with --dicom-series (default: OUT with .dcm instead of .seg.nrrd)")
    parser.add_argument("--jcm", default="always", choices=("always", "off"),
                        help="run the Judgment & Correction head on every turn (default) or never")
    parser.add_argument("--answer-mode", default="template", choices=("template", "generate"),
                        help="answer text fed to the model: a fixed template (default) or greedy generation")
    parser.add_argument("--propagate", metavar="START:STOP",
                        help="after the chat, replay it on slices START..STOP (inclusive) and write 3D segments")
    parser.set_defaults(func=run)
    return parser


# --------------------------------------------------------------------------- script
def load_script(path) -> Tuple[List[ScriptTurn], dict]:
    """Read a chat script; returns (turns, settings) — settings may hold axis/slice/window."""
    from ..errors import ConversationFormatError, InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"the script {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the script {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversationFormatError(f"the script {path} is not valid JSON: {exc}") from None
    settings = {}
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"turns", "axis", "slice", "window"})
        if unknown:
            raise ConversationFormatError(
                f"the script {path} has unknown key(s) {', '.join(unknown)}; allowed: turns, axis, slice, window"
            )
        settings = {k: data[k] for k in ("axis", "slice", "window") if k in data}
        if "slice" in settings and not _is_whole(settings["slice"]):
            raise ConversationFormatError(
                f"the script {path}: 'slice' must be a slice index (a whole number from 0); got {settings['slice']!r}"
            )
        data = data.get("turns")
    if not isinstance(data, list) or not data:
        raise ConversationFormatError(f"the script {path} must hold a non-empty list of turns")
    turns = []
    for i, item in enumerate(data, 1):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise ConversationFormatError(f"turn {i} of {path} must be a prompt text or an object with 'prompt'")
        unknown = sorted(set(item) - ALLOWED_TURN_KEYS)
        if unknown:
            raise ConversationFormatError(
                f"turn {i} of {path} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(ALLOWED_TURN_KEYS))}"
            )
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConversationFormatError(f"turn {i} of {path} needs a non-empty 'prompt'")
        ref = item.get("reference")
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (int, str))):
            raise ConversationFormatError(f"turn {i} of {path}: 'reference' must be a round number or a name")
        answer = item.get("answer")
        if answer is not None and (not isinstance(answer, str) or answer.count("[SEG]") != 1):
            raise ConversationFormatError(f"turn {i} of {path}: 'answer' must be text with exactly one [SEG]")
        turns.append(ScriptTurn(prompt=prompt, reference=ref, answer=answer))
    return turns, settings


def _is_whole(value) -> bool:
    """A slice index: an int >= 0 (numpy's too), not a bool, float or text."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _check_output(output) -> Path:
    from ..errors import InputError

    output = Path(output)
    if not output.name.endswith(".seg.nrrd"):
        raise InputError(f"the output {output} must be a .seg.nrrd file")
    return output


def _make_folder(folder: Path) -> None:
    from ..errors import InputError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- pictures
# Pillow's default font has no CJK glyphs: Chinese prompts would be drawn as
# boxes. These are the usual CJK fonts of Linux, macOS and Windows.
CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
)


_warned_no_cjk_font = False


def needs_cjk_font(texts) -> bool:
    """True when some text has characters beyond Latin, Greek and Cyrillic (e.g. Chinese)."""
    return any(ord(c) >= 0x2E80 for text in texts for c in text)


def _font(size: int, cjk: bool = False):
    """MULTITURNSEG_FONT if set, else a CJK font when ``cjk``, else Pillow's default."""
    from PIL import ImageFont

    for path in [os.environ.get("MULTITURNSEG_FONT")] + (list(CJK_FONTS) if cjk else []):
        if path:
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    global _warned_no_cjk_font
    if cjk and not _warned_no_cjk_font:
        _warned_no_cjk_font = True
        logger.warning("no font with Chinese characters found for the PNG captions; "
                       "set MULTITURNSEG_FONT to a .ttf/.ttc that has them")
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_turn_picture(image_rgb, turns, spacing: Optional[Tuple[float, float]] = None, min_width: int = 512,
                        title: Optional[str] = None):
    """The slice with every turn's mask in its colour, to physical scale, with a caption.

    ``turns``: the conversation's turns up to and including the one shown
    (the last one is described in the caption). Returns a PIL image.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from ..imaging import overlay, physical_size

    masks = [t.mask for t in turns]
    colors = [t.color for t in turns]
    blended = overlay(image_rgb, masks, colors, alpha=0.45, outline=True) if turns else np.asarray(image_rgb)
    picture = Image.fromarray(np.ascontiguousarray(blended))
    h, w = blended.shape[:2]
    if spacing is not None:
        h, w = physical_size((h, w), spacing)
    scale = max(1.0, min_width / float(w))
    size = (int(round(w * scale)), int(round(h * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.BILINEAR)

    width = picture.size[0]
    font_size = max(12, width // 40)
    cjk = needs_cjk_font([title or ""] + [t.prompt for t in turns] + [t.segment_name or "" for t in turns])
    font = _font(font_size, cjk)
    small = _font(max(11, int(font_size * 0.8)), cjk)
    chars = max(20, int(width / (font_size * 0.55)))
    lines: List[Tuple[str, object, Optional[tuple]]] = []
    if title:
        lines.append((title, small, None))
    if turns:
        last = turns[-1]
        for i, chunk in enumerate(textwrap.wrap(f"Round {last.round}: {last.prompt}", chars) or [""]):
            lines.append((chunk, font, None))
        details = [f"answer: {last.answer}"]
        if last.reference is not None:
            details.append(f"refers to {last.reference.describe()}")
        if last.jcm_score is not None:
            details.append(f"JCM {last.jcm_score:.2f}" + (" (corrected)" if last.jcm_refined else ""))
        area = int(np.count_nonzero(last.mask))
        details.append(f"{area} px ({100.0 * area / last.mask.size:.1f}%)")
        for chunk in textwrap.wrap(" | ".join(details), int(chars / 0.8)):
            lines.append((chunk, small, None))
        for t in turns:
            lines.append((t.segment_name or f"R{t.round}", small, tuple(int(round(c * 255)) for c in t.color)))
    pad = max(6, font_size // 2)
    line_h = [int(f.size * 1.35) if hasattr(f, "size") else 14 for _, f, _ in lines]
    caption_h = pad * 2 + sum(line_h)
    canvas = Image.new("RGB", (width, picture.size[1] + caption_h), (20, 20, 20))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = picture.size[1] + pad
    for (text, f, swatch), lh in zip(lines, line_h):
        x = pad
        if swatch is not None:
            box = int(lh * 0.7)
            draw.rectangle([x, y + (lh - box) // 2, x + box, y + (lh - box) // 2 + box], fill=swatch)
            x += box + pad
        draw.text((x, y), text, fill=(235, 235, 235), font=f)
        y += lh
    return canvas


# --------------------------------------------------------------------------- running
def make_backend(args):
    """LocalBackend (``--model``) or RemoteBackend (``--worker``)."""
    from ..errors import InputError

    worker = getattr(args, "worker", None)
    if worker:
        from ..backends.remote import RemoteBackend

        token = getattr(args, "token", None) or os.environ.get("MULTITURNSEG_TOKEN")
        return RemoteBackend(worker, token=token)
    if not args.model:
        raise InputError("give the model: --model MODEL.json (local) or --worker URL --token T (remote)")
    from ..backends.local import LocalBackend

    return LocalBackend.from_model_json(
        args.model, device=args.device, dtype=args.dtype, load_in_4bit=bool(args.load_in_4bit)
    )


def _describe_turn(turn) -> str:
    import numpy as np

    area = int(np.count_nonzero(turn.mask))
    parts = [f"{turn.segment_name}:"]
    if turn.reference is not None:
        parts.append(f"refers to {turn.reference.describe()};")
    parts.append(f"answer {turn.answer!r};")
    parts.append(f"{area} px ({100.0 * area / turn.mask.size:.1f}% of the slice)")
    if turn.jcm_score is not None:
        parts.append(f"; JCM score {turn.jcm_score:.3f}" + (" -> corrected" if turn.jcm_refined else ""))
    total = turn.timings.get("total")
    if total is not None:
        parts.append(f"; {total:.2f} s")
    return " ".join(parts).replace(" ;", ";")


def _terminology():
    """prompt -> Slicer TerminologyEntry tag (None where no code fits), if available."""
    try:
        from ..export.terminology import terminology_entry_for
    except ImportError:  # pragma: no cover - export is part of the library
        return None
    return terminology_entry_for


def run_chat(
    backend,
    volume_path,
    turns: Sequence[ScriptTurn],
    output,
    *,
    axis: str = "axial",
    slice_index: Optional[int] = None,
    window="auto",
    png_dir=None,
    transcript=None,
    jcm: str = "always",
    answer_mode: str = "template",
    picture_title: Optional[str] = None,
    dicom_series=None,
    dicom_seg_output=None,
    propagate=None,
    out=None,
) -> ChatOutcome:
    """Run the turns and write the outputs; never raises for a failing turn
    (the error is returned in ``ChatOutcome.error`` after writing what was done).

    propagate: ``(start, stop)`` slices (inclusive) to replay the conversation on; the 3D
    segments replace the single-slice ones.
    """
    from ..conversation import ChatSession, Conversation, conversation_segments, propagation_slices, save_conversation
    from ..errors import InputError
    from ..imaging import check_axis, num_slices, parse_window, read_volume, render_slice, slice_spacing
    from ..segmentation_io import Segmentation, write_seg_nrrd

    out = out or sys.stdout
    axis = check_axis(axis)
    parse_window(window)
    output = _check_output(output)
    volume = read_volume(volume_path)
    n = num_slices(volume, axis)
    if slice_index is not None and not _is_whole(slice_index):
        raise InputError(f"the slice index must be a whole number in 0..{n - 1}; got {slice_index!r}")
    index = n // 2 if slice_index is None else int(slice_index)
    if not 0 <= index < n:
        raise InputError(f"slice {index} is outside the volume: the {axis} axis has slices 0..{n - 1}")
    if propagate is not None:
        propagation_slices(volume, axis, tuple(propagate))  # refuse a bad range before any turn runs
    image = render_slice(volume, axis, index, window)
    spacing = slice_spacing(volume, axis)
    conversation = Conversation(
        volume=Path(str(volume_path)).name, axis=axis, slice_index=index,
        image_size=(int(image.shape[0]), int(image.shape[1])),
        window=window if isinstance(window, str) else tuple(window),
    )
    print(f"{Path(str(volume_path)).name}: {axis} slice {index} of 0..{n - 1} "
          f"({image.shape[1]}x{image.shape[0]} pixels), window {window}", file=out)
    session = ChatSession(backend, image, conversation, jcm=jcm, answer_mode=answer_mode)
    outcome = ChatOutcome(conversation=conversation)
    if png_dir is not None:
        png_dir = Path(png_dir)
        _make_folder(png_dir)
    for i, st in enumerate(turns, 1):
        try:
            turn = session.ask(st.prompt, reference=st.reference, answer=st.answer)
        except Exception as exc:  # keep what was done; report after writing
            outcome.error = exc
            print(f"turn {i} ({st.prompt!r}) failed: {exc}", file=out)
            break
        print(_describe_turn(turn), file=out)
        if png_dir is not None:
            path = png_dir / f"round_{turn.round:02d}.png"
            try:
                render_turn_picture(image, conversation.turns, spacing, title=picture_title).save(path)
            except OSError as exc:  # like a failed turn: stop, but still write the segments done so far
                outcome.error = InputError(f"cannot write the PNG {path}: {exc.strerror or exc}")
                print(f"turn {i}: {outcome.error}", file=out)
                break
            outcome.png_paths.append(path)

    if propagate is not None and conversation.turns and outcome.error is None:
        try:
            outcome.propagation = _propagate(backend, volume, conversation, tuple(propagate), window, jcm, out)
        except (Exception, KeyboardInterrupt) as exc:  # keep the single-slice result; report after writing
            outcome.error = exc
            print(f"propagation failed: {exc or type(exc).__name__}; writing the single-slice segments", file=out)

    if conversation.turns:
        segmentation = Segmentation.for_volume(volume)
        if outcome.propagation is not None:
            from ..conversation import propagated_segments

            segments = propagated_segments(conversation, volume, outcome.propagation, terminology=_terminology())
        else:
            segments = conversation_segments(conversation, volume, terminology=_terminology())
        segmentation.segments.extend(segments)
        _make_folder(output.parent)
        write_seg_nrrd(output, segmentation)
        outcome.segmentation_path = output
        span = f" on {axis} slices {propagate[0]}..{propagate[1]}" if outcome.propagation is not None else ""
        print(f"wrote {output} ({len(conversation.turns)} segment(s){span})", file=out)
        if dicom_series is not None:
            from ..export.dicom_seg import export_conversation_dicom_seg, write_dicom_seg

            dicom_out = Path(dicom_seg_output) if dicom_seg_output else output.with_name(
                output.name[: -len(".seg.nrrd")] + ".dcm")
            if outcome.propagation is not None:
                write_dicom_seg(segmentation, dicom_series, dicom_out)  # the same 3D segments
            else:
                export_conversation_dicom_seg(conversation, volume, dicom_series, dicom_out)
            outcome.dicom_seg_path = dicom_out
            print(f"wrote {dicom_out} (DICOM-SEG on {Path(str(dicom_series)).name})", file=out)
    if transcript is not None:
        transcript = Path(transcript)
        _make_folder(transcript.parent)
        save_conversation(conversation, transcript)
        outcome.transcript_path = transcript
        print(f"wrote {transcript}", file=out)
    if outcome.png_paths:
        print(f"wrote {len(outcome.png_paths)} PNG(s) to {png_dir}", file=out)
    return outcome


def _propagate(backend, volume, conversation, slice_range, window, jcm, out):
    """Run the propagation, printing about ten progress lines and the corrected answers."""
    from ..conversation import propagate

    start, stop = slice_range
    print(f"propagating {len(conversation.turns)} round(s) to {conversation.axis} slices {start}..{stop}", file=out)
    t0 = time.perf_counter()

    step = None

    def progress(done, total):
        nonlocal step
        step = step or max(1, -(-total // 10))  # at most about ten lines, however long the range
        if done and (done == total or done % step == 0):
            print(f"  {done}/{total} slices ({time.perf_counter() - t0:.1f} s)", file=out)

    result = propagate(backend, volume, conversation, slice_range, window=window, jcm=jcm, progress=progress)
    flagged = result.flagged()
    if flagged:
        shown = ", ".join(f"slice {k} R{r}" + (f" ({s:.2f})" if s is not None else "") for k, r, s in flagged[:10])
        more = f" and {len(flagged) - 10} more" if len(flagged) > 10 else ""
        print(f"  JCM corrected {len(flagged)} answer(s), check them: {shown}{more}", file=out)
    return result


def run(args: argparse.Namespace) -> int:
    if args.script:
        turns, settings = load_script(args.script)
    else:
        turns, settings = [ScriptTurn(prompt=p) for p in args.prompt], {}
    axis = args.axis or settings.get("axis") or "axial"
    slice_index = args.slice_index if args.slice_index is not None else settings.get("slice")
    window = args.window or settings.get("window") or "auto"
    # Check the cheap things before loading a model.
    from ..imaging import check_axis, parse_window

    check_axis(axis)
    parse_window(window)
    slice_range = None
    if getattr(args, "propagate", None) is not None:
        from ..conversation import parse_slice_range

        slice_range = parse_slice_range(args.propagate)
    _check_output(args.output)
    t0 = time.perf_counter()
    backend = make_backend(args)
    logger.info("backend ready in %.1f s", time.perf_counter() - t0)
    try:
        outcome = run_chat(
            backend, args.volume, turns, args.output, axis=axis, slice_index=slice_index, window=window,
            png_dir=args.png_dir, transcript=args.transcript, jcm=args.jcm, answer_mode=args.answer_mode,
            dicom_series=args.dicom_series, dicom_seg_output=args.dicom_seg_output, propagate=slice_range,
        )
    finally:
        backend.close()
    if outcome.error is not None:
        raise outcome.error
    return 0
