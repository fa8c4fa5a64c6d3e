"""Motion vocabularies: discrete 0.5 s motion tokens per agent kind (CAT-K / SMART style).

A vocabulary holds, for each kind of :data:`closedloop.constants.TOKEN_KINDS` (vehicle,
pedestrian, cyclist), ``V`` motion chunks of :data:`TOKEN_STEPS` steps: the local x, y and
heading of the 5 steps after a chunk's start pose, in the start pose's frame. It is built
by k-disk clustering of the logged chunks (:func:`build_vocabulary`): repeatedly pick a
random remaining chunk as a token and drop every chunk within ``tolerance`` of it, where
the distance between two chunks is the mean over the 5 steps and the 4 corners of the
kind's reference box of the distance between corresponding corners
(:func:`corner_distance`; CAT-K: 2048 tokens per kind, 0.05 m).

:func:`tokenize` turns logged trajectories into tokens sequentially: each chunk is matched
from the previous *tokenized* pose, so the tokenization's errors do not drift;
:func:`detokenize` chains tokens back into poses, exactly as the ``tokens`` dynamics
(:class:`closedloop.envs.dynamics.Tokens`) does with :meth:`MotionVocabulary.table`.

Vocabularies are saved as safetensors (one float tensor ``[V, 5, 3]`` per kind and the
settings that made it as JSON metadata); nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from closedloop.constants import TOKEN_KINDS, TYPE_CYCLIST, TYPE_PEDESTRIAN, TYPE_VEHICLE, token_kind
from closedloop.safetensors_io import read_safetensors, write_safetensors

TOKEN_STEPS = 5
# Reference boxes (length, width in metres) for the corner distance, one per kind: a
# typical WOMD car (4.8 x 2.0; the median WOMD vehicle is about 4.7 x 2.0), a pedestrian's
# footprint padded to 1 m so that heading errors still count for a near-round agent, and a
# bicycle with its rider (2.0 x 1.0). Fixed per kind (not the agent's own box) so that one
# chunk's distance to another does not depend on who drove it.
REFERENCE_BOXES: dict[str, tuple[float, float]] = {
    "vehicle": (4.8, 2.0),
    "pedestrian": (1.0, 1.0),
    "cyclist": (2.0, 1.0),
}
FORMAT = "closedloop-motion-vocabulary"
FORMAT_VERSION = 1
METADATA_KEY = "closedloop_motion_vocabulary"
MAX_CHUNK_MOTION_M = 50.0  # the trajectory dynamics' bounds: no chunk moves further
MAX_FILE_BYTES = 256 * 2**20
DEFAULT_MAX_CHUNKS = 1_000_000
DEFAULT_VOCABULARY_PATH = Path(__file__).resolve().parent / "data" / "default_vocabulary.safetensors"
# The WOMD types whose logs build each kind's vocabulary (unset and "other" objects are
# tokenized with the vehicle vocabulary, see token_kind, but do not shape it).
_BUILD_TYPES = {"vehicle": TYPE_VEHICLE, "pedestrian": TYPE_PEDESTRIAN, "cyclist": TYPE_CYCLIST}
_CORNER_SIGNS = ((1.0, 1.0), (1.0, -1.0), (-1.0, -1.0), (-1.0, 1.0))


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used; the message names the file."""


# -- geometry -----------------------------------------------------------------------------


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def compose(pose: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """World poses ``[..., k, 3]`` of the local poses ``local`` ``[..., k, 3]`` given in the
    frame of ``pose`` ``[..., 3]`` (headings wrapped to [-pi, pi), as the dynamics do)."""
    c, s = torch.cos(pose[..., None, 2]), torch.sin(pose[..., None, 2])
    x = pose[..., None, 0] + local[..., 0] * c - local[..., 1] * s
    y = pose[..., None, 1] + local[..., 0] * s + local[..., 1] * c
    return torch.stack([x, y, _wrap(pose[..., None, 2] + local[..., 2])], dim=-1)


def to_local(pose: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
    """``world`` poses ``[..., k, 3]`` in the frame of ``pose`` ``[..., 3]`` (the inverse of
    :func:`compose`)."""
    c, s = torch.cos(pose[..., None, 2]), torch.sin(pose[..., None, 2])
    dx, dy = world[..., 0] - pose[..., None, 0], world[..., 1] - pose[..., None, 1]
    return torch.stack([dx * c + dy * s, -dx * s + dy * c, _wrap(world[..., 2] - pose[..., None, 2])], dim=-1)


def _box_tensor(box, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(box, dtype=like.dtype, device=like.device)


def corners(poses: torch.Tensor, box) -> torch.Tensor:
    """The 4 corners ``[..., 4, 2]`` of a box (length, width: a pair or a tensor ``[..., 2]``
    broadcasting with ``poses``' leading dimensions) at poses ``[..., 3]``."""
    box = _box_tensor(box, poses)
    half_l, half_w = box[..., 0, None] / 2, box[..., 1, None] / 2  # [..., 1]
    signs = torch.tensor(_CORNER_SIGNS, dtype=poses.dtype, device=poses.device)
    cx, cy = signs[:, 0] * half_l, signs[:, 1] * half_w  # [..., 4]
    c, s = torch.cos(poses[..., 2, None]), torch.sin(poses[..., 2, None])
    return torch.stack([poses[..., 0, None] + cx * c - cy * s, poses[..., 1, None] + cx * s + cy * c], dim=-1)


def step_corner_distance(a: torch.Tensor, b: torch.Tensor, box) -> torch.Tensor:
    """Mean over the 4 corners of the reference box of the distance between the corners at
    poses ``a`` and ``b`` ``[..., 3]`` (same frame): ``[...]`` metres."""
    return torch.linalg.vector_norm(corners(a, box) - corners(b, box), dim=-1).mean(-1)


def corner_distance(a: torch.Tensor, b: torch.Tensor, box) -> torch.Tensor:
    """The k-disk distance between chunks ``a`` and ``b`` ``[..., 5, 3]`` (same frame): the
    mean over the steps and the 4 corners of ``box`` (length, width) of the corner
    distance. ``box`` is a pair, or a tensor ``[..., 2]`` per chunk."""
    if not isinstance(box, tuple | list):
        box = torch.as_tensor(box)[..., None, :]  # one box per chunk, the same for its steps
    return step_corner_distance(a, b, box).mean(-1)


# -- the vocabulary -----------------------------------------------------------------------


@dataclass
class MotionVocabulary:
    """``chunks``: kind -> float32 ``[V_kind, 5, 3]`` local poses of each token's 5 steps;
    ``settings``: how it was made (JSON-able)."""

    chunks: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [k for k in TOKEN_KINDS if k not in self.chunks]
        if missing or set(self.chunks) != set(TOKEN_KINDS):
            raise ValueError(f"a motion vocabulary has exactly the kinds {TOKEN_KINDS}, got {sorted(self.chunks)}")
        self.chunks = {k: _check_chunks(k, torch.as_tensor(self.chunks[k])) for k in TOKEN_KINDS}
        if not isinstance(self.settings, dict):
            raise ValueError("a motion vocabulary's settings are a JSON object")
        boxes = self.settings.get("reference_boxes", REFERENCE_BOXES)
        if not isinstance(boxes, dict) or not all(
            isinstance(boxes.get(k, REFERENCE_BOXES[k]), (list, tuple))
            and len(boxes.get(k, REFERENCE_BOXES[k])) == 2
            and all(isinstance(v, (int, float)) and 0 < v < 100 for v in boxes.get(k, REFERENCE_BOXES[k]))
            for k in TOKEN_KINDS
        ):
            raise ValueError(f"reference_boxes must map each kind to (length, width) in metres, not {boxes!r}")

    def sizes(self) -> torch.Tensor:
        """Tokens per kind ``[3]`` (long), in :data:`TOKEN_KINDS` order."""
        return torch.tensor([self.chunks[k].shape[0] for k in TOKEN_KINDS], dtype=torch.long)

    def table(self) -> torch.Tensor:
        """``[3, Vmax, 5, 3]``: every kind's chunks, padded up to the largest kind's size by
        repeating its token 0 (what ``make_dynamics("tokens", vocabulary=...)`` takes)."""
        vmax = int(self.sizes().max())
        rows = []
        for k in TOKEN_KINDS:
            chunk = self.chunks[k]
            pad = chunk[:1].expand(vmax - chunk.shape[0], -1, -1)
            rows.append(torch.cat([chunk, pad]))
        return torch.stack(rows)

    def boxes(self) -> torch.Tensor:
        """The reference boxes ``[3, 2]`` (length, width) this vocabulary was built with."""
        boxes = self.settings.get("reference_boxes", REFERENCE_BOXES)
        return torch.tensor([list(boxes.get(k, REFERENCE_BOXES[k])) for k in TOKEN_KINDS], dtype=torch.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically: the chunks as float32 and the settings as
        JSON metadata (byte-identical for identical vocabularies)."""
        tensors = {k: self.chunks[k].to(torch.float32).contiguous() for k in TOKEN_KINDS}
        header = {"format": FORMAT, "version": FORMAT_VERSION, "settings": self.settings}
        write_safetensors(path, tensors, header, METADATA_KEY)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MotionVocabulary:
        """Read a vocabulary saved by :meth:`save`; anything wrong raises
        :class:`VocabularyError` naming the file (never unpickles)."""
        where = str(path)
        tensors, header = read_safetensors(
            path, "a motion vocabulary", VocabularyError, MAX_FILE_BYTES, FORMAT, METADATA_KEY
        )
        if header.get("version") != FORMAT_VERSION:
            raise VocabularyError(
                f"{where}: motion vocabulary format version {header.get('version')!r}; "
                f"this closedloop reads version {FORMAT_VERSION}"
            )
        if set(tensors) != set(TOKEN_KINDS):
            raise VocabularyError(f"{where}: expected the tensors {list(TOKEN_KINDS)}, found {sorted(tensors)}")
        settings = header.get("settings", {})
        if not isinstance(settings, dict):
            raise VocabularyError(f"{where}: the settings are not a JSON object")
        try:
            return cls({k: tensors[k] for k in TOKEN_KINDS}, settings)
        except ValueError as err:
            raise VocabularyError(f"{where}: {err}") from None


def _check_chunks(kind: str, chunks: torch.Tensor) -> torch.Tensor:
    if chunks.dim() != 3 or chunks.shape[0] < 1 or tuple(chunks.shape[1:]) != (TOKEN_STEPS, 3):
        raise ValueError(f"{kind} chunks must be [V >= 1, {TOKEN_STEPS}, 3], got {list(chunks.shape)}")
    if chunks.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{kind} chunks must be floats, not {chunks.dtype}")
    chunks = chunks.to(torch.float32)
    bad = ~torch.isfinite(chunks).flatten(1).all(-1)
    if bool(bad.any()):
        raise ValueError(f"{kind} tokens {torch.nonzero(bad).flatten()[:5].tolist()} hold NaN/inf")
    reach = float(chunks[..., :2].abs().max())
    if reach > MAX_CHUNK_MOTION_M:
        raise ValueError(f"{kind} tokens move up to {reach:.1f} m in one chunk (at most {MAX_CHUNK_MOTION_M:.0f} m)")
    return chunks.contiguous()


def default_vocabulary() -> MotionVocabulary:
    """The vocabulary shipped with the package, built from synthetic scenarios (see the
    README's "Motion tokens" for the command that made it)."""
    return MotionVocabulary.load(DEFAULT_VOCABULARY_PATH)


# -- building -----------------------------------------------------------------------------


def scenario_chunks(scenario) -> dict[str, np.ndarray]:
    """Every valid 0.5 s chunk of a scenario's logs (6 consecutive valid steps: the start
    pose and 5 more), per kind: float32 ``[n, 5, 3]`` in the start pose's frame."""
    xy = scenario.track_xyz[..., :2].astype(np.float64)
    heading = scenario.track_heading.astype(np.float64)
    valid = scenario.track_valid.astype(bool)
    steps = xy.shape[1]
    out = {}
    for kind in TOKEN_KINDS:
        rows = scenario.track_type == _BUILD_TYPES[kind]
        if steps <= TOKEN_STEPS or not rows.any():
            out[kind] = np.zeros((0, TOKEN_STEPS, 3), np.float32)
            continue
        window = np.lib.stride_tricks.sliding_window_view(valid[rows], TOKEN_STEPS + 1, axis=1).all(-1)
        a, t = np.nonzero(window)  # agent (among rows), start step
        offsets = np.arange(1, TOKEN_STEPS + 1)
        kxy, kh = xy[rows], heading[rows]
        start_xy, start_h = kxy[a, t], kh[a, t]
        d = kxy[a[:, None], t[:, None] + offsets] - start_xy[:, None]
        c, s = np.cos(start_h)[:, None], np.sin(start_h)[:, None]
        dh = kh[a[:, None], t[:, None] + offsets] - start_h[:, None]
        local = np.stack(
            [d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c, (dh + np.pi) % (2 * np.pi) - np.pi], -1
        )
        out[kind] = local.astype(np.float32)
    return out


def _kdisk(
    chunks: torch.Tensor, box, size: int, tolerance: float, generator: torch.Generator, progress=None
) -> torch.Tensor:
    """Indices into ``chunks`` of the k-disk tokens, in pick order.

    Equivalent to picking a uniformly random remaining chunk and dropping all within
    ``tolerance`` until ``size`` tokens or none remain: walk a random permutation, keeping a
    chunk when no kept one lies within ``tolerance``. Batched: a block of the next
    uncovered chunks is resolved against itself, then the kept ones cover the rest with a
    matrix product that bounds the distance (mean of 20 corner distances >= their root sum
    of squares / 20), checked exactly where it may be within the tolerance."""
    m = chunks.shape[0]
    perm = torch.randperm(m, generator=generator)
    pts = corners(chunks[perm], box).flatten(1)  # [m, 40]: 5 steps x 4 corners x (x, y)
    npts = pts.shape[1] // 2
    sq = (pts * pts).sum(-1)
    # The float32 product has rounding errors of about 1e-7 x the squared norms; widen the
    # bound by that much so that it never rejects a pair that is within the tolerance.
    bound = (npts * tolerance) ** 2 + 1e-5 * float(sq.max()) + 1e-6
    active = torch.arange(m)
    kept: list[int] = []
    block = 256
    rows_per_pass, pairs_per_pass = 65536, 262144
    while len(kept) < size and active.numel() > 0:
        cand = active[:block]
        cpts = pts[cand].view(-1, npts, 2)
        close = torch.linalg.vector_norm(cpts[:, None] - cpts[None], dim=-1).mean(-1) <= tolerance  # [b, b]
        close_np = close.numpy()
        accepted: list[int] = []
        for i in range(cand.numel()):
            if len(kept) + len(accepted) >= size:
                break
            if not close_np[i, accepted].any():
                accepted.append(i)
        new = cand[accepted]
        kept.extend(new.tolist())
        if progress is not None:
            progress.update(len(accepted))
        if len(kept) >= size:
            break
        tok = pts[new]  # [a, 40]
        tok_sq = sq[new]
        covered = torch.zeros(active.numel(), dtype=torch.bool)
        for lo in range(0, active.numel(), rows_per_pass):
            rows = active[lo : lo + rows_per_pass]
            d2 = sq[rows, None] + tok_sq[None] - 2 * pts[rows] @ tok.T  # [r, a]
            r, j = torch.nonzero(d2 <= bound, as_tuple=True)
            for plo in range(0, r.numel(), pairs_per_pass):
                pr, pj = r[plo : plo + pairs_per_pass], j[plo : plo + pairs_per_pass]
                exact = torch.linalg.vector_norm((pts[rows[pr]] - tok[pj]).view(-1, npts, 2), dim=-1).mean(-1)
                covered[lo + pr[exact <= tolerance]] = True
        covered[: cand.numel()] = True  # every candidate is kept or within reach of a kept one
        active = active[~covered]
    return perm[torch.tensor(kept, dtype=torch.long)]


def _smallest_keys(
    parts: list[torch.Tensor], keys: list[torch.Tensor], limit: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (at most ``limit``) chunks of the smallest keys, in their original order."""
    chunks = torch.cat(parts) if parts else torch.zeros(0, TOKEN_STEPS, 3)
    key = torch.cat(keys) if keys else torch.zeros(0)
    if chunks.shape[0] > limit:
        keep = torch.topk(key, limit, largest=False).indices.sort().values
        chunks, key = chunks[keep], key[keep]
    return [chunks], [key]


def build_vocabulary(
    scenarios: Iterable,
    size: int = 2048,
    tolerance: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    data: str = "",
) -> MotionVocabulary:
    """k-disk vocabularies (``size`` tokens per kind at most) of the logged chunks of
    ``scenarios``; deterministic for ``seed``. Kinds with more than ``max_chunks`` chunks
    are subsampled uniformly at random (recorded in the settings); a kind without any chunk
    gets the single token "stand still"."""
    from tqdm import tqdm

    if size < 1:
        raise ValueError(f"the vocabulary size must be >= 1, not {size}")
    if not tolerance > 0:
        raise ValueError(f"the tolerance must be > 0 m, not {tolerance}")
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, not {max_chunks}")
    # A uniform sample without replacement of at most max_chunks chunks per kind, kept while
    # streaming (the chunks with the smallest random keys), so memory stays bounded.
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_KINDS}
    keys: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_KINDS}
    collected = dict.fromkeys(TOKEN_KINDS, 0)
    held = dict.fromkeys(TOKEN_KINDS, 0)
    count = 0
    for scenario in tqdm(scenarios, desc="chunks", unit="scenario", disable=not progress, leave=False):
        for kind, chunk in scenario_chunks(scenario).items():
            parts[kind].append(torch.from_numpy(chunk))
            keys[kind].append(torch.rand(chunk.shape[0], generator=generator))
            collected[kind] += chunk.shape[0]
            held[kind] += chunk.shape[0]
            if held[kind] > 2 * max_chunks:
                parts[kind], keys[kind] = _smallest_keys(parts[kind], keys[kind], max_chunks)
                held[kind] = max_chunks
        count += 1
    result, used, exhausted = {}, {}, {}
    for kind in TOKEN_KINDS:
        chunk_list, _ = _smallest_keys(parts[kind], keys[kind], max_chunks)
        chunks = chunk_list[0]
        used[kind] = int(chunks.shape[0])
        if chunks.shape[0] == 0:
            result[kind], exhausted[kind] = torch.zeros(1, TOKEN_STEPS, 3), True
            continue
        with tqdm(total=size, desc=f"k-disk {kind}", unit="token", disable=not progress, leave=False) as bar:
            picks = _kdisk(chunks, REFERENCE_BOXES[kind], size, tolerance, generator, bar if progress else None)
        result[kind] = chunks[picks].contiguous()
        exhausted[kind] = picks.numel() < size
    settings = {
        "size": size,
        "tolerance": tolerance,
        "seed": seed,
        "data": data,
        "scenarios": count,
        "token_steps": TOKEN_STEPS,
        "chunks_collected": collected,
        "chunks_used": used,
        "max_chunks": max_chunks,
        "subsampled": {k: used[k] < collected[k] for k in TOKEN_KINDS},
        "tokens": {k: int(result[k].shape[0]) for k in TOKEN_KINDS},
        "ran_out_of_chunks": exhausted,
        "reference_boxes": {k: list(v) for k, v in REFERENCE_BOXES.items()},
        "distance": "mean over the 5 steps and 4 reference-box corners of the corner distance (m)",
    }
    return MotionVocabulary(result, settings)


# -- tokenizing ---------------------------------------------------------------------------


@dataclass
class Tokenized:
    """A sequential tokenization: ``tokens`` ``[B, N, S]`` (indices into each agent's kind
    vocabulary), ``token_valid`` ``[B, N, S]``, ``poses`` ``[B, N, S + 1, 3]`` the tokenized
    poses at steps ``start, start + 5, ...`` (the first, and any re-anchored one, is the
    logged pose) and ``pose_valid`` ``[B, N, S + 1]``. ``tokens`` of invalid entries are
    still the best match where the chunk's start pose is valid (0 where it is not)."""

    tokens: torch.Tensor
    token_valid: torch.Tensor
    poses: torch.Tensor
    pose_valid: torch.Tensor
    start: int = 0


def _kind_tensors(vocab: MotionVocabulary, device, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per kind: (chunks [V, 5, 3], their corner points [V, 5, 4, 2]) at the origin."""
    boxes = vocab.boxes()
    out = []
    for k, kind in enumerate(TOKEN_KINDS):
        chunk = vocab.chunks[kind].to(device, dtype)
        out.append((chunk, corners(chunk, boxes[k].to(device, dtype))))
    return out


def _best_tokens(
    local: torch.Tensor, mask: torch.Tensor, vocab_corners: torch.Tensor, box: torch.Tensor
) -> torch.Tensor:
    """The token ``[n]`` whose corners lie closest (mean over the masked steps and the 4
    corners) to the logged local poses ``local`` ``[n, 5, 3]``."""
    logged = corners(local, box).flatten(1, 2)  # [n, 20, 2]: 5 steps x 4 corners
    vocab_points = vocab_corners.flatten(1, 2)  # [V, 20, 2]
    lx, ly, vx, vy = logged[..., 0], logged[..., 1], vocab_points[..., 0], vocab_points[..., 1]
    weight = mask.to(local.dtype)
    weight = weight / (4 * weight.sum(-1, keepdim=True).clamp_min(1))
    weight = weight.repeat_interleave(4, dim=-1)  # [n, 20]: mean over the valid steps and the corners
    rows = max(1, (1 << 22) // (vocab_points.shape[0] * 20))
    best = []
    for lo in range(0, local.shape[0], rows):
        sl = slice(lo, lo + rows)
        dist = torch.hypot(lx[sl, None] - vx[None], ly[sl, None] - vy[None])  # [r, V, 20]
        best.append(torch.einsum("rvk,rk->rv", dist, weight[sl]).argmin(-1))
    return torch.cat(best) if best else torch.zeros(0, dtype=torch.long, device=local.device)


@torch.no_grad()
def tokenize(
    vocab: MotionVocabulary,
    xy: torch.Tensor,
    heading: torch.Tensor,
    valid: torch.Tensor,
    agent_type: torch.Tensor,
    start: int = 0,
) -> Tokenized:
    """Tokenize logged trajectories ``xy`` ``[B, N, T, 2]``, ``heading`` ``[B, N, T]``,
    ``valid`` ``[B, N, T]`` from step ``start`` on, in ``S = (T - 1 - start) // 5`` tokens.

    Each token is the one of the agent's kind vocabulary that, from the previous tokenized
    pose, best reproduces the logged 5 steps (minimum corner distance over the valid ones).
    A token is valid when its start pose is and the log is valid at its last step; when the
    log is invalid at a token's end, the next chunk starting at a valid logged pose
    re-anchors there."""
    b, n, t = valid.shape
    s_count = (t - 1 - start) // TOKEN_STEPS
    if start < 0 or s_count < 0:
        raise ValueError(f"start {start} is outside the {t} steps")
    device, dtype = xy.device, xy.dtype if xy.dtype.is_floating_point else torch.float32
    logged = torch.cat([xy.to(dtype), heading.to(dtype)[..., None]], dim=-1).reshape(b * n, t, 3)
    ok = valid.reshape(b * n, t).bool()
    kinds = token_kind(agent_type.to(device)).reshape(b * n)
    tables = _kind_tensors(vocab, device, dtype)
    boxes = vocab.boxes().to(device, dtype)
    tokens = torch.zeros(b * n, s_count, dtype=torch.long, device=device)
    token_valid = torch.zeros(b * n, s_count, dtype=torch.bool, device=device)
    poses = torch.zeros(b * n, s_count + 1, 3, dtype=dtype, device=device)
    pose_valid = torch.zeros(b * n, s_count + 1, dtype=torch.bool, device=device)
    poses[:, 0] = torch.where(ok[:, start, None], logged[:, start], 0)
    pose_valid[:, 0] = ok[:, start]
    groups = [torch.nonzero(kinds == k).flatten() for k in range(len(TOKEN_KINDS))]
    for s in range(s_count):
        t0 = start + s * TOKEN_STEPS
        window = slice(t0 + 1, t0 + 1 + TOKEN_STEPS)
        end_ok = ok[:, t0 + TOKEN_STEPS]
        nxt = logged[:, t0 + TOKEN_STEPS].clone()
        for k, rows in enumerate(groups):
            rows = rows[pose_valid[rows, s]]
            if rows.numel() == 0:
                continue
            chunk, chunk_corners = tables[k]
            local = to_local(poses[rows, s], logged[rows, window])
            best = _best_tokens(local, ok[rows, window], chunk_corners, boxes[k])
            tokens[rows, s] = best
            reached = compose(poses[rows, s], chunk[best][:, -1:])[:, 0]
            keep = end_ok[rows]
            nxt[rows[keep]] = reached[keep]
            token_valid[rows[keep], s] = True
        poses[:, s + 1] = torch.where(end_ok[:, None], nxt, 0)
        pose_valid[:, s + 1] = end_ok
    shape = (b, n)
    return Tokenized(
        tokens.view(*shape, s_count),
        token_valid.view(*shape, s_count),
        poses.view(*shape, s_count + 1, 3),
        pose_valid.view(*shape, s_count + 1),
        start,
    )


def token_chunks(vocab: MotionVocabulary, tokens: torch.Tensor, agent_type: torch.Tensor, like=None) -> torch.Tensor:
    """The local chunks ``[..., 5, 3]`` of ``tokens`` ``[...]`` from each agent's kind
    vocabulary (``agent_type`` broadcasts with ``tokens``' leading dimensions)."""
    table = vocab.table().to(tokens.device, like.dtype if like is not None else torch.float32)
    kind = token_kind(agent_type.to(tokens.device))
    while kind.dim() < tokens.dim():
        kind = kind[..., None]
    return table[kind.expand(tokens.shape), tokens]


def chunk_poses(vocab: MotionVocabulary, tokenized: Tokenized, agent_type: torch.Tensor) -> torch.Tensor:
    """``[B, N, S, 5, 3]``: the poses of each token's 5 steps from its tokenized start pose
    (meaningful where ``pose_valid[..., :-1]``)."""
    local = token_chunks(vocab, tokenized.tokens, agent_type, like=tokenized.poses)
    return compose(tokenized.poses[..., :-1, :], local)


def detokenize(
    vocab: MotionVocabulary, start_pose: torch.Tensor, tokens: torch.Tensor, agent_type: torch.Tensor
) -> torch.Tensor:
    """Chain ``tokens`` ``[B, N, S]`` from ``start_pose`` ``[B, N, 3]``: poses ``[B, N, S * 5, 3]``
    (x, y, heading of every step after the start), as the ``tokens`` dynamics does."""
    local = token_chunks(vocab, tokens, agent_type, like=start_pose)  # [B, N, S, 5, 3]
    pose = start_pose
    out = []
    for s in range(tokens.shape[-1]):
        chunk = compose(pose, local[..., s, :, :])
        out.append(chunk)
        pose = chunk[..., -1, :]
    if not out:
        return start_pose.new_zeros((*start_pose.shape[:-1], 0, 3))
    return torch.cat(out, dim=-2)


# -- evaluating ---------------------------------------------------------------------------


def evaluate_vocabulary(vocab: MotionVocabulary, scenarios: Iterable, start: int = 10, group: int = 32) -> dict:
    """Per kind: the number of agents valid at ``start`` and the mean and 95th percentile,
    over every valid logged step after ``start`` of those agents, of the corner distance
    (the kind's reference box) between the logged pose and its sequential tokenization
    from the logged pose at ``start``. Steps in a chunk whose start pose is unknown (the
    log invalid there, before a re-anchor) are not counted."""
    errors: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_KINDS}
    agents = dict.fromkeys(TOKEN_KINDS, 0)
    boxes = vocab.boxes()
    batch: list = []

    def flush():
        if not batch:
            return
        xy = np.concatenate([x for x, _, _, _ in batch])
        anchor = xy[:, start].copy()  # per-agent origin: float32 stays exact far from the map origin
        xy = torch.from_numpy(xy - anchor[:, None]).float()[None]
        heading = torch.from_numpy(np.concatenate([h for _, h, _, _ in batch])).float()[None]
        valid = torch.from_numpy(np.concatenate([v for _, _, v, _ in batch]))[None]
        types = torch.from_numpy(np.concatenate([ty for _, _, _, ty in batch]).astype(np.int64))[None]
        tok = tokenize(vocab, xy, heading, valid, types, start=start)
        steps = chunk_poses(vocab, tok, types).flatten(2, 3)[0]  # [N, S * 5, 3]
        span = steps.shape[1]
        logged = torch.cat([xy, heading[..., None]], -1)[0, :, start + 1 : start + 1 + span]
        counted = valid[0, :, start + 1 : start + 1 + span] & tok.pose_valid[0, :, :-1].repeat_interleave(
            TOKEN_STEPS, dim=1
        )
        kinds = token_kind(types[0])
        for k, kind in enumerate(TOKEN_KINDS):
            rows = kinds == k
            agents[kind] += int(rows.sum())
            dist = step_corner_distance(steps[rows], logged[rows], boxes[k])
            errors[kind].append(dist[counted[rows]].float())
        batch.clear()

    for scenario in scenarios:
        keep = scenario.track_valid[:, start] & np.isin(scenario.track_type, list(_BUILD_TYPES.values()))
        if keep.any():
            batch.append(
                (
                    scenario.track_xyz[keep, :, :2].astype(np.float64),
                    scenario.track_heading[keep].astype(np.float64),
                    scenario.track_valid[keep].astype(bool),
                    scenario.track_type[keep],
                )
            )
        if len(batch) >= group:
            flush()
    flush()
    result = {}
    for kind in TOKEN_KINDS:
        err = torch.cat(errors[kind]).numpy() if errors[kind] else np.zeros(0)
        result[kind] = {
            "agents": agents[kind],
            "steps": int(err.size),
            "mean_corner_error_m": float(err.mean()) if err.size else None,
            "p95_corner_error_m": float(np.percentile(err, 95)) if err.size else None,
        }
    return result
