"""WOMD constants and predicates, defined once for the whole package.

Timeline: a scenario has ``NUM_STEPS`` steps of ``DT`` seconds; step ``CURRENT_INDEX`` is
"now", and simulation produces the ``SIM_STEPS`` steps after it.

Codes follow the WOMD protos: track object types (``Track.ObjectType``), traffic signal
lane states (``TrafficSignalLaneState.State``), and the roadgraph point type codes of the
WOMD tf.Example format (also Waymax's ``MapElementIds``): lanes 0..3 by lane type, road
lines 5..13 by line type, road edges 14..16 by edge type, then stop sign 17, crosswalk 18,
speed bump 19, driveway 20. The predicates work on ints, numpy arrays and torch tensors.
"""

from __future__ import annotations

from typing import TypeVar

NUM_STEPS = 91
CURRENT_INDEX = 10
SIM_STEPS = NUM_STEPS - 1 - CURRENT_INDEX  # 80
DT = 0.1  # seconds per step

# Track object types.
TYPE_UNSET, TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_CYCLIST, TYPE_OTHER = range(5)

# Traffic signal lane states.
(
    LIGHT_UNKNOWN,
    LIGHT_ARROW_STOP,
    LIGHT_ARROW_CAUTION,
    LIGHT_ARROW_GO,
    LIGHT_STOP,
    LIGHT_CAUTION,
    LIGHT_GO,
    LIGHT_FLASHING_STOP,
    LIGHT_FLASHING_CAUTION,
) = range(9)
RED_LIGHT_STATES = (LIGHT_ARROW_STOP, LIGHT_STOP, LIGHT_FLASHING_STOP)
YELLOW_LIGHT_STATES = (LIGHT_ARROW_CAUTION, LIGHT_CAUTION, LIGHT_FLASHING_CAUTION)
GREEN_LIGHT_STATES = (LIGHT_ARROW_GO, LIGHT_GO)
# Lights whose stop line must not be crossed at all (a flashing red is a stop sign: cross
# after stopping).
STOP_LIGHT_STATES = (LIGHT_ARROW_STOP, LIGHT_STOP)

# Roadgraph point type code ranges (inclusive).
LANE_CODES = (0, 3)
DRIVABLE_LANE_CODES = (1, 3)  # freeway, surface street, bike lane (0 is an undefined lane type)
ROAD_LINE_CODES = (5, 13)
ROAD_EDGE_CODES = (14, 16)
STOP_SIGN_CODE, CROSSWALK_CODE, SPEED_BUMP_CODE, DRIVEWAY_CODE = 17, 18, 19, 20

T = TypeVar("T")


def _between(code: T, codes: tuple[int, int]) -> T:
    return (code >= codes[0]) & (code <= codes[1])


def is_lane(code: T) -> T:
    return _between(code, LANE_CODES)


def is_drivable_lane(code: T) -> T:
    return _between(code, DRIVABLE_LANE_CODES)


def is_road_line(code: T) -> T:
    return _between(code, ROAD_LINE_CODES)


def is_road_edge(code: T) -> T:
    return _between(code, ROAD_EDGE_CODES)


def is_crossing_or_stop(code: T) -> T:
    """Stop signs, crosswalks, speed bumps and driveways."""
    return code >= STOP_SIGN_CODE


# Token vocabularies are per agent kind; unset and other objects move like vehicles.
TOKEN_KINDS = ("vehicle", "pedestrian", "cyclist")


def token_kind(agent_type):
    """Token vocabulary index (0 vehicle, 1 pedestrian, 2 cyclist) of WOMD type codes
    (a torch tensor)."""
    return (agent_type == TYPE_PEDESTRIAN).long() + 2 * (agent_type == TYPE_CYCLIST).long()


def _any_of(state: T, states: tuple[int, ...]) -> T:
    result = state == states[0]
    for other in states[1:]:
        result = result | (state == other)
    return result


def light_is_red(state: T) -> T:
    return _any_of(state, RED_LIGHT_STATES)


def light_is_yellow(state: T) -> T:
    return _any_of(state, YELLOW_LIGHT_STATES)


def light_is_green(state: T) -> T:
    return _any_of(state, GREEN_LIGHT_STATES)


def light_forbids_crossing(state: T) -> T:
    """Red and red-arrow lights: crossing their stop line is a violation."""
    return _any_of(state, STOP_LIGHT_STATES)
