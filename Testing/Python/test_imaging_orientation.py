"""Slices in patient orientation whatever the storage direction, and masks back into 3D.

A synthetic "patient" lives on a lattice indexed by LPS position: C[z, y, x]
with x towards patient Left, y towards Posterior, z towards Superior. Each of
the 48 signed permutations stores it with different voxel axes; the slices
must not change. Markers at known patient positions check the convention
against physics, independently of the implementation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from MultiTurnSegLib.errors import InputError, VolumeError
from MultiTurnSegLib.imaging import (
    AXES,
    extract_mask,
    extract_slice,
    insert_mask,
    num_slices,
    patient_axis_mapping,
    slice_center_lps,
    slice_index_at,
    slice_shape,
    slice_spacing,
    volume_from_array,
)

N_LPS = (5, 6, 7)  # voxels along x (L), y (P), z (S)
SPACING_LPS = (1.0, 2.0, 3.0)
ORIGIN_LPS = np.array([-10.0, 20.0, 30.0])  # physical position of lattice point (0, 0, 0)

SIGNED_PERMUTATIONS = [
    (perm, signs)
    for perm in itertools.permutations(range(3))
    for signs in itertools.product((1, -1), repeat=3)
]
assert len(SIGNED_PERMUTATIONS) == 48


def _patient_content(seed=0):
    """C[z, y, x]: distinct values on the patient lattice."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = N_LPS
    return rng.permutation(nx * ny * nz).reshape(nz, ny, nx).astype(np.int16)


def _store(content_zyx, perm, signs):
    """The same physical content stored with voxel axis a along patient axis perm[a], sign signs[a]."""
    cx = content_zyx.transpose(2, 1, 0)  # [x, y, z]
    a_ijk = cx.transpose(perm)
    for a, s in enumerate(signs):
        if s < 0:
            a_ijk = np.flip(a_ijk, axis=a)
    matrix = np.eye(4)
    origin = ORIGIN_LPS.copy()
    for a, (p, s) in enumerate(zip(perm, signs)):
        matrix[:3, a] = 0.0
        matrix[p, a] = s * SPACING_LPS[p]
        if s < 0:
            origin[p] += (N_LPS[p] - 1) * SPACING_LPS[p]
    matrix[:3, 3] = origin
    return volume_from_array(np.ascontiguousarray(a_ijk.transpose(2, 1, 0)), matrix, source=f"perm{perm}{signs}")


def _lps_of_lattice(x, y, z):
    return ORIGIN_LPS + np.array([x, y, z]) * np.array(SPACING_LPS)


@pytest.fixture(scope="module")
def content():
    return _patient_content()


@pytest.fixture(scope="module")
def reference(content):
    return _store(content, (0, 1, 2), (1, 1, 1))  # identity direction: LPS-aligned


def test_identity_storage_follows_the_documented_convention(content, reference):
    # axial index z (inferior->superior); rows anterior->posterior (y up); columns right->left (x up)
    for z in range(N_LPS[2]):
        np.testing.assert_array_equal(extract_slice(reference, "axial", z), content[z])
    # coronal index counts posterior->anterior; rows superior->inferior; columns right->left
    ny = N_LPS[1]
    for c in range(ny):
        np.testing.assert_array_equal(extract_slice(reference, "coronal", c), content[::-1, ny - 1 - c, :])
    # sagittal index counts left->right; rows superior->inferior; columns anterior->posterior
    nx = N_LPS[0]
    for s in range(nx):
        np.testing.assert_array_equal(extract_slice(reference, "sagittal", s), content[::-1, :, nx - 1 - s])


@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS, ids=lambda v: str(v))
def test_every_signed_permutation_gives_the_same_pictures(content, reference, perm, signs):
    vol = _store(content, perm, signs)
    assert patient_axis_mapping(vol) == tuple((p, s) for p, s in zip(perm, signs))
    for axis in AXES:
        assert num_slices(vol, axis) == num_slices(reference, axis)
        assert slice_shape(vol, axis) == slice_shape(reference, axis)
        assert slice_spacing(vol, axis) == pytest.approx(slice_spacing(reference, axis))
        for index in range(num_slices(vol, axis)):
            np.testing.assert_array_equal(extract_slice(vol, axis, index), extract_slice(reference, axis, index))


@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS[::5] + [((0, 1, 2), (-1, -1, 1))], ids=lambda v: str(v))
def test_mask_round_trip_is_voxel_exact(content, perm, signs):
    vol = _store(content, perm, signs)
    rng = np.random.default_rng(1)
    for axis in AXES:
        for index in range(num_slices(vol, axis)):
            mask = rng.random(slice_shape(vol, axis)) < 0.4
            labelmap = np.zeros(vol.shape, dtype=np.uint8)
            returned = insert_mask(labelmap, vol, axis, index, mask, value=3)
            assert returned is labelmap
            np.testing.assert_array_equal(extract_mask(labelmap, vol, axis, index), mask)
            np.testing.assert_array_equal(extract_mask(labelmap, vol, axis, index, value=3), mask)
            assert int(labelmap.sum()) == 3 * int(mask.sum())
            # the written voxels are exactly those of that slice: mark the whole slice and
            # compare with the voxels whose content equals that slice's picture
            full = np.zeros(vol.shape, dtype=bool)
            insert_mask(full, vol, axis, index, np.ones(slice_shape(vol, axis), bool))
            np.testing.assert_array_equal(np.sort(vol.array[full]), np.sort(extract_slice(vol, axis, index).ravel().astype(np.int16)))
            # and they lie on one physical plane, at the slice position
            k, j, i = np.nonzero(full)
            lps = (vol.ijk_to_lps @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3]
            normal = {"axial": 2, "coronal": 1, "sagittal": 0}[axis]
            assert np.ptp(lps[normal]) == 0
            assert slice_index_at(vol, axis, lps[:, 0]) == index
            np.testing.assert_allclose(slice_center_lps(vol, axis, index)[normal], lps[normal, 0])
            # pixel (r, c) of the picture is the voxel painted by mask pixel (r, c)
            r, c = rng.integers(0, slice_shape(vol, axis)[0]), rng.integers(0, slice_shape(vol, axis)[1])
            one = np.zeros(slice_shape(vol, axis), bool)
            one[r, c] = True
            spot = np.zeros(vol.shape, np.uint8)
            insert_mask(spot, vol, axis, index, one)
            assert vol.array[spot.astype(bool)][0] == extract_slice(vol, axis, index)[r, c]


@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS, ids=lambda v: str(v))
def test_markers_appear_where_anatomy_says(perm, signs):
    nx, ny, nz = N_LPS
    empty = np.zeros((nz, ny, nx), dtype=np.int16)
    vol_zero = _store(empty, perm, signs)
    mid = (nx // 2, ny // 2, nz // 2)

    def marker_volume(x, y, z):
        c = empty.copy()
        c[z, y, x] = 100
        return _store(c, perm, signs), _lps_of_lattice(x, y, z)

    def find(vol, axis, point):
        index = slice_index_at(vol, axis, point)
        picture = extract_slice(vol, axis, index)
        rows, cols = np.nonzero(picture == 100)
        assert len(rows) == 1, (axis, index)
        return index, rows[0], cols[0]

    # most anterior (smallest P), patient right (smallest L), most superior (largest S)
    anterior_vol, anterior = marker_volume(mid[0], 0, mid[2])
    right_vol, right = marker_volume(0, mid[1], mid[2])
    superior_vol, superior = marker_volume(mid[0], mid[1], nz - 1)
    inferior_vol, inferior = marker_volume(mid[0], mid[1], 0)

    # axial: anterior at the top, patient right on the image left, index inferior->superior
    assert find(anterior_vol, "axial", anterior)[1] == 0
    assert find(right_vol, "axial", right)[2] == 0
    assert find(superior_vol, "axial", superior)[0] == num_slices(vol_zero, "axial") - 1
    assert find(inferior_vol, "axial", inferior)[0] == 0
    # coronal: superior at the top, patient right on the left, index posterior->anterior
    assert find(superior_vol, "coronal", superior)[1] == 0
    assert find(right_vol, "coronal", right)[2] == 0
    assert find(anterior_vol, "coronal", anterior)[0] == num_slices(vol_zero, "coronal") - 1
    # sagittal: superior at the top, anterior on the left, index left->right
    assert find(superior_vol, "sagittal", superior)[1] == 0
    assert find(anterior_vol, "sagittal", anterior)[2] == 0
    assert find(right_vol, "sagittal", right)[0] == num_slices(vol_zero, "sagittal") - 1


def test_slice_spacing_keeps_the_voxel_grid(reference):
    assert slice_shape(reference, "axial") == (N_LPS[1], N_LPS[0])
    assert slice_shape(reference, "coronal") == (N_LPS[2], N_LPS[0])
    assert slice_shape(reference, "sagittal") == (N_LPS[2], N_LPS[1])
    assert slice_spacing(reference, "axial") == (2.0, 1.0)
    assert slice_spacing(reference, "coronal") == (3.0, 1.0)
    assert slice_spacing(reference, "sagittal") == (3.0, 2.0)


def test_slightly_oblique_volume_uses_nearest_axes(content, reference):
    angle = np.deg2rad(10)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = reference.ijk_to_lps.copy()
    matrix[:3, :3] = rot @ matrix[:3, :3]
    vol = volume_from_array(reference.array, matrix)
    for axis in AXES:
        np.testing.assert_array_equal(extract_slice(vol, axis, 1), extract_slice(reference, axis, 1))


def test_45_degree_volume_is_refused(reference):
    angle = np.deg2rad(45)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rot
    vol = volume_from_array(reference.array, matrix)
    with pytest.raises(VolumeError, match="oblique"):
        extract_slice(vol, "axial", 0)


def test_ct_chest_orientation(ct_chest_path):
    """CTChest4 is stored with flipped x, y (LPS direction diag(-1, -1, 1))."""
    from MultiTurnSegLib.imaging import read_volume

    ct = read_volume(ct_chest_path)
    assert patient_axis_mapping(ct) == ((0, -1), (1, -1), (2, 1))
    axial = extract_slice(ct, "axial", 17)
    # the table and spine are posterior: bottom half of the axial image is where the
    # vertebral body (bone, > 150 HU) is found, near the middle column
    rows, cols = np.nonzero(axial > 150)
    assert rows.mean() > axial.shape[0] / 2
    assert cols.mean() == pytest.approx(axial.shape[1] / 2, abs=10)
    # i runs towards patient right and j towards anterior (both flipped from LPS): the
    # stored array is the radiological picture turned by 180 degrees.
    np.testing.assert_array_equal(axial, ct.array[17, ::-1, ::-1])
    # coronal index counts posterior->anterior, i.e. along j; superior (large k) at the top
    coronal = extract_slice(ct, "coronal", 100)
    np.testing.assert_array_equal(coronal, ct.array[::-1, 100, ::-1])


# ----------------------------------------------------------------------------- bad input


def test_unknown_axis(reference):
    with pytest.raises(InputError, match=r"unknown slice axis 'transverse'; use one of: axial, coronal, sagittal"):
        extract_slice(reference, "transverse", 0)
    assert extract_slice(reference, "Axial", 0).shape == slice_shape(reference, "axial")


@pytest.mark.parametrize("index", [-1, 7, 100])
def test_index_out_of_range(reference, index):
    with pytest.raises(InputError, match=r"valid indices are 0\.\.6"):
        extract_slice(reference, "axial", index)
    with pytest.raises(InputError, match=r"0\.\.6"):
        insert_mask(np.zeros(reference.shape), reference, "axial", index, np.zeros((6, 5), bool))


def test_non_integer_index(reference):
    with pytest.raises(InputError, match="whole number"):
        extract_slice(reference, "axial", 1.5)


def test_mask_shape_mismatch(reference):
    with pytest.raises(InputError, match=r"mask has shape \(5, 6\).*\(6, 5\)"):
        insert_mask(np.zeros(reference.shape), reference, "axial", 0, np.zeros((5, 6), bool))
    with pytest.raises(InputError, match="labelmap has shape"):
        insert_mask(np.zeros((1, 2, 3)), reference, "axial", 0, np.zeros((6, 5), bool))


def test_point_outside_volume(reference):
    with pytest.raises(InputError, match="outside the volume along the axial axis"):
        slice_index_at(reference, "axial", _lps_of_lattice(0, 0, 50))


@pytest.mark.parametrize("point", ["abc", ["a", "b", "c"], (1.0, 2.0)])
def test_bad_patient_point_is_an_input_error(reference, point):
    with pytest.raises(InputError, match="3 finite LPS coordinates"):
        slice_index_at(reference, "axial", point)
