"""The training loop every closedloop trainer runs: read this file top to bottom.

``train(config)`` does, in order:

1. join the process group when launched by ``torchrun`` (one process per device);
2. build the model: a fresh one of ``config.model`` drawn from ``config.seed``, or the
   weights of ``config.init`` (a run directory or weights file: "continued BC" and every
   fine-tuning method start there, with a fresh optimizer and schedule);
3. read this rank's share of the scenarios and derive the training examples once
   (:mod:`closedloop.trainers.data`);
4. AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``, gradient-norm
   clipping, bf16 autocast on CUDA;
5. loop: batch (RoaD: from the demonstrations of the epoch's collection) -> summed loss of
   the objective -> divide by the global count -> backward
   (DDP averages the gradients) -> clip -> step; TensorBoard scalars and a tqdm bar on
   rank 0; a checkpoint every ``checkpoint_every`` steps; a closed-loop evaluation on
   held-out scenarios every ``eval_every`` steps;
6. stop after ``steps`` steps or when ``time_budget`` minutes are spent, whichever comes
   first, with a final checkpoint (and evaluation).

``resume=RUN_DIR`` restores the weights, the optimizer, the RNG states and the data
position of the latest checkpoint (or of the one named), so on CPU a resumed run is bit for
bit the run that was not interrupted. The learning-rate schedule is a function of the step
alone, never of the wall clock, for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from closedloop._atomic import atomic_write
from closedloop.trainers import checkpoint as ckpt
from closedloop.trainers.data import EpochSampler, load_scenarios
from closedloop.trainers.distributed import Distributed, setup, teardown
from closedloop.trainers.objectives import EgoBC, TokenBC, check_finite

TOKEN_MODELS = ("micro", "nano", "mini", "tiny")
MODELS = (*TOKEN_MODELS, "gmm-ego", "custom")  # custom: a token model of other sizes, from --init


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``RUN_DIR/config.json``."""

    data: list[str]
    out: str
    model: str = "micro"  # micro | nano | mini | tiny | gmm-ego (with init: the weights' own)
    objective: str = "bc"
    steps: int = 1000
    time_budget: float | None = None  # minutes
    batch_size: int | None = None  # global: scenarios (token models, default 8) or samples (gmm-ego, 256)
    lr: float | None = None  # default 5e-4 (token models), 1e-3 (gmm-ego)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    k: int = 32  # catk / road: candidates per agent
    rollout_temperature: float = 1e-5  # catk: sampling among the top-K where the log has no next pose
    freeze_encoder: bool = False  # catk / road: freeze the map encoder and the embeddings (the CAT-K recipe)
    sample_temperature: float | None = None  # road: the K samples' temperature (0.8); reinforce: the policy's (1.0)
    recovery_distance: float = 3.0  # road: blend toward the log beyond this distance (m)
    recovery_steps: int = 30  # road: over this many steps
    refresh_every: int | None = None  # road: collect demonstrations every E epochs (None: once, "one-off")
    guidance: str = "road"  # road: "road" (nearest sample) or "sampling" (the policy's own sample, ablation)
    gamma: float = 0.95  # reinforce: discount per 0.5 s decision
    distance_weight: float = 1.0  # reinforce: reward -= weight * metres from the logged position
    collision_weight: float = 1.0  # reinforce: reward -= lambda * collision
    offroad_weight: float = 0.0  # reinforce: reward -= weight * off-road
    red_light_weight: float = 0.0  # reinforce: reward -= weight * red-light violation
    progress_weight: float = 0.0  # reinforce: reward += weight * metres travelled
    kl_weight: float = 0.0  # reinforce: + weight * KL(policy || the --init policy); 0: off (the paper)
    seed: int = 0
    device: str = "cpu"
    vocabulary: str | None = None  # a .safetensors vocabulary (default: the shipped one)
    init: str | None = None
    eval_data: list[str] | None = None
    eval_every: int = 0  # steps; 0: only at the end
    eval_scenarios: int = 16
    eval_rollouts: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    quiet: bool = False
    command: list[str] = field(default_factory=list)

    def __post_init__(self):
        token_model = self.model != "gmm-ego"
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.batch_size is None:  # scenarios, or ego samples (gmm-ego BC and RoaD)
            self.batch_size = 8 if token_model else 16 if self.objective == "catk" else 256
        if self.lr is None:
            self.lr = 5e-4 if token_model else 1e-3
        if self.sample_temperature is None:
            self.sample_temperature = 1.0 if self.objective == "reinforce" else 0.8
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"steps ({self.steps}), batch size ({self.batch_size}) and lr ({self.lr}) must be > 0")
        if self.guidance not in ("road", "sampling"):
            raise ValueError(f"unknown RoaD guidance {self.guidance!r}: road or sampling")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"--time-budget must be positive minutes, not {self.time_budget}")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at ``steps``; ``step`` counts from 0."""
    warmup = min(config.warmup_steps, max(config.steps // 10, 1))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(config.steps - warmup, 1), 1.0)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- the model and its files


def init_model_name(init: str) -> str:
    """The model name (``micro``..., ``gmm-ego`` or ``custom``) of the weights ``--init`` names."""
    from closedloop.agents.smart import MODEL_SIZES
    from closedloop.agents.weights import load_weights

    model, vocabulary = load_weights(ckpt.resolve_weights(init))
    if vocabulary is None:
        return "gmm-ego"
    return next((name for name, size in MODEL_SIZES.items() if size == model.config), "custom")


def build_model(config: TrainConfig):
    """``(model, vocabulary, model_name)``: from ``config.init``'s weights, or fresh."""
    from closedloop.agents.gmm import GMMEgoModel
    from closedloop.agents.smart import SmartModel
    from closedloop.agents.tokens import MotionVocabulary, default_vocabulary
    from closedloop.agents.weights import load_weights

    if config.init:
        model, vocabulary = load_weights(ckpt.resolve_weights(config.init))
        return model, vocabulary, "gmm-ego" if vocabulary is None else config.model
    if config.model == "gmm-ego":
        return GMMEgoModel(), None, "gmm-ego"
    vocabulary = MotionVocabulary.load(config.vocabulary) if config.vocabulary else default_vocabulary()
    return SmartModel(config.model, vocabulary=vocabulary.table()), vocabulary, config.model


def weights_saver(model, vocabulary):
    """``save(path)`` for the model's weights file (readable as ``--policy model:FILE``)."""
    from closedloop.agents.weights import save_gmm, save_model

    if vocabulary is None:
        return lambda path: save_gmm(model, path)
    return lambda path: save_model(model, vocabulary, path)


def load_weights_into(model, path: Path) -> None:
    """Copy the weights of a checkpoint file into ``model`` (resume)."""
    from closedloop.agents.weights import load_weights

    try:
        model.load_state_dict(load_weights(path)[0].state_dict())
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{path}: does not fit the run's model: {err}") from None


def make_objective(config: TrainConfig, vocabulary):
    """The objective of ``config`` for a token model (``vocabulary``) or the GMM ego model."""
    if config.objective == "bc":
        return EgoBC() if vocabulary is None else TokenBC(vocabulary, config.label_smoothing)
    if config.objective == "catk":
        if vocabulary is None:
            from closedloop.trainers.ego import EgoCatK

            return EgoCatK(config.k)
        from closedloop.trainers.catk import CatK

        return CatK(vocabulary, config.k, config.rollout_temperature, config.label_smoothing)
    if config.objective == "road":
        from closedloop.trainers.road import DemoSchedule, RoaDTokens

        schedule = DemoSchedule(config.out, config.refresh_every, config.seed)
        road = {
            "k": config.k,
            "temperature": config.sample_temperature,
            "recovery_distance": config.recovery_distance,
            "recovery_steps": config.recovery_steps,
            "select": config.guidance == "road",
        }
        if vocabulary is None:
            from closedloop.trainers.ego import EgoRoaD

            return EgoRoaD(schedule, **road)
        return RoaDTokens(vocabulary, schedule, **road, label_smoothing=config.label_smoothing)
    if config.objective == "reinforce":
        return make_reinforce(config, vocabulary)
    raise ValueError(f"unknown objective {config.objective!r}")


def make_reinforce(config: TrainConfig, vocabulary):
    """The REINFORCE objective of ``config``: its reward, and the ``--init`` policy when a KL
    regulariser is asked for."""
    from closedloop.agents.weights import load_weights
    from closedloop.envs.rewards import RewardConfig
    from closedloop.trainers.reinforce import Reinforce

    if vocabulary is None:
        raise ValueError("train reinforce fine-tunes the tokenized multi-agent model; for the SDC use train ppo")
    reward = RewardConfig(
        distance_to_log=-config.distance_weight,
        collision=-config.collision_weight,
        offroad=-config.offroad_weight,
        red_light=-config.red_light_weight,
        progress=config.progress_weight,
    )
    reference = None
    if config.kl_weight:
        if not config.init:
            raise ValueError("--kl-weight regularises toward the --init policy: give --init")
        reference = load_weights(ckpt.resolve_weights(config.init))[0].eval().requires_grad_(False)
    return Reinforce(vocabulary, reward, config.gamma, config.sample_temperature, config.kl_weight, reference)


FROZEN_PREFIXES = ("map_encoder.", "token_embedding.", "start_embedding.", "type_embedding.", "motion.")


def freeze_encoder(model) -> int:
    """Stop training the map encoder and the token embeddings (CAT-K's fine-tuning recipe);
    returns the number of frozen parameters."""
    frozen = [p for name, p in model.named_parameters() if name.startswith(FROZEN_PREFIXES)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return sum(p.numel() for p in frozen)


# ---- evaluation


def evaluate_model(model, vocabulary, config: TrainConfig, scenarios, device) -> dict[str, float]:
    """Closed-loop scores of the model as a sim agent on held-out ``scenarios``: WOSAC
    meta-metric, minADE and event rates (:func:`closedloop.evaluate.evaluate_policy`).
    Runs under its own RNG, so evaluating never changes the training run."""
    from closedloop.agents.gmm import GMMEgoPolicy
    from closedloop.agents.token_policy import TokenPolicy
    from closedloop.evaluate import evaluate_policy

    policy = GMMEgoPolicy(model) if vocabulary is None else TokenPolicy(model, vocabulary)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = evaluate_policy(
            scenarios,
            policy,
            policy.make_dynamics(),
            num_rollouts=config.eval_rollouts,
            seed=config.seed,
            device=str(device),
            rollouts_together=config.eval_rollouts,
        )
    model.train()
    total = result["all"]
    return {
        "metametric": total["metametric"],
        "min_ade": total["min_average_displacement_error"],
        "collision_rate": total["collision_rate"],
        "offroad_rate": total["offroad_rate"],
        "red_light_rate": total["red_light_rate"],
        "sdc_collision_rate": total["sdc_collision_rate"],
        "sdc_offroad_rate": total["sdc_offroad_rate"],
    }


# ---- the loop


def forward_backward(net, objective, batch, dist: Distributed, step: int = 0):
    """The objective's loss on this rank's ``batch`` and its backward pass, scaled so that
    after DDP's gradient averaging the gradient is that of the mean over the *global*
    batch (what one process would get on all of it). Returns ``(loss, global_count)``."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dist.device.type == "cuda"):
        loss = objective.loss(net, batch)
    check_finite(loss, step)
    global_count = dist.sum(loss.count.detach())
    (loss.total * (dist.world / global_count.clamp_min(1))).backward()
    return loss, global_count


def train(config: TrainConfig, resume: str | None = None) -> Path:
    """Train as ``config`` says (see the module docstring); returns the run directory."""
    dist = setup(config.device)
    # Gradients of embedding lookups are summed in a thread-dependent order on CPU unless
    # deterministic algorithms are asked for: the price of a bit-exact resume (small).
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(dist.device.type == "cpu" or deterministic, warn_only=True)
    try:
        return _train(config, dist, resume)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        teardown()


def _train(config: TrainConfig, dist: Distributed, resume: str | None) -> Path:
    run_dir, device = Path(config.out), dist.device
    if config.batch_size % dist.world:
        raise ValueError(f"--batch-size {config.batch_size} is global: make it a multiple of the {dist.world} ranks")
    local_batch = config.batch_size // dist.world

    # The model, identical on every rank (drawn from the same seed, or loaded).
    torch.manual_seed(config.seed)
    model, vocabulary, model_name = build_model(config)
    model.to(device).train()
    objective = make_objective(config, vocabulary)
    if config.freeze_encoder:
        if vocabulary is None:
            raise ValueError("--freeze-encoder freezes a token model's map encoder; the gmm-ego model has none")
        freeze_encoder(model)
    if resume is None and hasattr(objective, "schedule"):  # RoaD: never train on an earlier run's demonstrations
        objective.schedule.clear(dist.rank)

    # Data: this rank's share of the scenarios, derived into examples once.
    show = dist.is_main and not config.quiet
    examples = objective.examples(load_scenarios(config.data, dist.rank, dist.world), model, progress=show)
    sampler = EpochSampler(len(examples), local_batch, seed=config.seed * 7919 + dist.rank)
    eval_scenarios = None
    if config.eval_data and dist.is_main:
        eval_scenarios = load_scenarios(config.eval_data)[: config.eval_scenarios]

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )

    # Resume: weights, optimizer moments, RNG states and data position of a checkpoint.
    step, seen = 0, 0
    torch.manual_seed(config.seed + 1 + dist.rank)  # dropout differs across ranks
    if resume is not None:
        weights, state_file = _checkpoint_files(resume)
        load_weights_into(model, weights)
        train_state, rng = ckpt.load_train_state(state_file, optimizer)
        step, seen = int(train_state["step"]), int(train_state.get("agent_tokens", 0))
        sampler.load(train_state["sampler"][dist.rank] if dist.world > 1 else train_state["sampler"])
        if dist.world == 1:
            ckpt.set_rng_state(rng)
        else:
            torch.manual_seed(config.seed + 1 + dist.rank + step)
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_run_config(run_dir, {"model_name": model_name, **_describe(model, vocabulary, config)})

    net = DistributedDataParallel(model) if dist.world > 1 else model
    writer = _writer(run_dir) if dist.is_main else None
    save = weights_saver(model, vocabulary)

    def checkpoint() -> None:
        samplers = _gather_samplers(sampler, dist)
        if dist.is_main:
            state = {"step": step, "agent_tokens": seen, "sampler": samplers}
            ckpt.save_checkpoint(run_dir, step, save, optimizer, state, keep=config.keep_checkpoints)

    start_time = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc=f"train {config.objective}", unit="step", disable=not show)
    interval = _new_interval()
    last_eval: dict[str, float] = {}
    history = _earlier_history(run_dir, step) if resume is not None else []  # [step, mean loss of the interval]
    while step < config.steps:
        tick = time.perf_counter()
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        rows = sampler.next()
        data = examples  # RoaD trains on demonstrations collected (and refreshed) by epoch
        if hasattr(objective, "epoch_examples"):
            data = objective.epoch_examples(model, examples, sampler.epoch, dist.rank, show)
        batch = objective.batch(data, rows, device)
        loss, global_count = forward_backward(net, objective, batch, dist, step)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # Bookkeeping: global sums for the logs, checkpoints, evaluation, the time budget.
        totals = dist.sum(torch.stack([loss.total.detach().float(), *(v.float() for v in loss.stats.values())]))
        seen += int(global_count)
        interval["loss"] += float(totals[0])
        for name, value in zip(loss.stats, totals[1:].tolist()):
            interval["stats"][name] = interval["stats"].get(name, 0.0) + value
        interval["count"] += float(global_count)
        interval["grad_norm"] += float(grad_norm)
        interval["seconds"] += time.perf_counter() - tick
        interval["n"] += 1
        if writer is not None and (step % config.log_every == 0 or step == config.steps):
            history.append([step, interval["loss"] / max(interval["count"], 1.0)])
            _log_train(writer, step, lr, interval, vocabulary is not None)
            bar.set_postfix(loss=f"{interval['loss'] / max(interval['count'], 1):.3f}")
            interval = _new_interval()
        bar.update(1)
        if step % config.checkpoint_every == 0:
            checkpoint()
        if eval_scenarios and config.eval_every and step % config.eval_every == 0:
            last_eval = evaluate_model(model, vocabulary, config, eval_scenarios, device)
            _log_eval(writer, step, last_eval)
        out_of_time = config.time_budget is not None and time.perf_counter() - start_time >= 60 * config.time_budget
        if dist.any(out_of_time):
            tqdm.write(f"time budget of {config.time_budget} min spent at step {step}", file=sys.stderr)
            break
    bar.close()

    if step % config.checkpoint_every:
        checkpoint()
    if eval_scenarios and (not config.eval_every or step % config.eval_every):
        last_eval = evaluate_model(model, vocabulary, config, eval_scenarios, device)
        _log_eval(writer, step, last_eval)
    if writer is not None:
        writer.close()
        summary = {
            "step": step,
            "agent_tokens": seen,
            "seconds": time.perf_counter() - start_time,
            "loss": history,
            "eval": last_eval,
        }
        with atomic_write(run_dir / "summary.json", "w") as handle:
            json.dump(summary, handle, indent=2)
    return run_dir


def _earlier_history(run_dir: Path, step: int) -> list[list[float]]:
    """The loss history a resumed run continues: the earlier summary's, up to ``step``."""
    try:
        earlier = json.loads((run_dir / "summary.json").read_text())["loss"]
        return [[int(s), float(loss)] for s, loss in earlier if s <= step]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no summary (a run stopped before its end) or an unreadable one


def _checkpoint_files(resume: str) -> tuple[Path, Path]:
    """(weights, train state) of ``--resume RUN_DIR`` (latest) or ``RUN_DIR/FILE``."""
    path = Path(resume)
    if path.is_dir():
        latest = ckpt.read_latest(path)
        return latest["weights"], latest["train_state"]
    stem = path.name.removesuffix(".safetensors").removesuffix(".train")
    weights, state = path.with_name(stem + ".safetensors"), path.with_name(stem + ".train.safetensors")
    for needed in (weights, state):
        if not needed.is_file():
            raise ckpt.CheckpointError(f"{needed}: missing (needed to resume from {resume})")
    return weights, state


def _gather_samplers(sampler: EpochSampler, dist: Distributed):
    """Every rank's data position (rank 0 writes them all), or the one on one process."""
    if dist.world == 1:
        return sampler.state()
    import torch.distributed as tdist

    states: list = [None] * dist.world
    tdist.all_gather_object(states, sampler.state())
    return states


def _describe(model, vocabulary, config: TrainConfig) -> dict:
    """The run config: the model's architecture, the vocabulary reference, the arguments."""
    from closedloop.agents.weights import gmm_config

    if vocabulary is None:
        architecture = {"kind": "gmm-ego", **gmm_config(model)}
    else:
        architecture = {"kind": "smart", **dataclasses.asdict(model.config)}
    return {
        "architecture": architecture,
        "vocabulary": None
        if vocabulary is None
        else {
            "path": config.vocabulary or "default",
            "settings": vocabulary.settings,
            "sizes": vocabulary.sizes().tolist(),
        },
        "args": dataclasses.asdict(config),
        "command": config.command,
    }


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"))


def _new_interval() -> dict:
    """Sums over the steps since the last log line."""
    return {"loss": 0.0, "count": 0.0, "stats": {}, "seconds": 0.0, "grad_norm": 0.0, "n": 0}


STAT_NAMES = {"correct": "token_accuracy"}  # a summed statistic / count -> its TensorBoard name


def _log_train(writer, step: int, lr: float, interval: dict, tokens: bool) -> None:
    count, n = max(interval["count"], 1.0), max(interval["n"], 1)
    writer.add_scalar("train/loss", interval["loss"] / count, step)
    for name, value in interval["stats"].items():
        writer.add_scalar(f"train/{STAT_NAMES.get(name, name)}", value / count, step)
    rate = "agent_tokens_per_s" if tokens else "samples_per_s"
    writer.add_scalar(f"train/{rate}", interval["count"] / max(interval["seconds"], 1e-9), step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/grad_norm", interval["grad_norm"] / n, step)
    writer.add_scalar("train/seconds_per_step", interval["seconds"] / n, step)


def _log_eval(writer, step: int, scores: dict[str, float]) -> None:
    if writer is None:
        return
    for name, value in scores.items():
        writer.add_scalar(f"eval/{name}", value, step)
    writer.flush()
