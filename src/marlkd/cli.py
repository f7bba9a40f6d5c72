"""The ``marlkd`` command: one subcommand per step of the workflow.

This module parses arguments and prints; the work happens in the library.
Bad input ends with one line naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from marlkd.errors import UserError
from marlkd.schema import add_arguments, overrides_from_args

logger = logging.getLogger("marlkd")


# ----------------------------------------------------------------- scenario
def add_worker_args(parser: argparse.ArgumentParser, section: str) -> None:
    """--workers and --ray-address, setting ``{section}workers`` and the address."""
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"collect on N Ray workers, one simulation each ({section}workers; "
        "default 0: in this process, without Ray); may change on --resume",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="collect on the Ray cluster at ADDR, e.g. auto; without --workers, "
        f"one worker per free CPU ({section}ray_address)",
    )


def add_scenario_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick a scenario and set up its environment."""
    from marlkd.envs.traffic.env import TrafficEnvConfig

    group = parser.add_argument_group("scenario")
    group.add_argument(
        "--scenario",
        default=None,
        help="a built-in scenario (see `marlkd scenarios`); default grid4x4",
    )
    group.add_argument("--net", help="a SUMO network file (.net.xml) of your own")
    group.add_argument(
        "--routes", help="route files for --net, comma-separated (.rou.xml)"
    )
    group.add_argument(
        "--begin", type=float, help="simulation start in seconds (with --net)"
    )
    group.add_argument(
        "--end", type=float, help="simulation end in seconds (with --net)"
    )
    group.add_argument("--sumocfg", help="a SUMO configuration file (.sumocfg)")
    env_group = parser.add_argument_group("environment")
    add_arguments(env_group, TrafficEnvConfig, skip=("sumo_args",))


def scenario_from_args(args: argparse.Namespace, default: str = "grid4x4"):
    """The scenario the flags name: a built-in, --net/--routes or --sumocfg."""
    from marlkd.envs.traffic import scenarios

    chosen = [
        flag
        for flag, given in (
            ("--scenario", args.scenario),
            ("--net", args.net or args.routes),
            ("--sumocfg", args.sumocfg),
        )
        if given
    ]
    if len(chosen) > 1:
        raise UserError(
            f"{' and '.join(chosen)} both name a scenario: give only one of "
            "--scenario, --net/--routes or --sumocfg"
        )
    if args.sumocfg:
        return scenarios.scenario_from_sumocfg(Path(args.sumocfg))
    if args.net or args.routes:
        if not (args.net and args.routes):
            raise UserError(
                "--net and --routes go together: pass the network with --net and its"
                " demand with --routes FILE[,FILE]"
            )
        routes = [Path(r) for r in args.routes.split(",") if r]
        return scenarios.user_scenario(Path(args.net), routes, args.begin, args.end)
    if args.begin is not None or args.end is not None:
        raise UserError("--begin and --end apply to --net/--routes scenarios only")
    return scenarios.get_scenario(args.scenario or default)


def env_config_from_args(args: argparse.Namespace, base=None):
    from marlkd.envs.traffic.env import TrafficEnvConfig
    from marlkd.schema import from_dict, to_dict

    data = to_dict(base) if base is not None else {}
    data.update(overrides_from_args(args, TrafficEnvConfig))
    config = from_dict(TrafficEnvConfig, data, "env")
    config.validate()
    return config


# --------------------------------------------------------------- commands
def cmd_scenarios(args: argparse.Namespace) -> int:
    from marlkd.envs.traffic.scenarios import list_scenarios

    rows = list_scenarios()
    width = max(len(name) for name, _, _ in rows)
    print(f"{'scenario':<{width}}  signals  description")
    for name, signals, description in rows:
        print(f"{name:<{width}}  {signals:>7}  {description}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from marlkd.envs.traffic.env import TrafficSignalEnv
    from marlkd.evaluate import format_table, simulate
    from marlkd.teachers import make_controller

    if args.episodes < 1:
        raise UserError(f"--episodes is {args.episodes}: run at least 1 episode")
    scenario = scenario_from_args(args)
    config = env_config_from_args(args)
    env = TrafficSignalEnv(scenario, config)
    try:
        controller = make_controller(args.controller, env, seed=args.seed)
        result = simulate(
            env, controller, episodes=args.episodes, seed=args.seed, progress=True
        )
    finally:
        env.close()

    result = {
        "scenario": scenario.name,
        "controller": args.controller,
        "signals": len(env.possible_agents),
        **result,
    }
    rows = [(f"seed {e['seed']}", e) for e in result["episodes"]]
    rows.append(("mean", result["mean"]))
    print(f"{args.controller} on {scenario.name} ({len(env.possible_agents)} signals)")
    print(format_table(rows))
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def config_from_args(args: argparse.Namespace, schema=None):
    """The run configuration: preset, then scenario and other flags, then --set."""
    from marlkd.config import load_config
    from marlkd.envs.traffic.env import TrafficEnvConfig

    # Values are read as YAML: JSON-quote file names so that one holding, say,
    # ": " or " #" stays the text it is.
    overrides = []
    if args.sumocfg:
        overrides += [
            "scenario.name=null",
            f"scenario.sumocfg={json.dumps(args.sumocfg)}",
        ]
    elif args.net or args.routes:
        if not (args.net and args.routes):
            raise UserError(
                "--net and --routes go together: pass the network with --net and its"
                " demand with --routes FILE[,FILE]"
            )
        routes = [r for r in args.routes.split(",") if r]
        overrides += [
            "scenario.name=null",
            f"scenario.net={json.dumps(args.net)}",
            f"scenario.routes={json.dumps(routes)}",
        ]
        for key in ("begin", "end"):
            if getattr(args, key) is not None:
                overrides.append(f"scenario.{key}={getattr(args, key)}")
    elif args.scenario:
        overrides.append(f"scenario.name={json.dumps(args.scenario)}")
    for key, value in overrides_from_args(args, TrafficEnvConfig).items():
        overrides.append(f"env.{key}={json.dumps(value)}")
    if getattr(args, "teacher", None):
        overrides.append(f"teacher={json.dumps(args.teacher)}")
    if getattr(args, "method", None):
        overrides.append(f"collect.method={args.method}")
    # a distillation run's workers are collect settings, a teacher's its own
    sections = {f.name for f in dataclasses.fields(schema)} if schema else {"collect"}
    where = "collect." if "collect" in sections else ""
    if getattr(args, "workers", None) is not None:
        overrides.append(f"{where}workers={args.workers}")
    if getattr(args, "ray_address", None):
        overrides.append(f"{where}ray_address={json.dumps(args.ray_address)}")
    overrides += args.set or []
    return load_config(Path(args.config) if args.config else None, overrides, schema)


def prepare_run_dir(out: str | None, config, resume: bool) -> Path:
    import time

    if out is None:
        if resume:
            raise UserError("--resume needs --out RUN_DIR: the run folder to continue")
        scenario = (
            config.scenario.name
            or Path(config.scenario.net or config.scenario.sumocfg).name.split(".")[0]
        )
        teacher = Path(config.teacher).stem
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = f"runs/{scenario}-{teacher}-{config.collect.method}-{stamp}"
    run_dir = Path(out)
    started = (run_dir / "progress.json").exists() or (run_dir / "dataset").exists()
    if resume and not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} holds no run to resume: drop --resume to start one")
    if started and not resume:
        raise UserError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose"
            " another --out"
        )
    return run_dir


def cmd_distill(args: argparse.Namespace) -> int:
    from marlkd.config import load_config
    from marlkd.distill.dagger import distill
    from marlkd.evaluate import evaluate_run

    _one_thread_for_small_networks()

    if args.resume and args.out and (Path(args.out) / "config.yaml").exists():
        config = load_config(Path(args.out) / "config.yaml")
        ignored = [
            flag
            for flag, value in (
                ("--config", args.config),
                ("--teacher", args.teacher),
                ("--method", args.method),
                ("--set", args.set),
                ("--scenario", args.scenario),
                ("--net", args.net),
                ("--sumocfg", args.sumocfg),
            )
            if value
        ]
        if ignored:
            logger.warning(
                "--resume continues the run as %s/config.yaml sets it; ignoring %s",
                args.out,
                ", ".join(ignored),
            )
        # where episodes run does not change the data: these may differ
        if args.workers is not None:
            config.collect.workers = args.workers
        if args.ray_address:
            config.collect.ray_address = args.ray_address
        config.validate()
    else:
        config = config_from_args(args)
    run_dir = prepare_run_dir(args.out, config, args.resume)
    distill(config, run_dir, resume=args.resume)
    print(f"student written to {run_dir / 'checkpoints' / 'student.pt'}")
    if args.eval:
        report = evaluate_run(run_dir)
        print(report["table"])
        print(f"results in {run_dir / 'results.json'}")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from marlkd.config import TeacherConfig, load_config
    from marlkd.rl.train import train_teacher

    _one_thread_for_small_networks()

    if args.resume:
        if not args.out or not (Path(args.out) / "config.yaml").exists():
            raise UserError("--resume needs --out RUN_DIR of a started train-teacher")
        config = load_config(Path(args.out) / "config.yaml", schema=TeacherConfig)
        # where episodes run does not change the data: these may differ
        if args.workers is not None:
            config.workers = args.workers
        if args.ray_address:
            config.ray_address = args.ray_address
        config.validate()
    else:
        config = config_from_args(args, TeacherConfig)
    out = args.out or "runs/{}-{}-{}-{}".format(
        config.scenario.name or "user",
        config.network.kind,
        config.algorithm,
        time.strftime("%Y%m%d-%H%M%S"),
    )
    run_dir = Path(out)
    if (run_dir / "checkpoints").exists() and not args.resume:
        raise UserError(
            f"{run_dir} already holds a train-teacher run: pass --resume to continue"
            " it, or choose another --out"
        )
    report = train_teacher(config, run_dir)
    print(report["table"])
    print(f"network written to {run_dir / 'checkpoints' / 'student.pt'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from marlkd.evaluate import evaluate_run

    _one_thread_for_small_networks()

    report = evaluate_run(
        Path(args.run_dir),
        episodes=args.episodes,
        demand_scale=args.demand_scale,
        seed=args.seed,
    )
    print(
        f"{report['scenario']}, demand x{report['demand_scale']:g}, "
        f"seeds {report['seeds'][0]}-{report['seeds'][-1]}"
    )
    print(report["table"])
    if args.json:
        write_json(Path(args.json), {k: v for k, v in report.items() if k != "table"})
        print(f"wrote {args.json}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from marlkd.config import TeacherConfig, load_config, to_commented_yaml

    schema = TeacherConfig if args.teacher else None
    config = load_config(Path(args.config) if args.config else None, args.set, schema)
    print(to_commented_yaml(config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """MaxPressure teacher -> DAgger student -> evaluation, on the default scenario."""
    from marlkd.config import load_config
    from marlkd.distill.dagger import distill
    from marlkd.evaluate import evaluate_run

    _one_thread_for_small_networks()

    config = load_config(None, args.set)
    run_dir = prepare_run_dir(args.out, config, resume=False)
    c = config.collect
    print(
        f"marlkd demo: distilling {config.teacher} into a {config.student.kind} "
        f"student on {config.scenario.name} by {c.method} "
        f"({c.iterations} rounds of {c.episodes_per_iteration} simulated hour)"
    )
    distill(config, run_dir)
    report = evaluate_run(run_dir)
    print(
        f"\nheld-out seeds {report['seeds'][0]}-{report['seeds'][-1]} "
        f"on {report['scenario']}:"
    )
    print(report["table"])
    print(f"\nrun folder: {run_dir} (results.json, results.md, metrics.csv)")
    return 0


def write_json(path: Path, data) -> None:
    """Write JSON atomically: a reader sees the old file or the new, never half."""
    from marlkd.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from marlkd import __version__
    from marlkd.teachers import CONTROLLERS

    parser = argparse.ArgumentParser(
        prog="marlkd",
        description="Distil costly multi-agent experts into small decentralized "
        "students.",
    )
    parser.add_argument("--version", action="version", version=f"marlkd {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scenarios", help="list the built-in scenarios")
    p.set_defaults(func=cmd_scenarios)

    p = sub.add_parser(
        "simulate", help="run a rule-based controller and report traffic metrics"
    )
    add_scenario_args(p)
    p.add_argument(
        "--controller",
        default="max-pressure",
        help=f"one of {', '.join(CONTROLLERS)} (default max-pressure)",
    )
    p.add_argument(
        "--episodes", type=int, default=1, help="episodes to run (default 1)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the first episode; then +1 each"
    )
    p.add_argument("--json", help="write per-episode and mean metrics to this file")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("distill", help="distil a teacher into decentralized students")
    p.add_argument("--config", help="a YAML preset (see configs/); defaults otherwise")
    add_scenario_args(p)
    p.add_argument(
        "--teacher", help="max-pressure, fixed, random, or a student checkpoint (.pt)"
    )
    p.add_argument("--method", choices=["bc", "dagger"], help="collection method")
    p.add_argument("--out", help="run folder (default runs/<scenario>-<teacher>-...)")
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --out"
    )
    add_worker_args(p, "collect.")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.epochs=20 (repeatable)",
    )
    p.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the student on held-out seeds at the end (default on)",
    )
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "train-teacher",
        help="train a network by RL (DQN or PPO): a large teacher or a from-scratch "
        "baseline",
    )
    p.add_argument("--config", help="a YAML preset (see `marlkd config --teacher`)")
    add_scenario_args(p)
    p.add_argument(
        "--out",
        help="run folder (default runs/<scenario>-<network>-<algorithm>-<time>)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last finished episode",
    )
    add_worker_args(p, "")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key"
    )
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser(
        "evaluate", help="compare teacher, student and baselines of a run"
    )
    p.add_argument("run_dir", help="the run folder written by `marlkd distill`")
    p.add_argument("--episodes", type=int, help="episodes per controller")
    p.add_argument(
        "--demand-scale", type=float, help="scale the demand, e.g. 1.3 (unseen)"
    )
    p.add_argument("--seed", type=int, help="first held-out seed")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=cmd_evaluate)

    from marlkd.export import add_deploy_args, add_export_args, cmd_deploy, cmd_export
    from marlkd.report import add_report_args, cmd_report

    p = sub.add_parser(
        "export", help="write the students as ONNX or TorchScript files with metadata"
    )
    add_export_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "deploy",
        help="run exported students as the signal controllers, without PyTorch",
    )
    add_deploy_args(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "report",
        help="write report.html: learning curves, delay per intersection, queues, map",
    )
    add_report_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "config", help="print a run configuration as YAML, a comment on every key"
    )
    p.add_argument("--config", help="a YAML preset to start from")
    p.add_argument(
        "--teacher",
        action="store_true",
        help="the configuration of `train-teacher` instead of `distill`",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key"
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "demo", help="the main job: MaxPressure -> DAgger student -> evaluation"
    )
    p.add_argument("--out", help="run folder (default runs/grid4x4-...)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def _one_thread_for_small_networks() -> None:
    """Run PyTorch on one thread.

    marlkd's networks are a few thousand parameters and share the machine with
    SUMO: spreading such small operations over threads costs more than it
    saves, and on a busy two-core machine it can slow training tenfold.
    """
    import os

    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        import torch
    except ImportError:  # the runtime needs no torch
        return
    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except UserError as exc:
        print(f"marlkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("marlkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
