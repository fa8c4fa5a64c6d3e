"""Batched planar geometry in torch: oriented boxes, their overlaps and signed distances.

Every function broadcasts over leading dimensions and runs on any device. Boxes are
``(x, y, heading, length, width)`` (except for :func:`box_separation`, which takes them
with the heading's cosine and sine and half sizes, as the simulator keeps them); corners
go counter-clockwise starting front-left: front-left, rear-left, rear-right, front-right.
"""

from __future__ import annotations

import functools

import torch

# Corner signs in the box frame (along length, along width), counter-clockwise.
_CORNER_SIGNS = ((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0))


@functools.lru_cache(maxsize=16)
def _corner_signs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``_CORNER_SIGNS`` as a ``[4, 2]`` tensor, made once per dtype and device (making a
    tensor from a list costs as much as a few operations, and boxes are made every step)."""
    with torch.inference_mode(False):  # a tensor kept for later calls, with autograd among them
        return torch.tensor(_CORNER_SIGNS, dtype=dtype, device=device)


def box_corners(
    x: torch.Tensor, y: torch.Tensor, heading: torch.Tensor, length: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """Corners ``[..., 4, 2]`` of oriented boxes."""
    signs = _corner_signs(x.dtype, x.device)
    half = torch.stack([length, width], dim=-1)[..., None, :] / 2 * signs  # [..., 4, 2]
    cos, sin = torch.cos(heading)[..., None], torch.sin(heading)[..., None]
    cx = half[..., 0] * cos - half[..., 1] * sin
    cy = half[..., 0] * sin + half[..., 1] * cos
    return torch.stack([cx + x[..., None], cy + y[..., None]], dim=-1)


def _corners_in_frame(x, y, heading, half_l, half_w, fx, fy, fheading):
    """Corners ``[..., 4]`` (u and v) of boxes expressed in another box's frame."""
    dx, dy = x - fx, y - fy
    c, s = torch.cos(fheading), torch.sin(fheading)
    cu, cv = dx * c + dy * s, -dx * s + dy * c  # centre in the frame
    rel = heading - fheading
    rc, rs = torch.cos(rel), torch.sin(rel)
    signs = _corner_signs(x.dtype, x.device)
    ol = half_l[..., None] * signs[:, 0]
    ow = half_w[..., None] * signs[:, 1]
    u = cu[..., None] + ol * rc[..., None] - ow * rs[..., None]
    v = cv[..., None] + ol * rs[..., None] + ow * rc[..., None]
    return u, v


def _separations(a, b) -> torch.Tensor:
    """Largest separating-axis gap between rectangles (negative when they overlap)."""
    xa, ya, ha, la, wa = a
    xb, yb, hb, lb, wb = b
    hla, hwa, hlb, hwb = la / 2, wa / 2, lb / 2, wb / 2
    ua, va = _corners_in_frame(xa, ya, ha, hla, hwa, xb, yb, hb)
    ub, vb = _corners_in_frame(xb, yb, hb, hlb, hwb, xa, ya, ha)
    sep_b = torch.maximum(
        torch.maximum(ua.amin(-1) - hlb, -ua.amax(-1) - hlb), torch.maximum(va.amin(-1) - hwb, -va.amax(-1) - hwb)
    )
    sep_a = torch.maximum(
        torch.maximum(ub.amin(-1) - hla, -ub.amax(-1) - hla), torch.maximum(vb.amin(-1) - hwa, -vb.amax(-1) - hwa)
    )
    return torch.maximum(sep_a, sep_b), (ua, va, ub, vb)


def rectangles_overlap(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Whether oriented rectangles ``(x, y, heading, length, width)`` overlap: the
    simulator's collision test (:func:`box_separation`), so planners judge collisions as
    the simulator does."""
    return box_separation(_projected(a), _projected(b)) < 0


def _projected(box: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``(x, y, heading, length, width)`` as :func:`box_separation` reads boxes."""
    x, y, heading, length, width = box
    return x, y, torch.cos(heading), torch.sin(heading), length / 2, width / 2


def box_separation(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """How far apart boxes ``a`` and ``b`` are along the separating axis that parts them
    most: negative exactly where they overlap (touching is no overlap; NaN is none).
    Boxes are ``(x, y, heading cosine, heading sine, half length, half width)``,
    broadcast together.

    The separating-axis test in its projected form (each box's reach along the four axes,
    the relative rotation by the angle-difference identities): a few dozen flops per pair
    where the corner form (:func:`_separations`) costs four cosines and sines. One float,
    not four booleans: compiled (the simulator's collision kernels), boolean pair tensors
    ran several times slower."""
    xa, ya, ca, sa, la, wa = a
    xb, yb, cb, sb, lb, wb = b
    dx, dy = xb - xa, yb - ya
    rc, rs = (cb * ca + sb * sa).abs(), (sb * ca - cb * sa).abs()  # |cos|, |sin| of the relative heading
    # Along each of the four axes: the centres' distance less both boxes' reach.
    return torch.maximum(
        torch.maximum(
            (dx * ca + dy * sa).abs() - (la + rc * lb + rs * wb), (dy * ca - dx * sa).abs() - (wa + rs * lb + rc * wb)
        ),
        torch.maximum(
            (dx * cb + dy * sb).abs() - (lb + rc * la + rs * wa), (dy * cb - dx * sb).abs() - (wb + rs * la + rc * wa)
        ),
    )


def rectangle_distance(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Signed distance between oriented rectangles ``(x, y, heading, length, width)``:
    the gap when apart, minus the penetration depth when they overlap.

    Works in each box's own frame, so it costs a few dozen flops per pair (no corner
    tensors of pairs x corners x corners).
    """
    hla, hwa, hlb, hwb = a[3] / 2, a[4] / 2, b[3] / 2, b[4] / 2
    separation, (ua, va, ub, vb) = _separations(a, b)
    # Apart: the nearest corner-to-rectangle distance, in either frame.
    da = torch.hypot((ua.abs() - hlb[..., None]).clamp_min(0), (va.abs() - hwb[..., None]).clamp_min(0))
    db = torch.hypot((ub.abs() - hla[..., None]).clamp_min(0), (vb.abs() - hwa[..., None]).clamp_min(0))
    gap = torch.minimum(da.amin(-1), db.amin(-1))
    return torch.where(separation > 0, gap, separation)
