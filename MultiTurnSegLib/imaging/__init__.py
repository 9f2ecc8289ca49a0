"""Imaging: volumes, patient-oriented slices, masks back into 3D, windowing.

Volumes are scalar 3D images (:class:`Volume`) with arrays in ``[k, j, i]``
order and an IJK-to-LPS matrix. Slices are cut along the patient axes nearest
to the voxel axes, by permuting/flipping only (no interpolation), so a model
mask maps back voxel-exactly with :func:`insert_mask`.

Display convention (whatever the volume's storage direction):

* axial: anterior at the top, patient right on the image left; index
  increases inferior -> superior.
* coronal: superior at the top, patient right on the image left; index
  increases posterior -> anterior.
* sagittal: superior at the top, anterior on the image left; index increases
  from the patient's left to right.

(Radiological convention, as Slicer's Red/Green/Yellow views; the index runs
like Slicer's slice offset sliders, i.e. with increasing RAS coordinate.)
Slices keep the voxel grid: pixels may be non-square (see
:func:`slice_spacing`; :func:`save_png` can stretch for viewing).
"""

from .volume import SUPPORTED_FORMATS, Volume, as_volume, read_volume, volume_from_array
from .slicing import (
    AXES,
    check_axis,
    extract_mask,
    extract_slice,
    insert_mask,
    num_slices,
    patient_axis_mapping,
    slice_center_lps,
    slice_index_at,
    slice_shape,
    slice_spacing,
)
from .render import (
    AUTO_WINDOW,
    WINDOW_PRESETS,
    auto_window,
    overlay,
    parse_window,
    physical_size,
    render_slice,
    save_png,
    to_rgb,
    window_names,
    window_to_uint8,
)

__all__ = [
    "AUTO_WINDOW",
    "AXES",
    "SUPPORTED_FORMATS",
    "Volume",
    "WINDOW_PRESETS",
    "as_volume",
    "auto_window",
    "check_axis",
    "extract_mask",
    "extract_slice",
    "insert_mask",
    "num_slices",
    "overlay",
    "parse_window",
    "patient_axis_mapping",
    "physical_size",
    "read_volume",
    "render_slice",
    "save_png",
    "slice_center_lps",
    "slice_index_at",
    "slice_shape",
    "slice_spacing",
    "to_rgb",
    "volume_from_array",
    "window_names",
    "window_to_uint8",
]
