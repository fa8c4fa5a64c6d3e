"""A SMART-style tokenized next-token-prediction model (CAT-K's SMART-tiny and smaller), pure torch.

Every agent picks one motion token per 0.5 s (``token_steps`` log steps). The sequence of
an agent is a list of *elements*: element ``s`` sits at the start pose of token ``s``
(``poses[:, :, s]``, log step ``steps[s]``, by default ``5 * s``), is embedded from the
token that brought the agent there (token ``s - 1``: its kind's learned embedding plus an
MLP of the token's motion contour when a vocabulary table is given; a learned start
embedding when there is no valid previous token) and predicts token ``s``.

- **Map encoder**: map tokens (:mod:`closedloop.agents.map_tokens`) embedded from kind,
  roadgraph code and length, then ``map_layers`` blocks of attention among each token's
  ``map_neighbours`` nearest tokens within ``map_radius``. Static: computed once per
  scenario batch (:meth:`SmartModel.encode_map`). The traffic-light state is *not* in it:
  a learned embedding of the state at each element's log step is added to the relative
  encoding of each (agent element, map token) pair, so lights are dynamic and cost one
  embedding lookup per pair and step.
- **Agent decoder**: ``agent_layers`` layers, each three pre-norm attention blocks with a
  feed-forward network: temporal self-attention (causal, over the agent's own elements),
  map-to-agent attention (the ``agent_map_neighbours`` nearest map tokens within
  ``agent_map_radius``), agent-to-agent attention (the ``agent_neighbours`` nearest other
  valid agents at the same step within ``agent_radius``).
- **Relative encodings**: every attention between a query (pose ``p_i``) and a key (pose
  ``p_j``) adds ``r_ij = MLP(features of p_j in p_i's frame)`` to the key and the value
  (features: local x, y, log distance, cos/sin of the relative heading, and for temporal
  attention the time gap). Nothing else sees a position, so logits are invariant to a
  rotation and translation of the whole scene. One MLP per attention type, shared by the
  layers (computed once per forward or decoding step).
- **Neighbourhoods**: ``topk`` over distances (no loops over agents), gathered keys
  ``[Q, heads, K, d]`` attended with ``scaled_dot_product_attention`` and a boolean mask;
  a query with no key at all gets a zero update.
- **Head**: a shared hidden layer, then one linear layer per agent kind (vehicle,
  pedestrian, cyclist; ``closedloop.constants.token_kind``) over that kind's vocabulary.

Incremental decoding (:meth:`SmartModel.start`, :meth:`SmartModel.step`): the cache holds,
for every layer, the keys and values of the temporal block for the past elements (the
pose-independent part) and the past poses; each step embeds one new element per agent, and
recomputes the relative encodings of the (new, past) pairs (at most ``steps`` of them).
The logits equal those of :meth:`SmartModel.forward` on the same tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from closedloop.agents.map_tokens import MAP_KINDS, MapTokens
from closedloop.constants import DT, token_kind

NUM_LIGHT_STATES = 9
NUM_ROAD_CODES = 21
NUM_AGENT_TYPES = 5


@dataclass(frozen=True)
class SmartConfig:
    """Sizes of a :class:`SmartModel` (see ``MODEL_SIZES``)."""

    hidden: int = 128
    heads: int = 8
    map_layers: int = 3
    agent_layers: int = 6
    ffn_multiplier: int = 4
    vocab_size: int = 2048  # tokens per kind
    kinds: int = 3  # vehicle, pedestrian, cyclist
    rel_hidden: int = 64  # width of the relative-encoding MLPs
    map_neighbours: int = 16  # map encoder: keys per map token
    map_radius: float = 20.0
    agent_map_neighbours: int = 32  # decoder: map tokens per agent element
    agent_map_radius: float = 30.0
    agent_neighbours: int = 16  # decoder: other agents per agent element
    agent_radius: float = 50.0
    time_span: int | None = None  # temporal attention reaches this many elements back (None: all)
    token_steps: int = 5  # log steps per token (poses per vocabulary entry)
    dropout: float = 0.1
    motion_embedding: bool = True  # embed the vocabulary's contours when a table is given


MODEL_SIZES: dict[str, SmartConfig] = {
    "tiny": SmartConfig(),
    "mini": SmartConfig(hidden=96, heads=6, map_layers=2, agent_layers=3),
    "nano": SmartConfig(hidden=64, heads=4, map_layers=1, agent_layers=1),
    "micro": SmartConfig(
        hidden=32, heads=4, map_layers=1, agent_layers=1, ffn_multiplier=2, rel_hidden=32, vocab_size=2048
    ),
}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logit_mask(sizes: Tensor | Sequence[int], agent_type: Tensor, vocab_size: int) -> Tensor:
    """``[B, N, V]`` bool: True for the tokens that exist in each agent's kind vocabulary
    (``sizes[k]`` tokens for kind ``k``; kinds from ``closedloop.constants.token_kind``)."""
    sizes = torch.as_tensor(sizes, device=agent_type.device)
    limit = sizes[token_kind(agent_type)]
    return torch.arange(vocab_size, device=agent_type.device) < limit.unsqueeze(-1)


# --------------------------------------------------------------------------------------
# Geometry helpers


def relative_features(query: Tensor, key: Tensor, time_gap: Tensor | None = None) -> Tensor:
    """Features of poses ``key`` ``[..., 3]`` in the frames of poses ``query`` (broadcast):
    local x, y (/ 20 m), log(1 + distance), cos and sin of the relative heading, and
    ``time_gap`` (seconds) when given. Invariant to a common rotation and translation."""
    dx = key[..., 0] - query[..., 0]
    dy = key[..., 1] - query[..., 1]
    cos, sin = torch.cos(query[..., 2]), torch.sin(query[..., 2])
    lx = cos * dx + sin * dy
    ly = cos * dy - sin * dx
    dist = torch.sqrt(lx * lx + ly * ly)
    dh = key[..., 2] - query[..., 2]
    feats = [lx / 20.0, ly / 20.0, torch.log1p(dist), torch.cos(dh), torch.sin(dh)]
    if time_gap is not None:
        feats.append(time_gap.expand_as(lx))
    return torch.stack(feats, dim=-1)


def nearest(
    query_xy: Tensor, key_xy: Tensor, key_valid: Tensor, k: int, radius: float, exclude_self: bool = False
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest valid keys within ``radius`` of each query.

    ``query_xy [G, Q, 2]``, ``key_xy [G, M, 2]``, ``key_valid [G, M]`` (or ``[G, Q, M]``);
    ``exclude_self`` (Q == M) leaves out key ``q`` for query ``q``. Returns ``index [G, Q, K]``
    (``K = min(k, M)``) and ``mask [G, Q, K]`` (False for the padding of short lists).
    """
    dist = torch.cdist(query_xy, key_xy, compute_mode="donot_use_mm_for_euclid_dist")
    valid = key_valid if key_valid.dim() == 3 else key_valid.unsqueeze(1)
    valid = valid & (dist <= radius)
    if exclude_self:
        valid = valid & ~torch.eye(dist.shape[1], dtype=torch.bool, device=dist.device)
    dist = torch.where(valid, dist, math.inf)
    K = min(k, key_xy.shape[1])
    d, index = torch.topk(dist, K, dim=-1, largest=False, sorted=False)
    return index, torch.isfinite(d)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x [G, M, ...]`` rows picked by ``index [G, *idx]`` -> ``[G, *idx, ...]``."""
    G = x.shape[0]
    g = torch.arange(G, device=x.device).view(G, *([1] * (index.dim() - 1)))
    return x[g, index]


# --------------------------------------------------------------------------------------
# Building blocks


class RelativeEncoding(nn.Module):
    """MLP of :func:`relative_features` -> ``[..., hidden]``, added to keys and values."""

    def __init__(self, hidden: int, width: int, time: bool = False):
        super().__init__()
        self.time = time
        self.mlp = nn.Sequential(
            nn.Linear(6 if time else 5, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, hidden)
        )

    def forward(self, query: Tensor, key: Tensor, time_gap: Tensor | None = None) -> Tensor:
        return self.mlp(relative_features(query, key, time_gap if self.time else None))


class AttentionBlock(nn.Module):
    """Pre-norm attention of each query over its own gathered keys, a gated update (as in
    QCNet / SMART: ``g * attention + (1 - g) * self``) and a feed-forward network, both
    residual. Keys and values are ``linear(norm(source)) + r`` (one linear layer for both)."""

    def __init__(self, hidden: int, heads: int, ffn_multiplier: int, dropout: float, norm_source: bool = True):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
        self.heads = heads
        self.norm_query = nn.LayerNorm(hidden)
        self.norm_source = nn.LayerNorm(hidden) if norm_source else nn.Identity()
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        self.self_value = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn_multiplier * hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_multiplier * hidden, hidden),
        )
        self.dropout = nn.Dropout(dropout)

    def keys(self, source: Tensor) -> Tensor:
        """The pose-independent keys and values ``[..., 2d]`` of ``source [..., d]``."""
        return self.key_value(self.norm_source(source))

    def forward(self, x: Tensor, kv: Tensor, rel: Tensor, mask: Tensor) -> Tensor:
        """``x [..., d]`` queries; ``kv [..., K, 2d]`` gathered keys and values and
        ``rel [..., K, d]`` their relative encodings (broadcast against each other);
        ``mask [..., K]`` bool."""
        lead, d = x.shape[:-1], x.shape[-1]
        Q = math.prod(lead)
        K = mask.shape[-1]
        h = self.heads
        xn = self.norm_query(x)
        q = self.query(xn).reshape(Q, h, 1, d // h)
        # keys + r and values + r written straight into the [2, Q, heads, K, d / heads] layout
        # scaled_dot_product_attention reads (one pass, no transposed copies).
        kv_t = kv.unflatten(-1, (2, h, d // h)).movedim(-3, 0).transpose(-3, -2)
        rel_t = rel.unflatten(-1, (1, h, d // h)).movedim(-3, 0).transpose(-3, -2)
        if torch.is_grad_enabled() and (kv.requires_grad or rel.requires_grad):  # out= has no autograd
            both = (kv_t + rel_t).expand(2, *lead, h, K, d // h).contiguous()
        else:
            both = torch.empty(2, *lead, h, K, d // h, dtype=x.dtype, device=x.device)
            torch.add(kv_t, rel_t, out=both)
        k, v = both[0].reshape(Q, h, K, d // h), both[1].reshape(Q, h, K, d // h)
        mask = mask.expand(*lead, K).reshape(Q, K)
        empty = ~mask.any(-1)
        mask = mask.clone()
        mask[:, 0] |= empty  # a query with no key attends to a dummy one; its update is zeroed
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        o = (o.reshape(Q, d) * (~empty).unsqueeze(-1).to(o.dtype)).reshape(*lead, d)
        g = torch.sigmoid(self.gate(torch.cat([o, xn], dim=-1)))
        o = o + g * (self.self_value(xn) - o)
        x = x + self.dropout(self.out(o))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


@dataclass
class MapEncoding:
    """The encoded map of a batch of B scenarios: the ``tokens`` (``MapTokens`` with B
    rows), ``features [B', M, d]`` and ``rows [B]``: scenario ``b`` has the features
    ``features[rows[b]]``. ``repeat_interleave`` repeats rows, not features, so a map
    encoded once serves many rollouts and the decoder projects each distinct map once.
    """

    features: Tensor
    tokens: MapTokens
    rows: Tensor

    def repeat_interleave(self, repeats: int) -> MapEncoding:
        """Each scenario ``repeats`` times in a row (encode a map once for many rollouts)."""
        return MapEncoding(self.features, self.tokens.repeat_interleave(repeats), self.rows.repeat_interleave(repeats))

    def to(self, device: torch.device | str) -> MapEncoding:
        return MapEncoding(self.features.to(device), self.tokens.to(device), self.rows.to(device))


class MapEncoder(nn.Module):
    """Kind, code and length embeddings, then attention among nearby map tokens."""

    def __init__(self, config: SmartConfig):
        super().__init__()
        d = config.hidden
        self.config = config
        self.kind = nn.Embedding(len(MAP_KINDS), d)
        self.code = nn.Embedding(NUM_ROAD_CODES, d)
        self.length = nn.Linear(1, d)
        self.rel = RelativeEncoding(d, config.rel_hidden)
        self.layers = nn.ModuleList(
            AttentionBlock(d, config.heads, config.ffn_multiplier, config.dropout) for _ in range(config.map_layers)
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens: MapTokens) -> MapEncoding:
        c = self.config
        x = (
            self.kind(tokens.kind)
            + self.code(tokens.subtype.clamp(0, NUM_ROAD_CODES - 1))
            + self.length(tokens.length.unsqueeze(-1) / 5.0)
        )
        pose = tokens.pose
        index, mask = nearest(tokens.position, tokens.position, tokens.mask, c.map_neighbours, c.map_radius)
        rel = self.rel(pose.unsqueeze(2), gather_rows(pose, index))  # [B, M, K, d]
        for layer in self.layers:
            x = layer(x, gather_rows(layer.keys(x), index), rel, mask)
        x = self.norm(x) * tokens.mask.unsqueeze(-1)
        return MapEncoding(x, tokens, torch.arange(x.shape[0], device=x.device))


class AgentDecoderLayer(nn.Module):
    """Temporal, map-to-agent and agent-to-agent attention blocks."""

    def __init__(self, config: SmartConfig):
        super().__init__()
        args = (config.hidden, config.heads, config.ffn_multiplier, config.dropout)
        self.temporal = AttentionBlock(*args)
        self.map = AttentionBlock(*args, norm_source=False)  # the map encoding is normalised already
        self.agents = AttentionBlock(*args)

    def forward(
        self, x: Tensor, ctx: _Context, past: Tensor | None, map_kv: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``x [B, N, Sq, d]``: the new elements; ``past``: the temporal keys and values of
        the earlier elements ``[B, N, Sp, 2d]``; ``map_kv``: this layer's ``map.keys``
        of the map features ``[B', M, 2d]`` and the row of each scenario ``[B]``. Returns the
        updated ``x`` and the temporal keys and values of all elements (past and new)."""
        kv = self.temporal.keys(x)
        if past is not None:
            kv = torch.cat([past, kv], dim=2)
        x = self.temporal(x, kv.unsqueeze(2), ctx.time_rel, ctx.time_mask)
        B, N, Sq, _ = x.shape
        idx = ctx.map_index.reshape(B, N * Sq, -1)
        mkv, rows = map_kv
        mkv = mkv[rows.view(B, 1, 1), idx].reshape(B, N, Sq, idx.shape[-1], -1)
        x = self.map(x, mkv, ctx.map_rel, ctx.map_mask)
        akv = self.agents.keys(x)[ctx.agent_b, ctx.agent_index, ctx.agent_s]
        x = self.agents(x, akv, ctx.agent_rel, ctx.agent_mask)
        return x, kv


@dataclass
class _Context:
    """Per-forward (or per-step) quantities shared by all decoder layers."""

    time_rel: Tensor  # [B, N, Sq, Sk, d]
    time_mask: Tensor  # [B, N, Sq, Sk]
    map_index: Tensor  # [B, N, Sq, Km]
    map_rel: Tensor  # [B, N, Sq, Km, d], light state embedding included
    map_mask: Tensor  # [B, N, Sq, Km]
    agent_b: Tensor  # [B, 1, 1, 1]
    agent_index: Tensor  # [B, N, Sq, Ka]
    agent_s: Tensor  # [1, 1, Sq, 1]
    agent_rel: Tensor  # [B, N, Sq, Ka, d]
    agent_mask: Tensor  # [B, N, Sq, Ka]


@dataclass
class DecoderCache:
    """State of an incremental decoding (:meth:`SmartModel.start` / :meth:`SmartModel.step`).

    ``layers[l]`` holds the temporal keys and values ``[B, N, S, 2d]`` of the S elements seen
    so far, ``poses [B, N, S, 3]``, ``steps [S]`` (log steps), ``valid [B, N, S]``;
    ``logits [B, N, V]`` are those of the newest element (they predict the next token).
    ``step`` advances the cache in place. Tensors are never written in place, so
    ``cache.clone()`` (a shallow copy) is an independent branch: clone before stepping each
    branch of a rollout that forks.
    """

    layers: list[Tensor]
    poses: Tensor
    steps: Tensor
    valid: Tensor
    logits: Tensor
    last_token: Tensor  # [B, N] the last token given (history or step)
    kind: Tensor  # [B, N]
    agent_type: Tensor  # [B, N]
    table: Tensor  # [kinds * V, d] token embeddings
    map: MapEncoding
    map_kv: list[tuple[Tensor, Tensor]]
    token_steps: int

    @property
    def next_step(self) -> int:
        """Log step of the next element :meth:`SmartModel.step` expects."""
        return int(self.steps[-1]) + self.token_steps

    @property
    def num_elements(self) -> int:
        return self.poses.shape[2]

    def clone(self) -> DecoderCache:
        return dataclasses.replace(self, layers=list(self.layers))


# --------------------------------------------------------------------------------------
# The model


class SmartModel(nn.Module):
    """Tokenized multi-agent next-token prediction (see the module docstring).

    ``SmartModel("tiny")`` or ``SmartModel(SmartConfig(...))``. ``vocabulary``: optional
    ``[kinds, V', token_steps, 3]`` table of the tokens' poses (x, y, heading in the
    token's start frame, ``MotionVocabulary.table()``; ``V' <= vocab_size``), kept as a
    buffer (saved with the weights) and embedded with an MLP next to the learned token
    embeddings; without one only the learned embeddings are used.
    """

    def __init__(self, config: SmartConfig | str = "tiny", vocabulary: Tensor | None = None):
        super().__init__()
        if isinstance(config, str):
            config = MODEL_SIZES[config]
        self.config = c = config
        d, V = c.hidden, c.vocab_size
        self.token_embedding = nn.Embedding(c.kinds * V, d)
        self.start_embedding = nn.Embedding(c.kinds, d)  # no previous token
        self.type_embedding = nn.Embedding(NUM_AGENT_TYPES, d)
        self.motion = (
            nn.Sequential(nn.Linear(4 * c.token_steps, d), nn.ReLU(), nn.Linear(d, d)) if c.motion_embedding else None
        )
        self.map_encoder = MapEncoder(c)
        self.light_embedding = nn.Embedding(NUM_LIGHT_STATES, d)
        self.time_rel = RelativeEncoding(d, c.rel_hidden, time=True)
        self.map_rel = RelativeEncoding(d, c.rel_hidden)
        self.agent_rel = RelativeEncoding(d, c.rel_hidden)
        self.layers = nn.ModuleList(AgentDecoderLayer(c) for _ in range(c.agent_layers))
        self.norm = nn.LayerNorm(d)
        self.head_hidden = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.head_weight = nn.Parameter(torch.empty(c.kinds, V, d))
        self.head_bias = nn.Parameter(torch.zeros(c.kinds, V))
        nn.init.normal_(self.head_weight, std=d**-0.5)
        self.register_buffer("vocabulary", None)
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)

    # ---- vocabulary and embeddings

    def set_vocabulary(self, table: Tensor | None) -> None:
        """Use ``table [kinds, V', token_steps, 3]`` for the motion embedding (None: none)."""
        self.vocabulary = None if table is None else self._check_vocabulary(table)

    def _check_vocabulary(self, table: Tensor) -> Tensor:
        c = self.config
        if table.dim() != 4 or table.shape[0] != c.kinds or table.shape[2:] != (c.token_steps, 3):
            raise ValueError(f"vocabulary must be [{c.kinds}, V, {c.token_steps}, 3], got {tuple(table.shape)}")
        if table.shape[1] > c.vocab_size:
            raise ValueError(f"vocabulary has {table.shape[1]} tokens per kind, the model {c.vocab_size}")
        return table.detach().to(self.token_embedding.weight.device, torch.float32)

    def token_table(self, vocabulary: Tensor | None = None) -> Tensor:
        """``[kinds * V, d]``: embedding of each (kind, token)."""
        table = self.token_embedding.weight
        vocab = self.vocabulary if vocabulary is None else self._check_vocabulary(vocabulary)
        if vocab is None or self.motion is None:
            return table
        c = self.config
        feats = torch.cat(
            [vocab[..., :2] / 10.0, torch.cos(vocab[..., 2:]), torch.sin(vocab[..., 2:])], dim=-1
        ).flatten(2)  # [kinds, V', 4 * steps]
        motion = self.motion(feats)
        motion = F.pad(motion, (0, 0, 0, c.vocab_size - motion.shape[1]))
        return table + motion.reshape(c.kinds * c.vocab_size, -1)

    def _embed(self, table: Tensor, prev_token: Tensor, prev_valid: Tensor, kind: Tensor, agent_type: Tensor) -> Tensor:
        """Element embeddings ``[B, N, S, d]`` from the previous tokens ``[B, N, S]``."""
        V = self.config.vocab_size
        k = kind.unsqueeze(-1).expand_as(prev_token)
        emb = table[k * V + prev_token.clamp(0, V - 1)]
        emb = torch.where(prev_valid.unsqueeze(-1), emb, self.start_embedding(k))
        return emb + self.type_embedding(agent_type.clamp(0, NUM_AGENT_TYPES - 1)).unsqueeze(2)

    def logit_mask(self, sizes: Tensor | Sequence[int], agent_type: Tensor) -> Tensor:
        """``[B, N, V]`` bool, see :func:`logit_mask`."""
        return logit_mask(sizes, agent_type, self.config.vocab_size)

    # ---- map

    def encode_map(self, map: MapTokens) -> MapEncoding:
        """The static map encoding (once per scenario batch; ``repeat_interleave`` it for
        several rollouts of the same scenarios)."""
        return self.map_encoder(map)

    # ---- decoder

    def _context(
        self,
        pose_q: Tensor,
        steps_q: Tensor,
        valid_q: Tensor,
        pose_k: Tensor,
        steps_k: Tensor,
        valid_k: Tensor,
        map: MapTokens,
    ) -> _Context:
        """Neighbourhoods and relative encodings of queries ``[B, N, Sq]`` against the
        temporal keys ``[B, N, Sk]`` (past and new elements), the map and the other agents."""
        c = self.config
        B, N, Sq, _ = pose_q.shape
        dev = pose_q.device
        # Temporal: causal, valid, within the span.
        gap = steps_q.view(Sq, 1) - steps_k.view(1, -1)  # [Sq, Sk] log steps
        allowed = gap >= 0
        if c.time_span is not None:
            allowed &= gap <= c.time_span * c.token_steps
        time_mask = allowed & valid_k.unsqueeze(2)
        time_rel = self.time_rel(pose_q.unsqueeze(3), pose_k.unsqueeze(2), gap.to(pose_q.dtype) * DT)
        # Map.
        index, map_mask = nearest(
            pose_q[..., :2].reshape(B, N * Sq, 2), map.position, map.mask, c.agent_map_neighbours, c.agent_map_radius
        )
        map_pose = gather_rows(map.pose, index).reshape(B, N, Sq, -1, 3)
        map_index = index.reshape(B, N, Sq, -1)
        map_mask = map_mask.reshape(B, N, Sq, -1)
        T = map.light.shape[-1]
        t = steps_q.clamp(0, T - 1)
        light = map.light[:, :, t]  # [B, M, Sq]
        light = light.permute(0, 2, 1)[
            torch.arange(B, device=dev).view(B, 1, 1, 1), torch.arange(Sq, device=dev).view(1, 1, Sq, 1), map_index
        ]
        map_rel = self.map_rel(pose_q.unsqueeze(3), map_pose) + self.light_embedding(light)
        # Agents at the same step.
        xy = pose_q[..., :2].transpose(1, 2).reshape(B * Sq, N, 2)
        vq = valid_q.transpose(1, 2).reshape(B * Sq, N)
        a_index, a_mask = nearest(xy, xy, vq, c.agent_neighbours, c.agent_radius, exclude_self=True)
        a_index = a_index.reshape(B, Sq, N, -1).transpose(1, 2)  # [B, N, Sq, Ka]
        a_mask = a_mask.reshape(B, Sq, N, -1).transpose(1, 2)
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        s = torch.arange(Sq, device=dev).view(1, 1, Sq, 1)
        agent_rel = self.agent_rel(pose_q.unsqueeze(3), pose_q[b, a_index, s])
        return _Context(time_rel, time_mask, map_index, map_rel, map_mask, b, a_index, s, agent_rel, a_mask)

    def _map_kv(self, encoding: MapEncoding) -> list[tuple[Tensor, Tensor]]:
        if encoding.rows.shape[0] != encoding.tokens.mask.shape[0]:
            raise ValueError("the map encoding's rows and tokens disagree on the batch size")
        return [(layer.map.keys(encoding.features), encoding.rows) for layer in self.layers]

    def _head(self, x: Tensor, kind: Tensor) -> Tensor:
        """Logits ``[B, N, S, V]`` of each element under its kind's head."""
        h = self.head_hidden(self.norm(x))
        kind = kind.unsqueeze(-1).expand(h.shape[:-1])
        logits = h.new_zeros(*h.shape[:-1], self.config.vocab_size)
        for k in range(self.config.kinds):
            sel = kind == k
            logits[sel] = F.linear(h[sel], self.head_weight[k], self.head_bias[k])
        return logits

    @staticmethod
    def _clean(poses: Tensor, valid: Tensor) -> Tensor:
        return torch.where(valid.unsqueeze(-1), poses, torch.zeros((), dtype=poses.dtype, device=poses.device))

    def _default_steps(self, S: int, device) -> Tensor:
        return torch.arange(S, device=device) * self.config.token_steps

    def forward(
        self,
        tokens: Tensor,
        poses: Tensor,
        valid: Tensor,
        agent_type: Tensor,
        map: MapTokens,
        map_encoding: MapEncoding | None = None,
        steps: Tensor | None = None,
        vocabulary: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits ``[B, N, S, V]``; ``logits[:, :, s]`` predicts ``tokens[:, :, s]``
        from the tokens before it (causal in time).

        - ``tokens [B, N, S]`` long: token indices in each agent's kind vocabulary.
        - ``poses [B, N, S + 1, 3]`` (or ``[B, N, S, 3]``): x, y, heading (batch frame) where
          each token starts; ``poses[:, :, S]`` (the end of the last token) is not used.
        - ``valid [B, N, S]`` bool: token ``s`` is valid (its start pose is known and it is a
          target); element ``s`` is a query and a key only where valid, and token ``s - 1``
          feeds element ``s`` only where ``valid[s - 1]`` (else the start embedding).
          Padded agents: all False.
        - ``agent_type [B, N]``: WOMD type codes (kind by ``constants.token_kind``).
        - ``steps [S]``: log step of each element (default ``token_steps * s``): the light
          state and the time gaps come from it.
        """
        B, N, S = tokens.shape
        if poses.shape[:3] not in ((B, N, S + 1), (B, N, S)) or valid.shape != (B, N, S):
            raise ValueError(
                f"tokens {tuple(tokens.shape)}, poses {tuple(poses.shape)}, valid {tuple(valid.shape)} disagree"
            )
        valid = valid.bool()
        poses = self._clean(poses[:, :, :S].float(), valid)
        steps = self._default_steps(S, tokens.device) if steps is None else steps.to(tokens.device)
        if map_encoding is None:
            map_encoding = self.encode_map(map)
        kind = token_kind(agent_type)
        prev_token = F.pad(tokens[:, :, :-1], (1, 0))
        prev_valid = F.pad(valid[:, :, :-1], (1, 0))
        x = self._embed(self.token_table(vocabulary), prev_token, prev_valid, kind, agent_type)
        ctx = self._context(poses, steps, valid, poses, steps, valid, map_encoding.tokens)
        map_kv = self._map_kv(map_encoding)
        for layer, kv in zip(self.layers, map_kv):
            x, _ = layer(x, ctx, None, kv)
        return self._head(x, kind)

    @torch.no_grad()
    def start(
        self,
        tokens_hist: Tensor,
        poses_hist: Tensor,
        valid_hist: Tensor,
        agent_type: Tensor,
        map: MapTokens,
        map_encoding: MapEncoding | None = None,
        steps: Tensor | None = None,
        vocabulary: Tensor | None = None,
    ) -> DecoderCache:
        """Run the history and return the cache for incremental decoding.

        ``tokens_hist [B, N, H]`` (e.g. H = 2: steps 0..5 and 5..10), ``poses_hist
        [B, N, H + 1, 3]`` (their start poses and the current pose), ``valid_hist
        [B, N, H + 1]`` (the H tokens' validity, then whether each agent is present now),
        ``steps [H + 1]`` (default ``0, 5, ..., 5 H``). ``cache.logits [B, N, V]`` predict
        the first token after the history (what ``forward`` gives at element H).
        """
        B, N, H = tokens_hist.shape
        if poses_hist.shape[:3] != (B, N, H + 1) or valid_hist.shape != (B, N, H + 1):
            raise ValueError(
                f"start needs poses_hist [B, N, H + 1, 3] and valid_hist [B, N, H + 1] for tokens_hist "
                f"{tuple(tokens_hist.shape)}; got {tuple(poses_hist.shape)} and {tuple(valid_hist.shape)}"
            )
        valid = valid_hist.bool()
        poses = self._clean(poses_hist.float(), valid)
        steps = self._default_steps(H + 1, tokens_hist.device) if steps is None else steps.to(tokens_hist.device)
        if map_encoding is None:
            map_encoding = self.encode_map(map)
        kind = token_kind(agent_type)
        table = self.token_table(vocabulary)
        prev_token = F.pad(tokens_hist, (1, 0))
        prev_valid = F.pad(valid[:, :, :-1], (1, 0))
        x = self._embed(table, prev_token, prev_valid, kind, agent_type)
        ctx = self._context(poses, steps, valid, poses, steps, valid, map_encoding.tokens)
        map_kv = self._map_kv(map_encoding)
        layers = []
        for layer, kv in zip(self.layers, map_kv):
            x, past = layer(x, ctx, None, kv)
            layers.append(past)
        return DecoderCache(
            layers=layers,
            poses=poses,
            steps=steps,
            valid=valid,
            logits=self._head(x[:, :, -1:], kind)[:, :, 0],
            last_token=tokens_hist[:, :, -1] if H else torch.zeros_like(kind),
            kind=kind,
            agent_type=agent_type,
            table=table,
            map=map_encoding,
            map_kv=map_kv,
            token_steps=self.config.token_steps,
        )

    @torch.no_grad()
    def step(
        self, cache: DecoderCache, token: Tensor, pose: Tensor, valid: Tensor, time_index: int | None = None
    ) -> Tensor:
        """Advance ``cache`` by one element and return its logits ``[B, N, V]``.

        ``token [B, N]``: the token each agent just executed (fed in where the previous
        element was valid); ``pose [B, N, 3]``: where it ended (the new element's pose);
        ``valid [B, N]``: whether each agent is present now. ``time_index`` (optional): the
        log step of ``pose``; if given it must be ``cache.next_step``, else ``ValueError``
        (e.g. a cache already stepped by another branch: ``cache.clone()`` each branch).
        """
        B, N = cache.kind.shape
        if token.shape != (B, N) or pose.shape != (B, N, 3) or valid.shape != (B, N):
            raise ValueError(
                f"step needs token [B, N], pose [B, N, 3], valid [B, N] with B, N = {B}, {N}; got "
                f"{tuple(token.shape)}, {tuple(pose.shape)}, {tuple(valid.shape)}"
            )
        now = cache.next_step
        if time_index is not None and time_index != now:
            raise ValueError(
                f"the decoder cache is at log step {now - cache.token_steps} and expects the pose of step {now}, "
                f"got step {time_index}: a cache advances in place, so clone it (cache.clone()) before "
                "stepping each branch of a forked rollout"
            )
        valid = valid.bool()
        pose = self._clean(pose.float(), valid)
        steps_q = torch.tensor([now], device=cache.steps.device)
        x = self._embed(
            cache.table, token.unsqueeze(-1), cache.valid[:, :, -1:], cache.kind, cache.agent_type
        )  # [B, N, 1, d]
        poses = torch.cat([cache.poses, pose.unsqueeze(2)], dim=2)
        steps = torch.cat([cache.steps, steps_q])
        valids = torch.cat([cache.valid, valid.unsqueeze(2)], dim=2)
        if self.config.time_span is not None and poses.shape[2] > self.config.time_span + 1:
            keep = self.config.time_span + 1
            cache.layers = [kv[:, :, -keep + 1 :] for kv in cache.layers]
            poses, steps, valids = poses[:, :, -keep:], steps[-keep:], valids[:, :, -keep:]
        # Only agent slots present now in some scenario are decoded: an absent agent is no
        # key for anyone (masked as invalid) and its logits are not used, so skipping it
        # changes nothing but the work (absent slots get zero keys and logits).
        cols = torch.nonzero(valid.any(0)).squeeze(-1)
        if cols.numel() == N:
            cols = None

        def present(t: Tensor) -> Tensor:
            return t if cols is None else t[:, cols]

        ctx = self._context(
            present(pose).unsqueeze(2),
            steps_q,
            present(valid).unsqueeze(2),
            present(poses),
            steps,
            present(valids),
            cache.map.tokens,
        )
        x = present(x)
        layers = []
        for layer, past, kv in zip(self.layers, cache.layers, cache.map_kv):
            x, new = layer(x, ctx, present(past), kv)
            if cols is not None:
                full = torch.cat([past, past.new_zeros(B, N, 1, past.shape[-1])], dim=2)
                full[:, cols, -1] = new[:, :, -1]
                new = full
            layers.append(new)
        logits = self._head(x, present(cache.kind))[:, :, 0]
        if cols is not None:
            logits = logits.new_zeros(B, N, logits.shape[-1]).index_copy_(1, cols, logits)
        cache.layers, cache.poses, cache.steps, cache.valid = layers, poses, steps, valids
        cache.last_token = token
        cache.logits = logits
        return cache.logits
