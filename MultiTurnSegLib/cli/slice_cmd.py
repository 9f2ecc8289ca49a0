"""``multiturnseg slice``: write one slice of a volume as the PNG the model would see."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "slice",
        help="render one axial/coronal/sagittal slice of a volume to PNG",
        description=(
            "Render one slice of a volume (NRRD, NIfTI, or a DICOM series folder) as an 8-bit "
            "PNG in radiological orientation: axial with anterior at the top and patient right "
            "on the left; coronal and sagittal with superior at the top. The PNG is stretched "
            "to physical proportions for viewing unless --voxel-grid is given (the model itself "
            "always sees the voxel grid)."
        ),
    )
    parser.add_argument("volume", help="volume file or DICOM series folder")
    parser.add_argument("--axis", default="axial", help="axial, coronal or sagittal (default: axial)")
    parser.add_argument(
        "--index",
        type=int,
        default=None,
        help="slice index, 0-based (axial counts inferior->superior, coronal posterior->anterior, "
        "sagittal left->right); default: the middle slice",
    )
    parser.add_argument(
        "--window",
        default="auto",
        help="window preset (ct-abdomen, lung, brain, bone, mediastinum, auto) or WIDTH/LEVEL "
        "such as 400/40 (default: auto)",
    )
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument(
        "--voxel-grid",
        action="store_true",
        help="write the voxel grid as is (one pixel per voxel), without physical aspect ratio",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..imaging import (
        check_axis,
        num_slices,
        parse_window,
        read_volume,
        render_slice,
        save_png,
        slice_spacing,
    )

    axis = check_axis(args.axis)
    parse_window(args.window)  # report a bad window before reading the volume
    volume = read_volume(args.volume)
    n = num_slices(volume, axis)
    index = n // 2 if args.index is None else args.index
    rgb = render_slice(volume, axis, index, args.window)
    spacing = None if args.voxel_grid else slice_spacing(volume, axis)
    save_png(args.output, rgb, spacing=spacing)
    print(f"{args.output}: {axis} slice {index} of 0..{n - 1}, {rgb.shape[1]}x{rgb.shape[0]} voxels, window {args.window}")
    return 0
