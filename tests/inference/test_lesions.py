"""Lesions as planar ROIs (inference.lesions): pure geometry on small masks."""

from __future__ import annotations

import numpy as np
import pytest

from inference.lesions import outer_outline, planar_rois, polygon_area


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


@pytest.mark.parametrize(
    "rows",
    [
        ["#"],
        ["##", "##"],
        ["###", "#..", "#.."],  # an L
        ["#.", ".#"],  # pixels touching only at a corner
        ["###", "#.#", "###"],  # a ring: its hole is not part of the outer outline
        [".#.", "###", ".#."],  # a plus
    ],
    ids=["pixel", "square", "L", "diagonal", "ring", "plus"],
)
def test_outline_is_closed_and_encloses_the_region(rows: list[str]) -> None:
    region = _mask(rows)

    outline = outer_outline(region)

    assert (outline[0] == outline[-1]).all()
    filled = region.sum() + (1 if rows == ["###", "#.#", "###"] else 0)  # the hole is inside
    assert polygon_area(outline) == filled
    # Vertices are pixel corners within the image.
    assert outline.min() >= 0 and outline[:, 0].max() <= region.shape[1]
    assert outline[:, 1].max() <= region.shape[0]


def test_square_outline_is_its_four_corners() -> None:
    outline = outer_outline(_mask(["..", ".#"]))

    assert sorted(map(tuple, outline[:-1].tolist())) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_each_lesion_on_its_largest_slice_with_area_and_long_axis() -> None:
    masks = np.zeros((3, 10, 10, 1), bool)
    masks[0, 1:3, 1:3, 0] = True  # lesion A: 2x2 on slice 0 ...
    masks[1, 1:4, 1:5, 0] = True  # ... and 3x4 on slice 1: its key slice
    masks[2, 7:9, 6:9, 0] = True  # lesion B: 2x3 on slice 2 only

    first, second = planar_rois(masks, (0.5, 2.0))  # rows 0.5 mm apart, columns 2 mm

    assert (first.lesion_number, first.slice_index) == (1, 1)
    assert first.area_mm2 == pytest.approx(12 * 0.5 * 2.0)
    # The diagonal of a 4 (columns) x 3 (rows) pixel box: 8 mm by 1.5 mm.
    assert first.long_axis_mm == pytest.approx(np.hypot(8.0, 1.5))
    assert (first.outline[:, 0].min(), first.outline[:, 1].min()) == (1, 1)
    assert (second.lesion_number, second.slice_index) == (2, 2)
    assert second.area_mm2 == pytest.approx(6 * 1.0)
    assert (second.outline[:, 0].min(), second.outline[:, 1].min()) == (6, 7)


def test_without_pixel_spacing_sizes_are_unknown() -> None:
    masks = np.zeros((1, 4, 4, 1), bool)
    masks[0, 1:3, 1:3, 0] = True

    [roi] = planar_rois(masks, None)

    assert roi.area_mm2 is None and roi.long_axis_mm is None
    assert polygon_area(roi.outline) == 4
