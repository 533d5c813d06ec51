"""Lesions of a slice model's masks, each as a planar region of interest on its key slice.

A lesion is a connected region of one label's mask across the slices (26-connected). Its key
slice is the slice where it is largest; there it is outlined by a closed polyline that follows
the pixel edges of its largest connected part, in the image coordinates of PS3.3 C.18.6.1.2
(column, row; 0.0\\0.0 is the top left corner of the top left pixel), so that the polygon's
area is exactly the pixels' area. The long axis is the longest distance between two vertices
of the outline (its diameter, which lies on the convex hull, whose vertices are outline
vertices). TID 1410 of the SR carries them (inference/sr.py): viewers that draw planar
measurements only, such as OHIF, show every lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 26-connectivity in 3D, 8-connectivity within a slice.
_CONNECT_3D = np.ones((3, 3, 3), bool)
_CONNECT_2D = np.ones((3, 3), bool)


@dataclass(frozen=True)
class PlanarRoi:
    label_index: int  # the model's label
    lesion_number: int  # 1, 2, … within the label, in order of first slice then position
    slice_index: int  # the key slice, an index into the spatially ordered stack
    outline: np.ndarray  # (n, 2) float: (column, row) vertices, closed (first == last)
    area_mm2: float | None  # None: the pixel spacing is unknown
    long_axis_mm: float | None


def planar_rois(masks: np.ndarray, pixel_spacing_mm: tuple[float, float] | None) -> list[PlanarRoi]:
    """``masks``: (slices, rows, columns, labels) booleans. ``pixel_spacing_mm``: (row spacing,
    column spacing) of every slice."""
    rois: list[PlanarRoi] = []
    for label_index in range(masks.shape[-1]):
        lesions, count = ndimage.label(masks[..., label_index], structure=_CONNECT_3D)
        for number, bounds in enumerate(ndimage.find_objects(lesions), start=1):
            if bounds is None:
                continue
            lesion = lesions[bounds] == number
            areas = lesion.sum(axis=(1, 2))
            key = int(np.argmax(areas))
            region = _largest_part(lesion[key])
            outline = outer_outline(region) + (bounds[2].start, bounds[1].start)
            rois.append(
                PlanarRoi(
                    label_index=label_index,
                    lesion_number=number,
                    slice_index=bounds[0].start + key,
                    outline=outline,
                    area_mm2=_area_mm2(region, pixel_spacing_mm),
                    long_axis_mm=_long_axis_mm(outline, pixel_spacing_mm),
                )
            )
    return rois


def _largest_part(section: np.ndarray) -> np.ndarray:
    parts, count = ndimage.label(section, structure=_CONNECT_2D)
    if count == 1:
        return section
    sizes = np.bincount(parts.ravel())[1:]
    return np.asarray(parts == int(np.argmax(sizes)) + 1)


def outer_outline(region: np.ndarray) -> np.ndarray:
    """The outer boundary of ``region`` (one 8-connected part of a 2D mask) as a closed
    polyline along pixel edges, clockwise on screen, collinear vertices dropped.

    Each pixel edge between the region and the outside is a directed step with the region on
    its right; the steps chain into loops, the outer one being the longest (the others go round
    holes). Where two steps leave one corner (pixels touching only diagonally), the walk turns
    left, away from the region, which keeps a diagonal pair of pixels in one loop (the region
    is 8-connected).
    """
    padded = np.pad(region, 1)
    steps: dict[tuple[int, int], list[tuple[int, int]]] = {}
    rows, columns = np.nonzero(padded[1:-1, 1:-1])
    for r, c in zip(rows.tolist(), columns.tolist(), strict=True):
        # Corners are (x, y) = (column, row) of the unpadded image; pixel (r, c) spans
        # x in [c, c+1] and y in [r, r+1]. Clockwise on screen (y down): top edge left to
        # right, right edge downwards, bottom edge right to left, left edge upwards.
        if not padded[r, c + 1]:  # above
            steps.setdefault((c, r), []).append((c + 1, r))
        if not padded[r + 1, c + 2]:  # right
            steps.setdefault((c + 1, r), []).append((c + 1, r + 1))
        if not padded[r + 2, c + 1]:  # below
            steps.setdefault((c + 1, r + 1), []).append((c, r + 1))
        if not padded[r + 1, c]:  # left
            steps.setdefault((c, r + 1), []).append((c, r))
    loops: list[list[tuple[int, int]]] = []
    while steps:
        start = min(steps)  # the leftmost corner: a single step leaves it
        loop = [start]
        previous = start
        point = _take(steps, start, None)
        while point != start:
            loop.append(point)
            point, previous = _take(steps, point, previous), point
        loops.append(loop)
    outer = max(loops, key=len)
    vertices = [
        p
        for i, p in enumerate(outer)
        if not _collinear(outer[i - 1], p, outer[(i + 1) % len(outer)])
    ]
    vertices.append(vertices[0])
    return np.array(vertices, dtype=float)


def _take(
    steps: dict[tuple[int, int], list[tuple[int, int]]],
    at: tuple[int, int],
    came_from: tuple[int, int] | None,
) -> tuple[int, int]:
    """The next corner from ``at``, removing that step; of two, the one turning left."""
    choices = steps[at]
    index = 0
    if len(choices) == 2 and came_from is not None:
        dx, dy = at[0] - came_from[0], at[1] - came_from[1]
        # Turning left on screen (y down) from direction (dx, dy) goes to (dy, -dx).
        left = (at[0] + dy, at[1] - dx)
        index = choices.index(left) if left in choices else 0
    point = choices.pop(index)
    if not choices:
        del steps[at]
    return point


def _collinear(a: tuple[int, int], b: tuple[int, int], c: tuple[int, int]) -> bool:
    return (b[0] - a[0]) * (c[1] - b[1]) == (b[1] - a[1]) * (c[0] - b[0])


def polygon_area(outline: np.ndarray) -> float:
    """Shoelace area of a closed polyline, in pixels."""
    x, y = outline[:, 0], outline[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2)


def _area_mm2(region: np.ndarray, spacing: tuple[float, float] | None) -> float | None:
    return float(region.sum()) * spacing[0] * spacing[1] if spacing else None


def _long_axis_mm(outline: np.ndarray, spacing: tuple[float, float] | None) -> float | None:
    if not spacing:
        return None
    # (column, row) -> mm: columns are spaced by the column spacing, rows by the row spacing.
    points = outline[:-1] * (spacing[1], spacing[0])
    differences = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((differences**2).sum(axis=-1)).max())
