"""Scalar 3D volumes: reading NRRD, NIfTI and DICOM series, and wrapping arrays.

A :class:`Volume` holds a numpy array in ``[k, j, i]`` order (slice, row,
column; what SimpleITK's ``GetArrayFromImage`` and Slicer's
``slicer.util.arrayFromVolume`` return) and the 4x4 matrix mapping voxel
indices ``(i, j, k, 1)`` to patient LPS millimetres.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import VolumeError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SUPPORTED_FORMATS = (
    "NRRD (.nrrd, .nhdr), NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) "
    "or a folder holding one DICOM series"
)


class Volume:
    """A scalar 3D image on a voxel grid placed in patient (LPS) space.

    Attributes:
        array: numpy array, ``[k, j, i]`` order, native voxel type (not copied).
        ijk_to_lps: 4x4 float matrix from voxel index ``(i, j, k, 1)`` to LPS mm.
        source: where the volume came from (a path, a DICOM series, "array").
    """

    __slots__ = ("array", "ijk_to_lps", "source")

    def __init__(self, array: np.ndarray, ijk_to_lps, source: str = "array"):
        array = np.asarray(array)
        matrix = np.asarray(ijk_to_lps, dtype=float)
        _check_scalar_3d_array(array, source)
        matrix = _check_matrix(matrix, source)
        self.array = array
        self.ijk_to_lps = matrix
        self.source = str(source)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape ``(nk, nj, ni)``."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def size_ijk(self) -> Tuple[int, int, int]:
        """Number of voxels along i, j, k (SimpleITK's ``GetSize()`` order)."""
        nk, nj, ni = self.shape
        return (ni, nj, nk)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along i, j, k (SimpleITK's ``GetSpacing()`` order)."""
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_lps[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin_lps(self) -> Tuple[float, float, float]:
        """LPS position (mm) of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.ijk_to_lps[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit LPS directions of the i, j, k axes."""
        return self.ijk_to_lps[:3, :3] / np.asarray(self.spacing)[np.newaxis, :]

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """The same geometry in RAS (what Slicer's ``GetIJKToRASMatrix`` gives)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps

    def to_sitk(self):
        """A SimpleITK image with this volume's voxels and geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin_lps)
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image

    def __repr__(self) -> str:
        return (
            f"Volume(shape[k,j,i]={self.shape}, spacing[i,j,k]="
            f"{tuple(round(s, 4) for s in self.spacing)}, dtype={self.array.dtype}, "
            f"source={self.source!r})"
        )


def _check_scalar_3d_array(array: np.ndarray, source: str) -> None:
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == bool
    ):
        raise VolumeError(
            f"{source}: voxel type {array.dtype} is not supported; a volume needs numeric "
            "(integer or floating point) grey values."
        )
    if np.iscomplexobj(array):
        raise VolumeError(
            f"{source}: complex-valued voxels are not supported; a volume needs real grey values."
        )
    if array.ndim == 4:
        raise VolumeError(
            f"{source}: this is a 4D array {array.shape} (a time series, multi-volume or "
            "colour/vector image). Only scalar (grey-value) 3D volumes can be segmented; "
            "pick one frame or component first."
        )
    if array.ndim != 3:
        what = "a 2D image" if array.ndim == 2 else f"a {array.ndim}D array"
        raise VolumeError(
            f"{source}: this is {what} of shape {array.shape}; a 3D volume "
            "(slices x rows x columns) is needed."
        )
    if min(array.shape) < 1:
        raise VolumeError(f"{source}: the volume is empty (shape {array.shape}).")


def _check_matrix(matrix: np.ndarray, source: str) -> np.ndarray:
    if matrix.shape == (3, 3):
        full = np.eye(4)
        full[:3, :3] = matrix
        matrix = full
    if matrix.shape != (4, 4):
        raise VolumeError(
            f"{source}: the IJK-to-LPS matrix must be 4x4 (or 3x3), got shape {matrix.shape}."
        )
    if not np.all(np.isfinite(matrix)):
        raise VolumeError(f"{source}: the IJK-to-LPS matrix contains NaN or infinite values.")
    if not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise VolumeError(
            f"{source}: the last row of the IJK-to-LPS matrix must be (0, 0, 0, 1), got {matrix[3]}."
        )
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12 * np.prod(spacing):
        raise VolumeError(
            f"{source}: the IJK-to-LPS matrix is singular (zero spacing or parallel axes): "
            f"{matrix[:3, :3].tolist()}."
        )
    return matrix.copy()


def volume_from_array(array_kji: np.ndarray, ijk_to_lps, source: str = "array") -> Volume:
    """Wrap a ``[k, j, i]`` array and its IJK-to-LPS matrix (4x4) as a :class:`Volume`.

    In Slicer: ``volume_from_array(slicer.util.arrayFromVolume(node), lps_from_ras @ ijk_to_ras)``
    with ``lps_from_ras = diag(-1, -1, 1, 1)``. The array is not copied.
    """
    return Volume(array_kji, ijk_to_lps, source=source)


def _sitk_to_volume(image, source: str) -> Volume:
    import SimpleITK as sitk

    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise VolumeError(
            f"{source}: this is a vector/colour image with {ncomp} components per voxel "
            f"(for example RGB). Only scalar (grey-value) 3D volumes can be segmented."
        )
    if dim == 4:
        raise VolumeError(
            f"{source}: this is a 4D image of size {image.GetSize()} (a time series or "
            "multi-volume). Only scalar 3D volumes can be segmented; extract one frame first."
        )
    if dim == 2:
        raise VolumeError(
            f"{source}: this is a 2D image of size {image.GetSize()}; a 3D volume is needed "
            "(for a DICOM series, give the folder that holds all its slices)."
        )
    if dim != 3:
        raise VolumeError(f"{source}: {dim}D images are not supported; a 3D volume is needed.")
    if "complex" in image.GetPixelIDTypeAsString():
        raise VolumeError(f"{source}: complex-valued voxels are not supported.")
    array = sitk.GetArrayFromImage(image)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return Volume(array, matrix, source=source)


def _read_dicom_folder(folder: Path, only_series: Optional[str] = None) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    folder_str = str(folder)
    series_ids = list(reader.GetGDCMSeriesIDs(folder_str) or ())
    if not series_ids:
        raise VolumeError(
            f"{folder}: no DICOM series found in this folder. Give a folder of DICOM "
            f"slices or a volume file: {SUPPORTED_FORMATS}."
        )
    files_by_series = {sid: list(reader.GetGDCMSeriesFileNames(folder_str, sid)) for sid in series_ids}
    if only_series is not None:
        chosen = only_series
    else:
        chosen = max(series_ids, key=lambda sid: (len(files_by_series[sid]), sid))
        if len(series_ids) > 1:
            # Sizes only: series UIDs and folder paths can identify a patient.
            others = ", ".join(str(len(files_by_series[sid])) for sid in series_ids if sid != chosen)
            logger.warning(
                "a DICOM folder holds %d series; reading the largest (%d files) and ignoring the others (%s files)",
                len(series_ids), len(files_by_series[chosen]), others,
            )
    files = files_by_series[chosen]
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(
            f"{folder}: the DICOM series ({len(files)} files) could not be read: {_first_line(exc)}"
        ) from None
    note = f"{folder} (DICOM series, {len(files)} files"
    if len(series_ids) > 1 and only_series is None:
        note += f"; {len(series_ids) - 1} other series in the folder ignored"
    note += ")"
    if image.GetDimension() == 3 and image.GetSize()[2] == 1 and len(files) == 1:
        raise VolumeError(
            f"{note}: the series has a single 2D slice; a 3D volume is needed."
        )
    return _sitk_to_volume(image, note)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # SimpleITK messages start with the C++ location; the useful part is at the end.
    return lines[-1] if lines else type(exc).__name__


def _looks_like_dicom(path: Path, reader) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            if handle.read(4) == b"DICM":
                return True
    except OSError:
        return False
    return path.suffix.lower() in (".dcm", ".dicom", ".ima") and reader.HasMetaDataKey("0020|000e")


def read_volume(path: PathLike) -> Volume:
    """Read a scalar 3D volume from a NRRD/NIfTI/MetaImage file or a DICOM series folder.

    A folder with several DICOM series: the series with the most files is read
    and a warning names the ignored ones. A single DICOM file: the series it
    belongs to (in the same folder) is read. Raises :class:`VolumeError` for a
    missing or unreadable path and for 2D, 4D and vector (RGB) images.
    """
    import SimpleITK as sitk

    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder. Give {SUPPORTED_FORMATS}.")
    if p.is_dir():
        return _read_dicom_folder(p)
    try:
        io = sitk.ImageFileReader()
        io.SetFileName(str(p))
        io.ReadImageInformation()
    except RuntimeError:
        raise VolumeError(
            f"{p}: not a readable image file (unknown or damaged format). "
            f"Give {SUPPORTED_FORMATS}."
        ) from None
    if _looks_like_dicom(p, io):
        # One DICOM file: read the whole series it belongs to, from its folder.
        series = io.GetMetaData("0020|000e").strip() if io.HasMetaDataKey("0020|000e") else None
        if series and series in (sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p.parent)) or ()):
            return _read_dicom_folder(p.parent, only_series=series)
    try:
        image = io.Execute()
    except RuntimeError as exc:
        raise VolumeError(
            f"{p}: the file could not be read ({_first_line(exc)}). Give {SUPPORTED_FORMATS}."
        ) from None
    return _sitk_to_volume(image, str(p))


def as_volume(volume_or_path) -> Volume:
    """A :class:`Volume` as it is, or read from a path."""
    if isinstance(volume_or_path, Volume):
        return volume_or_path
    return read_volume(volume_or_path)


__all__: Sequence[str] = ("Volume", "read_volume", "volume_from_array", "as_volume", "SUPPORTED_FORMATS")
