"""PPO baseline for the SDC with Stable-Baselines3: ``closedloop train ppo``.

The method in one file, CleanRL style: build the env (the SDCs of B scenarios in one
batched simulator, or SB3's ``DummyVecEnv``/``SubprocVecEnv`` of ``EgoEnv``), let
SB3's PPO learn on it, save the untrained initialisation and periodic checkpoints, and
evaluate the result against its initialisation and the constant-velocity ego on held-out
scenarios. The others follow the log (default) or a sim-agent policy (``--others``).

Run directory::

    config.json                 the settings (flags), read back by --resume
    init.zip, init.safetensors  the policy before any update (same seed)
    checkpoints/step_N.{zip,safetensors}
    model.zip, policy.safetensors  the final policy
    tb/                         SB3's TensorBoard logs (rollout/ep_rew_mean, train/...)
    eval.json                   with --eval-data: return and event rates of the three egos

SB3's ``.zip`` holds the weights as ``torch.save`` files (loaded ``weights_only``) and
the rest of the model (spaces, schedules, buffers) as cloudpickle inside ``data``.
Nothing here unpickles: ``--resume`` rebuilds the model from ``config.json`` and loads
only the weights and optimizer state (SB3's ``set_parameters``; ``--normalize-reward``'s
running return statistics come from the checkpoint's safetensors header; the scenario
order and sampling restart from ``seed + step``, so a resumed run is not bit-identical to
an uninterrupted one), and the planner
(``ppo:RUN_DIR``, :mod:`closedloop.agents.planners.ppo`) reads ``policy.safetensors``.

The learner acts in ``[-1, 1]`` per action dimension (:class:`~closedloop.wrappers.sb3.
UnitActions`), mapped onto the dynamics' bounds; the planner applies the same map.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from closedloop.envs.compiled import set_compile
from closedloop.envs.observation import ObservationConfig
from closedloop.envs.rewards import RewardConfig

CONFIG_FILE = "config.json"
WEIGHTS_FORMAT = "closedloop-ppo-policy-v1"
REWARD_FLAGS = ("distance_to_log", "collision", "offroad", "red_light", "progress", "action", "scale")
# Flags that may change when a run is resumed; the others come from config.json. They
# default to None in the parser, so a resumed run can tell a given flag from an absent one
# (and set one back to its default value); a fresh run takes these defaults.
RESUME_OVERRIDES = (
    "timesteps",
    "device",
    "threads",
    "compile",
    "checkpoint_every",
    "eval_data",
    "eval_scenarios",
    "quiet",
)
FRESH_DEFAULTS = {"timesteps": 100_000, "device": "cpu", "threads": 1, "compile": "auto", "eval_scenarios": 32}
COMPILE_PAYS_FROM = 50_000  # env steps from which --compile auto compiles (compiling costs ~8 s; see compiled.py)


def add_parser(objectives) -> None:
    """``closedloop train ppo`` and its flags."""
    from closedloop.cli import positive_int

    p = objectives.add_parser(
        "ppo",
        help="PPO (Stable-Baselines3) for the SDC; the others follow the log or --others",
        description="Train SB3's PPO on the SDC of --data scenarios (needs pip install 'closedloop[rl]'). "
        "The trained policy drives the SDC as the planner ppo:RUN_DIR.",
    )
    p.add_argument("--data", nargs="+", help="TFRecord files, directories or globs")
    p.add_argument("--out", help="the run directory")
    p.add_argument("--dynamics", choices=("bicycle", "delta_local", "delta_global"), default="bicycle")
    p.add_argument("--timesteps", type=positive_int, default=None, help="environment steps in total (100000)")
    p.add_argument("--others", default="log", help="sim agents: log (replay, default), cv, idm, or a --policy spec")
    p.add_argument("--num-envs", type=positive_int, default=16, help="SDCs (scenarios) stepped together (16)")
    p.add_argument(
        "--vec-env",
        choices=("batched", "dummy", "subproc"),
        default="batched",
        help="batched: one batched simulator for all envs (default); dummy / subproc: SB3's DummyVecEnv / "
        "SubprocVecEnv of EgoEnv",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="the learner's torch device (cpu; the simulator runs on CPU)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (1: the simulator's tensors are small; on the shared 2-core machine two threads "
        "stepped the envs 35x slower than one)",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default=None,
        help="torch.compile the simulator's observation, off-road and collision kernels (auto: as "
        f"CLOSEDLOOP_COMPILE says where it is set, else on from {COMPILE_PAYS_FROM} timesteps, where the ~8 s "
        "of compiling pays; see closedloop.envs.compiled)",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--n-steps", type=positive_int, default=80, help="steps per env between updates (80)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="minibatch size (256)")
    p.add_argument("--n-epochs", type=positive_int, default=10)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--ent-coef", type=float, default=0.0)
    p.add_argument("--net-arch", default="64,64", help="hidden sizes of the policy and value MLPs (64,64)")
    p.add_argument(
        "--log-std-init",
        type=float,
        default=-1.0,
        help="initial log std of the Gaussian in unit actions (-1: std 0.37; SB3's 0 clips much of the curvature)",
    )
    p.add_argument(
        "--normalize-reward",
        action="store_true",
        help="scale rewards by a running std of the discounted return (SB3's VecNormalize, no observation "
        "normalisation, so the planner needs no statistics)",
    )
    defaults = RewardConfig(scale=0.1)
    for name in REWARD_FLAGS:
        p.add_argument(
            f"--reward-{name.replace('_', '-')}",
            type=float,
            default=getattr(defaults, name),
            help=f"RewardConfig.{name} (default {getattr(defaults, name)})",
        )
    p.add_argument(
        "--terminate-on-collision",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="end the SDC's episode at its first collision, as EgoEnv does (default: no, the paper's reward over "
        "the whole log). With it the distance-to-log penalty stops at the crash, so PPO learns to crash early "
        "unless --reward-collision outweighs the penalty still to come",
    )
    p.add_argument("--terminate-on-offroad", action="store_true", help="end the SDC's episode when it leaves the road")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="env steps between checkpoints")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--eval-data", nargs="+", help="held-out scenarios: write RUN_DIR/eval.json at the end")
    p.add_argument("--eval-scenarios", type=positive_int, default=None, help="held-out scenarios evaluated (32)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_ppo)


def settings_from_args(args: argparse.Namespace) -> dict:
    """The run's settings: the flags of a fresh run, or ``config.json`` of the run that
    ``--resume`` continues with the flags that may change."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "objective", "resume")}
    if args.resume:
        path = Path(args.resume) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no {CONFIG_FILE} (not a train ppo run directory)")
        settings = json.loads(path.read_text())
        settings.update({k: given[k] for k in RESUME_OVERRIDES if given[k] not in (None, False)})
        settings["out"] = str(args.resume)
        return settings
    missing = [flag for flag in ("data", "out") if not given[flag]]
    if missing:
        raise ValueError(f"train ppo needs {' and '.join('--' + m for m in missing)} (or --resume RUN_DIR)")
    return {**given, **{k: v for k, v in FRESH_DEFAULTS.items() if given[k] is None}}


def reward_config(settings: dict) -> RewardConfig:
    return RewardConfig(**{name: settings[f"reward_{name}"] for name in REWARD_FLAGS})


def env_settings(settings: dict) -> dict:
    """Keyword arguments of ``EgoEnv`` / ``ego_vector_env`` (the same for both)."""
    return {
        "dynamics": settings["dynamics"],
        "reward": reward_config(settings),
        "terminate_on_collision": settings["terminate_on_collision"],
        "terminate_on_offroad": settings["terminate_on_offroad"],
    }


def others_policy(spec: str, seed: int):
    """``None`` for log replay (agents follow the log exactly), else the policy ``spec``."""
    if spec == "log":
        return None
    from closedloop.agents.policy import load_policy

    return load_policy({"cv": "constant_velocity"}.get(spec, spec), seed=seed)


def _monitored_ego(scenarios, kwargs: dict, others: str, seed: int):
    from stable_baselines3.common.monitor import Monitor

    from closedloop.envs.faces import EgoEnv

    return Monitor(EgoEnv(scenarios, others=others_policy(others, seed), **kwargs))


def make_vec_env(kind: str, scenarios, settings: dict, seed: int):
    """The training env: SB3 ``VecEnv`` of ``settings["num_envs"]`` SDCs, in unit actions."""
    from closedloop.wrappers.sb3 import SB3VecEnv, UnitActions

    n, kwargs = settings["num_envs"], env_settings(settings)
    if kind == "batched":
        from closedloop.envs.gym_vector import ego_vector_env

        venv = SB3VecEnv(ego_vector_env(scenarios, n, others=others_policy(settings["others"], seed), **kwargs))
    else:
        from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

        fns = [partial(_monitored_ego, scenarios, kwargs, settings["others"], seed + i) for i in range(n)]
        venv = DummyVecEnv(fns) if kind == "dummy" else SubprocVecEnv(fns)
    venv = UnitActions(venv)
    if settings["normalize_reward"]:
        from stable_baselines3.common.vec_env import VecNormalize

        venv = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=settings["gamma"])
    return venv


def policy_kwargs(settings: dict) -> dict:
    arch = [int(x) for x in str(settings["net_arch"]).split(",")]
    return {
        "net_arch": {"pi": arch, "vf": arch},
        "activation_fn": torch.nn.Tanh,
        "log_std_init": settings["log_std_init"],
    }


def weights_header(settings: dict, num_timesteps: int) -> dict:
    """What a planner needs to rebuild the policy (no pickle): spaces, sizes, dynamics."""
    return {
        "format": WEIGHTS_FORMAT,
        "dynamics": settings["dynamics"],
        "net_arch": settings["net_arch"],
        "log_std_init": settings["log_std_init"],
        "observation": ObservationConfig().__dict__,
        "num_timesteps": num_timesteps,
        "seed": settings["seed"],
    }


def save_policy(model, archive: Path, weights: Path, settings: dict) -> None:
    """``archive`` (SB3's ``.zip``, for SB3 users and ``--resume``) and ``weights`` (the
    policy's tensors as safetensors, for the planner)."""
    from closedloop.safetensors_io import write_safetensors

    partial_archive = archive.with_name(f".{archive.stem}.partial.zip")  # SB3 writes in place: rename when whole
    model.save(partial_archive)
    os.replace(partial_archive, archive)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.policy.state_dict().items()}
    header = weights_header(settings, model.num_timesteps)
    rms = getattr(model.get_env(), "ret_rms", None)  # --normalize-reward: resume needs its running std
    if rms is not None:
        header["return_rms"] = {"mean": float(rms.mean), "var": float(rms.var), "count": float(rms.count)}
    write_safetensors(weights, tensors, header)


def restore_return_rms(env, weights: Path) -> None:
    """Put back ``--normalize-reward``'s running return statistics saved with a checkpoint."""
    from closedloop.agents.planners.ppo import MAX_BYTES
    from closedloop.safetensors_io import read_safetensors

    saved = read_safetensors(weights, "a PPO checkpoint", ValueError, MAX_BYTES, WEIGHTS_FORMAT)[1].get("return_rms")
    if saved is not None and hasattr(env, "ret_rms"):
        env.ret_rms.mean, env.ret_rms.var, env.ret_rms.count = saved["mean"], saved["var"], saved["count"]


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """``(checkpoint without suffix, its step)`` of the highest complete step in ``run_dir``
    (both files: the safetensors is written last, so a crash mid-save leaves the earlier
    checkpoint in charge)."""
    found = [
        (int(p.stem.split("_")[1]), p)
        for p in (run_dir / "checkpoints").glob("step_*.zip")
        if p.with_suffix(".safetensors").is_file()
    ]
    if not found:
        return None
    step, path = max(found)
    return path.with_suffix(""), step


def evaluate_ego(scenarios, act, settings: dict, batch: int = 32, seed: int = 0) -> dict:
    """Mean episode return and SDC event rates of ``act`` (``obs [B, D] -> actions [B, 2]``
    in the dynamics' units) on one episode per scenario, in the training env. An SDC counts
    as collided / off-road when the env flagged that event at any step of its episode
    (before it terminated): the event definitions and the per-rollout rate of
    ``closedloop evaluate``'s ``sdc_collision_rate`` / ``sdc_offroad_rate``."""
    from closedloop.envs.gym_vector import ego_vector_env

    returns, events = [], {"collision": [], "offroad": [], "red_light": []}
    for start in range(0, len(scenarios), batch):
        chunk = scenarios[start : start + batch]
        env = ego_vector_env(
            chunk, len(chunk), shuffle=False, others=others_policy(settings["others"], seed), **env_settings(settings)
        )
        obs, _ = env.reset(seed=seed)
        total = np.zeros(len(chunk))
        seen = {key: np.zeros(len(chunk), bool) for key in events}
        while not env.log_ended:
            obs, reward, _, _, info = env.step(act(obs))
            live = ~info["ghost"]
            total += reward * live
            for key in seen:
                seen[key] |= (info[key] > 0) & live
        returns += total.tolist()
        for key in events:
            events[key] += seen[key].tolist()
    return {
        "episodes": len(returns),
        "mean_return": float(np.mean(returns)),
        "collision_rate": float(np.mean(events["collision"])),
        "offroad_rate": float(np.mean(events["offroad"])),
        "red_light_rate": float(np.mean(events["red_light"])),
    }


def evaluate_run(run_dir: Path, scenarios, settings: dict) -> dict:
    """``eval.json``: the trained policy, its initialisation and the constant-velocity ego
    (zero acceleration and curvature: the bicycle model keeps speed and heading)."""
    from closedloop.agents.planners.ppo import PPOPlanner

    egos = {
        "ppo": PPOPlanner(run_dir / "policy.safetensors"),
        "init": PPOPlanner(run_dir / "init.safetensors"),
    }
    result = {name: evaluate_ego(scenarios, planner.act_batch, settings) for name, planner in egos.items()}
    if settings["dynamics"] == "bicycle":
        result["constant_velocity"] = evaluate_ego(scenarios, lambda obs: np.zeros((len(obs), 2), np.float32), settings)
    return result


def compile_wanted(mode: str, timesteps: int) -> bool:
    """Whether ``--compile mode`` compiles a run of ``timesteps`` env steps: ``auto``
    follows ``CLOSEDLOOP_COMPILE`` where it is set, else compiles runs long enough to pay."""
    if mode == "auto":
        setting = os.environ.get("CLOSEDLOOP_COMPILE")
        return setting == "1" if setting is not None else timesteps >= COMPILE_PAYS_FROM
    return mode == "on"


def train_ppo(settings: dict, resume: bool = False) -> Path:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    from closedloop._atomic import atomic_write
    from closedloop.data.womd import read_scenarios

    run_dir = Path(settings["out"])
    torch.set_num_threads(settings.get("threads", 1))
    set_compile(compile_wanted(settings.get("compile", "auto"), settings["timesteps"]))
    scenarios = list(read_scenarios(settings["data"]))
    if not scenarios:
        raise ValueError(f"no scenarios in {' '.join(settings['data'])}")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / CONFIG_FILE, "w") as handle:
        json.dump({**settings, "command": ["closedloop", *sys.argv[1:]]}, handle, indent=2)
    found = latest_checkpoint(run_dir) if resume else None
    seed = settings["seed"] + (found[1] if found else 0)  # a resumed run draws fresh scenario orders
    env = make_vec_env(settings["vec_env"], scenarios, settings, seed)
    model = PPO(
        "MlpPolicy",
        env,
        learning_rate=settings["lr"],
        n_steps=settings["n_steps"],
        batch_size=settings["batch_size"],
        n_epochs=settings["n_epochs"],
        gamma=settings["gamma"],
        ent_coef=settings["ent_coef"],
        policy_kwargs=policy_kwargs(settings),
        tensorboard_log=str(run_dir / "tb"),
        seed=seed,
        device=settings["device"],
        verbose=0 if settings["quiet"] else 1,
    )
    if found:
        model.set_parameters(str(found[0].with_suffix(".zip")), exact_match=True, device=settings["device"])
        model.num_timesteps = found[1]
        restore_return_rms(env, found[0].with_suffix(".safetensors"))
    else:
        save_policy(model, run_dir / "init.zip", run_dir / "init.safetensors", settings)

    every = settings["checkpoint_every"]

    class Checkpoints(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = (model.num_timesteps // every + 1) * every if every else None

        def _on_step(self) -> bool:
            if self.next is not None and self.num_timesteps >= self.next:
                stem = run_dir / "checkpoints" / f"step_{self.num_timesteps}"
                save_policy(self.model, stem.with_suffix(".zip"), stem.with_suffix(".safetensors"), settings)
                self.next += every
            return True

    remaining = settings["timesteps"] - model.num_timesteps
    start = time.perf_counter()
    if remaining > 0:
        model.learn(remaining, callback=Checkpoints(), tb_log_name="ppo", reset_num_timesteps=not found)
    seconds = time.perf_counter() - start
    stem = run_dir / "checkpoints" / f"step_{model.num_timesteps}"
    save_policy(model, stem.with_suffix(".zip"), stem.with_suffix(".safetensors"), settings)
    save_policy(model, run_dir / "model.zip", run_dir / "policy.safetensors", settings)
    env.close()
    if remaining > 0:
        rate = remaining / max(seconds, 1e-9)
        print(f"trained PPO to {model.num_timesteps} env steps in {seconds:.0f} s ({rate:.0f} env steps/s)")
    if settings.get("eval_data"):
        held_out = list(read_scenarios(settings["eval_data"]))[: settings["eval_scenarios"]]
        result = {"settings": {k: settings[k] for k in ("others", "dynamics", "seed", "timesteps")}}
        result.update(evaluate_run(run_dir, held_out, settings))
        with atomic_write(run_dir / "eval.json", "w") as handle:
            json.dump(result, handle, indent=2)
        for name in ("ppo", "init", "constant_velocity"):
            if name in result:
                r = result[name]
                print(
                    f"{name:<18} return {r['mean_return']:8.2f}  collision {r['collision_rate']:.3f}  "
                    f"offroad {r['offroad_rate']:.3f}  ({r['episodes']} held-out scenarios)"
                )
    return run_dir


def run_ppo(args: argparse.Namespace) -> int:
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        print("closedloop train ppo: error: needs Stable-Baselines3: pip install 'closedloop[rl]'", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    run_dir = train_ppo(settings, resume=bool(args.resume))
    print(f"trained PPO in {run_dir}: closedloop rollout --ego-planner ppo:{run_dir} ...")
    return 0
