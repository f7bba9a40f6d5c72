"""Distillation benchmark: students against their MaxPressure teacher.

For each case, distil a student from a MaxPressure teacher and compare both on
held-out seeds in the same run:

- grid4x4, behaviour cloning and DAgger on the same budget (3 teacher-labelled
  simulated hours each), evaluated at the training demand and at 1.3 x demand,
  which the student never saw;
- city, the heterogeneous network: one shared student for all intersections.

Run:  .venv/bin/python bench/distill_traffic.py [--episodes 5] [--out bench/out]
Prints a table of student/teacher delay ratios and agreement, and writes
``summary.json`` beside the run folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from marlkd.config import load_config
from marlkd.distill.dagger import distill
from marlkd.evaluate import evaluate_run

CASES = [
    ("grid4x4-bc", ["scenario.name=grid4x4", "collect.method=bc"], (1.0, 1.3)),
    ("grid4x4-dagger", ["scenario.name=grid4x4", "collect.method=dagger"], (1.0, 1.3)),
    ("city-dagger", ["scenario.name=city", "collect.method=dagger"], (1.0,)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=5, help="held-out seeds")
    parser.add_argument("--out", default="bench/out", help="folder for the runs")
    parser.add_argument("--only", help="run only the case with this name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(args.out) / time.strftime("distill-%Y%m%d-%H%M%S")
    rows = []
    for name, overrides, demands in CASES:
        if args.only and name != args.only:
            continue
        config = load_config(
            None,
            [*overrides, "collect.iterations=3", "collect.episodes_per_iteration=1"],
        )
        run_dir = root / name
        started = time.perf_counter()
        distill(config, run_dir, progress=False)
        train_s = time.perf_counter() - started
        for demand in demands:
            started = time.perf_counter()
            report = evaluate_run(
                run_dir,
                episodes=args.episodes,
                demand_scale=None if demand == 1.0 else demand,
                controllers=["teacher", "student"],
                progress=False,
            )
            teacher = report["controllers"]["teacher"]["mean"]
            student = report["controllers"]["student"]["mean"]
            rows.append(
                {
                    "case": name,
                    "demand_scale": demand,
                    "teacher_delay_s": teacher["avg_delay_s"],
                    "student_delay_s": student["avg_delay_s"],
                    "ratio": student["avg_delay_s"] / teacher["avg_delay_s"],
                    "agreement": student["agreement"],
                    "student_parameters": student["parameters"],
                    "teacher_labelled_episodes": config.collect.iterations
                    * config.collect.episodes_per_iteration,
                    "distill_s": train_s,
                    "evaluate_s": time.perf_counter() - started,
                    "seeds": report["seeds"],
                }
            )
            print(_row(rows[-1]), flush=True)

    (root / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"\nsummary: {root / 'summary.json'}")


def _row(r: dict) -> str:
    return (
        f"{r['case']:<15} demand x{r['demand_scale']:<4g} teacher "
        f"{r['teacher_delay_s']:6.2f} s  student {r['student_delay_s']:6.2f} s  "
        f"ratio {r['ratio']:.3f}  agreement {r['agreement']:.3f}  "
        f"params {r['student_parameters']}  distill {r['distill_s']:.0f} s  "
        f"eval {r['evaluate_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
