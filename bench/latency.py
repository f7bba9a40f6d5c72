"""Decision latency, batched throughput, size and delay of exported students.

For a run folder, side by side in one process:

- latency of one decision for one agent, and of one decision for all agents at
  once, through each controller's own per-agent interface (dicts in, dict of
  actions out): the MaxPressure teacher, the student in PyTorch
  (``StudentPolicy``), and the exported student in ONNX Runtime and in the
  runtime's numpy path;
- throughput on a large batch (``--batch`` rows drawn from recorded
  observations of all agents), as padded arrays: PyTorch's forward pass,
  ``Runtime.run`` on ONNX Runtime and on numpy; the teacher, which has no
  array interface, on dicts of all agents;
- size of the exported network file, float32 and int8, and of a smaller
  student's when ``--small-run`` is given;
- traffic delay of the teacher and of each export, deployed on the same
  held-out seeds (``--episodes``, 0 skips it).

Threads: ``--threads`` for PyTorch and for ONNX Runtime on the batch; one
decision runs onnxruntime on one thread; numpy's OpenBLAS uses its default
(every core) unless ``OPENBLAS_NUM_THREADS`` says otherwise. Other load on the
machine slows every figure, so the load average and this process's share of
the CPU during the batch runs are printed, with each batch's best time beside
its median; ONNX Runtime on one thread, which does not spin, gives decisions
per CPU-second, and that times ``--threads`` is what idle cores would reach.

The run folder: ``marlkd demo --out RUN_DIR`` (grid4x4, default student); a
smaller student: ``marlkd demo --out RUN_DIR --set "student.hidden=[32,32]"``.

Usage::

    .venv/bin/python bench/latency.py --run RUN_DIR [--small-run RUN_DIR]
        [--batch 4096] [--threads 2] [--episodes 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_ONE_US = 20.0
TARGET_BATCH_PER_S = 1e6
TARGET_BYTES = 16 * 1024


# ------------------------------------------------------------------ timing
def timed(call, repeats: int, warmup: int = 20) -> dict:
    """Median and best wall time of ``call`` in seconds, and the CPU share."""
    for _ in range(warmup):
        call()
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "median_s": float(np.median(times)),
        "best_s": float(np.min(times)),
        "cpu_s_per_call": cpu / repeats,
        "cpu_share": cpu / wall,
    }


# -------------------------------------------------------------- recording
def record(env, teacher, decisions: int, seed: int):
    """(observations, masks) of every agent at ``decisions`` teacher decisions."""
    steps = []
    observations, infos = env.reset(seed=seed)
    for _ in range(decisions):
        masks = {a: infos[a]["action_mask"] for a in env.agents}
        steps.append((observations, masks))
        observations, _, _, _, infos = env.step(teacher(observations, masks))
    return steps


def batch_rows(runtime, steps, rows: int, seed: int):
    """``rows`` padded rows drawn with replacement from the recorded ones."""
    obs, agent, mask = [], [], []
    for observations, masks in steps:
        o, a, m = runtime.pad(observations, masks)
        obs.append(o)
        agent.append(a)
        mask.append(m)
    obs, agent, mask = np.concatenate(obs), np.concatenate(agent), np.concatenate(mask)
    pick = np.random.default_rng(seed).integers(0, len(agent), rows)
    return obs[pick], agent[pick], mask[pick]


# -------------------------------------------------------------- measuring
def latency_rows(controllers: dict, steps, repeats: int) -> dict:
    """Per controller: one agent alone, and all agents in one call."""
    observations, masks = steps[len(steps) // 2]
    first = next(iter(observations))
    one = ({first: observations[first]}, {first: masks[first]})
    results = {}
    for name, policy in controllers.items():
        results[name] = {
            "one": timed(lambda p=policy: p(*one), repeats),
            "all": timed(lambda p=policy: p(observations, masks), repeats // 4),
            "agents": len(observations),
        }
    return results


def throughput_rows(student, runtimes: dict, teacher, steps, rows, repeats) -> dict:
    """Agent-decisions per second on one large padded batch."""
    import torch

    obs, agent, mask = rows
    results = {}
    tensors = tuple(torch.from_numpy(x) for x in rows)

    def torch_batch():
        with torch.no_grad():
            student(*tensors).logits.argmax(dim=1)

    results["PyTorch"] = timed(torch_batch, max(3, repeats // 10), warmup=2)
    for name, runtime in runtimes.items():
        results[name] = timed(lambda r=runtime: r.run(obs, agent, mask), repeats, 3)
    for entry in results.values():
        entry["rows"] = len(agent)

    # The teacher has no array interface: all agents per call, every step.
    def teacher_pass():
        for observations, masks in steps:
            teacher(observations, masks)

    entry = timed(teacher_pass, 3, warmup=1)
    entry["rows"] = sum(len(o) for o, _ in steps)
    results["MaxPressure (teacher)"] = entry
    for entry in results.values():
        entry["per_s"] = entry["rows"] / entry["median_s"]
        entry["best_per_s"] = entry["rows"] / entry["best_s"]
        entry["per_cpu_s"] = entry["rows"] / entry["cpu_s_per_call"]
    return results


def delays(env, policies: dict, episodes: int, seed: int) -> dict:
    from marlkd.evaluate import simulate

    out = {}
    for name, policy in policies.items():
        result = simulate(env, policy, episodes=episodes, seed=seed, progress=False)
        out[name] = {
            "avg_delay_s": result["mean"]["avg_delay_s"],
            "per_seed": [e["avg_delay_s"] for e in result["episodes"]],
        }
        logging.getLogger("bench").info("%s: %s", name, out[name])
    return out


# ---------------------------------------------------------------- printing
def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header, lines) -> str:
    return "\n".join([row(header), row(["---"] * len(header)), *map(row, lines)])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder (marlkd distill)")
    parser.add_argument("--small-run", help="a run folder of a smaller student")
    parser.add_argument("--batch", type=int, default=4096, help="rows per batch")
    parser.add_argument("--threads", type=int, default=2, help="threads per library")
    parser.add_argument("--decisions", type=int, default=60, help="recorded steps")
    parser.add_argument("--repeats", type=int, default=2000, help="timed calls")
    parser.add_argument("--episodes", type=int, default=3, help="seeds for delay")
    parser.add_argument("--seed", type=int, default=10_000, help="first seed")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from marlkd.config import load_config
    from marlkd.envs.traffic.env import TrafficSignalEnv
    from marlkd.export import export_run
    from marlkd.rollout.batching import AgentBatcher
    from marlkd.runtime import Runtime
    from marlkd.students import load_student
    from marlkd.students.policy import StudentPolicy
    from marlkd.teachers import make_controller

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    run = Path(args.run)
    config = load_config(run / "config.yaml")
    student = load_student(run / "checkpoints" / "student.pt")

    # Exports: float and int8, of this run and of the smaller one.
    scratch = tempfile.TemporaryDirectory(prefix="marlkd-latency-")
    folder = Path(scratch.name)
    exports = {}
    for label, source in (("", run), ("small ", args.small_run)):
        if source is None:
            continue
        for quantize in (None, "int8"):
            name = f"{label}{'int8' if quantize else 'float32'}"
            target = folder / name.replace(" ", "-")
            out, meta = export_run(source, target, quantize=quantize)
            exports[name] = (out, meta)

    env = TrafficSignalEnv(config.scenario.build(), config.env)
    try:
        teacher = make_controller("max-pressure", env)
        steps = record(env, teacher, args.decisions, seed=args.seed + 100)
        out_float = exports["float32"][0]
        ort = Runtime.load(out_float, backend="onnxruntime", threads=1)
        numpy_rt = Runtime.load(out_float, backend="numpy")
        batcher = AgentBatcher(
            env.possible_agents, student.layout.max_obs_size, student.layout.max_actions
        )
        controllers = {
            "MaxPressure (teacher)": teacher,
            "PyTorch": StudentPolicy(student, batcher),
            "ONNX Runtime": ort,
            "numpy": numpy_rt,
        }
        latency = latency_rows(controllers, steps, args.repeats)
        rows = batch_rows(ort, steps, args.batch, seed=0)
        ort_threads = Runtime.load(
            out_float, backend="onnxruntime", threads=args.threads, spinning=True
        )
        throughput = throughput_rows(
            student,
            {
                f"ONNX Runtime, {args.threads} threads": ort_threads,
                "ONNX Runtime, 1 thread": ort,
                "numpy": numpy_rt,
            },
            teacher,
            steps,
            rows,
            repeats=30,
        )

        delay = {}
        if args.episodes > 0:
            policies = {"MaxPressure (teacher)": teacher}
            for name, (out, _) in exports.items():
                policies[f"student {name}"] = Runtime.load(out)
            delay = delays(env, policies, args.episodes, args.seed)
    finally:
        env.close()
    sizes = {
        name: sum(f["bytes"] for f in meta["files"].values())
        for name, (_, meta) in exports.items()
    }
    scratch.cleanup()
    load_end = os.getloadavg()

    # ------------------------------------------------------------ report
    model = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    n = len(env.possible_agents)
    print(
        f"{config.scenario.name}, {n} agents, {student.kind} student "
        f"({student.num_parameters()} parameters, hidden {student.config['hidden']})"
    )
    print(
        f"machine: {os.cpu_count()} cores ({model}), Python "
        f"{platform.python_version()}, torch {torch.__version__}, "
        f"{args.threads} threads per library"
    )
    print(
        "load average (1, 5, 15 min): "
        f"{' '.join(f'{x:.2f}' for x in load_start)} at start, "
        f"{' '.join(f'{x:.2f}' for x in load_end)} at end\n"
    )

    teacher_one = latency["MaxPressure (teacher)"]["one"]["median_s"]
    torch_one = latency["PyTorch"]["one"]["median_s"]
    lines = []
    for name, r in latency.items():
        one, all_ = r["one"]["median_s"], r["all"]["median_s"]
        lines.append([
            name, f"{one * 1e6:.1f}", f"{r['one']['best_s'] * 1e6:.1f}",
            f"{all_ * 1e6:.1f}", f"{all_ / r['agents'] * 1e6:.2f}",
            ratio(teacher_one, one), ratio(torch_one, one),
        ])  # fmt: skip
    print(f"one decision (dicts in, actions out; median of {args.repeats} calls)\n")
    print(table(
        ["controller", "one agent µs", "best µs", f"all {n} agents µs",
         "per agent µs", "speed-up vs teacher", "speed-up vs PyTorch"],
        lines,
    ))  # fmt: skip

    teacher_rate = throughput["MaxPressure (teacher)"]["per_s"]
    torch_rate = throughput["PyTorch"]["per_s"]
    lines = []
    for name, r in throughput.items():
        lines.append([
            name, r["rows"], f"{r['median_s'] * 1e3:.2f}",
            f"{r['per_s']:,.0f}", f"{r['best_per_s']:,.0f}",
            f"{r['cpu_share']:.2f}", f"{r['per_cpu_s']:,.0f}",
            ratio(r["per_s"], teacher_rate), ratio(r["per_s"], torch_rate),
        ])  # fmt: skip
    print(f"\nbatch throughput (padded arrays; the teacher on dicts of {n} agents)\n")
    print(table(
        ["controller", "rows", "median ms", "decisions/s", "best decisions/s",
         "CPU share", "decisions per CPU-s", "vs teacher", "vs PyTorch"],
        lines,
    ))  # fmt: skip

    lines = []
    for name, (_, meta) in exports.items():
        size = sum(f["bytes"] for f in meta["files"].values())
        s = meta["student"]
        lines.append([
            name, s["config"]["hidden"], s["parameters"], f"{size:,}",
            f"{size / 1024:.1f}", "yes" if size <= TARGET_BYTES else "no",
        ])  # fmt: skip
    print("\nexported network file (student.onnx; metadata.json not counted)\n")
    header = ["export", "hidden", "parameters", "bytes", "KiB", "<= 16 KiB"]
    print(table(header, lines))

    if delay:
        base = delay["MaxPressure (teacher)"]["avg_delay_s"]
        seeds = f"{args.seed}-{args.seed + args.episodes - 1}"
        lines = [
            [name, f"{d['avg_delay_s']:.2f}", ratio(d["avg_delay_s"], base),
             " ".join(f"{x:.2f}" for x in d["per_seed"])]
            for name, d in delay.items()
        ]  # fmt: skip
        print(f"\ndelay on {config.scenario.name}, seeds {seeds}\n")
        print(table(["controller", "avg_delay_s", "vs teacher", "per seed"], lines))

    # ------------------------------------------------------------ targets
    best_one = min(latency[k]["one"]["median_s"] for k in ("ONNX Runtime", "numpy"))
    threaded = throughput[f"ONNX Runtime, {args.threads} threads"]
    # One thread does not spin, so its CPU time is its work: times the cores.
    idle = throughput["ONNX Runtime, 1 thread"]["per_cpu_s"] * args.threads
    print("\ntargets\n")
    print(
        f"- one decision <= {TARGET_ONE_US:.0f} µs: {best_one * 1e6:.1f} µs "
        f"({'met' if best_one * 1e6 <= TARGET_ONE_US else 'missed'}, "
        f"{TARGET_ONE_US / (best_one * 1e6):.2f}x the target's speed)"
    )
    print(
        f"- >= 1M agent-decisions/s batched on {args.threads} cores: median "
        f"{threaded['per_s']:,.0f}/s, best {threaded['best_per_s']:,.0f}/s "
        f"({'met' if threaded['best_per_s'] >= TARGET_BATCH_PER_S else 'missed'} "
        f"at best, {threaded['best_per_s'] / TARGET_BATCH_PER_S:.2f}x); one "
        f"thread's decisions per CPU-second x {args.threads}: {idle:,.0f}/s "
        f"({idle / TARGET_BATCH_PER_S:.2f}x)"
    )
    for name, size in sizes.items():
        print(
            f"- {name} export <= 16 KiB: {size:,} bytes "
            f"({'met' if size <= TARGET_BYTES else 'missed'}, "
            f"{size / TARGET_BYTES:.2f}x the budget)"
        )

    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "latency": latency,
                    "throughput": throughput,
                    "sizes": sizes,
                    "delay": delay,
                    "load_average": [load_start, load_end],
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
