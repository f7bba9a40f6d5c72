"""The ``marlkd`` command: one subcommand per step of the workflow.

This module parses arguments and prints; the work happens in the library.
Bad input ends with one line naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from marlkd.errors import UserError
from marlkd.schema import add_arguments, overrides_from_args

logger = logging.getLogger("marlkd")


# ----------------------------------------------------------------- scenario
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
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
