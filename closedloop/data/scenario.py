"""The ``Scenario`` record: a lossless numpy image of one WOMD ``Scenario`` proto.

Every field is a numpy array (or a plain ``str``/``int``), so a record can be saved with
``np.savez`` and loaded with ``allow_pickle=False``. Variable-length lists (polylines, entry
lanes, lane boundaries, ...) are stored flat with a ``*_splits`` array of ``len + 1``
offsets, CSR style: the items of element ``i`` are ``flat[splits[i]:splits[i + 1]]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np

from closedloop.constants import (  # noqa: F401  (re-exported: the record's vocabulary)
    CURRENT_INDEX,
    DT,
    LIGHT_ARROW_CAUTION,
    LIGHT_ARROW_GO,
    LIGHT_ARROW_STOP,
    LIGHT_CAUTION,
    LIGHT_FLASHING_CAUTION,
    LIGHT_FLASHING_STOP,
    LIGHT_GO,
    LIGHT_STOP,
    LIGHT_UNKNOWN,
    NUM_STEPS,
    RED_LIGHT_STATES,
    TYPE_CYCLIST,
    TYPE_OTHER,
    TYPE_PEDESTRIAN,
    TYPE_UNSET,
    TYPE_VEHICLE,
)

# Map feature kinds: the names of the proto's ``feature_data`` oneof, in its order.
MAP_KINDS = ("lane", "road_line", "road_edge", "stop_sign", "crosswalk", "speed_bump", "driveway")
MAP_KIND_INDEX = {name: i for i, name in enumerate(MAP_KINDS)}
POLYGON_KINDS = frozenset(MAP_KIND_INDEX[k] for k in ("crosswalk", "speed_bump", "driveway"))

# Roadgraph point type codes: the WOMD tf.Example convention (also Waymax's MapElementIds):
# lanes 0..3 by lane type, road lines 5..13 by line type, road edges 14..16 by edge type,
# then stop sign 17, crosswalk 18, speed bump 19, driveway 20.
_ROAD_TYPE_OFFSET = {0: 0, 1: 5, 2: 14}
_ROAD_TYPE_FIXED = {3: 17, 4: 18, 5: 19, 6: 20}


def road_type_code(kind: int, subtype: int) -> int:
    """Roadgraph type code of a map feature of ``MAP_KINDS[kind]`` with proto type ``subtype``."""
    if kind in _ROAD_TYPE_FIXED:
        return _ROAD_TYPE_FIXED[kind]
    return _ROAD_TYPE_OFFSET[kind] + subtype


def road_type_kind(code: int) -> tuple[int, int]:
    """Inverse of :func:`road_type_code`: ``(kind, subtype)``; ValueError for unknown codes."""
    for kind, fixed in _ROAD_TYPE_FIXED.items():
        if code == fixed:
            return kind, 0
    for kind, (low, high) in {0: (0, 3), 1: (5, 13), 2: (14, 16)}.items():
        if low <= code <= high:
            return kind, code - low
    raise ValueError(f"unknown roadgraph type code {code}")


def _ints(shape=(0,), dtype=np.int64) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


def _splits() -> np.ndarray:
    return np.zeros(1, dtype=np.int64)


@dataclass(eq=False)
class Scenario:
    """One WOMD scenario. ``A`` tracks, ``T`` steps, ``M`` map features, ``S`` light states."""

    scenario_id: str
    timestamps_seconds: np.ndarray  # float64 [T]
    current_time_index: int
    sdc_track_index: int
    # Tracks.
    track_id: np.ndarray  # int64 [A]
    track_type: np.ndarray  # int8 [A], TYPE_*
    track_xyz: np.ndarray  # float64 [A, T, 3] centre x, y, z
    track_dims: np.ndarray  # float32 [A, T, 3] length, width, height
    track_heading: np.ndarray  # float32 [A, T]
    track_velocity: np.ndarray  # float32 [A, T, 2]
    track_valid: np.ndarray  # bool [A, T]
    tracks_to_predict: np.ndarray = field(default_factory=lambda: _ints(dtype=np.int32))  # track indices
    tracks_to_predict_difficulty: np.ndarray = field(default_factory=lambda: _ints(dtype=np.int8))
    objects_of_interest: np.ndarray = field(default_factory=_ints)  # track ids
    # Map features.
    map_id: np.ndarray = field(default_factory=_ints)  # int64 [M]
    map_kind: np.ndarray = field(default_factory=lambda: _ints(dtype=np.int8))  # MAP_KINDS index
    map_subtype: np.ndarray = field(default_factory=lambda: _ints(dtype=np.int8))  # lane/line/edge type
    map_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # float64 [Q, 3]
    map_point_splits: np.ndarray = field(default_factory=_splits)  # [M + 1]
    lane_speed_limit_mph: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 [M]
    lane_interpolating: np.ndarray = field(default_factory=lambda: _ints(dtype=bool))  # [M]
    lane_entry_lanes: np.ndarray = field(default_factory=_ints)
    lane_entry_splits: np.ndarray = field(default_factory=_splits)
    lane_exit_lanes: np.ndarray = field(default_factory=_ints)
    lane_exit_splits: np.ndarray = field(default_factory=_splits)
    # Boundary segments: rows of (lane_start_index, lane_end_index, boundary_feature_id, type).
    lane_left_boundaries: np.ndarray = field(default_factory=lambda: _ints((0, 4)))
    lane_left_boundary_splits: np.ndarray = field(default_factory=_splits)
    lane_right_boundaries: np.ndarray = field(default_factory=lambda: _ints((0, 4)))
    lane_right_boundary_splits: np.ndarray = field(default_factory=_splits)
    # Neighbours: rows of (feature_id, self_start, self_end, neighbor_start, neighbor_end),
    # each with its own list of boundary segments.
    lane_left_neighbors: np.ndarray = field(default_factory=lambda: _ints((0, 5)))
    lane_left_neighbor_splits: np.ndarray = field(default_factory=_splits)
    lane_left_neighbor_boundaries: np.ndarray = field(default_factory=lambda: _ints((0, 4)))
    lane_left_neighbor_boundary_splits: np.ndarray = field(default_factory=_splits)
    lane_right_neighbors: np.ndarray = field(default_factory=lambda: _ints((0, 5)))
    lane_right_neighbor_splits: np.ndarray = field(default_factory=_splits)
    lane_right_neighbor_boundaries: np.ndarray = field(default_factory=lambda: _ints((0, 4)))
    lane_right_neighbor_boundary_splits: np.ndarray = field(default_factory=_splits)
    stop_sign_lanes: np.ndarray = field(default_factory=_ints)
    stop_sign_lane_splits: np.ndarray = field(default_factory=_splits)
    # Traffic lights: one row per (step, lane) state, in proto order.
    num_dynamic_states: int = 0
    light_step: np.ndarray = field(default_factory=lambda: _ints(dtype=np.int32))  # [S]
    light_lane: np.ndarray = field(default_factory=_ints)  # [S] lane feature id
    light_state: np.ndarray = field(default_factory=lambda: _ints(dtype=np.int8))  # [S]
    light_stop_point: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # [S, 3]

    # -- convenient views --------------------------------------------------------------
    @property
    def num_tracks(self) -> int:
        return int(self.track_id.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.timestamps_seconds.shape[0])

    @property
    def num_map_features(self) -> int:
        return int(self.map_id.shape[0])

    def map_polyline(self, feature: int) -> np.ndarray:
        """The points ``[n, 3]`` of map feature ``feature`` (an index, not an id)."""
        return self.map_points[self.map_point_splits[feature] : self.map_point_splits[feature + 1]]

    def valid_at_current(self) -> np.ndarray:
        """Boolean ``[A]``: tracks valid at the current step (the WOSAC simulated set)."""
        return self.track_valid[:, self.current_time_index]

    # -- safe serialisation --------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """All fields as numpy arrays, ready for ``np.savez`` (no pickled objects)."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Scenario:
        """Inverse of :meth:`to_arrays`; missing keys raise ``KeyError`` naming the field."""
        values = {}
        for f in fields(cls):
            if f.name not in arrays:
                raise KeyError(f"scenario record lacks field {f.name!r}")
            value = np.asarray(arrays[f.name])
            if f.name == "scenario_id":
                value = str(value)
            elif f.name in ("current_time_index", "sdc_track_index", "num_dynamic_states"):
                value = int(value)
            values[f.name] = value
        return cls(**values)

    def equals(self, other: Scenario) -> bool:
        """Exact equality of every field (dtype, shape and values)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.dtype != np.asarray(b).dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                    return False
            elif a != b:
                return False
        return True

    def replace(self, **changes) -> Scenario:
        return dataclasses.replace(self, **changes)
