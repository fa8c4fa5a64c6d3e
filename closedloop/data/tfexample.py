"""Read the WOMD motion ``tf.Example`` format without TensorFlow.

The ``tf.Example`` schema (Example -> Features -> map<string, Feature> -> bytes/float/int64
lists) is declared here from its public field numbers, so protobuf alone can parse it. A
scene in this format holds fixed-size tensors: 128 agent slots x (10 past + 1 current +
80 future) steps, up to 20000 roadgraph samples and 16 traffic-light slots per step. The
conversion to a :class:`Scenario` keeps everything the format has; what it lacks (lane
connectivity, speed limits, boundaries) stays empty, and map features are rebuilt from the
samples' feature ids, so polylines are at the format's sampling resolution.

A record can pass its checksums and still be malformed (a feature missing, bytes where
numbers belong, a list of the wrong length). Every feature the conversion reads is checked
for presence, type and size first, and a bad one raises ``ValueError`` naming the feature,
which the reader reports as a ``ScenarioDecodeError`` for that record.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from closedloop.constants import DT
from closedloop.data.scenario import MAP_KIND_INDEX, Scenario, road_type_kind

_PACKAGE = "closedloop.tfexample"
_PAST = 10
# The three parts of every per-step feature and their number of steps.
_PARTS = (("past", _PAST), ("current", 1), ("future", 80))
_NUM_STEPS = sum(steps for _, steps in _PARTS)
_LIGHT_SLOTS = 16
# Integer-valued features may be stored as floats (the real files store state/id so); beyond
# this magnitude a float is not an exact integer id.
_MAX_INTEGER = 2.0**53


@cache
def example_class():
    """The protobuf class of ``tf.Example``, built from its schema at first use."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="closedloop_tf_example.proto", package=_PACKAGE, syntax="proto3")
    for name, value_type in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT), ("Int64List", F.TYPE_INT64)):
        file.message_type.add(name=name).field.add(name="value", number=1, label=F.LABEL_REPEATED, type=value_type)
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1
    ):
        feature.field.add(
            name=name,
            number=number,
            label=F.LABEL_OPTIONAL,
            type=F.TYPE_MESSAGE,
            type_name=f".{_PACKAGE}.{type_name}",
            oneof_index=0,
        )
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(
        name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=f".{_PACKAGE}.Feature"
    )
    features.field.add(
        name="feature",
        number=1,
        label=F.LABEL_REPEATED,
        type=F.TYPE_MESSAGE,
        type_name=f".{_PACKAGE}.Features.FeatureEntry",
    )
    file.message_type.add(name="Example").field.add(
        name="features",
        number=1,
        label=F.LABEL_OPTIONAL,
        type=F.TYPE_MESSAGE,
        type_name=f".{_PACKAGE}.Features",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Example"))


class ExampleFeatures:
    """The features of one parsed tf.Example, converted to numpy only when read.

    Each accessor checks the feature's presence, value type and number of values, raising
    ``ValueError`` naming the feature, so malformed input never reaches numpy indexing.
    Converting on access also keeps memory low: features the conversion does not use
    (speeds, timestamps of agents, roadgraph directions) are never turned into arrays.
    """

    def __init__(self, example) -> None:
        self._features = example.features.feature

    def __contains__(self, name: str) -> bool:
        return name in self._features

    def _values(self, name: str, kinds: tuple[str, ...], expected: str):
        if name not in self._features:
            raise ValueError(f"feature {name!r} is missing")
        kind = self._features[name].WhichOneof("kind")
        if kind not in kinds:
            raise ValueError(f"feature {name!r} holds {kind or 'no values'}, expected {expected}")
        return getattr(self._features[name], kind).value, kind

    def size(self, name: str) -> int:
        """Number of numeric values of ``name`` (checking that it holds numbers)."""
        return len(self._values(name, ("float_list", "int64_list"), "numbers")[0])

    def numbers(self, name: str, size: int) -> np.ndarray:
        """``size`` numbers (float32 or int64, as stored)."""
        values, kind = self._values(name, ("float_list", "int64_list"), "numbers")
        if len(values) != size:
            raise ValueError(f"feature {name!r} has {len(values)} values, expected {size}")
        return np.fromiter(values, dtype=np.float32 if kind == "float_list" else np.int64, count=size)

    def integers(self, name: str, size: int) -> np.ndarray:
        """``size`` integer values as int64; floats must be whole and exact."""
        values = self.numbers(name, size)
        if values.dtype.kind == "f":
            if not (
                np.isfinite(values).all()
                and (np.abs(values) <= _MAX_INTEGER).all()
                and (values == np.round(values)).all()
            ):
                raise ValueError(f"feature {name!r} holds values that are not integers")
            values = values.astype(np.int64)
        return values

    def flags(self, name: str, size: int) -> np.ndarray:
        """``size`` booleans (any number > 0 is true)."""
        return self.numbers(name, size) > 0

    def text(self, name: str) -> str:
        """The one UTF-8 string of a bytes feature."""
        values, _ = self._values(name, ("bytes_list",), "bytes")
        if len(values) != 1:
            raise ValueError(f"feature {name!r} has {len(values)} values, expected 1")
        try:
            return values[0].decode()
        except UnicodeDecodeError:
            raise ValueError(f"feature {name!r} is not UTF-8 text") from None


def _in_range(name: str, values: np.ndarray, low: int, high: int) -> np.ndarray:
    """``values`` (the used entries of feature ``name``) if all lie in [low, high]: they are
    stored in small integer types, where anything else would wrap around silently."""
    if len(values) and (values.min() < low or values.max() > high):
        raise ValueError(f"feature {name!r} holds values outside [{low}, {high}]")
    return values


def parse_example_features(payload: bytes) -> ExampleFeatures | None:
    """The features of a serialized tf.Example, or None if it is not one."""
    example = example_class()()
    try:
        example.ParseFromString(payload)
    except DecodeError:
        return None
    return ExampleFeatures(example)


def is_motion_example(features: ExampleFeatures | None) -> bool:
    return features is not None and "state/id" in features and "state/current/x" in features


def _agent_field(f: ExampleFeatures, name: str, slots: int, integer: bool = False) -> np.ndarray:
    """``[slots, 91]`` of one state field, past + current + future."""
    parts = []
    for when, steps in _PARTS:
        key = f"state/{when}/{name}"
        values = f.integers(key, slots * steps) if integer else f.numbers(key, slots * steps)
        parts.append(values.reshape(slots, steps))
    return np.concatenate(parts, axis=1)


def _map_features(f: ExampleFeatures) -> tuple[np.ndarray, ...]:
    """Map features rebuilt from the roadgraph samples: samples grouped by feature id, in
    order of first appearance; a stop sign keeps its first sample only.

    Returns ``(ids, kinds, subtypes, points, splits)``. Grouping is one stable sort, so a
    record with thousands of distinct ids costs no more than one with a few.
    """
    num_points, rest = divmod(f.size("roadgraph_samples/xyz"), 3)
    if rest:
        raise ValueError("feature 'roadgraph_samples/xyz' does not hold x, y, z triples")
    road_valid = f.flags("roadgraph_samples/valid", num_points)
    road_ids = f.integers("roadgraph_samples/id", num_points)[road_valid]
    road_type = f.integers("roadgraph_samples/type", num_points)[road_valid]
    road_xyz = f.numbers("roadgraph_samples/xyz", 3 * num_points).reshape(-1, 3)[road_valid].astype(np.float64)
    unique_ids, first, inverse = np.unique(road_ids, return_index=True, return_inverse=True)
    rank = np.argsort(first, kind="stable")  # features in order of first appearance
    position = np.empty_like(rank)
    position[rank] = np.arange(len(rank))
    feature_of_point = position[inverse.reshape(-1)]
    order = np.argsort(feature_of_point, kind="stable")
    counts = np.bincount(feature_of_point, minlength=len(rank))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    try:
        kinds, subtypes = (
            (
                np.array(c, dtype=np.int8).reshape(-1)
                for c in zip(*(road_type_kind(int(code)) for code in road_type[order][starts]))
            )
            if len(rank)
            else (np.zeros(0, np.int8), np.zeros(0, np.int8))
        )
    except ValueError as err:
        raise ValueError(f"feature 'roadgraph_samples/type': {err}") from None
    stop_sign = kinds == MAP_KIND_INDEX["stop_sign"]
    keep = np.ones(len(order), dtype=bool)
    keep[np.repeat(stop_sign, counts)] = False
    keep[starts[stop_sign]] = True
    lengths = np.where(stop_sign, np.minimum(counts, 1), counts)
    splits = np.zeros(len(rank) + 1, dtype=np.int64)
    np.cumsum(lengths, out=splits[1:])
    return unique_ids[rank].astype(np.int64), kinds, subtypes, road_xyz[order][keep], splits


def _lights(f: ExampleFeatures) -> tuple[np.ndarray, ...]:
    """``(step, lane id, state, stop point)`` of every valid traffic-light slot."""
    steps, lanes, states, points = [], [], [], []
    offset = 0
    for when, num in _PARTS:
        prefix = f"traffic_light_state/{when}"
        if f"{prefix}/state" in f:
            size = num * _LIGHT_SLOTS
            valid = f.flags(f"{prefix}/valid", size)
            steps.append(offset + np.flatnonzero(valid) // _LIGHT_SLOTS)
            lanes.append(f.integers(f"{prefix}/id", size)[valid])
            states.append(_in_range(f"{prefix}/state", f.integers(f"{prefix}/state", size)[valid], 0, 8))
            points.append(np.stack([f.numbers(f"{prefix}/{c}", size)[valid] for c in "xyz"], axis=-1))
        offset += num
    if not steps:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros((0, 3))
    return (
        np.concatenate(steps).astype(np.int32),
        np.concatenate(lanes),
        np.concatenate(states).astype(np.int8),
        np.concatenate(points).astype(np.float64),
    )


def scenario_from_example(f: ExampleFeatures) -> Scenario:
    """Convert the features of one motion tf.Example into a :class:`Scenario`."""
    scenario_id = f.text("scenario/id")
    slots = f.size("state/id")
    ids = f.integers("state/id", slots)
    valid = _agent_field(f, "valid", slots) > 0
    keep = np.flatnonzero((ids >= 0) & valid.any(axis=1))

    def field(name: str) -> np.ndarray:
        return _agent_field(f, name, slots)[keep]

    xyz = np.stack([field("x"), field("y"), field("z")], axis=-1).astype(np.float64)
    dims = np.stack([field("length"), field("width"), field("height")], axis=-1)
    velocity = np.stack([field("velocity_x"), field("velocity_y")], axis=-1)
    sdc = np.flatnonzero(f.flags("state/is_sdc", slots)[keep])
    if not len(sdc):
        raise ValueError("feature 'state/is_sdc' marks no valid track as the SDC")
    ttp = np.flatnonzero(f.flags("state/tracks_to_predict", slots)[keep]).astype(np.int32)
    difficulty = (
        f.integers("state/difficulty_level", slots) if "state/difficulty_level" in f else np.zeros(slots, np.int64)
    )[keep]
    track_type = _in_range("state/type", f.integers("state/type", slots)[keep], 0, 127)
    interesting = f.flags("state/objects_of_interest", slots)[keep]

    times = [f"traffic_light_state/{when}/timestamp_micros" for when, _ in _PARTS]
    if all(name in f for name in times):
        timestamps = np.concatenate([f.numbers(name, steps) for name, (_, steps) in zip(times, _PARTS)]) / 1e6
    else:
        timestamps = np.arange(_NUM_STEPS) * DT

    map_id, kinds, subtypes, points, splits = _map_features(f)
    num_features = len(map_id)
    light_step, light_lane, light_state, light_stop_point = _lights(f)

    return Scenario(
        scenario_id=scenario_id,
        timestamps_seconds=timestamps.astype(np.float64),
        current_time_index=_PAST,
        sdc_track_index=int(sdc[0]),
        track_id=ids[keep],
        track_type=track_type.astype(np.int8),
        track_xyz=xyz,
        track_dims=dims.astype(np.float32),
        track_heading=field("bbox_yaw").astype(np.float32),
        track_velocity=velocity.astype(np.float32),
        track_valid=valid[keep],
        tracks_to_predict=ttp,
        tracks_to_predict_difficulty=_in_range("state/difficulty_level", difficulty[ttp], 0, 127).astype(np.int8),
        objects_of_interest=ids[keep][interesting],
        map_id=map_id,
        map_kind=kinds,
        map_subtype=subtypes,
        map_points=points,
        map_point_splits=splits,
        lane_speed_limit_mph=np.zeros(num_features),
        lane_interpolating=np.zeros(num_features, dtype=bool),
        lane_entry_splits=np.zeros(num_features + 1, np.int64),
        lane_exit_splits=np.zeros(num_features + 1, np.int64),
        lane_left_boundary_splits=np.zeros(num_features + 1, np.int64),
        lane_right_boundary_splits=np.zeros(num_features + 1, np.int64),
        lane_left_neighbor_splits=np.zeros(num_features + 1, np.int64),
        lane_right_neighbor_splits=np.zeros(num_features + 1, np.int64),
        stop_sign_lane_splits=np.zeros(num_features + 1, np.int64),
        num_dynamic_states=_NUM_STEPS,
        light_step=light_step,
        light_lane=light_lane,
        light_state=light_state,
        light_stop_point=light_stop_point,
    )
