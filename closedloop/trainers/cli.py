"""``closedloop train ...``: the trainers' command line (registered by :mod:`closedloop.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from closedloop.cli import positive_int, threads_flag

# Flags that may change when a run is resumed; every other setting comes from config.json.
RESUME_OVERRIDES = ("steps", "time_budget", "device", "quiet", "eval_every", "checkpoint_every")


def add_parser(sub) -> None:
    """Add ``train`` and its objectives to the ``closedloop`` sub-commands."""
    from closedloop.trainers.loop import MODELS

    p = sub.add_parser(
        "train",
        help="train a policy: behaviour cloning (bc), closed-loop fine-tuning with CAT-K (catk), RoaD (road) "
        "or REINFORCE (reinforce), PPO for the SDC (ppo)",
    )
    objectives = p.add_subparsers(dest="objective", required=True)
    p = objectives.add_parser(
        "bc",
        help="behaviour cloning: teacher forcing on tokenized logs (token models) or NLL (gmm-ego)",
        description="Pre-train by behaviour cloning. Launch with torchrun --nproc-per-node K -m closedloop.cli "
        "train bc ... for DDP (NCCL on GPUs, gloo on CPU).",
    )
    _common_flags(p, MODELS)
    p = objectives.add_parser(
        "catk",
        help="CAT-K: closed-loop supervised fine-tuning from a BC checkpoint (--init): token model or gmm-ego",
        description="Fine-tune on a fresh CAT-K-guided closed-loop rollout per batch: execute the top-K token "
        "nearest the log, learn the recovery token (gmm-ego: the nearest of the K heaviest modes, learn the "
        "logged chunk from where the SDC is). Needs --init (a BC run or weights) or --resume.",
    )
    _common_flags(p, MODELS)
    p.add_argument("--k", type=positive_int, default=32, help="top-K candidates per agent (default 32; gmm-ego: modes)")
    p.add_argument(
        "--rollout-temperature",
        type=float,
        default=1e-5,
        help="sampling among the top-K for agents without a logged next pose (default 1e-5: the most likely)",
    )
    p.add_argument(
        "--freeze-encoder", action="store_true", help="freeze the map encoder and the token embeddings (CAT-K)"
    )
    p = objectives.add_parser(
        "road",
        help="RoaD: fine-tune by BC on the policy's own guided rollouts (token model or gmm-ego), from --init",
        description="Collect RoaD-guided closed-loop rollouts with the current policy (execute the nearest of K "
        "samples, blended toward the log beyond --recovery-distance) and fine-tune by behaviour cloning on them; "
        "collect once (--one-off, the default) or every --refresh-every epochs. Demonstrations are kept in "
        "RUN_DIR/demos so --resume reuses them. Needs --init (a BC run or weights) or --resume.",
    )
    _common_flags(p, MODELS)
    p.add_argument("--k", type=positive_int, default=64, help="samples per agent and decision (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    refresh = p.add_mutually_exclusive_group()
    refresh.add_argument("--refresh-every", type=positive_int, metavar="E", help="recollect every E epochs")
    refresh.add_argument("--one-off", action="store_true", help="collect once and reuse (the default)")
    p.add_argument("--recovery-distance", type=float, default=3.0, help="recovery mode beyond this (m, default 3)")
    p.add_argument("--recovery-steps", type=positive_int, default=30, help="blend over this many steps (30)")
    p.add_argument(
        "--guidance",
        choices=("road", "sampling"),
        default="road",
        help="road: execute the nearest sample; sampling: the policy's own (ablation)",
    )
    p.add_argument("--freeze-encoder", action="store_true", help="freeze the map encoder and the token embeddings")
    p = objectives.add_parser(
        "reinforce",
        help="REINFORCE: RL fine-tuning of the token model from --init, reward -distance - lambda * collision",
        description="Fine-tune the tokenized multi-agent model by REINFORCE (Peng et al.): every step samples all "
        "controlled agents in the env from the current policy, rewards each agent per 0.5 s decision with "
        "-distance_weight * metres from the log - collision_weight * collision (- offroad_weight * off-road - "
        "red_light_weight * red light + progress_weight * metres travelled), discounts by --gamma, normalises the "
        "returns over the whole batch and minimises -mean(log pi(a) * R_hat). Needs --init or --resume.",
    )
    _common_flags(p, MODELS)
    add_reward_flags(p)
    p.add_argument("--gamma", type=float, default=0.95, help="discount per 0.5 s decision (default 0.95)")
    p.add_argument("--temperature", type=float, default=1.0, help="the policy's sampling temperature (default 1)")
    p.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="weight of KL(policy || the --init policy) per decision (default 0: off, as in the paper)",
    )
    from closedloop.trainers.ppo import add_parser as add_ppo_parser

    add_ppo_parser(objectives)  # PPO runs SB3's own loop, not the shared one: its flags are its own


def add_reward_flags(p: argparse.ArgumentParser, collision: float = 1.0) -> None:
    """The reward terms of :class:`closedloop.envs.rewards.RewardConfig` as penalty / bonus
    weights (``train reinforce`` and ``train ppo``)."""
    p.add_argument(
        "--distance-weight", type=float, default=1.0, help="penalty per metre from the logged position (default 1)"
    )
    p.add_argument(
        "--collision-weight",
        type=float,
        default=collision,
        metavar="LAMBDA",
        help=f"penalty per collision, lambda (default {collision:g})",
    )
    p.add_argument("--offroad-weight", type=float, default=0.0, help="penalty per off-road step (default 0)")
    p.add_argument("--red-light-weight", type=float, default=0.0, help="penalty per red-light violation (default 0)")
    p.add_argument("--progress-weight", type=float, default=0.0, help="bonus per metre travelled (default 0)")


def _common_flags(p: argparse.ArgumentParser, models) -> None:
    """The flags every trainer takes."""
    p.add_argument("--data", nargs="+", help="TFRecord files, directories or globs, or a prepare cache directory")
    p.add_argument("--model", choices=models, default=None, help="default micro (with --init: the checkpoint's)")
    p.add_argument("--out", help="the run directory (config.json, checkpoints/, tb/)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default 1000)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES", help="stop cleanly after this")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch (8 scenarios; gmm-ego 256)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (5e-4; gmm-ego 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--vocabulary", help="a motion vocabulary .safetensors (default: the shipped one)")
    p.add_argument("--eval-data", nargs="+", help="held-out scenarios for closed-loop evaluation")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: at the end)")
    p.add_argument("--eval-scenarios", type=positive_int, default=16)
    p.add_argument("--eval-rollouts", type=positive_int, default=8)
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="steps (default 500)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (or RUN_DIR/FILE)")
    p.add_argument("--init", metavar="RUN_DIR", help="start from a checkpoint's weights, fresh optimizer and schedule")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    threads_flag(p, default=None)
    p.set_defaults(func=run_train)


def config_from_args(args: argparse.Namespace):
    """The :class:`TrainConfig` of a fresh run, or of the run ``--resume`` continues."""
    from closedloop.trainers import checkpoint as ckpt
    from closedloop.trainers.loop import TrainConfig

    given = {
        "data": args.data,
        "model": args.model,
        "out": args.out,
        "objective": args.objective,
        "steps": args.steps,
        "time_budget": args.time_budget,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "grad_clip": args.grad_clip,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "device": args.device,
        "vocabulary": args.vocabulary,
        "init": args.init,
        "eval_data": args.eval_data,
        "eval_every": args.eval_every,
        "eval_scenarios": args.eval_scenarios,
        "eval_rollouts": args.eval_rollouts,
        "checkpoint_every": args.checkpoint_every,
        "quiet": args.quiet,
        "k": getattr(args, "k", None),
        "rollout_temperature": getattr(args, "rollout_temperature", None),
        "freeze_encoder": getattr(args, "freeze_encoder", None) or None,
        "sample_temperature": getattr(args, "temperature", None),
        "recovery_distance": getattr(args, "recovery_distance", None),
        "recovery_steps": getattr(args, "recovery_steps", None),
        "refresh_every": getattr(args, "refresh_every", None),
        "guidance": getattr(args, "guidance", None),
        "gamma": getattr(args, "gamma", None),
        "distance_weight": getattr(args, "distance_weight", None),
        "collision_weight": getattr(args, "collision_weight", None),
        "offroad_weight": getattr(args, "offroad_weight", None),
        "red_light_weight": getattr(args, "red_light_weight", None),
        "progress_weight": getattr(args, "progress_weight", None),
        "kl_weight": getattr(args, "kl_weight", None),
        "command": ["closedloop", *sys.argv[1:]],
    }
    if args.resume:
        saved = ckpt.read_run_config(_run_dir(args.resume))["args"]
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in saved.items() if k in fields}
        values.update({k: given[k] for k in RESUME_OVERRIDES if given[k] not in (None, False)})
        values["command"] = given["command"]
        values["out"] = str(_run_dir(args.resume))
        return TrainConfig(**values)
    missing = [flag for flag, key in (("--data", "data"), ("--out", "out")) if not given[key]]
    if args.objective != "bc" and not args.init:
        missing.append("--init (a BC run directory or weights file)")
    if missing:
        raise ValueError(f"train {args.objective} needs {' and '.join(missing)} (or --resume RUN_DIR)")
    if args.init:
        from closedloop.trainers.loop import init_model_name

        found = init_model_name(args.init)
        if args.model is not None and args.model != found:
            raise ValueError(f"--init {args.init} holds a {found} model, not {args.model}: leave out --model")
        given["model"] = found
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def _run_dir(resume: str):
    from pathlib import Path

    from closedloop.trainers.checkpoint import CheckpointError

    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such run directory or checkpoint file")
    return path if path.is_dir() else path.parent.parent  # RUN_DIR/checkpoints/FILE


def run_train(args: argparse.Namespace) -> int:
    from closedloop.trainers.loop import train

    config = config_from_args(args)
    try:
        run_dir = train(config, resume=args.resume)
    except FloatingPointError as err:  # the last checkpoint is intact: resume from it with a lower --lr
        print(f"closedloop train: error: {err}", file=sys.stderr)
        return 1
    print(f"trained {config.objective} ({config.model}) in {run_dir}: closedloop rollout --policy ckpt:{run_dir} ...")
    return 0
