"""The six scenarios, planned as steps (for the progress bar) and run in order."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import multiprocessing
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _calls
from ._peers import CallPeer
from ._progress import Progress
from ._runner import Backend, run_on
from ._scale import run_scale, run_scale_lean
from ._settings import START_METHODS, Settings
from ._startblock import measure as measure_start_blocks
from ._ways import (
    BACKENDS,
    WAITID,
    Batch,
    BatchResult,
    Way,
    idle_lags,
    run_batch,
    run_throughput,
    storm_lags,
)

#: Children start exiting this long after the barrier opens (the herd has settled).
FIRST_EXIT = 0.05
_WARM_UP = 5


@dataclass
class Step:
    label: str
    units: int
    #: Runs the step, stores its figures in the results and returns that record.
    run: Callable[[Progress], dict[str, Any] | None]


def exit_schedule(
    n: int, rate: float, rng: random.Random, first: float = FIRST_EXIT
) -> list[float]:
    """Delays after the barrier for *n* children: *rate* exits per second, random order."""
    delays = [first + i / rate for i in range(n)]
    rng.shuffle(delays)
    return delays


class _Silent(Progress):
    def __init__(self) -> None:
        super().__init__(1, enabled=False)


def _warm_up(way: Way) -> None:
    """Imports, executors, fork-server start, first-use caches: not measured."""
    run_batch(way, Batch([0.0] * _WARM_UP), _Silent())


def plan(settings: Settings, results: dict[str, Any], skipped: list[dict[str, str]]) -> list[Step]:
    """Every step of the run, in order; fills *results* as they run."""
    rng = random.Random(settings.seed)
    # Every event loop's modules are loaded before the first way runs: a fork
    # child costs what its parent's size costs (to copy and to end), so a way
    # run after another loop was first imported would fork a bigger process.
    for module in ("uvloop", "trio"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    chosen = set(settings.scenarios)
    steps: list[Step] = []
    if "forkserver" in multiprocessing.get_all_start_methods():
        # As the multiprocessing docs advise: the server imports what every
        # child needs once, instead of each child importing it again.
        multiprocessing.set_forkserver_preload(["benchmarks._children", "aioproc"])

    def usable(scenario: int, way: Way, start_method: str = "fork") -> bool:
        if settings.only and not any(way.matches(term) for term in settings.only):
            return False
        reason = way.unavailable(start_method)
        if reason is not None:
            where = f"{way.label}" + (f" ({start_method})" if start_method != "fork" else "")
            skipped.append({"scenario": str(scenario), "way": where, "reason": reason})
        return reason is None

    if chosen & {1, 4}:
        rounds = max(1, settings.latency_rounds)
        section: dict[str, Any] = {
            "n": settings.n,
            "rate": settings.rate,
            "rounds": rounds,
            "runs": [],
        }
        results["latency"] = section
        ways = [way for way in settings.latency_ways() if usable(1, way)]
        for r in range(rounds):
            delays = exit_schedule(settings.n, settings.rate, rng)
            title = "1 join latency" + (f" {r + 1}/{rounds}" if rounds > 1 else "")
            # Every other round in reverse order: a drift along the run (the
            # process grows) falls on every way alike.
            for way in ways if r % 2 == 0 else ways[::-1]:
                steps.append(_batch_step(title, way, Batch(delays), section["runs"]))

    if 2 in chosen:
        long = [settings.hol_long_seconds] * settings.hol_long
        short = exit_schedule(settings.hol_short, settings.rate, rng)
        section = {
            "long": settings.hol_long,
            "long_seconds": settings.hol_long_seconds,
            "short": settings.hol_short,
            "rate": settings.rate,
            "runs": [],
        }
        results["hol"] = section
        for way in settings.hol_ways():
            if usable(2, way):
                steps.append(
                    _batch_step(
                        "2 head-of-line",
                        way,
                        Batch(long + short),
                        section["runs"],
                        keep_from=settings.hol_long,
                    )
                )

    if chosen & {3, 5}:
        section = {"batch": settings.batch, "repeat": settings.repeat, "runs": []}
        results["throughput"] = section
        for method in START_METHODS:
            if method not in multiprocessing.get_all_start_methods():
                skipped.append({"scenario": "3", "way": method, "reason": "not on this platform"})
                continue
            n = settings.throughput[method]
            ways = [w for w in settings.throughput_ways(method) if usable(3, w, method)]
            for rep in range(settings.repeat):
                for way in ways:
                    steps.append(
                        _throughput_step(
                            way, method, n, settings.batch, rep=rep, into=section["runs"]
                        )
                    )

    if 5 in chosen:
        section = {
            "n": settings.lag_n,
            "rounds": max(1, settings.lag_rounds),
            "heartbeat_seconds": 0.001,
            "idle": {},
            "storm": {},
            "storm_same": {},
            "storm_woken": {},
            "storm_same_woken": {},
            "runs": [],
        }
        results["lag"] = section
        for backend in BACKENDS:
            if Way("aioproc", backend, None).unavailable("fork") is None:
                steps.append(_idle_step(backend, settings.idle_seconds, section["idle"]))
        section["start_blocks"] = []
        for method in START_METHODS:
            if method not in multiprocessing.get_all_start_methods():
                continue
            payloads = [0] if method == "fork" else [0, settings.start_payload]
            for payload in payloads:
                steps.append(
                    _start_block_step(
                        method, payload, settings.start_blocks[method], section["start_blocks"]
                    )
                )
        lag_ways = [way for way in settings.lag_ways() if usable(5, way)]
        floors: list[tuple[str, str, Way | None, bool, Backend]] = [
            ("storm", "5 exits, no joins", None, False, "asyncio"),
            ("storm_same", "5 AsyncProcess exits, no joins", WAITID, False, "asyncio"),
            ("storm_woken", "5 exits that wake the loop", None, True, "asyncio"),
            ("storm_same_woken", "5 AsyncProcess exits, woken", WAITID, True, "asyncio"),
        ]
        rounds = max(1, settings.lag_rounds)
        for r in range(rounds):
            delays = exit_schedule(settings.lag_n, settings.rate, rng)
            lag_steps = [
                *(_storm_step(floor, delays, section) for floor in floors),
                *(
                    _batch_step("5 loop lag", way, Batch(delays, heartbeat=True), section["runs"])
                    for way in lag_ways
                ),
            ]
            # As in scenario 1: every other round in reverse order.
            steps += lag_steps if r % 2 == 0 else lag_steps[::-1]

    if 6 in chosen:
        top = max(settings.scale)
        units = 2 * top + 3 * settings.scale_samples * (len(settings.scale) + 1)

        def scale(progress: Progress) -> dict[str, Any]:
            gc.collect()
            args = (settings.scale, settings.scale_samples, progress, settings.scale_method)
            if settings.scale_parent == "lean":
                record = run_scale_lean(*args)
            else:
                record = run_scale(*args).as_json()
            results["scale"] = record
            return record

        where = " from a lean parent" if settings.scale_parent == "lean" else ""
        title = f"6 scale to {top} {settings.scale_method} children{where}"
        steps.append(Step(title, units, scale))

    if 7 in chosen:
        sizes = settings.calls
        calls: dict[str, Any] = {"sizes": sizes.as_json(), "speed": [], "semantics": []}
        results["calls"] = calls
        for peer in settings.peers():
            if settings.only and not any(peer.matches(term) for term in settings.only):
                continue
            reason = peer.unavailable()
            if reason is not None:
                skipped.append({"scenario": "7", "way": peer.label, "reason": reason})
                continue
            if peer.timed:
                steps.append(_calls_step(peer, "speed", calls["speed"], sizes))
            steps.append(_calls_step(peer, "semantics", calls["semantics"], sizes))
    return steps


def _calls_step(
    peer: CallPeer, what: str, into: list[dict[str, Any]], sizes: _calls.CallSizes
) -> Step:
    run = _calls.measure if what == "speed" else _calls.semantics
    units = (
        sizes.sequential_of(peer) + sizes.concurrent_of(peer) + sizes.cpu_calls
        if what == "speed"
        else len(_calls.PROBES)
    )

    def step(progress: Progress) -> dict[str, Any]:
        gc.collect()
        record = run(peer, sizes, progress)
        record["how"] = peer.how
        into.append(record)
        return record

    return Step(f"7 calls {what} · {peer.label}", units, step)


def _batch_step(
    title: str, way: Way, batch: Batch, into: list[dict[str, Any]], keep_from: int = 0
) -> Step:
    def run(progress: Progress) -> dict[str, Any]:
        _warm_up(way)
        gc.collect()
        result: BatchResult = run_batch(way, batch, progress)
        record = result.as_json()
        record["latencies"] = record["latencies"][keep_from:]
        for earlier in into:  # a later round of the same way: one record per way
            if earlier["way"] == record["way"]:
                _merge_rounds(earlier, record)
                return earlier
        into.append(record)
        return record

    return Step(f"{title} · {way.label}", 2 * len(batch.delays), run)


def _storm_step(
    floor: tuple[str, str, Way | None, bool, Backend],
    delays: list[float],
    section: dict[str, Any],
) -> Step:
    """One round of a floor of scenario 5 (children exit with nothing joining them):
    *floor* is its key in *section*, its label, whose children (``storm_lags``'s
    *way*), whether their exits wake the loop, and the loop."""
    key, label, way, woken, backend = floor

    def run(progress: Progress) -> None:
        gc.collect()
        lags = storm_lags(backend, delays, progress, way, woken=woken)
        section[key].setdefault(backend, []).extend(lags)

    return Step(f"{label} · {backend}", len(delays), run)


def _merge_rounds(earlier: dict[str, Any], later: dict[str, Any]) -> None:
    """Add a later round's figures to a way's record (the noisier round's mark wins)."""
    for key in ("n", "cpu_seconds", "wall_seconds"):
        earlier[key] += later[key]
    for key in ("latencies", "start_seconds", "lags"):
        earlier[key] += later[key]
    earlier["extra_threads"] = max(earlier["extra_threads"], later["extra_threads"])


def _throughput_step(
    way: Way, method: str, n: int, batch: int, *, rep: int, into: list[dict[str, Any]]
) -> Step:
    def run(progress: Progress) -> dict[str, Any]:
        if rep == 0:
            run_throughput(way, method, min(batch, 4), batch, _Silent())
        gc.collect()
        record = run_throughput(way, method, n, batch, progress).as_json()
        record["rep"] = rep
        into.append(record)
        return record

    return Step(f"3 throughput {method} · {way.label} #{rep + 1}", n, run)


def _start_block_step(method: str, payload: int, n: int, into: list[dict[str, Any]]) -> Step:
    def run(progress: Progress) -> None:
        gc.collect()
        into.extend(measure_start_blocks(method, payload, n))
        progress.advance(2 * n)

    size = f", {payload >> 10} KiB of arguments" if payload else ""
    return Step(f"5 start blocking · {method}{size}", 2 * n, run)


def _idle_step(backend: str, seconds: float, into: dict[str, list[float]]) -> Step:
    def run(progress: Progress) -> None:
        into[backend] = run_on(backend, idle_lags, seconds)  # type: ignore[arg-type]
        progress.advance()

    return Step(f"5 idle loop · {backend}", 1, run)


def median_throughput(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (start method, way): the median rate over repeats, and all start() times."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["start_method"], run["way"]), []).append(run)
    merged = {}
    for key, reps in grouped.items():
        merged[key] = {
            "per_second": statistics.median(r["per_second"] for r in reps),
            "cpu_per_child": statistics.median(r["cpu_seconds"] / r["n"] for r in reps),
            "start_seconds": [s for r in reps for s in r["start_seconds"]],
            "reps": len(reps),
            "others_cpu_share": statistics.mean(r.get("others_cpu_share", 0.0) for r in reps),
        }
    return merged
