"""Overhead of the traffic environment over SUMO's own simulation step.

SUMO's simulation is the floor, so the figure is the environment's overhead:
the wall time spent in ``env.reset``/``env.step`` outside SUMO's
``simulationStep``, as a share of the time inside it,

    overhead = (env wall time - time inside simulationStep) / time inside it,

over one simulated hour of each net, driven by MaxPressure and by random
actions. The controller's own decision time is measured apart and is not part
of the environment's time. libsumo's ``start`` and ``close`` happen outside the
step and count as overhead; the share without them is printed as well.

sumo-rl (1.4.5, libsumo, multi-agent ``SumoEnvironment``) is measured the same
way on the same net, routes and seed, with random actions, in its own venv
(``bench/.venv-sumo-rl``, see ``bench/requirements-sumo-rl.txt``): it needs
PettingZoo < 1.25 and marlkd needs >= 1.25. Plain ``sumo`` running the net's
own signal programs on the same routes gives the reference time.

Every run is a fresh process; the runs of one repeat are interleaved across
nets and sides, and each figure is the median over the repeats.

Usage::

    make bench-env
    .venv/bin/python bench/env_overhead.py [--nets grid4x4 arterial4 city]
        [--repeats 3] [--seed 0] [--no-sumo-rl] [--json bench/out/env.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMO_RL_PYTHON = ROOT / "bench" / ".venv-sumo-rl" / "bin" / "python"
SETTINGS = {"delta_time": 10, "yellow_time": 3, "min_green": 5}


# ---------------------------------------------------------------- workers
def run_marlkd(net: str, controller: str, seed: int) -> dict:
    """One episode of marlkd's env; runs in the main venv."""
    from marlkd.envs.traffic import env as env_module
    from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
    from marlkd.envs.traffic.scenarios import get_scenario
    from marlkd.teachers import make_controller

    config = TrafficEnvConfig(teleport_time=-1.0, **SETTINGS)
    env = TrafficSignalEnv(get_scenario(net), config)
    policy = make_controller(controller, env, seed)

    # Where the time outside the step goes: SUMO calls made between steps
    # (lane reads, signal states) and the episode-end parse of SUMO's outputs.
    # One timed wrapper per call; the rest is the env's own Python.
    parts = {"lane_reads_s": 0.0, "signal_sets_s": 0.0, "episode_metrics_s": 0.0}

    def timed(function, key):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[key] += time.perf_counter() - start

        return call

    env._read_lanes = timed(env._read_lanes, "lane_reads_s")
    env._set_state = timed(env._set_state, "signal_sets_s")
    metrics = env_module.traffic_metrics
    metrics.episode_metrics = timed(metrics.episode_metrics, "episode_metrics_s")
    env_s = controller_s = 0.0
    decisions = 0

    start = time.perf_counter()
    obs, infos = env.reset(seed=seed)
    env_s += time.perf_counter() - start
    while env.agents:
        start = time.perf_counter()
        actions = policy(obs, {a: infos[a]["action_mask"] for a in obs})
        controller_s += time.perf_counter() - start

        start = time.perf_counter()
        obs, _, _, _, infos = env.step(actions)
        env_s += time.perf_counter() - start
        decisions += 1
    timers = dict(env.timers)
    env.close()
    return {
        "env_s": env_s,
        "inside_s": timers["sumo_step_s"],
        "start_close_s": timers["sumo_start_s"] + timers["sumo_close_s"],
        "controller_s": controller_s,
        "decisions": decisions,
        "agents": len(env.possible_agents),
        **parts,
    }


def run_sumo_rl(net_file: str, routes: str, begin: float, seconds: float, seed: int):
    """One episode of sumo-rl with random actions; runs in sumo-rl's venv."""
    os.environ["LIBSUMO_AS_TRACI"] = "1"
    import numpy as np
    import sumo

    os.environ.setdefault("SUMO_HOME", sumo.SUMO_HOME)
    import traci  # libsumo itself, as LIBSUMO_AS_TRACI asks
    from sumo_rl import SumoEnvironment

    env = SumoEnvironment(
        net_file=net_file,
        route_file=routes,
        begin_time=int(begin),
        num_seconds=int(seconds),
        time_to_teleport=-1,
        single_agent=False,
        sumo_seed=seed,
        sumo_warnings=False,
        **SETTINGS,
    )

    # sumo-rl calls traci.simulationStep(), traci.start() and traci.close():
    # time them where marlkd's env times its own calls.
    timers = {"step": 0.0, "start_close": 0.0}

    def timed(function, key):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timers[key] += time.perf_counter() - start

        return call

    traci.simulationStep = timed(traci.simulationStep, "step")
    traci.start = timed(traci.start, "start_close")
    traci.close = timed(traci.close, "start_close")

    rng = np.random.default_rng(seed)
    sizes = {ts: env.action_spaces(ts).n for ts in env.ts_ids}
    env_s = controller_s = 0.0
    decisions = 0

    start = time.perf_counter()
    obs = env.reset(seed=seed)
    env_s += time.perf_counter() - start
    done = False
    while not done:
        start = time.perf_counter()
        actions = {ts: int(rng.integers(sizes[ts])) for ts in obs}
        controller_s += time.perf_counter() - start

        start = time.perf_counter()
        obs, _, dones, _ = env.step(actions)
        env_s += time.perf_counter() - start
        done = dones["__all__"]
        decisions += 1
    start = time.perf_counter()
    env.close()  # marlkd closes SUMO inside its last step
    env_s += time.perf_counter() - start
    return {
        "env_s": env_s,
        "inside_s": timers["step"],
        "start_close_s": timers["start_close"],
        "controller_s": controller_s,
        "decisions": decisions,
        "agents": len(env.ts_ids),
    }


# ------------------------------------------------------------------ driver
def spawn(python: Path | str, worker: str, pythonpath=None, **kwargs) -> dict:
    command = [str(python), __file__, "--worker", worker, json.dumps(kwargs)]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{worker} run failed ({kwargs}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(ref: str) -> Path:
    """Today's marlkd with the env module as it was at git ``ref``."""
    root = Path(tempfile.mkdtemp(prefix="marlkd-bench-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    shutil.copytree(ROOT / "src" / "marlkd", root / "marlkd")
    old = subprocess.run(
        ["git", "show", f"{ref}:src/marlkd/envs/traffic/env.py"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    (root / "marlkd" / "envs" / "traffic" / "env.py").write_text(old)
    return root


def plain_sumo(sumo: str, net_file: str, routes: str, begin, end, seed) -> float:
    """Wall seconds of a ``sumo`` process on the net's own programs."""
    command = [
        sumo, "-n", net_file, "-r", routes, "-b", f"{begin:g}", "-e", f"{end:g}",
        "--seed", str(seed), "--time-to-teleport", "-1", "--no-step-log", "true",
        "--no-warnings", "true", "--duration-log.disable", "true",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def share(run: dict, with_start_close: bool = True) -> float:
    outside = run["env_s"] - run["inside_s"]
    if not with_start_close:
        outside -= run["start_close_s"]
    return outside / run["inside_s"]


def median(runs: list[dict], value) -> float:
    return statistics.median(value(r) for r in runs)


def machine() -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def table(nets, controllers, runs, plain) -> str:
    """The headline table: overhead shares side by side, and the seconds."""
    baseline = any(side == "baseline" for side, _, _ in runs)
    header = [
        "net", "controller", "marlkd overhead", "without start/close",
        "sumo-rl overhead (random)", "without start/close", "marlkd / sumo-rl",
        "marlkd inside step s", "marlkd env s", "controller s",
        "sumo-rl inside step s", "sumo-rl env s", "plain sumo s",
    ]  # fmt: skip
    if baseline:
        header += ["env before overhead", "without start/close"]
    lines = [row(header), row(["---"] * len(header))]
    for net in nets:
        theirs = runs.get(("sumo-rl", net, "random"), [])
        for controller in controllers:
            ours = runs[("marlkd", net, controller)]
            cells = [
                net,
                controller,
                f"{median(ours, share):.1%}",
                f"{median(ours, lambda r: share(r, False)):.1%}",
            ]
            if theirs:
                ratio = median(ours, share) / median(theirs, share)
                cells += [
                    f"{median(theirs, share):.1%}",
                    f"{median(theirs, lambda r: share(r, False)):.1%}",
                    f"{ratio:.2f}",
                ]
            else:
                cells += ["n/a"] * 3
            cells += [
                f"{median(ours, lambda r: r['inside_s']):.2f}",
                f"{median(ours, lambda r: r['env_s']):.2f}",
                f"{median(ours, lambda r: r['controller_s']):.3f}",
            ]
            if theirs:
                cells += [
                    f"{median(theirs, lambda r: r['inside_s']):.2f}",
                    f"{median(theirs, lambda r: r['env_s']):.2f}",
                ]
            else:
                cells += ["n/a"] * 2
            cells.append(f"{statistics.median(plain[net]):.2f}")
            if baseline:
                before = runs[("baseline", net, controller)]
                cells += [
                    f"{median(before, share):.1%}",
                    f"{median(before, lambda r: share(r, False)):.1%}",
                ]
            lines.append(row(cells))
    return "\n".join(lines)


def breakdown(nets, controllers, runs) -> str:
    """marlkd's overhead split into SUMO calls, the episode-end parse and Python."""
    header = [
        "net", "controller", "decisions", "lane reads", "signal sets",
        "start/close", "episode metrics", "env's Python", "total",
    ]  # fmt: skip
    lines = [row(header), row(["---"] * len(header))]
    for net in nets:
        for controller in controllers:
            ours = runs[("marlkd", net, controller)]

            def part(key, ours=ours):
                return f"{median(ours, lambda r: r[key] / r['inside_s']):.1%}"

            def python(r):
                sumo_calls = r["lane_reads_s"] + r["signal_sets_s"] + r["start_close_s"]
                outside = r["env_s"] - r["inside_s"] - sumo_calls
                return (outside - r["episode_metrics_s"]) / r["inside_s"]

            lines.append(
                row(
                    [
                        net,
                        controller,
                        str(ours[0]["decisions"]),
                        part("lane_reads_s"),
                        part("signal_sets_s"),
                        part("start_close_s"),
                        part("episode_metrics_s"),
                        f"{median(ours, python):.1%}",
                        f"{median(ours, share):.1%}",
                    ]
                )
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["grid4x4", "arterial4", "city"])
    parser.add_argument("--controllers", nargs="+", default=["max-pressure", "random"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sumo-rl", action="store_true", help="skip sumo-rl")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure the env module as it was at this git commit",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()

    if args.worker:
        kwargs = json.loads(rest[0])
        worker = run_marlkd if args.worker == "marlkd" else run_sumo_rl
        print(json.dumps(worker(**kwargs)))
        return

    from marlkd.envs.traffic import sumo as sumo_api
    from marlkd.envs.traffic.scenarios import get_scenario

    with_sumo_rl = not args.no_sumo_rl
    if with_sumo_rl and not SUMO_RL_PYTHON.exists():
        sys.exit(
            f"sumo-rl's venv is missing ({SUMO_RL_PYTHON}): run `make bench-env`, "
            "or create it with `python3 -m venv bench/.venv-sumo-rl && "
            "bench/.venv-sumo-rl/bin/python -m pip install -r "
            "bench/requirements-sumo-rl.txt`, or pass --no-sumo-rl"
        )
    sumo = sumo_api.binary("sumo")
    files = {}
    for net in args.nets:  # build nets and routes now, not inside a timed reset
        scenario = get_scenario(net)
        routes = ",".join(str(r) for r in scenario.route_files(args.seed))
        files[net] = (str(scenario.net_file), routes, scenario.begin, scenario.end)

    runs: dict[tuple[str, str, str], list[dict]] = {}
    plain: dict[str, list[float]] = {net: [] for net in args.nets}
    load_at_start = load()
    baseline = baseline_tree(args.baseline) if args.baseline else None
    for repeat in range(args.repeats):
        for net in args.nets:
            net_file, routes, begin, end = files[net]
            print(f"repeat {repeat + 1}/{args.repeats}: {net}", file=sys.stderr)
            for controller in args.controllers:
                run = spawn(
                    sys.executable, "marlkd", net=net, controller=controller,
                    seed=args.seed,
                )  # fmt: skip
                runs.setdefault(("marlkd", net, controller), []).append(run)
                if baseline:
                    run = spawn(
                        sys.executable, "marlkd", pythonpath=baseline, net=net,
                        controller=controller, seed=args.seed,
                    )  # fmt: skip
                    runs.setdefault(("baseline", net, controller), []).append(run)
            if with_sumo_rl:
                run = spawn(
                    SUMO_RL_PYTHON, "sumo-rl", net_file=net_file, routes=routes,
                    begin=begin, seconds=end - begin, seed=args.seed,
                )  # fmt: skip
                runs.setdefault(("sumo-rl", net, "random"), []).append(run)
            plain[net].append(plain_sumo(sumo, net_file, routes, begin, end, args.seed))

    print(f"\nmachine: {machine()}")
    print(f"load average (1, 5, 15 min): {load_at_start} at start, {load()} at end")
    print(
        f"one simulated hour per run, seed {args.seed}, delta 10 s, yellow 3 s, "
        f"min green 5 s, teleporting off; median of {args.repeats} runs\n"
    )
    if baseline:
        print(f"env before: src/marlkd/envs/traffic/env.py at {args.baseline}\n")
    print(table(args.nets, args.controllers, runs, plain))
    print("\nmarlkd's time outside the step by part, as a share of the time inside:\n")
    print(breakdown(args.nets, args.controllers, runs))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "runs": [
                        {"side": s, "net": n, "controller": c, "runs": r}
                        for (s, n, c), r in runs.items()
                    ],
                    "plain_sumo_s": plain,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
