"""Axial, coronal and sagittal slices in patient orientation, and masks back into 3D.

Each voxel axis (i, j, k) is matched to the nearest patient axis (L-R, P-A,
I-S) with its sign, from the volume's direction matrix. Slices are then taken
by permuting and flipping array axes only: no interpolation, so a 2D mask maps
back onto exactly the voxels of that slice. Pixel spacing may differ between
rows and columns (e.g. coronal slices of a thick-slice CT): slices are on the
voxel grid as it is; see :func:`slice_spacing` to display them to scale.

Display convention (the same for every storage direction: LPS, RAS, flipped
or permuted axes give the same picture):

========  ===================  =========================  =========================
axis      image top            image left                 slice index increases
========  ===================  =========================  =========================
axial     anterior             patient right              inferior -> superior
coronal   superior             patient right              posterior -> anterior
sagittal  superior             anterior                   left -> right
========  ===================  =========================  =========================

That is the radiological convention (axial seen from the feet, coronal from
the front, sagittal from the patient's left side) and what Slicer's Red, Green
and Yellow views show. The slice index counts the voxel planes of the volume
in the direction of increasing RAS coordinate along the slice normal, like
Slicer's slice offset sliders: towards superior (axial), anterior (coronal)
and the patient's right (sagittal). Row 0 is the top row, column 0 the left
column.

A volume whose axes are oblique is sliced along the nearest patient axes (as
Slicer's views do when "slice intersection" is rotated to the volume); only a
volume so oblique that the nearest axis is ambiguous (about 45 degrees) is
refused.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, VolumeError
from .volume import Volume

AXES: Tuple[str, str, str] = ("axial", "coronal", "sagittal")

# Which patient (LPS) axis is the slice normal: x=L (0), y=P (1), z=S (2).
_NORMAL_PATIENT_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}

# Largest |cosine| must beat the second largest by this much for the
# nearest-axis mapping of a voxel axis to be unambiguous.
_AMBIGUITY_TOLERANCE = 1e-3


def check_axis(axis: str) -> str:
    """The canonical axis name, or InputError listing the valid ones."""
    if isinstance(axis, str):
        name = axis.strip().lower()
        if name in AXES:
            return name
    raise InputError(f"unknown slice axis {axis!r}; use one of: {', '.join(AXES)}.")


def patient_axis_mapping(volume: Volume) -> Tuple[Tuple[int, int], ...]:
    """For each voxel axis i, j, k: ``(patient_axis, sign)``.

    ``patient_axis`` is 0 (L), 1 (P) or 2 (S) in LPS, ``sign`` is +1 when the
    index increases towards L/P/S and -1 otherwise. Raises VolumeError when a
    voxel axis is about equally close to two patient axes.
    """
    direction = volume.direction
    mapping = []
    used = set()
    for a in range(3):
        column = direction[:, a]
        order = np.argsort(-np.abs(column))
        best, second = np.abs(column[order[0]]), np.abs(column[order[1]])
        p = int(order[0])
        if best - second < _AMBIGUITY_TOLERANCE or p in used:
            raise VolumeError(
                f"{volume.source}: the volume's voxel axes are too oblique to the patient axes "
                f"(direction matrix {np.round(direction, 4).tolist()}); its '{'ijk'[a]}' axis is "
                "about equally close to two patient axes, so axial/coronal/sagittal slices are "
                "ambiguous. Resample the volume to the patient axes first."
            )
        used.add(p)
        mapping.append((p, 1 if column[p] > 0 else -1))
    return tuple(mapping)


def _canonical_view(array_kji: np.ndarray, volume: Volume) -> np.ndarray:
    """A view of ``array_kji`` indexed ``[z, y, x]`` with indices increasing towards S, P, L."""
    mapping = patient_axis_mapping(volume)
    # numpy axis of voxel axis a is 2 - a
    numpy_axis_for_patient = {}
    sign_for_patient = {}
    for a, (p, s) in enumerate(mapping):
        numpy_axis_for_patient[p] = 2 - a
        sign_for_patient[p] = s
    view = array_kji.transpose(numpy_axis_for_patient[2], numpy_axis_for_patient[1], numpy_axis_for_patient[0])
    flips = tuple(slice(None, None, -1) if sign_for_patient[p] < 0 else slice(None) for p in (2, 1, 0))
    return view[flips]


def _oriented_view(array_kji: np.ndarray, volume: Volume, axis: str) -> np.ndarray:
    """A view ``V[slice_index, row, column]`` of the array in display convention."""
    if tuple(array_kji.shape) != volume.shape:
        raise InputError(
            f"the labelmap has shape {tuple(array_kji.shape)} but the volume has shape "
            f"{volume.shape} ([k, j, i]); they must be on the same voxel grid."
        )
    can = _canonical_view(array_kji, volume)  # [z(I->S), y(A->P), x(R->L)]
    if axis == "axial":
        return can  # rows anterior->posterior, columns right->left
    if axis == "coronal":
        # slices posterior->anterior, rows superior->inferior, columns right->left
        return can[::-1, ::-1, :].transpose(1, 0, 2)
    # sagittal: slices left->right, rows superior->inferior, columns anterior->posterior
    return can[::-1, :, ::-1].transpose(2, 0, 1)


def _normal_voxel_axis(volume: Volume, axis: str) -> Tuple[int, int, int]:
    """``(a, sign, n)``: the voxel axis (0=i, 1=j, 2=k) along the normal of ``axis`` slices, its
    sign (as in :func:`patient_axis_mapping`) and its number of voxels."""
    p = _NORMAL_PATIENT_AXIS[axis]
    for a, (pa, s) in enumerate(patient_axis_mapping(volume)):
        if pa == p:
            return a, s, volume.size_ijk[a]
    raise AssertionError("unreachable")  # pragma: no cover


def num_slices(volume: Volume, axis: str) -> int:
    """Number of slices of the volume along ``axis``."""
    return _normal_voxel_axis(volume, check_axis(axis))[2]


def slice_shape(volume: Volume, axis: str) -> Tuple[int, int]:
    """``(rows, columns)`` of slices along ``axis``."""
    axis = check_axis(axis)
    return tuple(_oriented_view(volume.array, volume, axis).shape[1:])  # type: ignore[return-value]


def slice_spacing(volume: Volume, axis: str) -> Tuple[float, float]:
    """Pixel size in mm ``(row_height, column_width)`` of slices along ``axis``."""
    axis = check_axis(axis)
    spacing_for_patient = {}
    for a, (p, _s) in enumerate(patient_axis_mapping(volume)):
        spacing_for_patient[p] = volume.spacing[a]
    rows, cols = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}[axis]
    return (spacing_for_patient[rows], spacing_for_patient[cols])


def _check_index(volume: Volume, axis: str, index) -> int:
    n = num_slices(volume, axis)
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise InputError(f"slice index must be a whole number in 0..{n - 1} for the {axis} axis, got {index!r}.")
    index = int(index)
    if not 0 <= index < n:
        raise InputError(
            f"slice index {index} is outside this volume: the {axis} axis has {n} slices, "
            f"valid indices are 0..{n - 1}."
        )
    return index


def extract_slice(volume: Volume, axis: str, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` as a 2D float64 array in display convention (a copy)."""
    axis = check_axis(axis)
    index = _check_index(volume, axis, index)
    return np.array(_oriented_view(volume.array, volume, axis)[index], dtype=np.float64)


def _check_mask(mask2d, expected: Tuple[int, int], axis: str) -> np.ndarray:
    mask = np.asarray(mask2d)
    if mask.ndim != 2 or tuple(mask.shape) != tuple(expected):
        raise InputError(
            f"the mask has shape {tuple(mask.shape)} but {axis} slices of this volume have "
            f"shape {tuple(expected)} (rows, columns)."
        )
    return mask.astype(bool, copy=False)


def insert_mask(
    labelmap_kji: np.ndarray, volume: Volume, axis: str, index: int, mask2d, value=1
) -> np.ndarray:
    """Paint ``value`` into ``labelmap_kji`` (in place) where ``mask2d`` is true on that slice.

    Exact inverse of :func:`extract_slice`'s pixel layout: pixel ``(r, c)`` of the
    slice is the voxel written. Voxels outside the mask are left as they are.
    Returns ``labelmap_kji``.
    """
    axis = check_axis(axis)
    index = _check_index(volume, axis, index)
    if not isinstance(labelmap_kji, np.ndarray):
        raise InputError("the labelmap must be a numpy array on the volume grid ([k, j, i]).")
    view = _oriented_view(labelmap_kji, volume, axis)
    mask = _check_mask(mask2d, view.shape[1:], axis)
    plane = view[index]  # a view into labelmap_kji
    plane[mask] = value
    return labelmap_kji


def extract_mask(
    labelmap_kji: np.ndarray, volume: Volume, axis: str, index: int, value: Optional[float] = None
) -> np.ndarray:
    """The 2D bool mask of a labelmap on that slice: nonzero voxels, or voxels equal to ``value``."""
    axis = check_axis(axis)
    index = _check_index(volume, axis, index)
    labelmap = np.asarray(labelmap_kji)
    plane = _oriented_view(labelmap, volume, axis)[index]
    if value is None:
        return np.array(plane != 0, dtype=bool)
    return np.array(plane == value, dtype=bool)


def _display_index_from_canonical(axis: str, canonical_index: int, n: int) -> int:
    """Display index of a canonical one, and back (the map is its own inverse)."""
    if axis == "axial":
        return canonical_index
    # coronal counts posterior->anterior (y decreasing), sagittal left->right (x decreasing)
    return n - 1 - canonical_index


def slice_index_at(volume: Volume, axis: str, point_lps: Sequence[float]) -> int:
    """Index of the ``axis`` slice nearest to the patient point ``point_lps`` (mm, LPS).

    Raises InputError when the point lies more than half a voxel outside the
    volume along the slice normal.
    """
    axis = check_axis(axis)
    try:
        point = np.asarray(point_lps, dtype=float).reshape(-1)
    except (TypeError, ValueError):  # e.g. text: reported below like any bad point
        point = np.full(0, np.nan)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise InputError(f"a patient point needs 3 finite LPS coordinates, got {point_lps!r}.")
    ijk = np.linalg.solve(volume.ijk_to_lps, np.append(point, 1.0))[:3]
    a, s, n = _normal_voxel_axis(volume, axis)
    voxel_index = int(np.floor(ijk[a] + 0.5))
    if not 0 <= voxel_index < n:
        raise InputError(
            f"the point {tuple(round(float(v), 2) for v in point)} (LPS mm) is outside the volume "
            f"along the {axis} axis (it would be slice {voxel_index if s > 0 else n - 1 - voxel_index} "
            f"of 0..{n - 1})."
        )
    canonical = voxel_index if s > 0 else n - 1 - voxel_index
    return _display_index_from_canonical(axis, canonical, n)


def slice_center_lps(volume: Volume, axis: str, index: int) -> Tuple[float, float, float]:
    """LPS position (mm) of the centre of slice ``index`` (e.g. to move a Slicer view there)."""
    axis = check_axis(axis)
    index = _check_index(volume, axis, index)
    ijk = np.array([(n - 1) / 2.0 for n in volume.size_ijk], dtype=float)
    a, s, n = _normal_voxel_axis(volume, axis)
    canonical = _display_index_from_canonical(axis, index, n)
    ijk[a] = canonical if s > 0 else n - 1 - canonical
    return tuple(float(v) for v in (volume.ijk_to_lps @ np.append(ijk, 1.0))[:3])  # type: ignore[return-value]
