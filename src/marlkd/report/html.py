"""One self-contained ``report.html`` for a run folder.

The page reads ``config.yaml``, ``metrics.csv`` and ``results.json`` of a run
and the scenario's network; every figure is a PNG embedded as base64, so the
file can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
from html import escape
from pathlib import Path

import numpy as np

from marlkd.errors import UserError

logger = logging.getLogger(__name__)

# Controllers whose queue over time is drawn; a random controller's queue
# usually dwarfs the rest and would flatten the lines that matter.
QUEUE_CONTROLLERS = ("teacher", "student", "fixed")

# (results key, column heading, formatter) of the comparison table.
COLUMNS = (
    ("avg_delay_s", "trip delay<br><small>s/veh</small>", "{:.1f}"),
    ("avg_wait_s", "waiting<br><small>s/veh</small>", "{:.1f}"),
    ("mean_queue_veh", "queue<br><small>veh/signal</small>", "{:.2f}"),
    ("throughput_veh", "throughput<br><small>veh</small>", "{:,.0f}"),
    ("teleports", "teleports", "{:.0f}"),
    ("delay_vs_teacher", "delay vs<br>teacher", "×{:.2f}"),
    ("agreement", "agreement<br><small>with teacher</small>", "pct"),
    ("parameters", "parameters", "{:,.0f}"),
    ("latency_one_us", "latency<br><small>one agent, µs</small>", "{:.0f}"),
    (
        "latency_batch_per_agent_us",
        "latency<br><small>batched, µs/agent</small>",
        "{:.1f}",
    ),
)


def write_report(
    run_dir: Path, *, results: str = "results.json", out: Path | None = None
) -> Path:
    """Render the run's report and write it atomically.

    Args:
        run_dir: a run folder of ``marlkd distill``.
        results: the results file in the run folder to report, e.g.
            ``results-demand1.3.json``.
        out: where to write; ``run_dir/report.html`` when None.

    Returns:
        The path written.
    """
    from marlkd.utils import atomic_write_text

    run_dir = Path(run_dir)
    page = render_report(run_dir, results=results)
    out = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(out, page)
    logger.info("wrote %s (%.0f kB)", out, len(page.encode()) / 1e3)
    return out


def render_report(run_dir: Path, *, results: str = "results.json") -> str:
    """The report page of a run folder, as HTML text."""
    from marlkd.config import load_config
    from marlkd.report import plots
    from marlkd.report.network import read_geometry
    from marlkd.tracking import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserError(
            f"{run_dir} is not a marlkd run folder (no config.yaml): pass the --out "
            "folder of `marlkd distill`"
        )
    results_path = run_dir / results
    if not results_path.exists():
        raise UserError(
            f"{results_path} not found: run `marlkd evaluate {run_dir}` first"
        )
    try:
        report = json.loads(results_path.read_text())
        controllers = report["controllers"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(
            f"{results_path} is not a results file of `marlkd evaluate` ({exc}): "
            f"run `marlkd evaluate {run_dir}` again"
        ) from exc
    config = load_config(run_dir / "config.yaml")
    means = {name: entry["mean"] for name, entry in controllers.items()}
    teacher_delay = means.get("teacher", {}).get("avg_delay_s")
    student_delay = means.get("student", {}).get("avg_delay_s")

    sections = [_summary(means), _table(means)]

    # Queue over the simulated span
    traces = _queue_traces(controllers)
    if traces:
        sections.append(
            _figure(
                f"Queue over the simulated {_span(traces, config)}",
                plots.queue_over_time(traces),
                "Vehicles halted on the approaches of all signals, averaged over "
                f"{plots.SMOOTHING_S / 60:g} minutes and over the held-out seeds"
                + (" (band: lowest to highest seed)" if _seeds(report) > 1 else "")
                + ".",
            )
        )
    else:
        sections.append(
            _note(
                "Queue over time",
                f"{results} holds no queue traces: it was written by an older "
                f"marlkd; run `marlkd evaluate {run_dir}` again to record them.",
            )
        )

    # Per intersection: bars beside the map
    per_agent = {
        name: _per_intersection(entry["episodes"], "avg_delay_s")
        for name, entry in controllers.items()
        if name in ("teacher", "student")
    }
    panels = []
    if per_agent:
        agents = sorted(set().union(*per_agent.values()), key=_natural)
        panels.append(
            _panel(
                "Delay on each intersection's approaches",
                plots.delay_per_intersection(per_agent, agents),
                "Time lost per vehicle on the roads into each intersection, mean "
                "over the held-out seeds.",
            )
        )
    if set(per_agent) == {"teacher", "student"}:
        net_file = config.scenario.build().net_file
        geometry = read_geometry(net_file, agents)
        missing = [a for a in agents if a not in geometry.signals]
        if missing:
            logger.warning(
                "no position in %s for %d signals (%s): they are left off the map",
                net_file,
                len(missing),
                ", ".join(missing[:5]),
            )
        difference = {
            a: per_agent["student"][a] - per_agent["teacher"][a]
            for a in agents
            if a in per_agent["student"] and a in per_agent["teacher"]
        }
        panels.append(
            _panel(
                "Student minus teacher, on the map",
                plots.network_map(geometry, difference),
                "Red where the student's intersection is slower than the "
                "teacher's, blue where it is faster; differences within a second "
                "stay pale.",
            )
        )
    if panels:
        sections.append(
            f'<section><h2>Per intersection</h2><div class="pair">{"".join(panels)}'
            "</div></section>"
        )

    # Learning curves
    metrics_path = run_dir / "metrics.csv"
    curves = (
        plots.learning_curves(
            read_metrics(run_dir),
            teacher_delay_s=teacher_delay,
            student_delay_s=student_delay,
        )
        if metrics_path.exists()
        else None
    )
    if curves is not None:
        sections.append(
            _figure(
                "Learning curves",
                curves,
                "Left and middle: loss and agreement on held-out training samples "
                "per epoch; dotted lines start a collection round. Right: the "
                "delay of the policy that drove each round (β is the share of "
                "decisions the teacher took) against the evaluated teacher and "
                "student.",
            )
        )
    else:
        sections.append(
            _note("Learning curves", f"{metrics_path} holds no training epochs.")
        )

    return _page(_header(report, config, run_dir), sections)


# ------------------------------------------------------------------- data
def _seeds(report: dict) -> int:
    return len(report.get("seeds", []))


def _queue_traces(controllers: dict) -> dict[str, tuple[list[float], np.ndarray]]:
    """Controller -> (times, (seeds, T) queues) for those with traces."""
    traces = {}
    for name in QUEUE_CONTROLLERS:
        episodes = controllers.get(name, {}).get("episodes", [])
        runs = [e["queue_trace"] for e in episodes if "queue_trace" in e]
        if not runs:
            continue
        length = min(len(r["queue_veh"]) for r in runs)
        times = runs[0]["time_s"][:length]
        queues = np.array([r["queue_veh"][:length] for r in runs], dtype=float)
        traces[name] = (times, queues)
    return traces


def _span(traces: dict, config) -> str:
    """``hour`` or ``N minutes``: how long the episodes simulated."""
    times = next(iter(traces.values()))[0]
    seconds = times[-1] - times[0] + config.env.delta_time
    minutes = round(seconds / 60)
    return "hour" if minutes == 60 else f"{minutes} minutes"


def _per_intersection(episodes: list[dict], key: str) -> dict[str, float]:
    """Per agent, the mean of ``key`` over episodes."""
    values: dict[str, list[float]] = {}
    for episode in episodes:
        for agent, figures in episode.get("per_intersection", {}).items():
            values.setdefault(agent, []).append(float(figures[key]))
    return {agent: float(np.mean(v)) for agent, v in values.items()}


def _natural(name: str):
    """Sort key that puts ``A2`` before ``A10`` and ``9`` before ``27``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------- html
def _header(report: dict, config, run_dir: Path) -> str:
    seeds = report.get("seeds", [])
    if len(seeds) > 1:
        seed_text = f"{seeds[0]}–{seeds[-1]} ({len(seeds)})"
    else:
        seed_text = ", ".join(map(str, seeds)) or "?"
    c = config.collect
    facts = [
        ("teacher", str(report.get("teacher", config.teacher))),
        ("student", f"{config.student.kind} ({_hidden(config)})"),
        ("method", f"{c.method}, {c.iterations} rounds"),
        ("seeds", seed_text),
        ("demand", f"×{report.get('demand_scale', config.env.demand_scale):g}"),
    ]
    cells = "".join(
        f'<div class="fact"><span>{escape(k)}</span><b>{escape(str(v))}</b></div>'
        for k, v in facts
    )
    return (
        "<header>"
        f"<h1>{escape(str(report.get('scenario', 'run')))}: "
        f"{escape(facts[0][1])} → {escape(config.student.kind)} student</h1>"
        f'<p class="sub">marlkd report of <code>{escape(str(run_dir))}</code>, '
        f"{time.strftime('%Y-%m-%d %H:%M')}</p>"
        f'<div class="facts">{cells}</div>'
        "</header>"
    )


def _hidden(config) -> str:
    hidden = getattr(config.student, "hidden", None)
    return "×".join(str(h) for h in hidden) + " hidden" if hidden else "no hidden"


def _summary(means: dict) -> str:
    teacher, student = means.get("teacher"), means.get("student")
    if not (teacher and student):
        return ""
    cards = [
        (
            "student delay",
            f"{student['avg_delay_s']:.1f} s",
            f"teacher {teacher['avg_delay_s']:.1f} s",
        ),
        (
            "vs teacher",
            _format(student.get("delay_vs_teacher"), "×{:.2f}"),
            "trip delay ratio, lower is better",
        ),
        (
            "agreement",
            _format(student.get("agreement"), "pct"),
            "decisions the teacher would take",
        ),
        (
            "decision time",
            _format(student.get("latency_batch_per_agent_us"), "{:.1f} µs"),
            f"per agent, batched; {student.get('parameters', 0):,} parameters",
        ),
    ]
    if "fixed" in means:
        cards.insert(
            2,
            (
                "vs fixed time",
                _saving(student, means["fixed"]),
                f"fixed-time delay {means['fixed']['avg_delay_s']:.1f} s",
            ),
        )
    body = "".join(
        f'<div class="card"><span>{escape(title)}</span><b>{escape(value)}</b>'
        f"<small>{escape(note)}</small></div>"
        for title, value, note in cards
    )
    return f'<section class="cards">{body}</section>'


def _saving(student: dict, baseline: dict) -> str:
    if baseline["avg_delay_s"] <= 0:
        return "–"
    ratio = student["avg_delay_s"] / baseline["avg_delay_s"] - 1.0
    return f"{100 * ratio:+.0f}% delay"


def _table(means: dict) -> str:
    head = "".join(f"<th>{heading}</th>" for _, heading, _ in COLUMNS)
    rows = []
    for name, mean in means.items():
        cells = "".join(
            f"<td>{escape(_format(mean.get(key), fmt))}</td>" for key, _, fmt in COLUMNS
        )
        rows.append(
            f'<tr class="{escape(name)}"><th scope="row">'
            f'<i style="background:{_swatch(name)}"></i>{escape(name)}</th>'
            f"{cells}</tr>"
        )
    return (
        "<section><h2>Teacher, student and baselines</h2>"
        f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}"
        "</tbody></table>"
        '<p class="caption">Means over the held-out seeds. Trip delay counts '
        "vehicles still driving at the end and those that never got in; latency is "
        "the median wall time of one decision; parameters 0 means a rule, not a "
        "network.</p></section>"
    )


def _swatch(name: str) -> str:
    from marlkd.report.plots import COLOURS

    return COLOURS.get(name, "#2ca02c")


def _format(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    return fmt.format(value)


def _figure(title: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<section><h2>{escape(title)}</h2><figure>"
        f'<img alt="{escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure></section>"
    )


def _panel(title: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<figure><h3>{escape(title)}</h3>"
        f'<img alt="{escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _note(title: str, text: str) -> str:
    return (
        f'<section><h2>{escape(title)}</h2><p class="note">{escape(text)}</p></section>'
    )


CSS = """
:root { --ink: #1d2733; --muted: #66707c; --line: #e3e6ea; --bg: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
header { margin-bottom: 18px; }
h1 { font-size: 24px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 0 0 10px; }
.sub { color: var(--muted); margin: 0 0 14px; font-size: 13px; }
code { font-size: 12.5px; }
.facts { display: flex; flex-wrap: wrap; gap: 6px; }
.fact { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 4px 9px; font-size: 12.5px; }
.fact span { color: var(--muted); margin-right: 6px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 18px; margin: 14px 0; }
section.cards { display: grid; gap: 12px; padding: 0; background: none; border: 0;
  grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; }
.card span { display: block; color: var(--muted); font-size: 12px;
  text-transform: uppercase; letter-spacing: .04em; }
.card b { display: block; font-size: 24px; margin: 2px 0; }
.card small { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px;
  font-variant-numeric: tabular-nums; }
th, td { padding: 6px 8px; text-align: right; border-bottom: 1px solid var(--line); }
thead th { font-weight: 600; color: var(--muted); font-size: 12px;
  vertical-align: bottom; line-height: 1.2; }
thead small { font-weight: 400; }
tbody th { text-align: left; white-space: nowrap; }
tbody th i { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 7px; }
tr.student td, tr.student th { background: #fff6ec; }
figure { margin: 0; }
h3 { font-size: 14px; margin: 0 0 8px; color: var(--muted); font-weight: 600; }
.pair { display: grid; gap: 20px; align-items: start;
  grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); }
img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption, .caption { color: var(--muted); font-size: 13px; margin: 8px 0 0; }
.note { color: var(--muted); margin: 0; }
"""


def _page(header: str, sections: list[str]) -> str:
    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>marlkd report</title><style>{CSS}</style></head>"
        f"<body><main>\n{header}\n{body}\n</main></body></html>\n"
    )
