"""Model weights files: safetensors with the model's config (and the vocabulary it was
trained with) in the metadata, so a file alone rebuilds the policy.

``save_model(model, vocabulary, path)`` writes atomically; ``load_model(path)`` returns the
model and its :class:`MotionVocabulary`. ``save_gmm`` / ``load_gmm`` do the same for the
GMM ego model, and ``policy_from_weights(path)`` builds the policy either file describes.
Nothing is unpickled; a missing, foreign, truncated or damaged file, unknown or missing
tensors, wrong shapes and NaN/inf weights raise :class:`WeightsError` naming the file.
The trainers' checkpoints (:mod:`closedloop.trainers.checkpoint`) store their weights in
these files.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from closedloop.agents.gmm import GMMEgoModel
from closedloop.agents.smart import SmartConfig, SmartModel
from closedloop.agents.tokens import MotionVocabulary
from closedloop.envs.observation import ObservationConfig
from closedloop.safetensors_io import read_format, read_safetensors, write_safetensors

FORMAT, FORMAT_VERSION = "closedloop-smart-weights", 1
GMM_FORMAT = "closedloop-gmm-weights"
VOCABULARY_PREFIX = "vocabulary."
MAX_FILE_BYTES = 2 << 30
# Config fields and their ranges: a file must not make us build a model of any size it likes.
INT_RANGES = {
    "hidden": (8, 4096),
    "heads": (1, 64),
    "map_layers": (0, 64),
    "agent_layers": (1, 64),
    "ffn_multiplier": (1, 16),
    "vocab_size": (1, 65536),
    "kinds": (3, 3),
    "rel_hidden": (1, 4096),
    "map_neighbours": (1, 1024),
    "agent_map_neighbours": (1, 1024),
    "agent_neighbours": (1, 1024),
    "token_steps": (1, 50),
}


def _config(values) -> SmartConfig:
    """A :class:`SmartConfig` from a file's JSON, every field's type and range checked."""
    if not isinstance(values, dict):
        raise ValueError("the config is not a JSON object")
    known = {f.name for f in dataclasses.fields(SmartConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    for name, (low, high) in INT_RANGES.items():
        value = values.get(name, getattr(SmartConfig, name))
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"config {name}={value!r} is not an integer in [{low}, {high}]")
    for name in ("map_radius", "agent_map_radius", "agent_radius", "dropout"):
        value = values.get(name, getattr(SmartConfig, name))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e6:
            raise ValueError(f"config {name}={value!r} is not a number in [0, 1e6)")
    span = values.get("time_span")
    if span is not None and (not isinstance(span, int) or isinstance(span, bool) or span < 1):
        raise ValueError(f"config time_span={span!r} is not a positive integer or null")
    if not isinstance(values.get("motion_embedding", True), bool):
        raise ValueError("config motion_embedding is not a boolean")
    config = SmartConfig(**values)
    if config.hidden % config.heads:
        raise ValueError(f"config hidden={config.hidden} is not a multiple of heads={config.heads}")
    return config


class WeightsError(ValueError):
    """A weights file that cannot be loaded; the message names it and says why."""


def save_model(model: SmartModel, vocabulary: MotionVocabulary, path: str | os.PathLike) -> None:
    """Write ``model``'s weights, config and ``vocabulary`` to ``path`` (safetensors)."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    tensors.pop("vocabulary", None)  # stored once, as the vocabulary below
    for kind, chunks in vocabulary.chunks.items():
        tensors[VOCABULARY_PREFIX + kind] = chunks.to(torch.float32).contiguous()
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": dataclasses.asdict(model.config),
        "vocabulary_settings": vocabulary.settings,
    }
    write_safetensors(path, tensors, header)


def load_model(path: str | os.PathLike) -> tuple[SmartModel, MotionVocabulary]:
    """The model (in eval mode) and vocabulary saved in ``path``; see the module docstring."""
    where = str(path)
    tensors, header = read_safetensors(path, "closedloop model weights", WeightsError, MAX_FILE_BYTES, FORMAT)
    if header.get("version") != FORMAT_VERSION:
        raise WeightsError(
            f"{where}: weights format version {header.get('version')!r}, this closedloop reads {FORMAT_VERSION}"
        )
    try:
        config = _config(header.get("config"))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{where}: the model config does not fit this closedloop: {err}") from None
    chunks = {k[len(VOCABULARY_PREFIX) :]: tensors.pop(k) for k in list(tensors) if k.startswith(VOCABULARY_PREFIX)}
    try:
        vocabulary = MotionVocabulary(chunks, header.get("vocabulary_settings") or {})
    except (ValueError, KeyError) as err:
        raise WeightsError(f"{where}: its vocabulary is not valid: {err}") from None
    bad = [
        name for name, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise WeightsError(f"{where}: NaN/inf in the weights {bad[:5]}")
    try:
        model = SmartModel(config, vocabulary=vocabulary.table())
    except (ValueError, RuntimeError) as err:
        raise WeightsError(f"{where}: cannot build the model it describes: {err}") from None
    expected = {name: value.shape for name, value in model.state_dict().items() if name != "vocabulary"}
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise WeightsError(
            f"{where}: weights do not match the {config.hidden}-wide model: missing {missing[:5]}, "
            f"unknown {unknown[:5]}"
        )
    wrong = [f"{n} {list(tensors[n].shape)} (expected {list(s)})" for n, s in expected.items() if tensors[n].shape != s]
    if wrong:
        raise WeightsError(f"{where}: wrong shapes: {', '.join(wrong[:3])}")
    try:
        model.load_state_dict({**tensors, "vocabulary": model.vocabulary}, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{where}: {err}") from None
    return model.eval(), vocabulary


# Sizes a GMM file may ask for: (low, high) of each integer.
GMM_RANGES = {"components": (1, 256), "chunk": (1, 50), "hidden": (1, 8192), "layers": (1, 64)}
OBSERVATION_RANGES = {"num_agents": (0, 256), "num_road_points": (0, 4096), "num_lights": (0, 256)}


def gmm_config(model: GMMEgoModel) -> dict:
    """The constructor arguments of ``model`` as JSON."""
    return {
        "observation": dataclasses.asdict(model.observation),
        "components": model.components,
        "chunk": model.chunk,
        "hidden": model.hidden,
        "layers": model.layers,
    }


def build_gmm(config: dict) -> GMMEgoModel:
    """A :class:`GMMEgoModel` from :func:`gmm_config`'s JSON, every size checked."""
    if not isinstance(config, dict) or not isinstance(config.get("observation"), dict):
        raise ValueError("the config is not a JSON object with an observation")
    observation = dict(config["observation"])
    for values, ranges in ((config, GMM_RANGES), (observation, OBSERVATION_RANGES)):
        for name, (low, high) in ranges.items():
            value = values.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"config {name}={value!r} is not an integer in [{low}, {high}]")
    known = {f.name for f in dataclasses.fields(ObservationConfig)}
    if set(observation) - known:
        raise ValueError(f"unknown observation fields {sorted(set(observation) - known)}")
    args = {name: config[name] for name in GMM_RANGES}
    return GMMEgoModel(ObservationConfig(**observation), **args)


def save_gmm(model: GMMEgoModel, path: str | os.PathLike) -> None:
    """Write a GMM ego model's weights and config to ``path`` (safetensors)."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    write_safetensors(path, tensors, {"format": GMM_FORMAT, "version": FORMAT_VERSION, "config": gmm_config(model)})


def load_gmm(path: str | os.PathLike) -> GMMEgoModel:
    """The GMM ego model (eval mode) saved in ``path``; bad files raise :class:`WeightsError`."""
    where = str(path)
    tensors, header = read_safetensors(path, "closedloop GMM weights", WeightsError, MAX_FILE_BYTES, GMM_FORMAT)
    if header.get("version") != FORMAT_VERSION:
        raise WeightsError(f"{where}: GMM weights version {header.get('version')!r}, this closedloop reads 1")
    try:
        model = build_gmm(header.get("config"))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{where}: the GMM config does not fit this closedloop: {err}") from None
    _load_state(model, tensors, where)
    return model.eval()


def _load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise WeightsError(f"{where}: weights do not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    wrong = [f"{n} {list(tensors[n].shape)} (expected {list(v.shape)})" for n, v in expected.items()]
    wrong = [w for n, w in zip(expected, wrong) if tensors[n].shape != expected[n].shape]
    if wrong:
        raise WeightsError(f"{where}: wrong shapes: {', '.join(wrong[:3])}")
    bad = [n for n, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"{where}: NaN/inf in the weights {bad[:5]}")
    model.load_state_dict(tensors, strict=True)


def load_weights(path: str | os.PathLike) -> tuple[torch.nn.Module, MotionVocabulary | None]:
    """The model a weights file holds, whichever kind: ``(SmartModel, its vocabulary)`` or
    ``(GMMEgoModel, None)``."""
    if read_format(path, "closedloop model weights", WeightsError, MAX_FILE_BYTES) == GMM_FORMAT:
        return load_gmm(path), None
    return load_model(path)


def policy_from_weights(path: str | os.PathLike, top_k: int | None = 48, temperature: float = 1.0):
    """The sim-agent policy a weights file describes: a :class:`TokenPolicy` for tokenized
    model weights, a :class:`GMMEgoPolicy` for GMM ego weights."""
    from closedloop.agents.gmm import GMMEgoPolicy
    from closedloop.agents.token_policy import TokenPolicy

    model, vocabulary = load_weights(path)
    if vocabulary is None:
        return GMMEgoPolicy(model, temperature=temperature, top_k=top_k)
    return TokenPolicy(model, vocabulary, temperature=temperature, top_k=top_k)
