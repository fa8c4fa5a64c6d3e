"""Shared-parameter PPO over every agent of the scenarios (Stable-Baselines3).

  OMP_NUM_THREADS=1 python scripts/ppo_multiagent.py --data DIR [--timesteps 20000]
      [--num-scenarios 2] [--max-agents 96] [--out out/ppo_multiagent]

One policy drives every agent valid at the current step; each agent is one SB3 env, so
PPO sees ``num_scenarios x max_agents`` envs per step (agent slots, padded; see
:mod:`closedloop.envs.gym_vector`) and updates one set of weights from all of them. The
reward is the ego env's (distance to the log and collisions, scaled by 0.1), per agent,
over the whole log (no termination on collision); padding slots play "ghost" steps.

Why not SuperSuit's ``pettingzoo_env_to_vec_env_v1`` on ``closedloop.envs.parallel_env``:
its vector env fixes one env per name of ``possible_agents`` when it is built, and a
closedloop episode's agents are the WOMD track ids of the scenario drawn at each reset
(every scenario has its own agents, and their count varies), so the names, and the
number of envs, change across resets. SuperSuit also steps one scenario at a time
through the per-agent dict API. The agent-slot env does what its ``black_death`` padding
would do with a fixed slot count (zero observations and rewards for absent agents) and
steps B scenarios in one batched call.

A PettingZoo user keeps the same env settings: ``parallel_env(scenarios, dynamics=...,
reward=..., terminate_on_collision=True)`` and ``agents_vector_env(scenarios, ...)``
simulate the same agents with the same observations and rewards.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from closedloop.data.womd import read_scenarios
from closedloop.envs.gym_vector import agents_vector_env
from closedloop.wrappers.sb3 import SB3VecEnv, UnitActions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, nargs="+", help="TFRecord files or directories")
    parser.add_argument("--timesteps", type=int, default=20_000, help="agent-slot steps in total")
    parser.add_argument("--num-scenarios", type=int, default=2, help="scenarios simulated together")
    parser.add_argument("--max-agents", type=int, default=96, help="agent slots per scenario (padding)")
    parser.add_argument("--n-steps", type=int, default=16, help="steps per slot between updates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/ppo_multiagent")
    args = parser.parse_args()

    from stable_baselines3 import PPO

    scenarios = list(read_scenarios(args.data))
    # No termination on collision: it would stop the distance penalty at the crash (see the
    # README's PPO section: the ego PPO learned to crash with it).
    venv = agents_vector_env(
        scenarios, num_scenarios=args.num_scenarios, max_agents=args.max_agents, terminate_on_collision=False
    )
    env = UnitActions(SB3VecEnv(venv))
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=args.n_steps,
        batch_size=min(512, args.n_steps * env.num_envs),
        n_epochs=4,
        seed=args.seed,
        tensorboard_log=str(Path(args.out) / "tb"),
        verbose=0,
    )
    start = time.perf_counter()
    model.learn(args.timesteps)
    seconds = time.perf_counter() - start
    model.save(Path(args.out) / "model.zip")
    episodes = list(model.ep_info_buffer)
    mean = sum(e["r"] for e in episodes) / max(len(episodes), 1)
    print(
        f"{model.num_timesteps} agent-steps ({env.num_envs} slots of {args.num_scenarios} scenarios) in "
        f"{seconds:.0f} s; mean return of the last {len(episodes)} agent episodes {mean:.2f}; "
        f"saved {Path(args.out) / 'model.zip'}"
    )


if __name__ == "__main__":
    main()
