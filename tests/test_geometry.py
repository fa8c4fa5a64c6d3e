"""Batched box geometry against shapely on random cases."""

import numpy as np
import torch
from shapely.geometry import Polygon

from closedloop.geometry import box_corners, rectangle_distance, rectangles_overlap


def _random_boxes(rng, n):
    return torch.tensor(rng.uniform([-6, -6, -3.2, 0.4, 0.3], [6, 6, 3.2, 7, 3], (n, 5)), dtype=torch.float64)


def test_corners_distances_and_overlaps_match_shapely():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 3000), _random_boxes(rng, 3000)
    ca = box_corners(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4])
    cb = box_corners(b[:, 0], b[:, 1], b[:, 2], b[:, 3], b[:, 4])
    signed = rectangle_distance(tuple(a.T), tuple(b.T))
    overlap = rectangles_overlap(tuple(a.T), tuple(b.T))
    for i in range(len(a)):
        pa, pb = Polygon(ca[i].numpy()), Polygon(cb[i].numpy())
        assert abs(pa.area - float(a[i, 3] * a[i, 4])) < 1e-9  # corners span the box
        if pa.intersection(pb).area > 1e-9:
            assert overlap[i] and signed[i] < 0
        elif not pa.intersects(pb):
            assert not overlap[i]
            assert abs(signed[i].item() - pa.distance(pb)) < 1e-9


def test_penetration_depth_of_aligned_boxes():
    # Two 4 x 2 boxes, centres 3 m apart along x: they overlap by 1 m.
    a = tuple(torch.tensor([v], dtype=torch.float64) for v in (0.0, 0.0, 0.0, 4.0, 2.0))
    b = tuple(torch.tensor([v], dtype=torch.float64) for v in (3.0, 0.0, 0.0, 4.0, 2.0))
    assert rectangle_distance(a, b).item() == -1.0
    c = tuple(torch.tensor([v], dtype=torch.float64) for v in (7.5, 0.0, np.pi / 2, 4.0, 2.0))
    assert abs(rectangle_distance(a, c).item() - 4.5) < 1e-12  # 7.5 - 2 - 1
