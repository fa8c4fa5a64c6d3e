"""Plane-curve helpers for the synthetic town: resampling, smooth turns, offsets."""

from __future__ import annotations

import numpy as np


def resample(points: np.ndarray, spacing: float) -> np.ndarray:
    """Points along the polyline ``points`` [n, 2] at (nearly) equal arc-length spacing.

    The first and last points are kept; the spacing is adjusted so the steps are equal.
    """
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    count = max(int(np.ceil(arc[-1] / spacing)), 1)
    at = np.linspace(0.0, arc[-1], count + 1)
    return np.stack([np.interp(at, arc, points[:, 0]), np.interp(at, arc, points[:, 1])], axis=1)


def line(start, end, spacing: float) -> np.ndarray:
    """A straight polyline from ``start`` to ``end`` sampled every ~``spacing`` metres."""
    return resample(np.array([start, end], dtype=np.float64), spacing)


def _turn_unit(angle: float, ramp: float, samples: int = 400) -> np.ndarray:
    """A unit-length curve turning by ``angle`` with a trapezoidal curvature profile.

    Curvature rises linearly over the first ``ramp`` fraction, stays flat, and falls over
    the last ``ramp`` fraction, so it is zero at both ends: joining straight lanes with such
    a curve keeps the yaw rate continuous (no angular-acceleration spikes).
    """
    u = np.linspace(0.0, 1.0, samples + 1)
    shape = np.minimum(np.minimum(u / ramp, (1 - u) / ramp), 1.0)
    kappa = shape / np.trapezoid(shape, u) * angle
    heading = np.concatenate([[0.0], np.cumsum((kappa[1:] + kappa[:-1]) / 2 * np.diff(u))])
    step = np.diff(u)
    mid = (heading[1:] + heading[:-1]) / 2
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(np.stack([np.cos(mid), np.sin(mid)], 1) * step[:, None], 0)])
    return xy


def smooth_turn(start, start_heading: float, end, end_heading: float, spacing: float, ramp: float = 0.3) -> np.ndarray:
    """A G2-continuous path from ``start`` to ``end`` with the given headings.

    The two tangent rays must meet at a point ``T`` ahead of ``start`` and behind ``end``.
    The path is a straight run, a symmetric smooth turn, and another straight run, with the
    straight run on the longer side so the turn itself is symmetric about ``T``.
    """
    start, end = np.asarray(start, float), np.asarray(end, float)
    d0 = np.array([np.cos(start_heading), np.sin(start_heading)])
    d1 = np.array([np.cos(end_heading), np.sin(end_heading)])
    # Solve start + a * d0 = end - b * d1 for the distances a, b to the tangent intersection.
    matrix = np.stack([d0, d1], axis=1)
    a, b = np.linalg.solve(matrix, end - start)
    if a <= 0 or b <= 0:
        raise ValueError("smooth_turn: the tangent rays do not meet ahead of the start")
    angle = float(np.arctan2(d0[0] * d1[1] - d0[1] * d1[0], np.dot(d0, d1)))
    unit = _turn_unit(angle, ramp)
    # Distance from the unit curve's start to its own tangent intersection.
    unit_a = np.linalg.solve(np.stack([[1.0, 0.0], [np.cos(angle), np.sin(angle)]], axis=1), unit[-1])[0]
    d = min(a, b)
    rot = np.array([[np.cos(start_heading), -np.sin(start_heading)], [np.sin(start_heading), np.cos(start_heading)]])
    turn_start = start + (a - d) * d0
    curve = turn_start + (unit * (d / unit_a)) @ rot.T
    pieces = [curve]
    if a - d > 1e-6:
        pieces.insert(0, np.array([start, turn_start]))
    if b - d > 1e-6:
        pieces.append(np.array([curve[-1], end]))
    path = np.concatenate(pieces)
    keep = np.concatenate([[True], np.linalg.norm(np.diff(path, axis=0), axis=1) > 1e-9])
    return resample(path[keep], spacing)


def arc(center, radius: float, start_angle: float, end_angle: float, spacing: float) -> np.ndarray:
    """A circular arc, counter-clockwise when ``end_angle > start_angle``."""
    count = max(int(np.ceil(abs(end_angle - start_angle) * radius / spacing)), 2)
    t = np.linspace(start_angle, end_angle, count + 1)
    return np.asarray(center, float) + radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def headings(points: np.ndarray) -> np.ndarray:
    """Tangent heading at every point of a polyline (forward differences, last repeated)."""
    d = np.diff(points, axis=0)
    h = np.arctan2(d[:, 1], d[:, 0])
    return np.concatenate([h, h[-1:]])
