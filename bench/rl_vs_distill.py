"""Does distillation save training? RL from scratch against distilled students.

For each scenario and seed, on one axis of environment steps (decisions of
all signals; one simulated hour is 359 of them):

(a) RL from scratch: DQN with a student-sized network (the phase student);
(b) DAgger distillation from MaxPressure, and from an RL-trained teacher;
(c) kickstarting: one DAgger round from MaxPressure, then DQN with an
    annealed pull towards MaxPressure (Schmitt et al. 2018);
(d) the teachers: MaxPressure, and a large phase network (384-384) trained
    by DQN.

Learning curves are greedy episodes on validation seed 9000; the final
figures are 5 held-out seeds (10000-10004). Writes ``summary.json`` and
``curves.png`` into ``--out`` and prints the figures of the issue.

Budgets shorter than one simulated hour. Whole-hour rounds can only say
"at most one hour" of a method that needs minutes, so both sides are also
measured on a finer grid: a *budget* of ``n`` steps is a training run whose
only episode stops after ``n`` decisions (``env.duration``), scored on the
same whole validation hour. For RL from scratch that is DQN whose first
collection is cut after ``n`` decisions, followed by its ``n`` updates; for
distillation it is behaviour cloning on the teacher's first ``n`` decisions.
Steps to 95% are then bracketed: the point from which on every later point
reaches the mark (small budgets are noisy), and the last point that missed
it. The speed-up is the conservative one: RL from scratch's last point that
missed, over the point where distillation reaches the mark for good.

RL from scratch starts learning after 256 transitions (one minibatch), not
after the library's default of 2,000: on a 4-signal net the default alone
would hold it back for 500 decisions, and the baseline should be as quick as
DQN can be made, not as slow as a default.

Run:  .venv/bin/python bench/rl_vs_distill.py --scenarios grid4x4 arterial4 \
          city --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from marlkd.config import RunConfig, TeacherConfig, load_config
from marlkd.distill.dagger import distill
from marlkd.envs.traffic.env import TrafficSignalEnv
from marlkd.evaluate import evaluate_run, simulate
from marlkd.rl.dqn import RLConfig, train_dqn
from marlkd.rl.train import train_teacher
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.students.policy import StudentPolicy
from marlkd.teachers import make_controller

VALIDATION_SEED = 9_000
SCRATCH_LEARNING_STARTS = 256  # transitions; see the module's docstring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios", nargs="+", default=["grid4x4", "arterial4", "city"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scratch-episodes", type=int, default=8)
    parser.add_argument("--teacher-episodes", type=int, default=8)
    parser.add_argument("--kickstart-episodes", type=int, default=10)
    parser.add_argument("--test-episodes", type=int, default=5)
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=int,
        default=[3, 6, 12, 24, 48, 96],
        help="decisions of the one-episode distillation budgets",
    )
    parser.add_argument(
        "--rl-budgets",
        nargs="+",
        type=int,
        default=[15, 30, 60, 90, 120, 180, 240, 300],
        help="decisions of the one-episode RL-from-scratch budgets",
    )
    parser.add_argument("--out", default="bench/out/rl_vs_distill")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="print the tables and plot of the cases in --out; run nothing",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    for scenario in args.scenarios:
        for seed in args.seeds:
            key = f"{scenario}/seed{seed}"
            if key in summary or args.report_only:
                if key in summary:
                    print(f"{key}: done already, skipped")
                continue
            started = time.perf_counter()
            summary[key] = run_case(
                scenario, seed, args, out / scenario / f"seed{seed}"
            )
            summary[key]["wall_s"] = time.perf_counter() - started
            summary_path.write_text(json.dumps(summary, indent=2))
            print_case(key, summary[key])

    report(summary, args.scenarios, out)


def run_case(scenario: str, seed: int, args, root: Path) -> dict:
    case: dict = {"timings_s": {}}
    common = [
        f"scenario.name={scenario}",
        f"train.seed={seed}",
        "collect.validate=true",
    ]

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        case["timings_s"][name] = time.perf_counter() - started
        return result

    # (d) the rule-based teacher's level on the validation seed
    config = load_config(None, common)
    env = TrafficSignalEnv(config.scenario.build(), config.env)
    try:
        mp = make_controller("max-pressure", env)
        case["max_pressure_val_delay_s"] = simulate(
            env, mp, episodes=1, seed=VALIDATION_SEED, progress=False
        )["mean"]["avg_delay_s"]
    finally:
        env.close()

    # (a) RL from scratch, student-sized network
    case["scratch"] = timed(
        "scratch", lambda: rl_from_scratch(scenario, seed, args, root)
    )
    case["scratch"]["budgets"] = timed(
        "budgets_scratch",
        lambda: [
            rl_from_scratch(scenario, seed, args, root, steps=n)
            for n in args.rl_budgets
        ],
    )

    # (b) DAgger from MaxPressure
    run = root / "dagger-mp"
    timed(
        "dagger_mp",
        lambda: distill(
            load_config(None, [*common, f"collect.seed={100 * seed}"]),
            run,
            progress=False,
        ),
    )
    case["dagger_mp"] = {
        "curve": json.loads((run / "rounds_curve.json").read_text()),
        "budgets": timed(
            "budgets_mp",
            lambda: distill_budgets(common, seed, "max-pressure", args, root),
        ),
    }
    case["dagger_mp"]["test"] = test(run, args)

    # (c) kickstarting from MaxPressure
    run = root / "kickstart-mp"
    k = args.kickstart_episodes
    kick = [
        *common, f"collect.seed={100 * seed}", "collect.iterations=1",
        f"rl.episodes={k}", "rl.kickstart=1.0", f"rl.kickstart_episodes={k / 2}",
        "rl.eps_start=0.1", "rl.eps_episodes=3", "rl.eval_every=2",
        f"rl.seed={1000 + 100 * seed}", "rl.learning_starts=1000",
    ]  # fmt: skip
    timed("kickstart_mp", lambda: distill(load_config(None, kick), run, progress=False))
    case["kickstart_mp"] = {
        "curve": json.loads((run / "rounds_curve.json").read_text())
        + json.loads((run / "rl_curve.json").read_text())
    }
    case["kickstart_mp"]["test"] = test(run, args)

    # (d) an RL teacher: a large phase network trained by DQN
    run = root / "rl-teacher"
    teacher_config = load_config(
        None,
        [
            f"scenario.name={scenario}",
            "network.kind=phase",
            "network.hidden=[384, 384]",
            "network.agent_embedding=0",
            f"rl.episodes={args.teacher_episodes}",
            f"rl.eps_episodes={args.teacher_episodes / 3}",
            "rl.eval_every=2",
            f"rl.seed={2000 + 100 * seed}",
            f"eval.episodes={args.test_episodes}",
            "eval.controllers=[teacher]",
        ],
        TeacherConfig,
    )
    report_ = timed(
        "rl_teacher", lambda: train_teacher(teacher_config, run, progress=False)
    )
    case["rl_teacher"] = {
        "curve": json.loads((run / "rl_curve.json").read_text()),
        "test": report_["controllers"]["teacher"]["mean"],
    }

    # (b) DAgger from the RL teacher
    teacher_path = run / "checkpoints" / "student.pt"
    run = root / "dagger-rl"
    timed(
        "dagger_rl",
        lambda: distill(
            load_config(
                None,
                [
                    *common,
                    f"collect.seed={100 * seed}",
                    f"teacher={json.dumps(str(teacher_path))}",
                ],
            ),
            run,
            progress=False,
        ),
    )
    case["dagger_rl"] = {
        "curve": json.loads((run / "rounds_curve.json").read_text()),
        "budgets": timed(
            "budgets_rl",
            lambda: distill_budgets(common, seed, str(teacher_path), args, root),
        ),
    }
    case["dagger_rl"]["test"] = test(run, args)
    return case


def rl_from_scratch(
    scenario: str, seed: int, args, root: Path, steps: int | None = None
) -> dict:
    """DQN from scratch; with ``steps``, only its first ``steps`` decisions.

    A budget run is scored by one greedy whole hour on the validation seed,
    a full run by its curve and the held-out test seeds.
    """
    config = RunConfig()
    config.scenario.name = scenario
    if steps is not None:
        config.env.duration = (steps + 1) * config.env.delta_time
    env = TrafficSignalEnv(config.scenario.build(), config.env)
    try:
        layout = AgentLayout.from_traffic_specs(env.specs, config.env.max_green)
        batcher = AgentBatcher(
            env.possible_agents, layout.max_obs_size, layout.max_actions
        )
        torch.manual_seed(seed)
        network = make_student("phase", layout)
        rl = RLConfig(
            episodes=1 if steps is not None else args.scratch_episodes,
            eps_episodes=args.scratch_episodes / 3,
            eval_every=0 if steps is not None else 1,
            seed=3000 + 100 * seed,
            learning_starts=SCRATCH_LEARNING_STARTS,
        )
        curve = train_dqn(env, network, rl, batcher=batcher, progress=False)
        if steps is None:
            policy = StudentPolicy(network, batcher)
            test_figures = simulate(
                env, policy, episodes=args.test_episodes, seed=10_000, progress=False
            )["mean"]
    finally:
        env.close()
    if steps is not None:
        return {"env_steps": steps, **validation_hour(scenario, network, batcher)}
    return {
        "curve": curve,
        "test": test_figures,
        "parameters": network.num_parameters(),
    }


def distill_budgets(common: list[str], seed: int, teacher: str, args, root: Path):
    """Behaviour cloning on the teacher's first n decisions, for each budget n.

    Each budget is one collection episode cut after n decisions; the student
    is scored on one whole validation hour.
    """
    points = []
    name = "mp" if teacher == "max-pressure" else "rl"
    for n in args.budgets:
        config = load_config(
            None,
            [
                *common,
                f"collect.seed={100 * seed}",
                f"teacher={json.dumps(teacher)}",
                "collect.iterations=1",
                "collect.validate=false",
            ],
        )
        config.env.duration = (n + 1) * config.env.delta_time
        student = distill(config, root / f"budget-{name}-{n}", progress=False)
        points.append(
            {"env_steps": n, **validation_hour(config.scenario.name, student, None)}
        )
    return points


def validation_hour(scenario: str, network, batcher) -> dict:
    """Network figures of one greedy whole hour on the validation seed."""
    config = RunConfig()
    config.scenario.name = scenario
    env = TrafficSignalEnv(config.scenario.build(), config.env)
    try:
        if batcher is None:
            layout = AgentLayout.from_traffic_specs(env.specs, config.env.max_green)
            batcher = AgentBatcher(
                env.possible_agents, layout.max_obs_size, layout.max_actions
            )
        policy = StudentPolicy(network, batcher)
        return simulate(env, policy, episodes=1, seed=VALIDATION_SEED, progress=False)[
            "mean"
        ]
    finally:
        env.close()


def test(run: Path, args) -> dict:
    report_ = evaluate_run(
        run,
        episodes=args.test_episodes,
        controllers=["teacher", "student"],
        progress=False,
    )
    return {k: v["mean"] for k, v in report_["controllers"].items()}


def steps_to_reach(curve: list[dict], threshold_s: float) -> tuple[int | None, int]:
    """Where a curve reaches the threshold for good, and the point before.

    Small budgets are noisy (a student of 12 decisions may reach the mark and
    one of 24 miss it), so a method counts as there only from the point after
    which every later point is at or below the threshold.

    Returns:
        (environment steps of that point, or None when the last point misses;
        environment steps of the point before it, which missed, or 0).
    """
    points = sorted(curve, key=lambda p: p["env_steps"])
    reached, before = None, 0
    for point in points:
        if point["avg_delay_s"] <= threshold_s:
            if reached is None:
                reached = int(point["env_steps"])
        else:
            reached, before = None, int(point["env_steps"])
    return reached, before


def full_curve(method: dict) -> list[dict]:
    """A method's budget points and its curve of whole episodes, by steps."""
    points = [*method.get("budgets", []), *method["curve"]]
    return sorted(points, key=lambda p: p["env_steps"])


def print_case(key: str, case: dict) -> None:
    mp = case["max_pressure_val_delay_s"]
    teacher = case["rl_teacher"]["test"]
    from_mp = case["dagger_mp"]["test"]
    kick = case["kickstart_mp"]["test"]["student"]
    from_rl = case["dagger_rl"]["test"]["student"]
    lines = [
        f"{key}: MaxPressure (validation) {mp:.2f} s; wall {case['wall_s']:.0f} s",
        f"  scratch RL test {case['scratch']['test']['avg_delay_s']:.2f} s",
        f"  DAgger<-MP test student {from_mp['student']['avg_delay_s']:.2f}"
        f" teacher {from_mp['teacher']['avg_delay_s']:.2f}",
        f"  kickstart test student {kick['avg_delay_s']:.2f}",
        f"  RL teacher test {teacher['avg_delay_s']:.2f} s"
        f" ({teacher['parameters']} params); DAgger<-RL student"
        f" {from_rl['avg_delay_s']:.2f} ({from_rl['parameters']} params)",
    ]
    print("\n".join(lines), flush=True)


def report(summary: dict, scenarios: list[str], out: Path) -> None:
    print(
        "\n| case | teacher | 95% mark s | distillation: reaching for good"
        " | RL from scratch: last missing / reaching for good | speed-up (conservative)"
        " |\n|---|---|---|---|---|---|"
    )
    speedups: dict[str, list[float]] = {"MaxPressure": [], "RL": []}
    for scenario in scenarios:
        for key, case in summary.items():
            if not key.startswith(f"{scenario}/"):
                continue
            for method, label in (("dagger_mp", "MaxPressure"), ("dagger_rl", "RL")):
                teacher_val = (
                    case["max_pressure_val_delay_s"]
                    if method == "dagger_mp"
                    else case["rl_teacher"]["curve"][-1]["avg_delay_s"]
                )
                mark = teacher_val / 0.95
                hit, _ = steps_to_reach(full_curve(case[method]), mark)
                rl_hit, rl_miss = steps_to_reach(full_curve(case["scratch"]), mark)
                speedup = "n/a"
                if hit and rl_hit and rl_miss:
                    speedups[label].append(rl_miss / hit)
                    speedup = f"{rl_miss / hit:.1f} x"
                print(
                    f"| {key} | {label} | {mark:.2f} | {hit} | {rl_miss} / {rl_hit}"
                    f" | {speedup} |"
                )
    for label, values in speedups.items():
        if values:
            print(
                f"{label} teacher: conservative speed-up min {min(values):.1f} x,"
                f" median {np.median(values):.1f} x over {len(values)} cases"
            )
    print(
        "\n| case | MaxPressure | kickstarted | RL teacher | its student"
        " | parameters teacher / student | performance kept |"
        "\n|---|---|---|---|---|---|---|"
    )
    for scenario in scenarios:
        for key, case in summary.items():
            if not key.startswith(f"{scenario}/"):
                continue
            kick = case["kickstart_mp"]["test"]
            rl = case["rl_teacher"]["test"]
            student = case["dagger_rl"]["test"]["student"]
            print(
                f"| {key} | {kick['teacher']['avg_delay_s']:.2f}"
                f" | {kick['student']['avg_delay_s']:.2f} | {rl['avg_delay_s']:.2f}"
                f" | {student['avg_delay_s']:.2f}"
                f" | {rl['parameters'] / student['parameters']:.0f} x"
                f" | {rl['avg_delay_s'] / student['avg_delay_s']:.1%} |"
            )
    print("\n| case | " + " | ".join(TIMED) + " | all |\n|" + "---|" * (len(TIMED) + 2))
    for key, case in summary.items():
        t = case["timings_s"]
        print(
            f"| {key} | "
            + " | ".join(f"{t.get(name, 0):.0f}" for name in TIMED)
            + f" | {case['wall_s']:.0f} |"
        )
    total = sum(case["wall_s"] for case in summary.values())
    print(f"\nall cases: {total:.0f} s ({total / 60:.1f} min)")
    plot(summary, scenarios, out / "curves.png")


TIMED = (
    "scratch", "budgets_scratch", "dagger_mp", "budgets_mp", "kickstart_mp",
    "rl_teacher", "dagger_rl", "budgets_rl",
)  # fmt: skip


def plot(summary: dict, scenarios: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    scenarios = [s for s in scenarios if any(k.startswith(f"{s}/") for k in summary)]
    fig = Figure(figsize=(6 * len(scenarios), 4.2), layout="constrained")
    axes = fig.subplots(1, len(scenarios), squeeze=False)[0]
    styles = {
        "scratch": ("RL from scratch (phase student)", "tab:red"),
        "dagger_mp": ("DAgger from MaxPressure", "tab:blue"),
        "kickstart_mp": ("kickstarting from MaxPressure", "tab:green"),
        "rl_teacher": ("RL teacher (phase net 384-384)", "tab:purple"),
        "dagger_rl": ("DAgger from the RL teacher", "tab:orange"),
    }
    for ax, scenario in zip(axes, scenarios, strict=True):
        cases = [v for k, v in summary.items() if k.startswith(f"{scenario}/")]
        for name, (label, color) in styles.items():
            for i, case in enumerate(cases):
                curve = full_curve(case[name])
                ax.plot(
                    [p["env_steps"] for p in curve],
                    [p["avg_delay_s"] for p in curve],
                    color=color,
                    alpha=0.8,
                    marker="o" if name.startswith("dagger") else None,
                    markersize=3,
                    label=label if i == 0 else None,
                )
        mp = np.mean([c["max_pressure_val_delay_s"] for c in cases])
        ax.axhline(mp, color="black", linestyle="--", label="MaxPressure teacher")
        ax.set_title(
            f"{scenario}: {len(cases)} seeds, validation seed {VALIDATION_SEED}"
        )
        ax.set_xscale("log")
        ax.set_xlabel("environment steps (decisions of all signals; log scale)")
        ax.set_ylabel("average trip delay (s)")
        ax.set_ylim(0, 2.5 * mp)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
