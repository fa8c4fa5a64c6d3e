"""Read the WOMD motion ``tf.Example`` format without TensorFlow.

The ``tf.Example`` schema (Example -> Features -> map<string, Feature> -> bytes/float/int64
lists) is declared here from its public field numbers, so protobuf alone can parse it. A
scene in this format holds fixed-size tensors: 128 agent slots x (10 past + 1 current +
80 future) steps, up to 20000 roadgraph samples and 16 traffic-light slots per step. The
conversion to a :class:`Scenario` keeps everything the format has; what it lacks (lane
connectivity, speed limits, boundaries) stays empty, and map features are rebuilt from the
samples' feature ids, so polylines are at the format's sampling resolution.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from closedloop.data.scenario import MAP_KIND_INDEX, Scenario, road_type_kind

_PACKAGE = "closedloop.tfexample"
_PAST, _FUTURE = 10, 80


@lru_cache(maxsize=None)
def example_class():
    """The protobuf class of ``tf.Example``, built from its schema at first use."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="closedloop_tf_example.proto", package=_PACKAGE, syntax="proto3"
    )
    for name, value_type in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT),
                             ("Int64List", F.TYPE_INT64)):
        file.message_type.add(name=name).field.add(
            name="value", number=1, label=F.LABEL_REPEATED, type=value_type
        )
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1
    ):
        feature.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                          type_name=f".{_PACKAGE}.{type_name}", oneof_index=0)
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=f".{_PACKAGE}.Feature")
    features.field.add(name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                       type_name=f".{_PACKAGE}.Features.FeatureEntry")
    file.message_type.add(name="Example").field.add(
        name="features", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
        type_name=f".{_PACKAGE}.Features",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Example"))


def parse_example_features(payload: bytes) -> dict[str, np.ndarray] | None:
    """The features of a serialized tf.Example as numpy arrays, or None if it is not one."""
    example = example_class()()
    try:
        example.ParseFromString(payload)
    except DecodeError:
        return None
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = np.array(list(feature.bytes_list.value), dtype=object)
        elif kind == "float_list":
            out[key] = np.array(feature.float_list.value, dtype=np.float32)
        elif kind == "int64_list":
            out[key] = np.array(feature.int64_list.value, dtype=np.int64)
    return out


def is_motion_example(features: dict[str, np.ndarray] | None) -> bool:
    return features is not None and "state/id" in features and "state/current/x" in features


def _agent_field(f: dict, name: str, num_agents: int) -> np.ndarray:
    """``[agents, 91]`` of one state field, past + current + future."""
    parts = [f[f"state/{when}/{name}"].reshape(num_agents, -1) for when in ("past", "current", "future")]
    return np.concatenate(parts, axis=1)


def scenario_from_example(f: dict[str, np.ndarray]) -> Scenario:
    """Convert the features of one motion tf.Example into a :class:`Scenario`."""
    ids = f["state/id"].astype(np.int64)
    slots = ids.shape[0]
    valid = _agent_field(f, "valid", slots) > 0
    keep = np.flatnonzero((ids >= 0) & valid.any(axis=1))
    num_steps = valid.shape[1]

    def field(name: str) -> np.ndarray:
        return _agent_field(f, name, slots)[keep]

    xyz = np.stack([field("x"), field("y"), field("z")], axis=-1).astype(np.float64)
    dims = np.stack([field("length"), field("width"), field("height")], axis=-1)
    velocity = np.stack([field("velocity_x"), field("velocity_y")], axis=-1)
    sdc = np.flatnonzero(f["state/is_sdc"][keep] > 0)
    ttp = np.flatnonzero(f["state/tracks_to_predict"][keep] > 0).astype(np.int32)
    difficulty = f.get("state/difficulty_level", np.zeros(slots, np.int64))[keep]

    times = [f.get(f"traffic_light_state/{w}/timestamp_micros") for w in ("past", "current", "future")]
    if all(t is not None for t in times) and sum(len(t) for t in times) == num_steps:
        timestamps = np.concatenate(times) / 1e6
    else:
        timestamps = np.arange(num_steps) * 0.1

    # Map features: samples grouped by feature id, in order of first appearance.
    road_valid = f["roadgraph_samples/valid"] > 0
    road_ids = f["roadgraph_samples/id"][road_valid]
    road_xyz = f["roadgraph_samples/xyz"].reshape(-1, 3)[road_valid].astype(np.float64)
    road_type = f["roadgraph_samples/type"][road_valid]
    unique_ids, first = np.unique(road_ids, return_index=True)
    order = np.argsort(first, kind="stable")
    unique_ids = unique_ids[order]
    groups = [np.flatnonzero(road_ids == fid) for fid in unique_ids]
    kinds, subtypes = zip(*(road_type_kind(int(road_type[g[0]])) for g in groups)) if groups else ((), ())
    points = [road_xyz[g[:1]] if k == MAP_KIND_INDEX["stop_sign"] else road_xyz[g]
              for g, k in zip(groups, kinds)]
    splits = np.zeros(len(points) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in points], out=splits[1:])
    num_features = len(points)

    light_rows = []
    step = 0
    for when in ("past", "current", "future"):
        if f"traffic_light_state/{when}/state" not in f:
            continue
        per_step = f[f"traffic_light_state/{when}/valid"].reshape(-1, 16)
        state = f[f"traffic_light_state/{when}/state"].reshape(-1, 16)
        lane = f[f"traffic_light_state/{when}/id"].reshape(-1, 16)
        x, y, z = (f[f"traffic_light_state/{when}/{c}"].reshape(-1, 16) for c in "xyz")
        for t, l in zip(*np.nonzero(per_step > 0)):
            light_rows.append((step + t, lane[t, l], state[t, l], x[t, l], y[t, l], z[t, l]))
        step += per_step.shape[0]
    lights = np.array(light_rows, dtype=np.float64).reshape(-1, 6)

    return Scenario(
        scenario_id=f["scenario/id"][0].decode() if "scenario/id" in f else "",
        timestamps_seconds=timestamps.astype(np.float64),
        current_time_index=_PAST,
        sdc_track_index=int(sdc[0]) if len(sdc) else -1,
        track_id=ids[keep],
        track_type=f["state/type"][keep].astype(np.int8),
        track_xyz=xyz,
        track_dims=dims.astype(np.float32),
        track_heading=field("bbox_yaw").astype(np.float32),
        track_velocity=velocity.astype(np.float32),
        track_valid=valid[keep],
        tracks_to_predict=ttp,
        tracks_to_predict_difficulty=difficulty[ttp].astype(np.int8),
        objects_of_interest=ids[keep][f["state/objects_of_interest"][keep] > 0],
        map_id=unique_ids.astype(np.int64),
        map_kind=np.array(kinds, dtype=np.int8),
        map_subtype=np.array(subtypes, dtype=np.int8),
        map_points=np.concatenate(points) if points else np.zeros((0, 3)),
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
        num_dynamic_states=num_steps,
        light_step=lights[:, 0].astype(np.int32),
        light_lane=lights[:, 1].astype(np.int64),
        light_state=lights[:, 2].astype(np.int8),
        light_stop_point=lights[:, 3:6].copy(),
    )
