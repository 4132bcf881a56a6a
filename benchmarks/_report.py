"""The terminal/README table, and the targets, from the raw figures."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from ._scenarios import median_throughput
from ._stats import percentile, ratio, summary
from ._ways import BACKENDS, HOW

# -- formatting ----------------------------------------------------------------


#: No line of the output is wider than this (a terminal's width, with room to spare).
WIDTH = 120


def wrap(text: str, width: int = WIDTH) -> str:
    """*text* with every prose line longer than *width* wrapped; table rows and
    headings are left as they are (they are made to fit)."""
    out: list[str] = []
    for line in text.splitlines():
        if len(line) <= width or line.startswith(("|", "#")):
            out.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        out += textwrap.wrap(
            line,
            width,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join(out)


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
    if results.get("calls", {}).get("semantics"):
        out += _calls(results["calls"])
    targets = results.get("targets", [])
    if targets:
        out += ["### Targets", ""]
        out += table(
            ["target", "measured (ratio from this run)", "met"],
            [
                [t["target"] + (f" {MARK}" if t.get("noisy") else ""), t["measured"], t["verdict"]]
                for t in targets
            ],
            right=99,
        )
        out.append("")
        if any(t.get("noisy") for t in targets):
            out += [
                f"{MARK} measured while other processes used more than {DISTURBED:.0%} of the "
                "CPU time: noisier than the others.",
                "",
            ]
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
        + (f", {section['rounds']} rounds of each way" if section.get("rounds", 1) > 1 else "")
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
    floors = (
        ("storm", "{} loop, bare forks exit unjoined"),
        ("storm_same", "{} loop, AsyncProcess children exit unjoined"),
        ("storm_woken", "{} loop woken by each exit, nothing joined"),
        ("storm_same_woken", "{} loop woken by each AsyncProcess exit, nothing joined"),
    )
    for key, label in floors:
        for backend, lags in section.get(key, {}).items():
            s = summary(lags)
            rows.append([label.format(backend), ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
    for run in section["runs"]:
        s = summary(run["lags"])
        rows.append([_name(run["way"], run), ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
    lines = [
        "### 5. Event-loop lag: how late a 1 ms heartbeat wakes while "
        f"{section.get('n', '?')} children exit as in scenario 1, "
        f"{section.get('rounds', 1)} rounds of each way",
        "",
        *table(["way", "lag p50 ms", "p99 ms", "max ms"], rows),
        "",
        *_footnote(section["runs"]),
        "Idle: the loop's own timer precision. Children exit unjoined: the same exits, "
        "nothing joining them; the loop loses a core to each exiting child, which is the "
        "floor for every way of joining (AsyncProcess children cost the machine more to "
        "end than bare forks). Woken by each exit: children that write a byte to a pipe "
        "the loop reads as they end; being woken at all makes the heartbeat later, because "
        "epoll_wait's timeout is whole milliseconds (a wait cut short resumes rounded up): "
        "the floor for any way of joining in an event loop. wake/LOOP: the same "
        "AsyncProcess children as aioproc's, joined by the thinnest join that loop can "
        "make (woken by the pidfd, the status collected): the target's floor, so that "
        "what is left is aioproc's.",
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
    cpu = all("aioproc cpu" in point for point in section["curve"])
    faults = all("aioproc faults" in point for point in section["curve"])
    for point in section["curve"]:
        row = [str(point["live"])]
        for how in ("fork", "stdlib", "aioproc"):
            row.append(ms(percentile(point[how], 50)))
            if cpu:
                row[-1] += f" ({ms(percentile(point[how + ' cpu'], 50))})"
        if faults:
            row.append(
                " / ".join(
                    f"{percentile(point[how + ' faults'], 50):.0f}"
                    for how in ("fork", "stdlib", "aioproc")
                )
            )
            row.append(f"{point['new page us']:.1f}")
        rows.append(row)
    headers = ["live children", "bare fork ms", "stdlib start() ms", "aioproc start() ms"]
    if faults:
        headers += ["faults f/s/a", "new page µs"]
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
        *table(headers, rows),
        "",
        *(
            [
                "Medians of the wall time, and in brackets of the starting thread's CPU time "
                "(the kernel's fork included; others' load does not inflate it).",
            ]
            if cpu
            else []
        ),
        *(
            [
                "Faults f/s/a: the starting thread's page faults a start, medians, for bare "
                "fork / stdlib / aioproc (after a fork, each page the parent writes first "
                "is one, and a copy). New page: what a first "
                "write to fresh memory cost at that point; on a VM whose host backs memory "
                "lazily it jumps when the guest's recently used free memory runs out, and "
                "each fault's copy pays it too.",
            ]
            if faults
            else []
        ),
        f"Reached {section['reached']} concurrent children (asked {section['asked']}); "
        f"one asyncio loop joined them all in {section['join_seconds']:.2f} s. "
        + (
            "The ramp ran in a lean parent that only starts the children"
            if section.get("parent") == "lean"
            else "The ramp ran in the benchmark's own process"
        )
        + f" ({section.get('parent_rss', 0) / 2**20:.0f} MiB resident when it began).",
        "Private memory of a sleeping child (smaps_rollup): "
        + ", ".join(f"{kind} {mib:.2f} MiB" for kind, mib in private.items())
        + ".",
        f"Each aioproc child costs the parent {section['parent_fds_per_child']:.2f} fds and "
        f"{section['parent_rss_per_child'] / 1024:.1f} KiB of RSS; the machine "
        f"{section['mem_available_per_child'] / 2**20:.2f} MiB of MemAvailable "
        "(page tables and kernel stacks included; noisy when others run)"
        + (
            f"; {section['mem_available_at_top'] / 2**30:.1f} GiB of memory was still "
            "available with all of them alive."
            if section.get("mem_available_at_top")
            else "."
        ),
    ]
    if section.get("stopped_by"):
        lines.append(f"Stopped early: {section['stopped_by']}.")
    if section.get("fd_limit_note"):
        lines.append(f"Descriptors: {section['fd_limit_note']}.")
    return [*lines, "", *_footnote([section])]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _is_ours(way: str) -> bool:
    return way.startswith("aioproc")


def _calls(section: dict[str, Any]) -> list[str]:
    sizes = section["sizes"]
    ideal = sizes["cpu_calls"] * sizes["cpu_seconds"] / sizes["workers"]
    rows = []
    for run in section["speed"]:
        if "error" in run:
            continue
        s = summary(run["latencies"])
        rows.append(
            [
                _name(run["way"], run),
                ms(s["p50"]),
                ms(s["p99"]),
                f"{run['per_second']:,.0f}",
                ms(run["cpu_per_call"]),
                f"{run['cpu_bound_seconds']:.2f}",
                times(ratio(run["cpu_bound_seconds"], run["cpu_bound_ideal"])),
                str(run["threads"]),
            ]
        )
    headers = ["way", "p50 ms", "p99 ms", "calls/s", "CPU ms/call", "CPU-bound s", "/ideal"]
    lines = [
        f"### 7. Calls: a function in another process, {sizes['workers']} workers",
        "",
        *table([*headers, "threads"], rows),
        "",
        *_footnote(section["speed"]),
        f"p50/p99: {sizes['sequential']} sequential calls of a function that returns at once "
        f"({sizes['sequential_slow']} for Dask). "
        f"calls/s: {sizes['concurrent']:,} such calls at once",
        f"({sizes['concurrent_slow']} for aioproc.run and Dask), and the parent's CPU time "
        f"per call meanwhile. CPU-bound: {sizes['cpu_calls']} calls",
        f"of {sizes['cpu_seconds'] * 1e3:.0f} ms of CPU each, wall time against the ideal "
        f"{ideal:.2f} s. threads: the most the parent had beyond those before.",
        "",
    ]
    from ._calls import CHECKS

    headers = [
        "way",
        "timeout kills",
        "cancel kills",
        "crash: code,pid,next",
        "ValueError+trace",
        "grandchild gone",
    ]
    rows = [
        [_name(r["way"], r), *(r.get(check, {}).get("text", "-") for check in CHECKS)]
        for r in section["semantics"]
    ]
    lines += [
        "Semantics, measured by running each way (a fresh pool for each probe):",
        "",
        *table(headers, rows, right=99),
        "",
        *_footnote(section["semantics"]),
        f"- timeout: a call that sleeps {sizes['hold']:g} s, with a {sizes['timeout']:g} s "
        "timeout; yes: the timeout came at that time and the",
        "  process running the call was gone within 1 s after; ignored: the value came back "
        "when the call ended.",
        "- cancel: the task of a running call is cancelled; yes: the process was gone within "
        "this time; waits: the cancellation",
        "  waited for the call to end.",
        "- crash: the process running a call is SIGKILLed; yes: the call raised after this time "
        "an error that names the",
        "  exit code and the pid, and the next call worked (broken: it failed); returned: the "
        "call was run again.",
        "- ValueError: raised two frames down in the function; trace: those frames reach the "
        "caller; type lost: another type.",
        "- grandchild: a `sleep 1000` that the timed-out function started; yes: gone within "
        "1 s of the call's end.",
        "",
        "Ways:",
        "",
        *(f"- {r['way']}: {r['how']}" for r in section["semantics"]),
        "",
    ]
    left = []
    for what in ("speed", "semantics"):
        for r in section[what]:
            if r["left_processes"]:
                left.append(
                    f"- {r['way']} ({what}): {_count(len(r['left_processes']), 'process')} "
                    "still running after its pool was shut down (killed)"
                )
            if r["left_threads"]:
                left.append(
                    f"- {r['way']} ({what}): {_count(r['left_threads'], 'thread')} still there "
                    "2 s after its event loop ended"
                )
    if left:
        lines += ["Left behind:", "", *left, ""]
    failed = [f"- {r['way']}: {r['error']}" for r in section["speed"] if "error" in r]
    if failed:
        lines += ["Failed (no speed figures):", "", *failed, ""]
    return lines


# -- targets -------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _target(
    text: str,
    values: dict[str, float],
    ok: Callable[[float], bool],
    records: Sequence[dict[str, Any] | None] = (),
    fmt: Callable[[float], str] = times,
) -> dict[str, Any]:
    """A target met when *ok* holds for every value (one per event loop).

    *records* are the runs the values come from: the target is marked noisy
    when other processes were busy during any of them.
    """
    shown = ", ".join(f"{k} {fmt(v)}".strip() for k, v in values.items())
    if values and shown.endswith(" ms"):  # the unit once, at the end: the table fits 120 columns
        shown = shown.replace(" ms,", ",")
    if not values:
        shown = "not measured"
    measured = bool(values) and not any(math.isnan(v) for v in values.values())
    verdict = all(ok(v) for v in values.values()) if measured else None
    return {
        "target": text,
        "measured": shown,
        "verdict": _verdict(verdict),
        "values": values,
        "noisy": measured and _noisy(records),
    }


def _noisy(records: Sequence[dict[str, Any] | None]) -> bool:
    return any(r is not None and r.get("others_cpu_share", 0.0) > DISTURBED for r in records)


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
                [raw, *ours.values()],
            )
        )
        wake: dict[str, dict[str, Any]] = {
            b: r for b in BACKENDS if (r := runs.get(f"wake/{b}")) is not None
        }
        if wake:
            found.append(
                _target(
                    "1: aioproc's part of a join, p50 <= 0.1 ms",
                    {b: p(r, "p50") - p(wake.get(b), "p50") for b, r in ours.items()},
                    lambda v: v <= 0.0001,
                    [*ours.values(), *wake.values()],
                    fmt=lambda x: f"{x * 1e3:+.2f} ms",
                )
            )
        found.append(
            _target(
                "1: pidfd p99 latency <= 3x raw",
                {b: ratio(p(r, "p99"), p(raw, "p99")) for b, r in ours.items()},
                lambda v: v <= 3,
                [raw, *ours.values()],
            )
        )
    found.append(
        _target(
            f"{scenario}: pidfd p50 >= 100x better than thread",
            {b: ratio(p(thread, "p50"), p(r, "p50")) for b, r in ours.items()},
            lambda v: v >= 100,
            [thread, *ours.values()],
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
            list(ours.values()),
            fmt=lambda x: f"{x:.0f}",
        ),
        _target(
            "4: parent CPU per child <= sync's",
            {b: ratio(r["cpu_seconds"] / r["n"], sync_cpu) for b, r in ours.items()},
            lambda v: v <= 1.0,
            [sync, *ours.values()],
        ),
    ]


def _throughput_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    merged = median_throughput(section["runs"])
    rate = {w: m["per_second"] for (method, w), m in merged.items() if method == "fork"}
    ours = {b: rate[w] for b in BACKENDS if (w := f"aioproc pidfd/{b}") in rate}
    used = [m for (method, _), m in merged.items() if method == "fork"]
    return [
        _target(
            "3: fork start+join throughput >= 1.0x sync",
            {b: ratio(r, rate.get("sync", math.nan)) for b, r in ours.items()},
            lambda v: v >= 1.0,
            used,
        ),
        _target(
            "3: fork start+join throughput >= 0.7x raw",
            {b: ratio(r, rate.get("raw", math.nan)) for b, r in ours.items()},
            lambda v: v >= 0.7,
            used,
        ),
    ]


#: How much later than the same exits with nothing joining them the heartbeat may wake.
LAG_OVER_FLOOR = 0.0002


def _lag_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    runs = _by_way(section["runs"])
    ours = _pidfd(runs)
    woken = section.get("storm_woken", {})

    def floor(backend: str) -> float:
        # The same children joined by the thinnest join on the same loop
        # (wake/LOOP); without it, bare forks that wake the loop.
        wake = runs.get(f"wake/{backend}")
        if wake is not None:
            return _stat(wake, "lags", "p99")
        lags = woken.get(backend) or woken.get("asyncio")
        return percentile(lags, 99) if lags else math.nan

    return [
        _target(
            f"5: loop lag p99 <= wake/LOOP's + {LAG_OVER_FLOOR * 1e3:g} ms (pidfd)",
            {b: _stat(r, "lags", "p99") - floor(b) for b, r in ours.items()},
            lambda v: v <= LAG_OVER_FLOOR,
            list(ours.values()),
            fmt=lambda x: f"{x * 1e3:+.2f} ms",
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
                "target": f"6: start() flat to {last['live']} live: growth <= 1.25x fork's",
                "measured": ", ".join(f"{k} {times(v)}" for k, v in growth.items()),
                "verdict": _verdict(None if math.isnan(growth["aioproc"]) else flat),
                "values": growth,
                "noisy": _noisy([section]),
            }
        )
        if all("aioproc cpu" in point for point in (first, last)):
            cpu = {
                how: ratio(percentile(last[how + " cpu"], 50), percentile(first[how + " cpu"], 50))
                for how in ("aioproc", "fork")
            }
            found.append(
                {
                    "target": f"6: start() CPU to {last['live']} live <= 1.3x or 1.1x fork's",
                    "measured": ", ".join(f"{k} {times(v)}" for k, v in cpu.items()),
                    "verdict": _verdict(
                        None
                        if math.isnan(cpu["aioproc"])
                        else cpu["aioproc"] <= max(1.3, 1.1 * cpu["fork"])
                    ),
                    "values": cpu,
                    "noisy": False,
                }
            )
        if all("aioproc faults" in point for point in (first, last)):
            pages = {
                how: ratio(
                    percentile(last[how + " faults"], 50), percentile(first[how + " faults"], 50)
                )
                for how in ("aioproc", "fork")
            }
            found.append(
                {
                    "target": f"6: page faults a start() to {last['live']} live <= 1.1x",
                    "measured": f"aioproc {times(pages['aioproc'])}; new page "
                    f"{first['new page us']:.1f} -> {last['new page us']:.1f} µs",
                    "verdict": _verdict(
                        None if math.isnan(pages["aioproc"]) else pages["aioproc"] <= 1.1
                    ),
                    "values": pages,
                    "noisy": False,
                }
            )
    asked_enough = section["asked"] >= 10000
    found.append(
        {
            "target": "6: 10,000 concurrent children joined from one loop",
            "measured": f"{section['reached']} reached (asked {section['asked']})",
            "verdict": _verdict(section["reached"] >= 10000 if asked_enough else None),
            "values": {"reached": section["reached"]},
            "noisy": _noisy([section]),
        }
    )
    return found


def _calls_targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    speed = _by_way([r for r in section["speed"] if "error" not in r])
    pool = speed.get("aioproc.Pool")
    peers = {w: r for w, r in speed.items() if not _is_ours(w)}
    semantics = _by_way(section["semantics"]).get("aioproc.Pool")

    def best(key: Callable[[dict[str, Any]], float], pick: Callable[..., Any]) -> dict[str, float]:
        """The Pool's figure over the best peer's, labelled with that peer."""
        if pool is None or not peers:
            return {}
        name = pick(peers, key=lambda w: key(peers[w]))
        return {f"vs {name}": ratio(key(pool), key(peers[name]))}

    def p50(r: dict[str, Any]) -> float:
        return summary(r["latencies"])["p50"]

    def p99(r: dict[str, Any]) -> float:
        return summary(r["latencies"])["p99"]

    used = [r for r in (pool, *peers.values()) if r is not None]
    count = lambda x: f"{x:.0f}"  # noqa: E731
    from ._calls import CHECKS

    yes = (
        {"cells yes": float(sum(bool(semantics.get(c, {}).get("ok")) for c in CHECKS))}
        if semantics is not None
        else {}
    )
    return [
        _target("7: Pool p50 <= 0.8x the best peer's", best(p50, min), lambda v: v <= 0.8, used),
        _target("7: Pool p99 <= 1.0x the best peer's", best(p99, min), lambda v: v <= 1.0, used),
        _target(
            "7: Pool throughput >= 1.0x the best peer's",
            best(lambda r: r["per_second"], max),
            lambda v: v >= 1.0,
            used,
        ),
        _target(
            "7: Pool CPU-bound <= 1.06x ideal",
            {"": ratio(pool["cpu_bound_seconds"], pool["cpu_bound_ideal"])} if pool else {},
            lambda v: v <= 1.06,
            used[:1],
        ),
        _target(
            "7: Pool: zero parent threads",
            {"": float(pool["threads"])} if pool else {},
            lambda v: v == 0,
            used[:1],
            fmt=count,
        ),
        _target(
            "7: Pool parent CPU per call <= the best peer's",
            best(lambda r: r["cpu_per_call"], min),
            lambda v: v <= 1.0,
            used,
        ),
        _target(
            f"7: Pool: every semantics cell yes ({len(CHECKS)})",
            yes,
            lambda v: v == len(CHECKS),
            [semantics] if semantics else [],
            fmt=count,
        ),
    ]


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
    if "calls" in results:
        found += _calls_targets(results["calls"])
    return found


def describe_ways() -> list[str]:
    return [f"- {kind}: {how}" for kind, how in HOW.items()]
