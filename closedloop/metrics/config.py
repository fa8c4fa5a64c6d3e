"""WOSAC realism-metric configurations (2024 and 2025 challenges) and field names."""

from __future__ import annotations

from dataclasses import dataclass

FEATURES = (
    "linear_speed",
    "linear_acceleration",
    "angular_speed",
    "angular_acceleration",
    "distance_to_nearest_object",
    "collision_indication",
    "time_to_collision",
    "distance_to_road_edge",
    "offroad_indication",
    "traffic_light_violation",
)
BUCKETS = {
    "kinematic": FEATURES[0:4],
    "interactive": FEATURES[4:7],
    "map_based": FEATURES[7:10],
}
# The per-scenario output fields, in the order they are printed.
FIELDS = (
    "metametric",
    "average_displacement_error",
    "min_average_displacement_error",
    *(f"{name}_likelihood" for name in FEATURES),
    "simulated_collision_rate",
    "simulated_offroad_rate",
    "simulated_traffic_light_violation_rate",
)


@dataclass(frozen=True)
class Histogram:
    min_val: float
    max_val: float
    num_bins: int
    pseudocount: float = 0.1


# A Bernoulli estimate is a two-bin histogram; its pseudocount is the proto default 0.001.
BERNOULLI = Histogram(-0.5, 1.5, 2, 0.001)


@dataclass(frozen=True)
class WosacConfig:
    """Estimator and meta-metric weight of each feature."""

    name: str
    estimators: dict[str, Histogram]
    weights: dict[str, float]

    def bucket_scores(self, likelihoods: dict[str, float]) -> dict[str, float]:
        """Weight-normalised mean likelihood of each leaderboard bucket."""
        out = {}
        for bucket, names in BUCKETS.items():
            total = sum(self.weights[n] for n in names)
            out[bucket] = sum(self.weights[n] * likelihoods[f"{n}_likelihood"] for n in names) / total
        return out


_ESTIMATORS = {
    "linear_speed": Histogram(0.0, 25.0, 10),
    "linear_acceleration": Histogram(-12.0, 12.0, 11),
    "angular_speed": Histogram(-0.628, 0.628, 11),
    "angular_acceleration": Histogram(-3.14, 3.14, 11),
    "distance_to_nearest_object": Histogram(-5.0, 40.0, 10),
    "collision_indication": BERNOULLI,
    "time_to_collision": Histogram(0.0, 5.0, 10),
    "distance_to_road_edge": Histogram(-20.0, 40.0, 10),
    "offroad_indication": BERNOULLI,
    "traffic_light_violation": BERNOULLI,
}
_WEIGHTS_2025 = {
    "linear_speed": 0.05,
    "linear_acceleration": 0.05,
    "angular_speed": 0.05,
    "angular_acceleration": 0.05,
    "distance_to_nearest_object": 0.1,
    "collision_indication": 0.25,
    "time_to_collision": 0.1,
    "distance_to_road_edge": 0.05,
    "offroad_indication": 0.25,
    "traffic_light_violation": 0.05,
}
CONFIGS = {
    "2025": WosacConfig("2025", _ESTIMATORS, _WEIGHTS_2025),
    "2024": WosacConfig(
        "2024", _ESTIMATORS, {**_WEIGHTS_2025, "distance_to_road_edge": 0.1, "traffic_light_violation": 0.0}
    ),
}


def get_config(name: str | WosacConfig) -> WosacConfig:
    if isinstance(name, WosacConfig):
        return name
    try:
        return CONFIGS[str(name)]
    except KeyError:
        raise ValueError(f"unknown WOSAC config {name!r}; choose one of {', '.join(CONFIGS)}") from None
