"""Simulator throughput: agent-steps/s of the batched core and of the PettingZoo face.

  python scripts/bench_sim.py [--steps 40] [--repeats 5] [--device cpu|cuda] [--only ego]

The core step measured is dynamics (delta_local) + collisions + off-road + red-light
events, for B in {1, 8, 64} scenarios and N in {32, 128} agents per scenario (synthetic
town scenarios of 60-90 agents, truncated or padded to N slots; rates count real
agents, not padding), every agent controlled and replaying its logged motion
(actions precomputed, so no policy is timed). The PettingZoo row steps one scenario
through the face (dict actions, per-agent observations and infos) with every agent
driving straight ahead, and is compared with the core at B = 1 on that same workload.
The BatchedEnv rows time the trainers' env (core + observations + rewards, then also
the guidance in ``info``: the log ahead and the expert action) at B = 1 and 64 on that
straight-ahead workload.
``--waymax`` instead times the workload of issue 16's comparison with Waymax (HEAD 48b33d7,
jax 0.4.26 CPU, jit + scan + vmap): ``motion_data_one_example.tfrecord`` from
``../shared/womd`` (128 objects, 73 controlled), every controlled object driven by the
Expert (inverse bicycle to the log, computed in the loop) with the bicycle dynamics for 80
steps, B copies of the scenario, with collision + off-road checks of every object each step
(off-road of the objects present at the step, as the env's event tracker measures them) or
dynamics + expert only; object-steps/s count all 128 objects, as Waymax does.

``--threads-under-load`` instead measures what a busy machine does to torch's thread
pool: the core at B = 1 and 8 (N = 128) with 1 and with 2 threads while one busy process
per core runs beside it (the setting behind the simulating commands' ``--threads 1``
default).

The ego rows time what PPO steps (bicycle SDC, others following the log, observations,
rewards, events; each ego accelerating gently): one ``EgoEnv``, the batched agent-slot
vector env at B = 16 SDCs and SB3's ``DummyVecEnv`` of 16 ``EgoEnv``s, in env-steps/s
(SDC steps; auto-resets included), with ratios against the single ``EgoEnv`` of the same
run. They run (alone) with ``--only ego``, which needs Stable-Baselines3; each env steps
``--ego-steps`` times after 50 untimed warm-up steps, over 8 scenarios (each drawn again
and again: an env keeps the roadgraph indexes of the scenarios it drew last).
``--compile`` switches on the compiled kernels (``closedloop.envs.compiled``); their
compiling happens in the warm-up, untimed (the README states its cost).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from closedloop.agents.baselines import LogReplay
from closedloop.data.batch import collate_scenarios
from closedloop.data.synthetic import generate_scenarios
from closedloop.envs.compiled import compile_enabled, set_compile
from closedloop.envs.core import reset, step
from closedloop.envs.dynamics import make_dynamics
from closedloop.envs.events import EventTracker
from closedloop.envs.faces import parallel_env
from closedloop.envs.vector import BatchedEnv


def best_of(repeats: int, measure, *args) -> float:
    """The highest rate of ``repeats`` runs: the least disturbed by other work on the machine."""
    return max(measure(*args) for _ in range(repeats))


def workload_actions(state, dynamics, workload: str) -> list[torch.Tensor]:
    """Actions for every step of an episode: ``log`` replays the logged motion (the
    open-loop log-replay policy, precomputed so its cost is not timed), ``forward``
    drives every agent straight ahead at 8 m/s (off the roads too)."""
    if workload == "forward":
        forward = torch.zeros(*state.controlled.shape, 3, device=state.pose.device)
        forward[..., 0] = 0.8
        return [forward] * ((state.num_steps - 1 - state.t) // dynamics.chunk)
    policy, actions, current = LogReplay(), [], state
    policy.reset(state, dynamics)
    while not current.done:
        actions.append(policy.act(current))
        current = step(current, actions[-1], dynamics)
    return actions


def core_rate(scenarios, B: int, N: int, steps: int, device: str, workload: str = "log") -> float:
    with warnings.catch_warnings():  # truncating to N slots drops scored objects on purpose
        warnings.filterwarnings("ignore", message=r".*dropped \d+ scored objects")
        batch = collate_scenarios(
            [scenarios[i % len(scenarios)] for i in range(B)], max_agents=N, allow_drop_scored=True, pad_agents=True
        ).to(device)
    dynamics = make_dynamics("delta_local")
    state = reset(batch)
    actions = workload_actions(state, dynamics, workload)
    tracker = EventTracker(state)
    for action in actions[:2]:  # warm-up
        tracker(state, step(state, action, dynamics))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    current, index = state, 0
    for _ in range(steps):
        nxt = step(current, actions[index], dynamics)
        tracker(current, nxt)
        current, index = (nxt, index + 1) if not nxt.done else (state, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return int(batch.agent_mask.sum()) * steps / seconds  # real agents, not padding slots


def env_rate(scenarios, B: int, N: int, steps: int, device: str, guidance: bool = True) -> float:
    """Agent-steps/s of the trainers' ``BatchedEnv``: the core plus observations and
    rewards (and, with ``guidance``, the log ahead and the expert action in ``info``),
    every agent driving straight ahead (real agents counted)."""
    env = BatchedEnv(scenarios, batch_size=B, max_agents=N, device=device, guidance=guidance)
    env.reset()
    agents = int(env.state.batch.agent_mask.sum())
    forward = torch.zeros(B, N, 3, device=device)
    forward[..., 0] = 0.8
    env.step(forward)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        env.step(forward)
    if device == "cuda":
        torch.cuda.synchronize()
    return agents * steps / (time.perf_counter() - start)


def face_rate(scenario, steps: int) -> tuple[float, int]:
    env = parallel_env([scenario], dynamics="delta_local")
    env.reset(seed=0)
    agents = len(env.agents)
    action = np.array([0.8, 0.0, 0.0], np.float32)
    start = time.perf_counter()
    for _ in range(steps):
        if not env.agents:
            env.reset(seed=0)
        env.step({a: action for a in env.agents})
    return agents * steps / (time.perf_counter() - start), agents


WOMD_EXAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "womd" / "motion_data_one_example.tfrecord"
WAYMAX_OBJECT_STEPS = {  # Waymax on this 2-core machine (issue 16): (checks, B) -> object-steps/s
    (True, 1): 4_314,
    (True, 8): 5_372,
    (False, 1): 5_955_479,
    (False, 8): 2_715_401,
}


def waymax_rate(scenario, B: int, checks: bool, episodes: int, device: str) -> float:
    """Object-steps/s of Expert + bicycle on B copies of ``scenario`` for ``episodes``
    episodes of 80 steps, with or without collision + off-road checks each step."""
    from closedloop.agents.baselines import Expert
    from closedloop.envs.core import collisions
    from closedloop.envs.map_index import RoadEdges

    batch = collate_scenarios([scenario] * B).to(device)
    dynamics = make_dynamics("bicycle")
    start = reset(batch)
    expert = Expert()
    expert.reset(start, dynamics)
    edges = RoadEdges(batch)
    objects = int(batch.agent_mask.sum())

    def episode() -> None:
        state = start
        while not state.done:
            state = step(state, expert.act(state), dynamics)
            if checks:  # as the env's event tracker measures them
                collisions(state)
                p, dims = state.current, state.dims
                heading = p[..., 2]
                edges.box_signed_distance(
                    p[..., 0], p[..., 1], heading.cos(), heading.sin(), dims[..., 0], dims[..., 1], state.valid_now
                )

    episode()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(episodes):
        episode()
    if device == "cuda":
        torch.cuda.synchronize()
    return objects * 80 * episodes / (time.perf_counter() - began)


def waymax_rows(repeats: int, device: str) -> None:
    """The issue-16 table: this code's rates and the Waymax figures beside them."""
    from closedloop.data import read_scenarios

    if not WOMD_EXAMPLE.exists():
        raise SystemExit(f"{WOMD_EXAMPLE}: the real WOMD example is needed for --waymax")
    (scenario,) = read_scenarios([WOMD_EXAMPLE])
    rows = []
    print(f"{'workload':<32}{'B':>5}{'object-steps/s':>16}{'Waymax':>12}{'ratio':>8}")
    for checks in (True, False):
        for B in (1, 8, 64):
            rate = best_of(repeats, waymax_rate, scenario, B, checks, 1, device)
            waymax = WAYMAX_OBJECT_STEPS.get((checks, B))
            what = "collision + off-road each step" if checks else "dynamics + expert only"
            waymax = waymax if device == "cpu" else None  # Waymax's figures are CPU ones
            ratio = f"{rate / waymax:.2f}x" if waymax else "-"
            print(f"{what:<32}{B:>5}{rate:>16,.0f}{waymax or '-':>12}{ratio:>8}")
            rows.append({"checks": checks, "B": B, "object_steps_per_s": round(rate), "waymax": waymax})
    print(
        json.dumps(
            {
                "waymax_workload": rows,
                "device": device,
                "threads": torch.get_num_threads(),
                "compile": compile_enabled(),
            }
        )
    )


def _spin(stop) -> None:
    """Keep one core busy until ``stop`` is set (another job on the machine)."""
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def threads_under_load(scenarios, steps: int, repeats: int) -> None:
    """Core agent-steps/s with 1 and 2 torch threads while every core is kept busy."""
    import multiprocessing

    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 1)]
    for process in spinners:
        process.start()
    rows = []
    try:
        for B in (1, 8):
            rates = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                rates[threads] = best_of(repeats, core_rate, scenarios, B, 128, steps, "cpu")
            rows.append({"B": B, "N": 128, "threads_1": round(rates[1]), "threads_2": round(rates[2])})
            print(
                f"busy machine, B={B}, N=128: 1 thread {rates[1]:,.0f}, 2 threads {rates[2]:,.0f} agent-steps/s "
                f"-> 1 thread {rates[1] / rates[2]:.1f}x"
            )
    finally:
        stop.set()
        for process in spinners:
            process.join()
    print(json.dumps({"threads_under_load": rows}))


def ego_rates(scenarios, steps: int, num_envs: int = 16) -> dict[str, float]:
    """Env-steps/s of one EgoEnv, the batched vector env and a DummyVecEnv of EgoEnvs."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    from closedloop.envs.faces import EgoEnv
    from closedloop.envs.gym_vector import ego_vector_env

    action = np.array([0.5, 0.0], np.float32)
    single = EgoEnv(scenarios)
    single.reset(seed=0)

    def step_single() -> None:
        *_, terminated, truncated, _ = single.step(action)
        if terminated or truncated:
            single.reset()

    rates = {"ego_env": timed(step_single, steps)}

    actions = np.tile(action, (num_envs, 1))
    vector = ego_vector_env(scenarios, num_envs)
    vector.reset(seed=0)
    rates[f"vector_b{num_envs}"] = num_envs * timed(lambda: vector.step(actions), steps)

    dummy = DummyVecEnv([lambda: EgoEnv(scenarios) for _ in range(num_envs)])
    dummy.seed(0)
    dummy.reset()
    rates[f"dummy_vec_env_{num_envs}"] = num_envs * timed(lambda: dummy.step(actions), steps)
    return rates


def timed(step_once, steps: int, warm_up: int = 50) -> float:
    """Calls per second of ``step_once`` over ``steps`` calls after ``warm_up`` untimed ones."""
    for _ in range(warm_up):
        step_once()
    start = time.perf_counter()
    for _ in range(steps):
        step_once()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell; the best is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--threads-under-load", action="store_true", help="1 vs 2 threads with every core busy")
    parser.add_argument("--waymax", action="store_true", help="the issue-16 Waymax workload (real WOMD example)")
    parser.add_argument("--only", choices=("all", "ego"), default="all", help="ego: only the PPO env rows")
    parser.add_argument("--ego-steps", type=int, default=1000, help="steps per ego row run (auto-resets included)")
    parser.add_argument(
        "--compile", action="store_true", help="compiled kernels (closedloop.envs.compiled; compile time not timed)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_compile(args.compile)
    scenarios = list(generate_scenarios(8, seed=0, town="grid", agents=(60, 90)))
    if args.waymax:
        waymax_rows(args.repeats, args.device)
        return
    if args.threads_under_load:
        threads_under_load(scenarios, args.steps, args.repeats)
        return
    if args.only == "ego":
        ego = {}
        for _ in range(args.repeats):
            for name, rate in ego_rates(scenarios, args.ego_steps).items():
                ego[name] = max(ego.get(name, 0.0), rate)
        for name, rate in ego.items():
            print(f"{name:<20}{rate:>10,.0f} env-steps/s{rate / ego['ego_env']:>8.1f}x EgoEnv")
        print(json.dumps({"ego_env_steps_per_s": {k: round(v) for k, v in ego.items()}, "compile": args.compile}))
        return
    rows = []
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" else [])
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'device':<7}{'B':>5}{'N':>6}{'agent-steps/s':>16}{'vs B=1':>9}")
    for device in devices:
        for N in (32, 128):
            base = None
            for B in (1, 8, 64):
                rate = best_of(args.repeats, core_rate, scenarios, B, N, args.steps, device)
                base = base or rate
                rows.append({"device": device, "B": B, "N": N, "agent_steps_per_s": round(rate)})
                print(f"{device:<7}{B:>5}{N:>6}{rate:>16,.0f}{rate / base:>8.1f}x")
    env_rows = []
    for guidance in (False, True):
        for B in (1, 64):
            rate = best_of(args.repeats, env_rate, scenarios, B, 128, args.steps, devices[-1], guidance)
            env_rows.append(
                {"device": devices[-1], "B": B, "N": 128, "guidance": guidance, "agent_steps_per_s": round(rate)}
            )
            what = "observations + rewards + events" + (" + guidance" if guidance else "")
            print(f"BatchedEnv ({devices[-1]}, {what}), B={B}, N=128: {rate:,.0f} agent-steps/s")
    face, agents = max(face_rate(scenarios[0], args.steps) for _ in range(args.repeats))
    core_one = best_of(args.repeats, core_rate, scenarios[:1], 1, 128, args.steps, "cpu", "forward")
    print(
        f"PettingZoo face, 1 scenario ({agents} controlled agents): {face:,.0f} agent-steps/s; "
        f"core at B=1, N=128: {core_one:,.0f} -> face overhead {core_one / face:.1f}x per agent-step"
    )
    print(
        json.dumps(
            {
                "rows": rows,
                "batched_env": env_rows,
                "pettingzoo_agent_steps_per_s": round(face),
                "pettingzoo_agents": agents,
                "core_b1_n128": round(core_one),
            }
        )
    )


if __name__ == "__main__":
    main()
