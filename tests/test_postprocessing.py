"""Tests of medunet.postprocessing on small hand-made volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from medunet.config import ClassPostprocessing, PostprocessingConfig
from medunet.errors import DataError
from medunet.postprocessing.operations import (
    DEFAULT_CONNECTIVITY,
    ball,
    binary_closing,
    binary_opening,
    fill_holes,
    keep_largest_component,
    postprocess_labels,
    remove_small_components,
    settings_for_class,
)

ISO = (1.0, 1.0, 1.0)


def sphere(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


# --- ball -------------------------------------------------------------------


def test_ball_isotropic_radius_1_is_6_neighbourhood() -> None:
    expected = np.zeros((3, 3, 3), dtype=bool)
    expected[1, 1, :] = expected[1, :, 1] = expected[:, 1, 1] = True
    b = ball(1.0, ISO)
    assert b.dtype == bool
    np.testing.assert_array_equal(b, expected)


def test_ball_anisotropic_shape_and_extent() -> None:
    b = ball(2.0, (1.0, 1.0, 2.0))
    assert b.shape == (5, 5, 3)
    assert b[2, 2, 0] and b[2, 2, 2]  # 2 mm along the coarse axis: one voxel
    assert b[0, 2, 1] and b[4, 2, 1]  # 2 mm along a fine axis: two voxels
    assert not b[0, 0, 1]  # corner at sqrt(8) mm is outside
    assert not b[2, 1, 0]  # sqrt(1 + 4) mm is outside
    assert int(b.sum()) == 15  # 13 in the mid plane (radius-2 disc) + 1 on each side


def test_ball_smaller_than_voxel_is_centre_only() -> None:
    np.testing.assert_array_equal(ball(0.4, (1.0, 1.0, 1.0)), np.ones((1, 1, 1), dtype=bool))
    np.testing.assert_array_equal(ball(0.0, (0.5, 1.0, 3.0)), np.ones((1, 1, 1), dtype=bool))


# --- connected components ----------------------------------------------------


def test_keep_largest_component_keeps_big_blob() -> None:
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:5, 1:5, 1:5] = True  # 64 voxels
    mask[7:9, 7:9, 7:9] = True  # 8 voxels
    out = keep_largest_component(mask)
    expected = np.zeros_like(mask)
    expected[1:5, 1:5, 1:5] = True
    np.testing.assert_array_equal(out, expected)
    assert int(mask.sum()) == 72  # input untouched


def test_keep_largest_component_connectivity() -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # diagonal: one 26-component
    mask[4, 4, 0] = mask[4, 4, 1] = True  # two face-adjacent voxels
    assert DEFAULT_CONNECTIVITY == 26
    assert int(keep_largest_component(mask).sum()) == 3
    assert int(keep_largest_component(mask, connectivity=6).sum()) == 2


def test_keep_largest_component_empty_stays_empty() -> None:
    out = keep_largest_component(np.zeros((4, 4, 4), dtype=bool))
    assert out.shape == (4, 4, 4) and not out.any()


def test_remove_small_components_anisotropic_threshold() -> None:
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[0, 0, 0:3] = True  # 3 voxels * 5 mm3 = 15 mm3
    mask[4:8, 4:8, 4:8] = True  # 64 voxels * 5 mm3 = 320 mm3
    spacing = (1.0, 1.0, 5.0)
    removed = remove_small_components(mask, min_size_mm3=16.0, spacing=spacing)
    assert int(removed.sum()) == 64 and not removed[0, 0, 0:3].any()
    np.testing.assert_array_equal(remove_small_components(mask, min_size_mm3=14.0, spacing=spacing), mask)
    np.testing.assert_array_equal(remove_small_components(mask, min_size_mm3=15.0, spacing=spacing), mask)
    # The same 3 voxels on an isotropic 1 mm grid are only 3 mm3.
    assert int(remove_small_components(mask, min_size_mm3=4.0, spacing=ISO).sum()) == 64


# --- hole filling and morphology ---------------------------------------------


def test_fill_holes_fills_hollow_sphere() -> None:
    solid = sphere((13, 13, 13), (6, 6, 6), 5)
    hollow = solid & ~sphere((13, 13, 13), (6, 6, 6), 3)
    assert int(hollow.sum()) < int(solid.sum())
    np.testing.assert_array_equal(fill_holes(hollow), solid)


def test_fill_holes_leaves_cavity_open_to_border() -> None:
    mask = np.ones((5, 5, 5), dtype=bool)
    mask[2, 2, :] = False  # a tunnel through the whole volume is not a hole
    np.testing.assert_array_equal(fill_holes(mask), mask)


def test_opening_removes_thin_spur_keeps_cube() -> None:
    cube = np.zeros((12, 12, 12), dtype=bool)
    cube[2:8, 2:8, 2:8] = True
    mask = cube.copy()
    mask[5, 5, 8:11] = True  # 1-voxel-thin spur sticking out of the cube
    # sqrt(3) < 1.75 mm: on a 1 mm grid the ball is the full 3x3x3 block, so a cube survives exactly.
    np.testing.assert_array_equal(binary_opening(mask, radius_mm=1.75, spacing=ISO), cube)


def test_opening_with_round_ball_trims_cube_edges() -> None:
    cube = np.zeros((10, 10, 10), dtype=bool)
    cube[2:8, 2:8, 2:8] = True  # 6^3 = 216 voxels
    opened = binary_opening(cube, radius_mm=1.0, spacing=ISO)
    # A 6-neighbourhood ball cannot reach the 12 edges (12 * 4 + 8 corners = 56 voxels).
    assert int(opened.sum()) == 216 - 56
    assert opened[4, 4, 2] and not opened[2, 2, 4]


def test_opening_keeps_objects_at_volume_border() -> None:
    full = np.ones((6, 6, 6), dtype=bool)
    np.testing.assert_array_equal(binary_opening(full, radius_mm=1.0, spacing=ISO), full)


def test_closing_fills_gap_and_keeps_border_voxels() -> None:
    mask = np.ones((8, 8, 8), dtype=bool)
    mask[:, :, 4] = False  # 1-voxel gap between two slabs that touch every border
    closed = binary_closing(mask, radius_mm=1.75, spacing=ISO)  # full 3x3x3 ball
    assert closed.all()


def test_closing_never_removes_border_voxels() -> None:
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0, :, :] = True  # a face of the volume, and a corner voxel on the opposite side
    mask[5, 5, 5] = True
    closed = binary_closing(mask, radius_mm=2.0, spacing=ISO)
    # Unpadded scipy closing would drop the whole border plane; padding keeps every voxel,
    # and zero padding does not bridge the two through the outside of the volume.
    np.testing.assert_array_equal(closed, mask)


def test_closing_anisotropic_does_not_bridge_coarse_gap() -> None:
    mask = np.zeros((7, 7, 7), dtype=bool)
    mask[1:6, 1:6, 1:3] = True
    mask[1:6, 1:6, 4:6] = True  # 1-voxel gap along the last axis
    # 1.75 mm ball on a 1 mm grid is the full 3x3x3 block: the whole gap is bridged.
    expected = mask.copy()
    expected[1:6, 1:6, 3] = True
    np.testing.assert_array_equal(binary_closing(mask, radius_mm=1.75, spacing=ISO), expected)
    # A round 1 mm ball cannot reach the rim of the gap: only its 3x3 interior fills.
    expected = mask.copy()
    expected[2:5, 2:5, 3] = True
    np.testing.assert_array_equal(binary_closing(mask, radius_mm=1.0, spacing=ISO), expected)
    # With 5 mm along the last axis the gap is wider than the ball: nothing changes.
    np.testing.assert_array_equal(binary_closing(mask, radius_mm=1.75, spacing=(1.0, 1.0, 5.0)), mask)


# --- settings lookup ----------------------------------------------------------


def test_settings_for_class_by_name_then_index_then_default() -> None:
    by_name = ClassPostprocessing(keep_largest=True)
    by_index = ClassPostprocessing(fill_holes=True)
    default = ClassPostprocessing(min_size_mm3=10.0)
    config = PostprocessingConfig(default=default, classes={"liver": by_name, "1": by_index, "2": by_index})
    assert settings_for_class(config, 1, "liver") is by_name  # name wins over index
    assert settings_for_class(config, 2, "spleen") is by_index
    assert settings_for_class(config, 3, "kidney") is default


# --- postprocess_labels ------------------------------------------------------


def test_fill_holes_does_not_overwrite_other_class() -> None:
    labels = np.zeros((9, 9, 9), dtype=np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[3:6, 3:6, 3:6] = 0  # 27-voxel cavity inside class 1
    labels[4, 4, 4] = 2  # class 2 voxel inside the cavity
    config = PostprocessingConfig(default=ClassPostprocessing(fill_holes=True))
    out = postprocess_labels(labels, spacing=ISO, config=config, class_names={0: "background", 1: "a", 2: "b"})
    expected = labels.copy()
    expected[3:6, 3:6, 3:6] = 1
    expected[4, 4, 4] = 2
    np.testing.assert_array_equal(out, expected)
    assert int((out == 1).sum()) == 7**3 - 1


def test_removed_voxels_become_background_per_class_settings() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.int16)
    labels[0:4, 0:4, 0:4] = 1
    labels[8, 8, 8] = 1  # island of class 1
    labels[6:9, 0:3, 0:3] = 2
    labels[0, 9, 9] = 2  # island of class 2
    config = PostprocessingConfig(classes={"liver": ClassPostprocessing(keep_largest=True)})
    out = postprocess_labels(labels, spacing=ISO, config=config, class_names={1: "liver", 2: "spleen"})
    expected = labels.copy()
    expected[8, 8, 8] = 0  # only class 1 has settings
    np.testing.assert_array_equal(out, expected)

    config = PostprocessingConfig(classes={"2": ClassPostprocessing(min_size_mm3=2.0)})
    out = postprocess_labels(labels, spacing=ISO, config=config, class_names={1: "liver", 2: "spleen"})
    expected = labels.copy()
    expected[0, 9, 9] = 0  # settings found by index "2"
    np.testing.assert_array_equal(out, expected)


def test_classes_not_in_class_names_are_untouched() -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[0, 0, 0] = 1
    labels[5, 5, 5] = 3
    config = PostprocessingConfig(default=ClassPostprocessing(min_size_mm3=5.0))
    out = postprocess_labels(labels, spacing=ISO, config=config, class_names={1: "a"})
    assert out[0, 0, 0] == 0 and out[5, 5, 5] == 3


def test_noop_config_returns_equal_copy_without_mutation() -> None:
    labels = np.zeros((5, 5, 5), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[4, 4, 4] = 2
    before = labels.copy()
    out = postprocess_labels(labels, spacing=ISO, config=PostprocessingConfig(), class_names={1: "a", 2: "b"})
    np.testing.assert_array_equal(out, before)
    assert out is not labels and not np.shares_memory(out, labels)
    np.testing.assert_array_equal(labels, before)


def test_input_not_mutated_when_cleaning() -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[0:3, 0:3, 0:3] = 1
    labels[5, 5, 5] = 1
    before = labels.copy()
    config = PostprocessingConfig(default=ClassPostprocessing(keep_largest=True))
    out = postprocess_labels(labels, spacing=ISO, config=config, class_names={1: "a"})
    assert out[5, 5, 5] == 0 and int((out == 1).sum()) == 27
    np.testing.assert_array_equal(labels, before)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_dtype_and_shape_preserved(dtype: type) -> None:
    labels = np.zeros((4, 5, 6), dtype=dtype)
    labels[0:2, 0:3, 0:4] = 1
    labels[3, 4, 5] = 1  # island, not touching the block
    config = PostprocessingConfig(default=ClassPostprocessing(keep_largest=True))
    out = postprocess_labels(labels, spacing=(0.5, 0.5, 2.0), config=config, class_names={1: "a"})
    assert out.dtype == np.dtype(dtype) and out.shape == (4, 5, 6)
    assert int((out == 1).sum()) == 2 * 3 * 4


@pytest.mark.parametrize(
    ("labels", "spacing", "message"),
    [
        (np.zeros((4, 4), dtype=np.uint8), ISO, "labels must be a 3D integer array, got 2D uint8"),
        (np.zeros((4, 4, 4), dtype=np.float32), ISO, "labels must be a 3D integer array, got 3D float32"),
        (np.zeros((4, 4, 4), dtype=bool), ISO, "labels must be a 3D integer array, got 3D bool"),
        (np.zeros((4, 4, 4), dtype=np.uint8), (1.0, -1.0, 1.0), "spacing must be 3 positive numbers"),
        (np.zeros((4, 4, 4), dtype=np.uint8), (1.0, 1.0), "spacing must be 3 positive numbers"),
    ],
)
def test_bad_input_raises_data_error(labels: np.ndarray, spacing: tuple[float, ...], message: str) -> None:
    config = PostprocessingConfig(default=ClassPostprocessing(fill_holes=True))
    with pytest.raises(DataError, match=message):
        postprocess_labels(labels, spacing=spacing, config=config, class_names={1: "a"})
