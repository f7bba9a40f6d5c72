"""The HTML report of a run: learning curves, per-intersection delay, queues, map.

``marlkd report RUN_DIR`` writes ``RUN_DIR/report.html``, one self-contained
page with every figure embedded. matplotlib (the ``report`` extra) is imported
only when a page is rendered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_report_args", "cmd_report", "render_report", "write_report"]


def add_report_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``marlkd report``."""
    parser.add_argument("run_dir", help="the run folder written by `marlkd distill`")
    parser.add_argument(
        "--results",
        default="results.json",
        help="results file in the run folder to report, e.g. "
        "results-demand1.3.json (default results.json)",
    )
    parser.add_argument(
        "--out", help="where to write the page (default RUN_DIR/report.html)"
    )


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(
        Path(args.run_dir),
        results=args.results,
        out=Path(args.out) if args.out else None,
    )
    print(f"wrote {path}")
    return 0


def write_report(run_dir, *, results: str = "results.json", out=None) -> Path:
    """See ``marlkd.report.html.write_report``."""
    from marlkd.report.html import write_report as write

    return write(run_dir, results=results, out=out)


def render_report(run_dir, *, results: str = "results.json") -> str:
    """See ``marlkd.report.html.render_report``."""
    from marlkd.report.html import render_report as render

    return render(run_dir, results=results)
