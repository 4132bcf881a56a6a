"""The terminal/README table, and the targets, from the raw figures."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ._scenarios import median_throughput
from ._stats import percentile, ratio, summary
from ._ways import BACKENDS, HOW

# -- formatting ----------------------------------------------------------------


def ms(seconds: float) -> str:
    """Milliseconds with three significant digits or so."""
    if seconds is None or math.isnan(seconds):
        return "-"
    value = seconds * 1e3
    if abs(value) < 1:
        return f"{value:.3f}"
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def times(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    if x >= 100:
        return f"{x:.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> list[str]:
    """A Markdown table padded to line up in a terminal; columns from *right* on align right."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).rjust(w) if i >= right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w + 1) + ":" if i >= right else "-" * (w + 2) for i, w in enumerate(widths)]
    return [line(headers), "|" + "|".join(rule) + "|", *(line(r) for r in rows)]


#: A run during which other processes used more of the CPU than this is marked.
DISTURBED = 0.10
MARK = "†"


def _by_way(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {run["way"]: run for run in runs}


def _name(way: str, record: dict[str, Any]) -> str:
    """The way's label, marked if other processes were busy while it ran."""
    return f"{way} {MARK}" if record.get("others_cpu_share", 0.0) > DISTURBED else way


def _footnote(records: list[dict[str, Any]]) -> list[str]:
    if any(r.get("others_cpu_share", 0.0) > DISTURBED for r in records):
        return [
            f"{MARK} other processes used more than {DISTURBED:.0%} of the CPU time while "
            "this ran: its figures are noisier than the others.",
            "",
        ]
    return []


def _stat(run: dict[str, Any] | None, key: str, q: str) -> float:
    if run is None:
        return math.nan
    return summary(run[key])[q]


# -- sections ------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    """Every section that ran, then the targets, as Markdown."""
    out: list[str] = ["Ways compared:", "", *describe_ways(), ""]
    scenarios = set(results["settings"]["scenarios"])
    if "latency" in results:
        out += _latency(results["latency"], show_cpu=4 in scenarios)
    if "hol" in results:
        out += _hol(results["hol"])
    if "throughput" in results and 3 in scenarios:
        out += _throughput(results["throughput"])
    if "lag" in results:
        out += _lag(results["lag"], results.get("throughput"))
    if "scale" in results:
        out += _scale(results["scale"])
    targets = results.get("targets", [])
    if targets:
        out += ["### Targets", ""]
        out += table(
            ["target", "measured (ratio from this run)", "met"],
            [[t["target"], t["measured"], t["verdict"]] for t in targets],
            right=99,
        )
        out.append("")
    if results.get("skipped"):
        out += ["Skipped:", ""]
        out += [
            f"- {s['way']} (scenario {s['scenario']}): {s['reason']}" for s in results["skipped"]
        ]
        out.append("")
    return "\n".join(out)


def _latency(section: dict[str, Any], *, show_cpu: bool) -> list[str]:
    runs = _by_way(section["runs"])
    raw, sync = runs.get("raw"), runs.get("sync")
    headers = ["way", "p50 ms", "p99 ms", "max ms", "p50/raw", "p99/raw"]
    if show_cpu:
        headers += ["threads", "CPU ms/child", "CPU/sync"]
    rows = []
    for way, run in runs.items():
        s = summary(run["latencies"])
        row = [
            _name(way, run),
            ms(s["p50"]),
            ms(s["p99"]),
            ms(s["max"]),
            times(ratio(s["p50"], _stat(raw, "latencies", "p50"))),
            times(ratio(s["p99"], _stat(raw, "latencies", "p99"))),
        ]
        if show_cpu:
            cpu = run["cpu_seconds"] / run["n"]
            sync_cpu = sync["cpu_seconds"] / sync["n"] if sync else math.nan
            row += [str(run["extra_threads"]), ms(cpu), times(ratio(cpu, sync_cpu))]
        rows.append(row)
    title = (
        f"### 1. Join latency: {section['n']} children exiting in random order, "
        f"{section['rate']:.0f}/s (fork)"
    )
    lines = [title, "", *table(headers, rows), "", *_footnote(section["runs"])]
    lines.append(
        "Latency: a child's last instruction (a CLOCK_MONOTONIC stamp, then `os._exit`) "
        "to its join returning in the parent."
    )
    if show_cpu:
        lines.append(
            "threads: most threads alive at once beyond those before the run (scenario 4); "
            "CPU: the parent's user+system time per child, starts and joins included."
        )
    return [*lines, ""]


def _hol(section: dict[str, Any]) -> list[str]:
    runs = _by_way(section["runs"])
    raw, thread = runs.get("raw"), runs.get("thread")
    rows = []
    for way, run in runs.items():
        s = summary(run["latencies"])
        rows.append(
            [
                _name(way, run),
                ms(s["p50"]),
                ms(s["p99"]),
                ms(s["max"]),
                times(ratio(s["p50"], _stat(raw, "latencies", "p50"))),
                times(ratio(_stat(thread, "latencies", "p50"), s["p50"])),
            ]
        )
    title = (
        f"### 2. Head-of-line: {section['long']} children living {section['long_seconds']:g} s "
        f"started before {section['short']} short ones; latency of the short ones"
    )
    headers = ["way", "p50 ms", "p99 ms", "max ms", "p50/raw", "thread p50/this"]
    return [title, "", *table(headers, rows), "", *_footnote(section["runs"])]


def _throughput(section: dict[str, Any]) -> list[str]:
    merged = median_throughput(section["runs"])
    rows = []
    for (method, way), m in merged.items():
        sync = merged.get((method, "sync"), {}).get("per_second", math.nan)
        raw = merged.get((method, "raw"), {}).get("per_second", math.nan)
        rows.append(
            [
                method,
                _name(way, m),
                f"{m['per_second']:.0f}",
                times(ratio(m["per_second"], sync)),
                times(ratio(m["per_second"], raw)),
                ms(m["cpu_per_child"]),
            ]
        )
    title = (
        f"### 3. Start+join throughput: children that return at once, {section['batch']} "
        f"started then joined at a time (median of {section['repeat']})"
    )
    headers = ["start method", "way", "children/s", "vs sync", "vs raw", "CPU ms/child"]
    return [title, "", *table(headers, rows, right=2), "", *_footnote(list(merged.values()))]


def _lag(section: dict[str, Any], throughput: dict[str, Any] | None) -> list[str]:
    rows = []
    for backend, lags in section["idle"].items():
        s = summary(lags)
        rows.append([f"idle {backend} loop", ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
    for backend, lags in section.get("storm", {}).items():
        s = summary(lags)
        label = f"{backend} loop, children exit unjoined"
        rows.append([label, ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
    for run in section["runs"]:
        s = summary(run["lags"])
        rows.append([_name(run["way"], run), ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
    lines = [
        "### 5. Event-loop lag: how late a 1 ms heartbeat task wakes while children exit "
        f"as in scenario 1 ({section.get('n', '?')} of them)",
        "",
        *table(["way", "lag p50 ms", "p99 ms", "max ms"], rows),
        "",
        *_footnote(section["runs"]),
        "Idle: the loop's own timer precision. Children exit unjoined: the same exits, "
        "nothing joining them; the loop loses a core to each exiting child, which is the "
        "floor for every way of joining.",
        "",
    ]
    if throughput is not None:
        merged = median_throughput(throughput["runs"])
        rows = []
        for (method, way), m in merged.items():
            if way in ("sync", "aioproc pidfd/asyncio"):
                s = summary(m["start_seconds"])
                label = "multiprocessing" if way == "sync" else "aioproc"
                rows.append([method, label, ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
        lines += [
            "How long one `start()` call blocks the event loop (scenario 3's starts):",
            "",
            *table(["start method", "start()", "p50 ms", "p99 ms", "max ms"], rows, right=2),
            "",
        ]
    return lines + _start_blocks(section.get("start_blocks", []))


def _start_blocks(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    rows = []
    for r in records:
        s = summary(r["blocks"])
        size = f"{r['payload'] >> 10} KiB" if r["payload"] else "none"
        turns = sorted(r["yields"])[len(r["yields"]) // 2] if r["yields"] else 0
        rows.append(
            [
                r["start_method"],
                size,
                r["call"],
                str(s["n"]),
                ms(s["p50"]),
                ms(s["p99"]),
                ms(s["max"]),
                str(turns),
            ]
        )
    headers = ["start method", "arguments", "call", "n", "p50 ms", "p99 ms", "max ms", "turns"]
    return [
        "Longest single block of the event loop per start, `start()` against "
        "`start_async()` (asyncio, each start joined before the next; turns: the median "
        "number of times `start_async()` handed the loop back during one start):",
        "",
        *table(headers, rows, right=3),
        "",
    ]


def _scale(section: dict[str, Any]) -> list[str]:
    rows = []
    for point in section["curve"]:
        rows.append(
            [
                str(point["live"]),
                ms(percentile(point["fork"], 50)),
                ms(percentile(point["stdlib"], 50)),
                ms(percentile(point["aioproc"], 50)),
            ]
        )
    private = {
        kind: sum(sizes) / len(sizes) / 2**20
        for kind, sizes in section["private_bytes"].items()
        if sizes
    }
    lines = [
        f"### 6. Scale: start() cost as {section.get('method', 'fork')} children pile up, "
        f"then one loop joins them all (aioproc watcher: {section['watcher']})"
        + (f" {MARK}" if section.get("others_cpu_share", 0.0) > DISTURBED else ""),
        "",
        *table(["live children", "bare fork ms", "stdlib start() ms", "aioproc start() ms"], rows),
        "",
        f"Reached {section['reached']} concurrent children (asked {section['asked']}); "
        f"one asyncio loop joined them all in {section['join_seconds']:.2f} s.",
        "Private memory of a sleeping child (smaps_rollup): "
        + ", ".join(f"{kind} {mib:.2f} MiB" for kind, mib in private.items())
        + ".",
        f"Each aioproc child costs the parent {section['parent_fds_per_child']:.2f} fds and "
        f"{section['parent_rss_per_child'] / 1024:.1f} KiB of RSS; the machine "
        f"{section['mem_available_per_child'] / 2**20:.2f} MiB of MemAvailable "
        "(page tables and kernel stacks included; noisy when others run).",
    ]
    if section.get("stopped_by"):
        lines.append(f"Stopped early: {section['stopped_by']}.")
    if section.get("fd_limit_note"):
        lines.append(f"Descriptors: {section['fd_limit_note']}.")
    return [*lines, "", *_footnote([section])]


# -- targets -------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _target(
    text: str,
    values: dict[str, float],
    ok: Callable[[float], bool],
    fmt: Callable[[float], str] = times,
) -> dict[str, Any]:
    """A target met when *ok* holds for every value (one per event loop)."""
    shown = ", ".join(f"{k} {fmt(v)}" for k, v in values.items()) if values else "not measured"
    measured = bool(values) and not any(math.isnan(v) for v in values.values())
    verdict = all(ok(v) for v in values.values()) if measured else None
    return {"target": text, "measured": shown, "verdict": _verdict(verdict), "values": values}


def _pidfd(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """aioproc's default-watcher runs, by event loop."""
    return {b: runs[w] for b in BACKENDS if (w := f"aioproc pidfd/{b}") in runs}


def _latency_targets(section: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    runs = _by_way(section["runs"])
    ours = _pidfd(runs)
    raw, thread = runs.get("raw"), runs.get("thread")

    def p(run: dict[str, Any] | None, q: str) -> float:
        return _stat(run, "latencies", q)

    found = []
    if scenario == "1":
        found.append(
            _target(
                "1: pidfd p50 latency <= 1.5x raw",
                {b: ratio(p(r, "p50"), p(raw, "p50")) for b, r in ours.items()},
                lambda v: v <= 1.5,
            )
        )
        found.append(
            _target(
                "1: pidfd p99 latency <= 3x raw",
                {b: ratio(p(r, "p99"), p(raw, "p99")) for b, r in ours.items()},
                lambda v: v <= 3,
            )
        )
    found.append(
        _target(
            f"{scenario}: pidfd p50 >= 100x better than thread",
            {b: ratio(p(thread, "p50"), p(r, "p50")) for b, r in ours.items()},
            lambda v: v >= 100,
        )
    )
    return found


def _cost_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    runs = _by_way(section["runs"])
    ours = _pidfd(runs)
    sync = runs.get("sync")
    sync_cpu = sync["cpu_seconds"] / sync["n"] if sync else math.nan
    return [
        _target(
            "4: zero threads created (pidfd)",
            {b: float(r["extra_threads"]) for b, r in ours.items()},
            lambda v: v == 0,
            fmt=lambda x: f"{x:.0f}",
        ),
        _target(
            "4: parent CPU per child <= sync's",
            {b: ratio(r["cpu_seconds"] / r["n"], sync_cpu) for b, r in ours.items()},
            lambda v: v <= 1.0,
        ),
    ]


def _throughput_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    merged = median_throughput(section["runs"])
    rate = {w: m["per_second"] for (method, w), m in merged.items() if method == "fork"}
    ours = {b: rate[w] for b in BACKENDS if (w := f"aioproc pidfd/{b}") in rate}
    return [
        _target(
            "3: fork start+join throughput >= 1.0x sync",
            {b: ratio(r, rate.get("sync", math.nan)) for b, r in ours.items()},
            lambda v: v >= 1.0,
        ),
        _target(
            "3: fork start+join throughput >= 0.7x raw",
            {b: ratio(r, rate.get("raw", math.nan)) for b, r in ours.items()},
            lambda v: v >= 0.7,
        ),
    ]


def _lag_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    ours = _pidfd(_by_way(section["runs"]))
    return [
        _target(
            "5: loop lag p99 <= 1 ms while waiting (pidfd)",
            {b: _stat(r, "lags", "p99") for b, r in ours.items()},
            lambda v: v <= 0.001,
            fmt=lambda x: f"{ms(x)} ms",
        )
    ]


def _scale_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    curve = section["curve"]
    if len(curve) >= 2:
        first, last = curve[0], curve[-1]
        growth = {
            how: ratio(percentile(last[how], 50), percentile(first[how], 50))
            for how in ("aioproc", "fork", "stdlib")
        }
        flat = growth["aioproc"] <= 1.25 * max(growth["fork"], 1.0)
        found.append(
            {
                "target": f"6: aioproc start() flat from 0 to {last['live']} live children "
                "(grows no more than a bare fork's, +25%)",
                "measured": ", ".join(f"{k} {times(v)}" for k, v in growth.items()),
                "verdict": _verdict(None if math.isnan(growth["aioproc"]) else flat),
                "values": growth,
            }
        )
    asked_enough = section["asked"] >= 10000
    found.append(
        {
            "target": "6: 10,000 concurrent children joined from one loop",
            "measured": f"{section['reached']} reached (asked {section['asked']})",
            "verdict": _verdict(section["reached"] >= 10000 if asked_enough else None),
            "values": {"reached": section["reached"]},
        }
    )
    return found


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each as ratios from this run, met or missed."""
    chosen = set(results["settings"]["scenarios"])
    found: list[dict[str, Any]] = []
    if "latency" in results:
        found += _latency_targets(results["latency"], "1")
        if 4 in chosen:
            found += _cost_targets(results["latency"])
    if "hol" in results:
        found += _latency_targets(results["hol"], "2")
    if "throughput" in results and 3 in chosen:
        found += _throughput_targets(results["throughput"])
    if "lag" in results:
        found += _lag_targets(results["lag"])
    if "scale" in results:
        found += _scale_targets(results["scale"])
    return found


def describe_ways() -> list[str]:
    return [f"- {kind}: {how}" for kind, how in HOW.items()]
