"""The ``closedloop`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from closedloop import __version__

EXIT_BAD_INPUT = 2


def _cmd_inspect(args: argparse.Namespace) -> int:
    from closedloop.data.womd import read_scenarios
    from closedloop.inspect import summarize, summary_line

    for scenario in read_scenarios(args.paths):
        summary = summarize(scenario)
        print(json.dumps(summary) if args.json else summary_line(summary), flush=True)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from closedloop.data.cache import prepare_cache

    start = time.perf_counter()
    result = prepare_cache(args.data, args.out, workers=args.workers, on_error=args.on_error, progress=not args.quiet)
    seconds = time.perf_counter() - start
    rebuilt = f" ({result['rebuilt']} rebuilt: corrupt or changed)" if result["rebuilt"] else ""
    print(
        f"cache {args.out}: {result['scenarios']} scenarios from "
        f"{result['converted'] + result['reused']} shards ({result['converted']} converted now{rebuilt}, "
        f"{result['reused']} already done, {result['skipped']} bad records skipped) "
        f"in {seconds:.1f} s"
    )
    return 0


def _parse_agents(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, e.g. 30:60, not {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _cmd_generate(args: argparse.Namespace) -> int:
    from closedloop.data.synthetic import generate_dataset

    start = time.perf_counter()
    paths = generate_dataset(
        args.out,
        args.num_scenarios,
        seed=args.seed,
        shards=args.shards,
        town=args.town,
        agents=args.agents,
        workers=args.workers,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.num_scenarios} {args.town} scenarios in {len(paths)} shards to {args.out} "
        f"in {seconds:.1f} s ({args.num_scenarios / seconds:.1f} scenarios/s)"
    )
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from closedloop.data.womd import read_scenarios
    from closedloop.metrics.config import FIELDS
    from closedloop.metrics.rollouts import RolloutFileError, iter_rollout_files, load_rollouts
    from closedloop.metrics.submission import submission_problem
    from closedloop.metrics.wosac import aggregate, buckets, check_rollouts, score_scenario

    scenarios = {s.scenario_id: s for s in read_scenarios(args.data)}
    files = list(iter_rollout_files(args.rollouts))
    scores = []
    columns = (
        "metametric",
        "min_average_displacement_error",
        "kinematic",
        "interactive",
        "map_based",
        "simulated_collision_rate",
        "simulated_offroad_rate",
    )
    if not args.json:
        print(f"{'scenario_id':<18}" + "".join(f"{c[:16]:>17}" for c in columns), flush=True)
    for path in tqdm(files, desc="metrics", unit="scenario", disable=args.json or len(files) < 2, file=sys.stderr):
        rollouts = load_rollouts(path)
        if rollouts.scenario_id not in scenarios:
            raise RolloutFileError(f"{path}: scenario {rollouts.scenario_id} is not in --data")
        scenario = scenarios[rollouts.scenario_id]
        check_rollouts(scenario, rollouts.object_ids, rollouts.trajectories, source=str(path))
        # Scored anyway (debug runs with fewer rollouts are useful), but said out loud.
        problem = submission_problem(rollouts)
        if problem:
            tqdm.write(
                f"closedloop metrics: warning: {path}: {problem}; `closedloop submit` would refuse it", file=sys.stderr
            )
        score = score_scenario(
            scenario, rollouts.object_ids, rollouts.trajectories, config=args.config, device=args.device
        )
        score.update(buckets(score, args.config))
        scores.append(score)
        if args.json:
            print(json.dumps(score), flush=True)
        else:
            print(f"{score['scenario_id']:<18}" + "".join(f"{score[c]:>17.4f}" for c in columns), flush=True)
    total = aggregate(scores)
    total.update(buckets(total, args.config))
    if args.json:
        print(json.dumps(total))
    else:
        print(f"\nWOSAC {args.config} metrics, mean over {len(scores)} scenarios:")
        for name in (*FIELDS, "kinematic", "interactive", "map_based"):
            print(f"  {name:<40}{total[name]:>10.4f}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from closedloop.metrics.rollouts import iter_rollout_files, load_rollouts
    from closedloop.metrics.submission import write_submission

    scenarios = None
    if args.data:
        from closedloop.data.womd import read_scenarios

        scenarios = {s.scenario_id: s for s in read_scenarios(args.data)}
    result = write_submission(
        (load_rollouts(p) for p in iter_rollout_files(args.rollouts)),
        args.out,
        method_name=args.method_name,
        authors=args.authors,
        account=args.account,
        affiliation=args.affiliation,
        description=args.description,
        method_link=args.method_link,
        num_model_parameters=args.num_model_parameters,
        scenarios=scenarios,
        scenarios_per_shard=args.scenarios_per_shard,
    )
    checked = "checked against --data" if scenarios else "shape-checked (pass --data for object checks)"
    print(f"wrote {args.out}: {result['scenarios']} scenarios in {len(result['shards'])} shards, {checked}")
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value}")
    return value


def _top_k(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: no top-k), not {value}")
    return value or None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
    return value


def _cmd_model_info(args: argparse.Namespace) -> int:
    import dataclasses

    from closedloop.agents.smart import MODEL_SIZES, SmartModel, count_parameters

    if args.model not in MODEL_SIZES:
        raise ValueError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_SIZES)}")
    config = MODEL_SIZES[args.model]
    info = {"model": args.model, "parameters": count_parameters(SmartModel(config)), **dataclasses.asdict(config)}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.model}: {info['parameters']:,} parameters")
        for key, value in dataclasses.asdict(config).items():
            print(f"  {key:<22}{value}")
    return 0


def _policy_and_dynamics(args: argparse.Namespace):
    """``(policy, dynamics, rollouts_together)`` from the policy flags that ``rollout`` and
    ``evaluate`` share: ``--policy``, ``--dynamics``, ``--vocabulary``, ``--chunk``,
    ``--seed``, ``--top-k``, ``--temperature``, ``--num-rollouts``, ``--rollouts-together``."""
    import numpy as np
    import torch

    from closedloop.agents.policy import load_policy
    from closedloop.envs.dynamics import make_dynamics

    vocabulary, motion_vocabulary = None, None
    if args.vocabulary and args.vocabulary.endswith(".safetensors"):
        from closedloop.agents.tokens import MotionVocabulary

        motion_vocabulary = MotionVocabulary.load(args.vocabulary)
        vocabulary = motion_vocabulary.table()
    elif args.vocabulary:
        vocabulary = torch.from_numpy(np.load(args.vocabulary, allow_pickle=False)).float()
    if args.policy.startswith("model:") and vocabulary is not None and motion_vocabulary is None:
        raise ValueError(f"--policy {args.policy} takes a .safetensors motion vocabulary, not {args.vocabulary}")
    policy = load_policy(
        args.policy, seed=args.seed, vocabulary=motion_vocabulary, top_k=args.top_k, temperature=args.temperature
    )
    if hasattr(policy, "make_dynamics"):  # a learned policy brings the dynamics its actions are for
        if args.dynamics is not None:
            raise ValueError(f"--policy {args.policy} drives its own dynamics: leave out --dynamics")
        return policy, policy.make_dynamics(), args.rollouts_together or args.num_rollouts
    dynamics = make_dynamics(args.dynamics or "delta_global", vocabulary=vocabulary, chunk=args.chunk)
    return policy, dynamics, args.rollouts_together or 1


def _cmd_rollout(args: argparse.Namespace) -> int:

    from closedloop.data.womd import read_scenarios
    from closedloop.envs.rollout import rollout_scenarios

    if args.ego_planner:
        return _rollout_planner(args)
    policy, dynamics, together = _policy_and_dynamics(args)
    scenarios = list(read_scenarios(args.data))
    results = rollout_scenarios(
        scenarios,
        policy,
        dynamics,
        args.num_rollouts,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        rollouts_together=together,
    )
    _write_rollouts(results, len(scenarios), args, f"policy {args.policy}, dynamics {dynamics.name}")
    return 0


def _rollout_planner(args: argparse.Namespace) -> int:
    """``rollout --ego-planner``: the planner drives the SDC, ``--policy`` the others."""

    from closedloop.data.womd import read_scenarios
    from closedloop.policy_eval import planner_rollouts

    scenarios = list(read_scenarios(args.data))
    results = planner_rollouts(
        scenarios,
        args.ego_planner,
        args.policy,
        num_rollouts=args.num_rollouts,
        ego=args.ego_dynamics,
        sim_dynamics=args.dynamics or "delta_global",
        device=args.device,
        seed=args.seed,
        top_k=args.top_k,
        temperature=args.temperature,
    )
    what = f"ego planner {args.ego_planner} ({args.ego_dynamics}), sim agents {args.policy}"
    _write_rollouts(results, len(scenarios), args, what)
    return 0


def _write_rollouts(results, total: int, args: argparse.Namespace, what: str) -> None:
    """Write ``rollout``'s files with a progress bar and say what was written."""
    from tqdm import tqdm

    from closedloop.envs.rollout import write_rollouts

    start = time.perf_counter()
    bar = tqdm(results, total=total, desc="rollout", unit="scenario", disable=args.quiet, file=sys.stderr)
    paths = write_rollouts(bar, args.out)
    print(
        f"wrote {len(paths)} rollout files ({args.num_rollouts} rollouts, {what}) to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )


def _spec_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, not {text!r}")
    return items


def _cmd_policy_eval(args: argparse.Namespace) -> int:
    from closedloop.data.womd import read_scenarios
    from closedloop.policy_eval import RESULT_FILE, evaluate_planners, json_ready, markdown_tables

    scenarios = list(read_scenarios(args.data))
    if not scenarios:
        raise ValueError(f"no scenarios in {' '.join(args.data)}")
    start = time.perf_counter()
    result = evaluate_planners(
        scenarios,
        args.planners,
        args.sim_agents,
        ground_truth=args.ground_truth,
        ego=args.ego_dynamics,
        sim_dynamics=args.sim_dynamics,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
        out=args.out,
    )
    for failure in result["failed"]:
        print(
            f"closedloop policy-eval: planner {failure['planner']} failed on scenario {failure['scenario_id']} "
            f"(sim agents {failure['sim_agent']}), left out: {failure['error']}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(json_ready(result)), flush=True)
        return 0
    print(markdown_tables(result))
    if result["failed"]:
        names = sorted({f["planner"] for f in result["failed"]})
        print(f"\nleft out (failed, see stderr): {', '.join(names)}")
    wrote = f"; wrote {RESULT_FILE}, values.csv and values.png to {args.out}" if args.out else ""
    print(
        f"\n{len(result['values'])} planners x {len(result['settings']['sim_agents'])} sim-agent models on "
        f"{len(scenarios)} scenarios in {time.perf_counter() - start:.1f} s{wrote}"
    )
    return 0


EVALUATE_COLUMNS = (
    ("metametric", "metametric"),
    ("min_average_displacement_error", "minADE"),
    ("kinematic", "kinematic"),
    ("interactive", "interactive"),
    ("map_based", "map_based"),
    ("collision_rate", "collision"),
    ("offroad_rate", "offroad"),
    ("red_light_rate", "red_light"),
)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from closedloop.data.womd import read_scenarios
    from closedloop.evaluate import RATES, RESULT_FILE, evaluate_policy
    from closedloop.metrics.config import FIELDS

    policy, dynamics, together = _policy_and_dynamics(args)
    scenarios = list(read_scenarios(args.data))
    if not scenarios:
        raise ValueError(f"no scenarios in {' '.join(args.data)}")

    def show(row: dict) -> None:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{row['scenario_id']:<18}" + "".join(f"{row[key]:>12.4f}" for key, _ in EVALUATE_COLUMNS), flush=True
            )

    if not args.json:
        print(f"{'scenario_id':<18}" + "".join(f"{title:>12}" for _, title in EVALUATE_COLUMNS), flush=True)
    start = time.perf_counter()
    result = evaluate_policy(
        scenarios,
        policy,
        dynamics,
        num_rollouts=args.num_rollouts,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        rollouts_together=together,
        config=args.config,
        out=args.out,
        progress=not args.quiet,
        settings={"policy": args.policy, "top_k": args.top_k, "temperature": args.temperature},
        on_scenario=show,
    )
    total = result["all"]
    if args.json:
        print(json.dumps(total), flush=True)
        return 0
    print(
        f"\nWOSAC {args.config} metrics of {args.policy} (dynamics {dynamics.name}, {args.num_rollouts} rollouts, "
        f"seed {args.seed}), mean over {len(result['scenarios'])} scenarios:"
    )
    for name in (*FIELDS, "kinematic", "interactive", "map_based"):
        print(f"  {name:<40}{total[name]:>10.4f}")
    print("events of the policy's agents, fraction of (agent, rollout) pairs with at least one, over all scenarios:")
    for name in RATES.values():
        print(f"  {name:<40}{total[name]:>10.4f}")
    if args.out:
        print(
            f"wrote {len(result['scenarios'])} rollout files and {RESULT_FILE} to {args.out} "
            f"in {time.perf_counter() - start:.1f} s"
        )
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    import dataclasses

    from closedloop.data.womd import read_scenarios
    from closedloop.envs.render import render_state, state_from_rollout, write_animation
    from closedloop.metrics.rollouts import iter_rollout_files, load_rollouts

    scenarios = {s.scenario_id: s for s in read_scenarios(args.data)}
    files = list(iter_rollout_files(args.rollouts))
    chosen = [load_rollouts(f) for f in files]
    if args.scenario:
        chosen = [r for r in chosen if r.scenario_id == args.scenario]
        if not chosen:
            raise ValueError(f"no rollouts for scenario {args.scenario} in {args.rollouts}")
    rollouts = chosen[0]
    if rollouts.scenario_id not in scenarios:
        raise ValueError(f"{rollouts.path}: scenario {rollouts.scenario_id} is not in --data")
    if not 0 <= args.rollout < rollouts.trajectories.shape[0]:
        raise ValueError(f"--rollout {args.rollout}: the file has {rollouts.trajectories.shape[0]} rollouts")
    final = state_from_rollout(
        scenarios[rollouts.scenario_id], rollouts.object_ids, rollouts.trajectories[args.rollout]
    )
    frames = [
        render_state(dataclasses.replace(final, t=t), size=args.size, ghosts=args.ghosts)
        for t in range(final.batch.current_time_index, final.num_steps)
    ]
    write_animation(frames, args.out, fps=args.fps)
    print(f"wrote {args.out}: {len(frames)} frames of scenario {rollouts.scenario_id}, rollout {args.rollout}")
    return 0


def _cmd_vocab_build(args: argparse.Namespace) -> int:
    from closedloop.agents.tokens import build_vocabulary
    from closedloop.data.womd import expand_paths, read_scenarios

    if not expand_paths(args.data):
        raise FileNotFoundError(f"no TFRecord files in {' '.join(args.data)}")
    start = time.perf_counter()
    vocab = build_vocabulary(
        read_scenarios(args.data),
        size=args.size,
        tolerance=args.tolerance,
        seed=args.seed,
        progress=not args.quiet,
        max_chunks=args.max_chunks,
        data=" ".join(args.data),
    )
    vocab.save(args.out)
    s = vocab.settings
    kinds = ", ".join(
        f"{kind} {s['tokens'][kind]} tokens from {s['chunks_used'][kind]} chunks"
        + (f" (of {s['chunks_collected'][kind]})" if s["subsampled"][kind] else "")
        for kind in s["tokens"]
    )
    print(
        f"wrote {args.out}: {kinds}; {s['scenarios']} scenarios, tolerance {args.tolerance} m, "
        f"seed {args.seed}, in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _cmd_vocab_eval(args: argparse.Namespace) -> int:
    from closedloop.agents.tokens import MotionVocabulary, default_vocabulary, evaluate_vocabulary
    from closedloop.data.womd import expand_paths, read_scenarios

    vocab = MotionVocabulary.load(args.vocab) if args.vocab else default_vocabulary()
    if not expand_paths(args.data):
        raise FileNotFoundError(f"no TFRecord files in {' '.join(args.data)}")
    result = evaluate_vocabulary(vocab, read_scenarios(args.data))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'kind':<12}{'tokens':>8}{'agents':>8}{'steps':>9}{'mean m':>10}{'p95 m':>10}")
    for (kind, row), size in zip(result.items(), vocab.sizes().tolist()):
        mean, p95 = row["mean_corner_error_m"], row["p95_corner_error_m"]
        cells = f"{mean:>10.4f}{p95:>10.4f}" if mean is not None else f"{'-':>10}{'-':>10}"
        print(f"{kind:<12}{size:>8}{row['agents']:>8}{row['steps']:>9}{cells}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from closedloop.demo import run_demo

    run_demo(data=args.data, out=Path(args.out), seed=args.seed, num_scenarios=args.num_scenarios)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="closedloop",
        description="Closed-loop training and evaluation of traffic agents on WOMD scenarios.",
    )
    parser.add_argument("--version", action="version", version=f"closedloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise the scenarios in WOMD TFRecord files")
    p.add_argument("paths", nargs="+", help="TFRecord files, directories or glob patterns")
    p.add_argument("--json", action="store_true", help="one JSON object per scenario")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("prepare", help="convert TFRecord shards into a fast, pickle-free cache")
    p.add_argument("--data", required=True, nargs="+", help="TFRecord files, dirs or globs")
    p.add_argument("--out", required=True, help="cache directory (resumable)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="what to do with corrupt records (skip counts and reports them)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    from closedloop.data.synthetic import TOWNS

    p = sub.add_parser("generate", help="write synthetic WOMD-format scenarios (TFRecord shards)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-scenarios", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument(
        "--agents",
        type=_parse_agents,
        default=(30, 60),
        metavar="MIN:MAX",
        help="range of the number of agents placed per scenario (default 30:60)",
    )
    p.add_argument("--town", choices=TOWNS, default="grid")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    from closedloop.envs.dynamics import DYNAMICS

    def policy_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, nargs="+", help="TFRecords, directories or globs")
        p.add_argument(
            "--policy",
            default="expert",
            metavar="NAME|model:SIZE|model:FILE|ckpt:RUN|module:attr|file.py:attr",
            help="log, expert, constant_velocity, idm; model:tiny|mini|nano|micro (an untrained tokenized model, "
            "weights from --seed); model:FILE.safetensors (trained weights); ckpt:RUN_DIR (a training run's "
            "latest checkpoint); or your policy: module:attr, path/to/file.py:attr or an entry point of "
            "closedloop.policies (default expert)",
        )
        p.add_argument(
            "--dynamics", choices=DYNAMICS, default=None, help="default delta_global; learned policies bring their own"
        )
        p.add_argument("--num-rollouts", type=positive_int, default=32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--top-k",
            type=_top_k,
            default=48,
            help="learned policies sample among the K most likely actions (default 48; 0: all of them)",
        )
        p.add_argument(
            "--temperature", type=_positive_float, default=1.0, help="learned policies' sampling temperature"
        )
        p.add_argument("--batch-size", type=positive_int, default=8, help="scenarios simulated together")
        p.add_argument("--chunk", type=int, default=5, help="steps per action for --dynamics trajectory")
        p.add_argument(
            "--vocabulary",
            help="a motion vocabulary (.safetensors, from closedloop vocab build) for --dynamics tokens or model: "
            "policies, or a .npy array [V, k, 3]",
        )
        p.add_argument(
            "--rollouts-together",
            type=positive_int,
            default=None,
            help="rollouts of a scenario simulated in one batch (default: 1, all of them for learned policies)",
        )
        p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        threads_flag(p)

    from closedloop.agents.planners.episode import EGO_DYNAMICS

    p = sub.add_parser("rollout", help="roll a policy out and write rollout files")
    policy_flags(p)
    p.add_argument("--out", required=True, help="directory for <scenario_id>.npz files")
    p.add_argument(
        "--ego-planner",
        metavar="SPEC",
        help="a planner drives the SDC (rs_J{j}_D{d}, module:attr, path/to/file.py:attr or an entry point of "
        "closedloop.planners) and --policy the other agents (log: log playback)",
    )
    p.add_argument("--ego-dynamics", choices=EGO_DYNAMICS, default="bicycle", help="the planner's dynamics")
    p.set_defaults(func=_cmd_rollout)

    p = sub.add_parser(
        "evaluate", help="roll a policy out and score it: WOSAC metrics and collision/off-road/red-light rates"
    )
    policy_flags(p)
    p.add_argument("--config", choices=("2025", "2024"), default="2025", help="the WOSAC metrics config")
    p.add_argument("--json", action="store_true", help="one JSON object per scenario, then ALL")
    p.add_argument("--out", help="also write <scenario_id>.npz rollout files and evaluation.json here")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "policy-eval",
        help="value planners under sim-agent models; rank correlation and error against the ground truth",
    )
    p.add_argument("--data", required=True, nargs="+", help="TFRecords, directories or globs")
    p.add_argument(
        "--planners",
        required=True,
        type=_spec_list,
        metavar="random_shooting[,SPEC...]",
        help="comma-separated: random_shooting (the 64 rs_J{j}_D{d}), rs_J{j}_D{d}, module:attr, "
        "path/to/file.py:attr or entry points of closedloop.planners",
    )
    p.add_argument(
        "--sim-agents",
        type=_spec_list,
        default=["log", "constant_velocity", "idm"],
        metavar="log,constant_velocity,idm[,ckpt:RUN_DIR...]",
        help="comma-separated sim-agent models: log (playback) or any rollout --policy spec",
    )
    p.add_argument("--ground-truth", default="log", help="the sim-agent model the others are compared with")
    p.add_argument("--ego-dynamics", choices=EGO_DYNAMICS, default="bicycle", help="the planners' dynamics")
    p.add_argument(
        "--sim-dynamics",
        choices=[name for name in DYNAMICS if name != "tokens"],
        default="delta_global",
        help="baseline sim agents' dynamics (learned ones bring their own)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="(planner, scenario) rows simulated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--json", action="store_true", help="one JSON object: values, spearman, mae, failed")
    p.add_argument("--out", help="write policy_eval.json, values.csv and values.png here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    threads_flag(p)
    p.set_defaults(func=_cmd_policy_eval)

    p = sub.add_parser("model-info", help="the size of a tokenized traffic model")
    p.add_argument("--model", required=True, help="tiny, mini, nano or micro")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_info)

    p = sub.add_parser("render", help="animate a rollout (GIF, or MP4 with imageio-ffmpeg)")
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--rollouts", required=True, help="a rollout .npz or a directory of them")
    p.add_argument("--out", required=True, help="file.gif or file.mp4")
    p.add_argument("--scenario", help="which scenario (default: the first rollout file)")
    p.add_argument("--rollout", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--ghosts", action="store_true", help="also draw the logged positions")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("metrics", help="score rollouts with the WOSAC realism metrics")
    p.add_argument("--data", required=True, nargs="+", help="the scenarios (TFRecords, dirs, globs)")
    p.add_argument("--rollouts", required=True, help="a rollout .npz or a directory of them")
    p.add_argument("--config", choices=("2025", "2024"), default="2025")
    p.add_argument("--json", action="store_true", help="one JSON object per scenario, then ALL")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("submit", help="pack rollouts as a WOSAC challenge submission (.tar.gz)")
    p.add_argument("--rollouts", required=True, help="a directory of rollout .npz files")
    p.add_argument("--out", required=True, help="the .tar.gz to write")
    p.add_argument("--method-name", required=True)
    p.add_argument("--authors", required=True, nargs="+")
    p.add_argument("--account", required=True, help="the Waymo Open Dataset account e-mail")
    p.add_argument("--affiliation", default="")
    p.add_argument("--description", default="")
    p.add_argument("--method-link", default="")
    p.add_argument("--num-model-parameters", default="")
    p.add_argument("--data", nargs="+", help="the scenarios, to check every object valid at step 10")
    p.add_argument("--scenarios-per-shard", type=int, default=1000)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("demo", help="run the pipeline end to end on the default data")
    p.add_argument("--data", nargs="+", help="WOMD TFRecords to use instead of synthetic data")
    p.add_argument("--out", default="closedloop_demo", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-scenarios", type=int, default=8, help="synthetic scenarios to generate when --data is not given"
    )
    threads_flag(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("vocab", help="motion token vocabularies: build (k-disk) and evaluate")
    vsub = p.add_subparsers(dest="vocab_command", required=True)
    p = vsub.add_parser("build", help="k-disk motion vocabularies (one per agent kind) from logged scenarios")
    p.add_argument("--data", required=True, nargs="+", help="TFRecords, directories or globs")
    p.add_argument("--size", type=int, default=2048, help="tokens per kind at most (default 2048)")
    p.add_argument("--tolerance", type=float, default=0.05, help="k-disk radius in metres (mean corner distance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--max-chunks",
        type=int,
        default=1_000_000,
        help="a uniform random sample of at most this many chunks per kind is clustered (default 1000000)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_vocab_build)
    p = vsub.add_parser("eval", help="corner error of the sequential tokenization of logged trajectories")
    p.add_argument("--vocab", help="a vocabulary .safetensors file (default: the shipped one)")
    p.add_argument("--data", required=True, nargs="+", help="TFRecords, directories or globs")
    p.add_argument("--json", action="store_true", help="one JSON object: per kind agents, mean and p95 (m)")
    p.set_defaults(func=_cmd_vocab_eval)

    from closedloop.trainers.cli import add_parser as add_train_parser

    add_train_parser(sub)
    return parser


SIMULATION_THREADS = 1


def threads_flag(p: argparse.ArgumentParser, default: int | None = SIMULATION_THREADS) -> None:
    """``--threads N``: torch's intra-op threads for the command.

    Simulation is hundreds of small tensor operations per step, where a second thread
    gains 1.2-1.5x on an idle machine and, on a busy one, makes each operation wait for a
    core: with both cores of the 2-core machine kept busy, the simulator at B=1 ran 98x
    slower with 2 threads than with 1 (``scripts/bench_sim.py --threads-under-load``). So the commands that
    simulate default to 1 thread; the shared-loop trainers (large matrix products) keep
    torch's default (``train ppo``, which mostly steps the simulator, defaults to 1)."""
    what = f"default {default}" if default else "default: torch's, one per core"
    p.add_argument("--threads", type=positive_int, default=default, help=f"torch CPU threads ({what})")


def main(argv: list[str] | None = None) -> int:
    from closedloop.data.tfrecord import TFRecordError
    from closedloop.data.womd import ScenarioDecodeError

    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (TFRecordError, ScenarioDecodeError, FileNotFoundError, ValueError, KeyError) as err:
        # Rollout and metric input errors are ValueErrors too; they name the file at fault.
        print(f"closedloop {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
