"""Segmentations and 3D Slicer ``.seg.nrrd`` files.

:class:`Segmentation` holds :class:`Segment` objects (ID, name, colour 0..1,
3D bool mask ``[k, j, i]``, Slicer tags) on one voxel grid. :func:`read_seg_nrrd`
reads Slicer's files (overlapping segments in layers included) and
:func:`write_seg_nrrd` writes files Slicer loads, both through slicerio.
Names and tags may be any Unicode text (e.g. Chinese prompts); like Slicer,
the header stores them as UTF-8.
"""

from .segnrrd import (
    STATUS_TAG,
    TERMINOLOGY_TAG,
    Segment,
    Segmentation,
    check_geometry,
    geometry_mismatch,
    labelmap_for_volume,
    read_seg_nrrd,
    validate_segment,
    volume_geometry,
    write_seg_nrrd,
)

__all__ = [
    "STATUS_TAG",
    "TERMINOLOGY_TAG",
    "Segment",
    "Segmentation",
    "check_geometry",
    "geometry_mismatch",
    "labelmap_for_volume",
    "read_seg_nrrd",
    "validate_segment",
    "volume_geometry",
    "write_seg_nrrd",
]
