"""The report's figures, each rendered to PNG bytes with matplotlib.

Every function takes plain numbers (no run folder, no JSON) and returns the PNG,
so a figure can be checked or reused on its own.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence

import numpy as np

from marlkd.errors import UserError

# One colour per controller across every figure of the report.
COLOURS = {
    "teacher": "#1f5fa8",
    "student": "#e07b1a",
    "fixed": "#7f7f7f",
    "random": "#b04a8c",
}
GRID = {"color": "#e4e4e4", "linewidth": 0.8}
DPI = 110


# The look of every figure; applied around each drawing, so the report leaves
# matplotlib's global settings and backend as it found them.
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#999999",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
}


def _styled(draw):
    """Run a drawing function under ``STYLE``; a clear error without matplotlib."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        try:
            import matplotlib
        except ImportError as exc:
            raise UserError(
                "the report needs matplotlib: pip install 'marlkd[report]'"
            ) from exc
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _subplots(ncols: int = 1, *, figsize: tuple[float, float]):
    """A figure outside pyplot (no GUI backend, nothing to close) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _colour(name: str) -> str:
    return COLOURS.get(name, "#2ca02c")


def short_label(agent: str, width: int = 10) -> str:
    """An agent's id, cut to ``width`` characters for axes and map labels."""
    return agent if len(agent) <= width else agent[: width - 1] + "…"


def clock(seconds: float) -> str:
    """Simulation seconds as ``h:mm`` (time of day when the scenario has one)."""
    minutes = int(round(seconds / 60.0))
    return f"{minutes // 60}:{minutes % 60:02d}"


# ---------------------------------------------------------------- learning
@_styled
def learning_curves(
    metrics: Mapping[str, Sequence[tuple[int, float]]],
    *,
    teacher_delay_s: float | None,
    student_delay_s: float | None = None,
) -> bytes | None:
    """Validation loss, agreement per epoch and behaviour delay per round.

    Args:
        metrics: ``marlkd.tracking.read_metrics`` of the run.
        teacher_delay_s: the teacher's evaluated delay, drawn as a line.
        student_delay_s: the student's evaluated delay, drawn dashed.

    Returns:
        The PNG, or None when the run logged no training epochs.
    """
    val_loss = _series(metrics, "distill/val_loss")
    if not val_loss:
        return None
    train_loss = _series(metrics, "distill/train_loss")
    agreement = _series(metrics, "distill/val_agreement")
    rounds = _series(metrics, "collect/round")
    behaviour = _series(metrics, "collect/behaviour_avg_delay_s")
    betas = dict(_series(metrics, "collect/beta"))
    # A round's collection is logged at the epoch count reached before it.
    starts = [step for step, _ in rounds]

    from matplotlib.ticker import MaxNLocator

    fig, axes = _subplots(3, figsize=(11.5, 3.2))
    fig.subplots_adjust(wspace=0.3)

    ax = axes[0]
    if train_loss:
        ax.plot(*zip(*train_loss, strict=True), color="#9bb7d9", lw=1.2, label="train")
    ax.plot(
        *zip(*val_loss, strict=True),
        color=COLOURS["teacher"],
        lw=1.8,
        label="validation",
    )
    ax.legend(loc="upper right")
    ax.set(title="Distillation loss", xlabel="epoch", ylabel="loss")
    values = [v for _, v in val_loss + train_loss]
    # Losses that fall by orders of magnitude read better on a log scale.
    if min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")

    ax = axes[1]
    if agreement:
        steps, values = zip(*agreement, strict=True)
        ax.plot(steps, 100 * np.asarray(values), color=COLOURS["student"], lw=1.8)
    ax.set(
        title="Agreement with the teacher",
        xlabel="epoch",
        ylabel="validation decisions (%)",
    )
    # A dotted line where each collection round after the first starts.
    for axis in axes[:2]:
        for start in starts[1:]:
            axis.axvline(start + 0.5, color="#999999", lw=0.9, ls=":")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(**GRID)

    ax = axes[2]
    if behaviour:
        by_step = dict(rounds)
        xs = [int(by_step.get(step, k)) for k, (step, _) in enumerate(behaviour)]
        ys = [v for _, v in behaviour]
        ax.plot(xs, ys, "o-", color="#444444", lw=1.6)
        # Each round's tick says how often the teacher drove it (beta).
        ax.set_xticks(
            xs,
            [
                f"{x}\nβ={betas[step]:.2g}" if step in betas else str(x)
                for (step, _), x in zip(behaviour, xs, strict=True)
            ],
        )
        ax.set_xlim(min(xs) - 0.35, max(xs) + 0.35)
    # The evaluated levels are labelled on their lines, the higher one above
    # it and the lower one below, so they stay apart when they nearly meet.
    levels = [
        (name, value)
        for name, value in (("teacher", teacher_delay_s), ("student", student_delay_s))
        if value is not None
    ]
    levels.sort(key=lambda level: -level[1])  # stable: the teacher first on a tie
    for k, (name, value) in enumerate(levels):
        ax.axhline(
            value, color=COLOURS[name], lw=1.4, ls="-" if name == "teacher" else "--"
        )
        above = k == 0
        ax.annotate(
            f"{name}, held-out seeds: {value:.1f} s",
            (1.0, value),
            xycoords=("axes fraction", "data"),
            xytext=(-2, 3 if above else -3),
            textcoords="offset points",
            ha="right",
            va="bottom" if above else "top",
            fontsize=7.5,
            color=COLOURS[name],
        )
    shown = [v for _, v in behaviour] + [value for _, value in levels]
    if shown:
        low, high = min(shown), max(shown)
        pad = 0.2 * max(high - low, 0.05 * high, 0.1)
        ax.set_ylim(low - pad, high + pad)
    ax.set(
        title="Delay of the policy that collected",
        xlabel="collection round",
        ylabel="average trip delay (s)",
    )
    ax.grid(**GRID)
    return _png(fig)


def _series(metrics, key: str) -> list[tuple[int, float]]:
    """One key's points by step; a step logged twice (a resumed run) keeps the last."""
    return sorted(dict(metrics.get(key, [])).items())


# -------------------------------------------------------- per intersection
@_styled
def delay_per_intersection(
    delays: Mapping[str, Mapping[str, float]], agents: Sequence[str]
) -> bytes:
    """Horizontal bars of each intersection's delay, one bar per controller.

    Args:
        delays: controller -> agent -> average delay on its incoming roads (s).
        agents: the agents in the order to draw them, top to bottom.
    """
    names = list(delays)
    height = 0.8 / len(names)
    y = np.arange(len(agents))
    fig, ax = _subplots(figsize=(5.2, max(3.0, 0.27 * len(agents) + 1.0)))
    for k, name in enumerate(names):
        values = [delays[name].get(a, np.nan) for a in agents]
        ax.barh(
            y + (k - (len(names) - 1) / 2) * height,
            values,
            height,
            color=_colour(name),
            label=name,
        )
    ax.set_yticks(y, [short_label(a) for a in agents])
    ax.set(
        ylim=(len(agents) - 0.4, -0.6),
        xlabel="delay on its approaches (s/veh)",
    )
    ax.grid(axis="x", **GRID)
    ax.set_axisbelow(True)
    ax.legend(loc="lower left", ncols=len(names), bbox_to_anchor=(0, 1.0))
    return _png(fig)


# --------------------------------------------------------------- queue
SMOOTHING_S = 300.0
"""Window of the moving average over the queue, in seconds: long enough to
even out a signal cycle, short enough to keep the peak's shape."""


@_styled
def queue_over_time(
    traces: Mapping[str, tuple[Sequence[float], np.ndarray]],
) -> bytes:
    """The network's queue over the simulated span, one line per controller.

    Args:
        traces: controller -> (times in s, (seeds, T) queue in vehicles). Each
            seed's queue is smoothed by a moving average over ``SMOOTHING_S``;
            the line is the mean over seeds, the band the range between seeds.
    """
    fig, ax = _subplots(figsize=(10, 3.1))
    for name, (times, queues) in traces.items():
        queues = moving_average(np.atleast_2d(queues), times, SMOOTHING_S)
        ax.plot(times, queues.mean(axis=0), color=_colour(name), lw=1.8, label=name)
        if len(queues) > 1:
            ax.fill_between(
                times,
                queues.min(axis=0),
                queues.max(axis=0),
                color=_colour(name),
                alpha=0.15,
                lw=0,
            )
    last = max(t[-1] for t, _ in traces.values())
    span = last - min(t[0] for t, _ in traces.values())
    step = 600 if span > 2400 else 300 if span > 900 else 60
    # The first decision comes one decision after the start; the axis starts
    # at the round time before it, normally the scenario's begin.
    first = np.floor(min(t[0] for t, _ in traces.values()) / step) * step
    ticks = np.arange(first, last + 1, step)
    ax.set_xticks(ticks, [clock(t) for t in ticks])
    ax.set(
        xlim=(first, last),
        ylim=(0, None),
        xlabel="simulation time (h:mm)",
        ylabel="vehicles queued",
    )
    ax.grid(**GRID)
    ax.legend(loc="upper left")
    return _png(fig)


def moving_average(values: np.ndarray, times: Sequence[float], window_s: float):
    """Centred moving average along the last axis over ``window_s`` seconds.

    The ends are padded with their own values, so the first and last points
    average over a shorter real span rather than being pulled towards zero.
    """
    times = np.asarray(times, dtype=float)
    step = float(np.median(np.diff(times))) if len(times) > 1 else window_s
    half = int(window_s / step) // 2
    if half < 1:
        return values
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(half, half)], "edge")
    return np.apply_along_axis(np.convolve, -1, padded, kernel, mode="valid")


# ------------------------------------------------------------------ map
@_styled
def network_map(geometry, difference: Mapping[str, float]) -> bytes:
    """The roads in grey and each signal coloured by a delay difference.

    Args:
        geometry: a ``NetworkGeometry``.
        difference: per agent, student minus teacher delay on its approaches
            (s/veh); red where the student is slower, blue where it is faster.
    """
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.colors import TwoSlopeNorm

    xmin, ymin, xmax, ymax = geometry.bounds
    pad = 0.06 * max(xmax - xmin, ymax - ymin, 1.0)
    aspect = (ymax - ymin + 2 * pad) / (xmax - xmin + 2 * pad)
    width = 5.2
    fig, ax = _subplots(figsize=(width, float(np.clip(width * aspect, 3, 7))))

    road = "#c9ccd1"
    ax.add_collection(
        PolyCollection(geometry.junctions, facecolors=road, edgecolors=road, lw=0.5)
    )
    ax.add_collection(
        LineCollection(
            geometry.edges,
            colors=road,
            linewidths=[0.6 + 0.6 * n for n in geometry.lanes],
            capstyle="round",
            zorder=1,
        )
    )
    agents = [a for a in geometry.signals if a in difference]
    values = np.array([difference[a] for a in agents], dtype=float)
    # Differences under a second are noise; they stay pale.
    limit = max(float(np.nanmax(np.abs(values))) if len(values) else 0.0, 1.0)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    xy = np.array([geometry.signals[a] for a in agents]).reshape(-1, 2)
    points = ax.scatter(
        xy[:, 0],
        xy[:, 1],
        c=values,
        cmap="RdBu_r",
        norm=norm,
        s=260,
        edgecolors="#333333",
        linewidths=0.8,
        zorder=3,
    )
    for agent, (x, y), value in zip(agents, xy, values, strict=True):
        ax.annotate(
            f"{short_label(agent)}\n{_signed(value)} s",
            (x, y),
            textcoords="offset points",
            xytext=(11, 6),
            fontsize=7.5,
            color="#222222",
            zorder=4,
            bbox={
                "boxstyle": "round,pad=0.15",
                "fc": "white",
                "ec": "none",
                "alpha": 0.75,
            },
        )
    ax.set_xlim(xmin - pad, xmax + pad)
    ax.set_ylim(ymin - pad, ymax + pad)
    ax.set_aspect("equal")
    ax.set_axis_off()
    _scale_bar(ax, xmin - pad, ymin - pad, xmax - xmin + 2 * pad)
    bar = fig.colorbar(points, ax=ax, shrink=0.7, pad=0.02)
    bar.set_label("student − teacher delay (s/veh)")
    return _png(fig)


def _scale_bar(ax, x0: float, y0: float, width: float) -> None:
    """A round-numbered bar of about a fifth of the map's width, bottom left."""
    target = width / 5
    length = max(
        (
            m
            for m in (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000)
            if m <= target
        ),
        default=10,
    )
    x, y = x0 + 0.03 * width, y0 + 0.03 * width
    ax.plot([x, x + length], [y, y], color="#333333", lw=2, solid_capstyle="butt")
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length} m"
    ax.annotate(
        label,
        (x + length / 2, y),
        textcoords="offset points",
        xytext=(0, 3),
        ha="center",
        va="bottom",
        fontsize=7.5,
    )


def _signed(value: float) -> str:
    """``+1.2``, ``-0.4`` or ``0.0``: no sign on what rounds to zero."""
    text = f"{value:+.1f}"
    return "0.0" if float(text) == 0 else text
