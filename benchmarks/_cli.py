"""``python -m benchmarks``: run the scenarios, print the table, write JSON and a PNG."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import _plot, _report, _system
from ._progress import Progress
from ._scenarios import plan
from ._settings import NEEDS, SCENARIOS, Settings, preset
from ._ways import shutdown_extras

RESULTS = Path(__file__).resolve().parent / "results"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare aioproc with the other ways of joining processes from async "
        "code, in one process on this machine, and print the ratios.",
        epilog="Scenarios: "
        + "; ".join(f"{k} {v}" for k, v in SCENARIOS.items())
        + ". Scenario 4 reads scenario 1's runs and 5 reads start() times from 3's.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="a smoke run: 20 children, every combination"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="every watcher on every loop in every scenario, and scale up to 5000 children",
    )
    parser.add_argument("--n", type=_positive_int, help="children in scenario 1")
    parser.add_argument("--rate", type=float, help="exits per second in scenarios 1, 2 and 5")
    parser.add_argument(
        "--scale", type=_int_list, metavar="N,N,...", help="live-children checkpoints, scenario 6"
    )
    parser.add_argument(
        "--scale-method",
        choices=["fork", "forkserver"],
        help="start method of scenario 6's children (forkserver ones are smaller)",
    )
    parser.add_argument(
        "--scale-parent",
        choices=["this", "lean"],
        help="who starts scenario 6's children: this process (default), or a lean one that "
        "imports only aioproc, so that this process's size does not decide the result",
    )
    parser.add_argument(
        "--scenarios", type=_int_list, metavar="1,2,...", help="which scenarios to run (1-7)"
    )
    parser.add_argument(
        "--only",
        metavar="TEXT,TEXT,...",
        help="run only these ways: a label, kind, watcher, loop or watcher/loop, "
        "e.g. raw,sync,pidfd/asyncio or raw,trio",
    )
    parser.add_argument("--seed", type=int, help="seed of the random exit order")
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "latest.json",
        help="where the raw figures go (default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=RESULTS / "latest.png",
        help="where the latency plot goes (default: %(default)s)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    settings = preset("quick" if args.quick else "full" if args.full else "default")
    if args.n is not None:
        settings.n = args.n
    if args.rate is not None:
        if args.rate <= 0:
            parser.error(f"--rate must be positive, got {args.rate}")
        settings.rate = args.rate
    if args.scale is not None:
        settings.scale = args.scale
    if args.scale_method is not None:
        settings.scale_method = args.scale_method
    if args.scale_parent is not None:
        settings.scale_parent = args.scale_parent
    if args.seed is not None:
        settings.seed = args.seed
    if args.only:
        settings.only = [term.strip() for term in args.only.split(",") if term.strip()]
    if args.scenarios is not None:
        unknown = sorted(set(args.scenarios) - set(SCENARIOS))
        if unknown:
            parser.error(f"--scenarios takes numbers 1-7, got {unknown}")
        chosen = set(args.scenarios)
        chosen |= {NEEDS[s] for s in chosen if s in NEEDS}
        settings.scenarios = sorted(chosen)
    return settings, args


def _children_left() -> list[int]:
    """Our children still there, apart from the fork server and resource tracker."""
    return sorted(_system.children() - _system.long_lived_helpers())


def _header(results: dict[str, Any], argv: list[str]) -> list[str]:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = results["load_average_end"]
    return [
        "## aioproc benchmarks",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"{m['implementation']} {m['python']}; {m['date'].replace('T', ' ')}.",
        f"Load average {m['load_average'][0]:.2f} at the start, {load[0]:.2f} at the end; "
        f"other processes used {results['others_cpu_share']:.0%} of the CPU time meanwhile.",
        f"{versions}.",
        f"`python -m benchmarks {' '.join(argv)}`".replace("  ", " ").replace(" `", "`")
        + f" ({results['preset']} sizes) took {results['duration_seconds']:.0f} s.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings, args = parse(argv)
    # The thread baselines fork while their threads exist; Python >= 3.12 warns
    # about that on every fork.  It is their nature, not news.
    warnings.filterwarnings(
        "ignore", message=r"This process .* is multi-threaded", category=DeprecationWarning
    )
    results: dict[str, Any] = {
        "machine": _system.machine(),
        "preset": settings.preset,
        "settings": settings.as_json(),
        "argv": argv,
    }
    skipped: list[dict[str, str]] = []
    results["skipped"] = skipped
    steps = plan(settings, results, skipped)
    progress = Progress(len(steps), enabled=not args.no_progress)
    load = results["machine"]["load_average"][0]
    if load > (os.cpu_count() or 1) * 0.5:
        progress.note(f"note: load average is {load:.1f}: other work will show in the figures")
    for s in skipped:
        progress.note(f"skipped {s['way']} in scenario {s['scenario']}: {s['reason']}")
    began = time.monotonic()
    others = _system.OthersMeter()
    timings: list[dict[str, Any]] = []
    results["steps"] = timings
    try:
        for step in steps:
            progress.begin(step.label, step.units)
            t = time.monotonic()
            meter = _system.OthersMeter()
            record = step.run(progress)
            share = round(meter.share(), 3)
            if record is not None:  # a record filled in rounds keeps its noisiest one's
                record["others_cpu_share"] = max(share, record.get("others_cpu_share", 0.0))
            timings.append(
                {"step": step.label, "seconds": round(time.monotonic() - t, 3), "others": share}
            )
            progress.end()
    finally:
        shutdown_extras()
        progress.close()
    results["duration_seconds"] = time.monotonic() - began
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["others_cpu_share"] = round(others.share(), 3)
    results["children_left"] = _children_left()
    results["targets"] = _report.targets(results)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    text = [*_header(results, argv), _report.render(results)]
    if args.no_plot:
        text.append("Plot: not asked for.")
    elif (why := _plot.missing()) is not None:
        text.append(f"Plot: {why}.")
    elif _plot.plot(results, args.plot):
        text.append(f"Plot: {args.plot}")
    text.append(f"Raw figures: {args.json}")
    if results["children_left"]:
        text.append(f"ERROR: children left behind: {results['children_left']}")
    text.append(f"The run took {results['duration_seconds']:.0f} s.")
    print(_report.wrap("\n".join(text)))
    return 1 if results["children_left"] else 0
