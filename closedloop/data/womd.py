"""WOMD ``Scenario`` proto <-> :class:`~closedloop.data.scenario.Scenario` record.

The protos come from ``waymo-open-dataset-tf-2-12-0`` (installed with ``--no-deps``); no
TensorFlow is needed. ``scenario_to_proto(scenario_from_proto(p))`` rebuilds every field the
record keeps (all but the optional lidar and camera payloads).
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from closedloop.data.scenario import MAP_KIND_INDEX, MAP_KINDS, Scenario
from closedloop.data.tfexample import is_motion_example, parse_example_features, scenario_from_example
from closedloop.data.tfrecord import TFRecordError, iter_record_spans, write_records

try:
    from waymo_open_dataset.protos import map_pb2, scenario_pb2
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError("closedloop needs the WOMD protos: pip install --no-deps waymo-open-dataset-tf-2-12-0") from err

from google.protobuf.message import DecodeError

OnError = Literal["raise", "skip"]


class ScenarioDecodeError(ValueError):
    """A record passed its checksums but is not a valid WOMD Scenario proto."""

    def __init__(self, path: str, record_index: int, reason: str):
        self.path, self.record_index, self.reason = path, record_index, reason
        super().__init__(f"{path}: record {record_index}: {reason}")


# -- proto -> record --------------------------------------------------------------------------
def _flatten(groups: Sequence[Sequence], width: int | None = None, dtype=np.int64):
    """Flatten a list of lists into (flat array, splits)."""
    splits = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum([len(g) for g in groups], out=splits[1:])
    flat = [item for group in groups for item in group]
    shape = (len(flat),) if width is None else (len(flat), width)
    return np.array(flat, dtype=dtype).reshape(shape), splits


def _boundary_rows(segments) -> list[tuple[int, int, int, int]]:
    return [(b.lane_start_index, b.lane_end_index, b.boundary_feature_id, b.boundary_type) for b in segments]


def scenario_from_proto(proto: scenario_pb2.Scenario) -> Scenario:
    """Convert a parsed ``Scenario`` proto into a record."""
    num_steps = len(proto.timestamps_seconds)
    num_tracks = len(proto.tracks)
    # Filled track by track into the final dtypes: one list or float64 array of every state
    # at once would take several times the memory of the record itself on a large scene.
    xyz = np.zeros((num_tracks, num_steps, 3), dtype=np.float64)
    dims = np.zeros((num_tracks, num_steps, 3), dtype=np.float32)
    heading = np.zeros((num_tracks, num_steps), dtype=np.float32)
    velocity = np.zeros((num_tracks, num_steps, 2), dtype=np.float32)
    valid = np.zeros((num_tracks, num_steps), dtype=bool)
    for a, track in enumerate(proto.tracks):
        if len(track.states) != num_steps:
            raise ValueError(
                f"tracks[{a}].states: track {track.id} has {len(track.states)} states "
                f"but the scenario has {num_steps} timestamps"
            )
        rows = np.array(
            [
                (
                    s.center_x,
                    s.center_y,
                    s.center_z,
                    s.length,
                    s.width,
                    s.height,
                    s.heading,
                    s.velocity_x,
                    s.velocity_y,
                    s.valid,
                )
                for s in track.states
            ],
            dtype=np.float64,
        ).reshape(num_steps, 10)
        xyz[a], dims[a], heading[a] = rows[:, 0:3], rows[:, 3:6], rows[:, 6]
        velocity[a], valid[a] = rows[:, 7:9], rows[:, 9]

    kinds, subtypes, ids, point_groups = [], [], [], []
    speed, interp = [], []
    entry, exits, left_b, right_b, stop_lanes = [], [], [], [], []
    neighbors = {"left": [], "right": []}
    for feature in proto.map_features:
        kind = feature.WhichOneof("feature_data")
        if kind is None:
            raise ValueError(f"map_features: feature {feature.id} has no data")
        data = getattr(feature, kind)
        ids.append(feature.id)
        kinds.append(MAP_KIND_INDEX[kind])
        subtypes.append(getattr(data, "type", 0))
        if kind == "stop_sign":
            points = [data.position]
        elif kind in ("crosswalk", "speed_bump", "driveway"):
            points = data.polygon
        else:
            points = data.polyline
        point_groups.append(np.array([(p.x, p.y, p.z) for p in points], dtype=np.float64).reshape(-1, 3))
        is_lane = kind == "lane"
        speed.append(data.speed_limit_mph if is_lane else 0.0)
        interp.append(data.interpolating if is_lane else False)
        entry.append(list(data.entry_lanes) if is_lane else [])
        exits.append(list(data.exit_lanes) if is_lane else [])
        left_b.append(_boundary_rows(data.left_boundaries) if is_lane else [])
        right_b.append(_boundary_rows(data.right_boundaries) if is_lane else [])
        for side in ("left", "right"):
            neighbors[side].append(list(getattr(data, f"{side}_neighbors")) if is_lane else [])
        stop_lanes.append(list(data.lane) if kind == "stop_sign" else [])

    map_point_splits = np.zeros(len(point_groups) + 1, dtype=np.int64)
    np.cumsum([len(g) for g in point_groups], out=map_point_splits[1:])
    map_points = np.concatenate(point_groups) if point_groups else np.zeros((0, 3))
    del point_groups
    neighbor_fields = {}
    for side in ("left", "right"):
        rows = [
            [
                (n.feature_id, n.self_start_index, n.self_end_index, n.neighbor_start_index, n.neighbor_end_index)
                for n in group
            ]
            for group in neighbors[side]
        ]
        flat, splits = _flatten(rows, 5)
        bounds, bound_splits = _flatten([_boundary_rows(n.boundaries) for group in neighbors[side] for n in group], 4)
        neighbor_fields.update(
            {
                f"lane_{side}_neighbors": flat,
                f"lane_{side}_neighbor_splits": splits,
                f"lane_{side}_neighbor_boundaries": bounds,
                f"lane_{side}_neighbor_boundary_splits": bound_splits,
            }
        )

    light_rows = [
        (step, ls.lane, ls.state, ls.stop_point.x, ls.stop_point.y, ls.stop_point.z)
        for step, dyn in enumerate(proto.dynamic_map_states)
        for ls in dyn.lane_states
    ]
    lights = np.array(light_rows, dtype=np.float64).reshape(-1, 6)
    # Lane ids are int64 and may exceed float64's exact range: take them from the proto.
    light_lane = np.array([ls.lane for dyn in proto.dynamic_map_states for ls in dyn.lane_states], dtype=np.int64)

    entry_flat, entry_splits = _flatten(entry)
    exit_flat, exit_splits = _flatten(exits)
    left_flat, left_splits = _flatten(left_b, 4)
    right_flat, right_splits = _flatten(right_b, 4)
    stop_flat, stop_splits = _flatten(stop_lanes)
    return Scenario(
        scenario_id=proto.scenario_id,
        timestamps_seconds=np.array(proto.timestamps_seconds, dtype=np.float64),
        current_time_index=proto.current_time_index,
        sdc_track_index=proto.sdc_track_index,
        track_id=np.array([t.id for t in proto.tracks], dtype=np.int64),
        track_type=np.array([t.object_type for t in proto.tracks], dtype=np.int8),
        track_xyz=xyz,
        track_dims=dims,
        track_heading=heading,
        track_velocity=velocity,
        track_valid=valid,
        tracks_to_predict=np.array([r.track_index for r in proto.tracks_to_predict], dtype=np.int32),
        tracks_to_predict_difficulty=np.array([r.difficulty for r in proto.tracks_to_predict], dtype=np.int8),
        objects_of_interest=np.array(proto.objects_of_interest, dtype=np.int64),
        map_id=np.array(ids, dtype=np.int64),
        map_kind=np.array(kinds, dtype=np.int8),
        map_subtype=np.array(subtypes, dtype=np.int8),
        map_points=map_points,
        map_point_splits=map_point_splits,
        lane_speed_limit_mph=np.array(speed, dtype=np.float64),
        lane_interpolating=np.array(interp, dtype=bool),
        lane_entry_lanes=entry_flat,
        lane_entry_splits=entry_splits,
        lane_exit_lanes=exit_flat,
        lane_exit_splits=exit_splits,
        lane_left_boundaries=left_flat,
        lane_left_boundary_splits=left_splits,
        lane_right_boundaries=right_flat,
        lane_right_boundary_splits=right_splits,
        **neighbor_fields,
        stop_sign_lanes=stop_flat,
        stop_sign_lane_splits=stop_splits,
        num_dynamic_states=len(proto.dynamic_map_states),
        light_step=lights[:, 0].astype(np.int32),
        light_lane=light_lane,
        light_state=lights[:, 2].astype(np.int8),
        light_stop_point=lights[:, 3:6].copy(),
    )


# -- record -> proto --------------------------------------------------------------------------
def _rows(flat: np.ndarray, splits: np.ndarray, i: int) -> np.ndarray:
    return flat[splits[i] : splits[i + 1]]


def _fill_boundaries(target, rows: np.ndarray) -> None:
    for start, end, feature_id, boundary_type in rows.tolist():
        target.add(
            lane_start_index=start, lane_end_index=end, boundary_feature_id=feature_id, boundary_type=boundary_type
        )


def scenario_to_proto(scenario: Scenario) -> scenario_pb2.Scenario:
    """Build the ``Scenario`` proto a record came from."""
    s = scenario
    proto = scenario_pb2.Scenario(
        scenario_id=s.scenario_id,
        current_time_index=s.current_time_index,
        sdc_track_index=s.sdc_track_index,
    )
    proto.timestamps_seconds.extend(s.timestamps_seconds.tolist())
    xyz, dims = s.track_xyz.tolist(), s.track_dims.tolist()
    heading, vel, valid = s.track_heading.tolist(), s.track_velocity.tolist(), s.track_valid.tolist()
    for a, (track_id, track_type) in enumerate(zip(s.track_id.tolist(), s.track_type.tolist())):
        track = proto.tracks.add(id=track_id, object_type=track_type)
        for t in range(s.num_steps):
            track.states.add(
                center_x=xyz[a][t][0],
                center_y=xyz[a][t][1],
                center_z=xyz[a][t][2],
                length=dims[a][t][0],
                width=dims[a][t][1],
                height=dims[a][t][2],
                heading=heading[a][t],
                velocity_x=vel[a][t][0],
                velocity_y=vel[a][t][1],
                valid=valid[a][t],
            )
    for index, difficulty in zip(s.tracks_to_predict.tolist(), s.tracks_to_predict_difficulty.tolist()):
        proto.tracks_to_predict.add(track_index=index, difficulty=difficulty)
    proto.objects_of_interest.extend(s.objects_of_interest.tolist())

    for i, (feature_id, kind, subtype) in enumerate(
        zip(s.map_id.tolist(), s.map_kind.tolist(), s.map_subtype.tolist())
    ):
        feature = proto.map_features.add(id=feature_id)
        name = MAP_KINDS[kind]
        data = getattr(feature, name)
        points = [map_pb2.MapPoint(x=x, y=y, z=z) for x, y, z in s.map_polyline(i).tolist()]
        if name == "stop_sign":
            data.lane.extend(_rows(s.stop_sign_lanes, s.stop_sign_lane_splits, i).tolist())
            if points:
                data.position.CopyFrom(points[0])
            else:
                data.SetInParent()
        elif name in ("crosswalk", "speed_bump", "driveway"):
            data.polygon.extend(points)
            data.SetInParent()
        else:
            data.polyline.extend(points)
            data.type = subtype
            data.SetInParent()
        if name != "lane":
            continue
        data.speed_limit_mph = float(s.lane_speed_limit_mph[i])
        data.interpolating = bool(s.lane_interpolating[i])
        data.entry_lanes.extend(_rows(s.lane_entry_lanes, s.lane_entry_splits, i).tolist())
        data.exit_lanes.extend(_rows(s.lane_exit_lanes, s.lane_exit_splits, i).tolist())
        _fill_boundaries(data.left_boundaries, _rows(s.lane_left_boundaries, s.lane_left_boundary_splits, i))
        _fill_boundaries(data.right_boundaries, _rows(s.lane_right_boundaries, s.lane_right_boundary_splits, i))
        for side in ("left", "right"):
            flat = getattr(s, f"lane_{side}_neighbors")
            splits = getattr(s, f"lane_{side}_neighbor_splits")
            bounds = getattr(s, f"lane_{side}_neighbor_boundaries")
            bound_splits = getattr(s, f"lane_{side}_neighbor_boundary_splits")
            target = getattr(data, f"{side}_neighbors")
            for n in range(splits[i], splits[i + 1]):
                fid, s0, s1, n0, n1 = flat[n].tolist()
                neighbor = target.add(
                    feature_id=fid,
                    self_start_index=s0,
                    self_end_index=s1,
                    neighbor_start_index=n0,
                    neighbor_end_index=n1,
                )
                _fill_boundaries(neighbor.boundaries, _rows(bounds, bound_splits, n))

    dynamic = [proto.dynamic_map_states.add() for _ in range(s.num_dynamic_states)]
    for step, lane, state, (x, y, z) in zip(
        s.light_step.tolist(),
        s.light_lane.tolist(),
        s.light_state.tolist(),
        s.light_stop_point.tolist(),
    ):
        dynamic[step].lane_states.add(lane=lane, state=state, stop_point=map_pb2.MapPoint(x=x, y=y, z=z))
    return proto


# -- files ------------------------------------------------------------------------------------
def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (their ``*.tfrecord*`` files) and glob patterns, sorted.

    Raises ``FileNotFoundError`` naming the pattern that matched nothing.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for item in paths:
        item = str(item)
        if os.path.isdir(item):
            matches = sorted(glob.glob(os.path.join(item, "*.tfrecord*")))
            if not matches:
                raise FileNotFoundError(f"{item}: the directory has no TFRecord files (*.tfrecord*)")
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
        else:
            matches = [item] if os.path.exists(item) else []
        if not matches:
            raise FileNotFoundError(f"{item}: no such file, or the pattern matched nothing")
        out.extend(Path(m) for m in matches)
    return out


def parse_scenario(payload: bytes, path: str = "<bytes>", record_index: int = 0) -> Scenario:
    """Decode one record: a serialized WOMD Scenario proto or a motion tf.Example.

    A record that is neither raises :class:`ScenarioDecodeError` naming file and record.
    """
    proto = scenario_pb2.Scenario()
    try:
        proto.ParseFromString(payload)
        is_scenario = bool(proto.scenario_id) and bool(proto.timestamps_seconds)
    except DecodeError:
        is_scenario = False
    try:
        if is_scenario:
            scenario = scenario_from_proto(proto)
        else:
            features = parse_example_features(payload)
            if not is_motion_example(features):
                raise ScenarioDecodeError(path, record_index, "not a WOMD Scenario proto nor a WOMD motion tf.Example")
            scenario = scenario_from_example(features)
        check_references(scenario)
    except (ValueError, KeyError) as err:
        if isinstance(err, ScenarioDecodeError):
            raise
        raise ScenarioDecodeError(path, record_index, f"malformed scenario: {err}") from None
    return scenario


def _outside(values: np.ndarray, size: int | np.ndarray) -> np.ndarray:
    return (values < 0) | (values >= size)


def check_references(s: Scenario) -> None:
    """Raise ``ValueError`` naming the field if an index in ``s`` points outside what it indexes.

    Checked: ``current_time_index`` (a step), ``sdc_track_index`` and ``tracks_to_predict``
    (tracks), traffic-light steps, and the point indices of lane boundaries and lane
    neighbours (into the lane's own polyline and, when the neighbour is in the map, into the
    neighbour's). Ids that name map features (entry/exit lanes, neighbour and boundary
    features, stop-sign lanes, signal lanes) are not required to exist: WOMD maps are
    cropped, so a lane may lead to one outside the scenario.
    """
    if not 0 <= s.current_time_index < s.num_steps:
        raise ValueError(f"current_time_index {s.current_time_index} is not a step of the {s.num_steps} timestamps")
    if not 0 <= s.sdc_track_index < s.num_tracks:
        raise ValueError(f"sdc_track_index {s.sdc_track_index} is not one of the {s.num_tracks} tracks")
    bad = _outside(s.tracks_to_predict, s.num_tracks)
    if bad.any():
        raise ValueError(
            f"tracks_to_predict[{np.flatnonzero(bad)[0]}].track_index "
            f"{s.tracks_to_predict[bad][0]} is not one of the {s.num_tracks} tracks"
        )
    if s.num_dynamic_states > s.num_steps:
        raise ValueError(f"dynamic_map_states has {s.num_dynamic_states} steps, more than the {s.num_steps} timestamps")
    lengths = np.diff(s.map_point_splits)
    position = {feature_id: i for i, feature_id in enumerate(s.map_id.tolist())}
    for side in ("left", "right"):
        for name, splits_name, columns in (
            (f"lane_{side}_boundaries", f"lane_{side}_boundary_splits", [0, 1]),
            (f"lane_{side}_neighbors", f"lane_{side}_neighbor_splits", [1, 2]),
        ):
            rows, splits = getattr(s, name), getattr(s, splits_name)
            owner = np.repeat(np.arange(len(lengths)), np.diff(splits))
            bad = _outside(rows[:, columns], lengths[owner, None]).any(axis=1)
            if bad.any():
                feature = s.map_id[owner[np.flatnonzero(bad)[0]]]
                raise ValueError(
                    f"map feature {feature}: {name.removeprefix('lane_')} index points "
                    f"{rows[bad][0, columns].tolist()} outside its {lengths[owner[bad][0]]} points"
                )
        rows = getattr(s, f"lane_{side}_neighbors")
        owner = np.repeat(s.map_id, np.diff(getattr(s, f"lane_{side}_neighbor_splits")))
        for lane, (feature_id, start, end) in zip(owner.tolist(), rows[:, [0, 3, 4]].tolist()):
            size = lengths[position[feature_id]] if feature_id in position else None
            if size is not None and not (0 <= start < size and 0 <= end < size):
                raise ValueError(
                    f"map feature {lane}: {side}_neighbors: neighbour {feature_id}'s index "
                    f"points {[start, end]} outside its {size} points"
                )


class SkipCounter:
    """Counts records skipped under ``on_error="skip"`` and remembers why."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __len__(self) -> int:
        return len(self.errors)


def read_scenarios(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    on_error: OnError = "raise",
    skipped: SkipCounter | None = None,
) -> Iterator[Scenario]:
    """Yield every scenario in the TFRecord files named by ``paths`` (files, globs, dirs).

    With ``on_error="skip"`` a bad record (or the unreadable rest of a truncated file) is
    skipped and recorded in ``skipped`` (and warned about), never silently dropped.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    for path in expand_paths(paths):
        yield from _read_file(path, on_error, skipped)


def _read_file(path: Path, on_error: OnError, skipped: SkipCounter | None) -> Iterator[Scenario]:
    for _, scenario in iter_file_scenarios(path, on_error, skipped):
        if scenario is not None:
            yield scenario


def iter_file_scenarios(
    path: Path,
    on_error: OnError = "raise",
    skipped: SkipCounter | None = None,
    keep: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, Scenario | None]]:
    """Yield ``(record_index, scenario)`` for every record of one file.

    The scenario is ``None`` for records ``keep`` rejected (not decoded) and for bad records
    skipped under ``on_error="skip"``. A record that fails its payload checksum or does not
    decode is skipped alone; only broken framing (a bad length header, a truncated record)
    ends the file, since no record after it can be located.
    """

    def corrupt_payload(err: TFRecordError) -> None:
        _note_skip(skipped, f"skipping bad record: {err}")

    try:
        for index, _, payload in iter_record_spans(
            path, keep=keep, on_corrupt_payload=corrupt_payload if on_error == "skip" else None
        ):
            if payload is None:
                yield index, None
                continue
            try:
                yield index, parse_scenario(payload, str(path), index)
            except ScenarioDecodeError as err:
                if on_error == "raise":
                    raise
                _note_skip(skipped, f"skipping bad record: {err}")
                yield index, None
    except TFRecordError as err:
        if on_error == "raise":
            raise
        # Framing is lost: the records after this point cannot be located.
        _note_skip(skipped, f"skipping the rest of a corrupt file: {err}")


def _note_skip(skipped: SkipCounter | None, message: str) -> None:
    warnings.warn(message, stacklevel=3)
    if skipped is not None:
        skipped.errors.append(message)


def write_scenarios(path: str | os.PathLike, scenarios: Iterable[Scenario]) -> int:
    """Write records as a TFRecord file of Scenario protos; returns the count written."""
    return write_records(path, (scenario_to_proto(s).SerializeToString() for s in scenarios))
