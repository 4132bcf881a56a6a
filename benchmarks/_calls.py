"""Scenario 7, "calls": aioproc.Pool and aioproc.run against the pools people call
functions with from async code, each through the one ``CallPeer`` protocol.

Speed, per peer, with 2 workers, in an event loop of its own: the latency of
sequential trivial calls (p50/p99), the rate of many concurrent trivial calls
and the parent's CPU time per call meanwhile, the wall time of CPU-bound calls
against the ideal (their CPU time divided by the workers), and the most threads
the parent had beyond those before the pool existed.

Semantics, measured by running each peer (nothing is taken from its docs), each
probe with a fresh pool in a fresh event loop, so that one probe's damage
cannot decide the next; a watchdog kills the probe's processes if a peer waits
for them shielded from cancellation, and the cells then say "hung":

- timeout: a call of ``hold`` (which sleeps) with a 0.5 s timeout; "yes" when
  it raised a ``TimeoutError`` at about 0.5 s and the process that ran the
  function was gone within a second;
- grandchild: ``hold`` started a ``sleep 1000`` before sleeping; "yes" when it
  was gone within a second of that timed-out call's end;
- cancel: a running call's task is cancelled; "yes" when the cancellation
  returned within a second and the process was gone within a second;
- crash: the process running the call is SIGKILLed; "yes" when the call raised
  within a few seconds an error that names the exit code (-9) and the pid, and
  the pool's next call returned its value;
- exception: the function raises ``ValueError`` two frames down; "yes" when
  the caller gets a ``ValueError`` whose traceback shows the inner frame.

The scenario adopts orphans (it is a child subreaper while a peer runs) and,
after each peer, kills and reaps every process that peer left behind, and
waits for the threads it started to end: what was left is in the figures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from . import _system
from ._callees import hold, raise_value_error, spin, trivial
from ._peers import Call, CallPeer
from ._runner import run_on

if TYPE_CHECKING:
    from ._progress import Progress

#: How soon after a call ended its process (or grandchild) must be gone to count as killed.
_GONE_WITHIN = 1.0
#: How long the crash probe waits for the call to fail once its process was killed.
_CRASH_WAIT = 5.0
#: How long a probe may wait for its function to start in a worker.
_START_WAIT = 30.0


@dataclass
class CallSizes:
    """How much work the calls scenario does (the presets scale it)."""

    workers: int = 2
    sequential: int = 200
    concurrent: int = 2000
    #: The slow ways (``aioproc.run`` forks a child per call; Dask) make fewer
    #: concurrent calls, and Dask fewer sequential ones.
    concurrent_slow: int = 200
    sequential_slow: int = 100
    cpu_calls: int = 40
    cpu_seconds: float = 0.05
    #: Semantics: the probe function sleeps this long; the timeout given to it.
    hold: float = 1.5
    timeout: float = 0.5

    def concurrent_of(self, peer: CallPeer) -> int:
        """How many concurrent calls *peer* makes."""
        return self.concurrent_slow if peer.slow else self.concurrent

    def sequential_of(self, peer: CallPeer) -> int:
        """How many sequential calls *peer* makes."""
        return self.sequential_slow if peer.cluster else self.sequential

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _timeout_error(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError | asyncio.TimeoutError | concurrent.futures.TimeoutError)


# -- speed -----------------------------------------------------------------------


async def _watch_threads(peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], _system.os_threads())
        await anyio.sleep(0.01)


async def _concurrently(call: Call, n: int, fn: Callable[..., Any], *args: Any) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(call, fn, *args)


async def _measure(peer: CallPeer, sizes: CallSizes, progress: Progress) -> dict[str, Any]:
    threads_before = _system.os_threads()
    peak = [threads_before]
    concurrent = sizes.concurrent_of(peer)
    latencies: list[float] = []
    async with peer.open(sizes.workers) as call, anyio.create_task_group() as helpers:
        helpers.start_soon(_watch_threads, peak)
        # Warm up: every worker started, imports done, caches filled.
        await _concurrently(call, 2 * sizes.workers, trivial)
        for _ in range(5):
            await call(trivial)
        for _ in range(sizes.sequential_of(peer)):
            t = time.perf_counter()
            value = await call(trivial)
            latencies.append(time.perf_counter() - t)
            if value != 1:
                raise RuntimeError(f"{peer.label}: trivial() returned {value!r}")
            progress.advance()
        cpu0, wall0 = _system.cpu_seconds(), time.perf_counter()
        await _concurrently(call, concurrent, trivial)
        wall, cpu = time.perf_counter() - wall0, _system.cpu_seconds() - cpu0
        progress.advance(concurrent)
        t = time.perf_counter()
        await _concurrently(call, sizes.cpu_calls, spin, sizes.cpu_seconds)
        cpu_bound = time.perf_counter() - t
        progress.advance(sizes.cpu_calls)
        peak[0] = max(peak[0], _system.os_threads())
        helpers.cancel_scope.cancel()
    return {
        "way": peer.label,
        "latencies": latencies,
        "concurrent": concurrent,
        "concurrent_seconds": wall,
        "per_second": concurrent / wall,
        "cpu_per_call": cpu / concurrent,
        "cpu_bound_seconds": cpu_bound,
        "cpu_bound_ideal": sizes.cpu_calls * sizes.cpu_seconds / sizes.workers,
        "threads": peak[0] - threads_before,
    }


# -- semantics -------------------------------------------------------------------


@dataclass
class Cell:
    ok: bool
    text: str
    seconds: float | None = None


def _read_pids(report: Path) -> list[int]:
    try:
        return [int(word) for word in report.read_text().split()]
    except FileNotFoundError:
        return []


async def _started(report: Path) -> list[int]:
    """The pids ``hold`` reported once it runs (a handshake through the file)."""
    with anyio.fail_after(_START_WAIT):
        while not (pids := _read_pids(report)):  # noqa: ASYNC110 - a file is the handshake
            await anyio.sleep(0.002)
    return pids


async def _gone_within(pids: list[int], seconds: float) -> list[float | None]:
    """Per pid: seconds until it was gone (exited or a zombie), None if it outlived *seconds*."""
    t0 = time.monotonic()
    gone: list[float | None] = [None] * len(pids)
    while True:
        now = time.monotonic() - t0
        for i, pid in enumerate(pids):
            if gone[i] is None and _system.process_gone(pid):
                gone[i] = now
        if all(g is not None for g in gone) or now > seconds:
            return gone
        await anyio.sleep(0.002)


def _kill(pids: list[int]) -> None:
    """Kill the processes in *pids* that are still running (and still ours: a pid
    that was freed and given to a stranger is left alone)."""
    for pid in pids:
        if not _system.process_gone(pid) and _system.is_descendant(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _probe_timeout(call: Call, sizes: CallSizes, report: Path) -> dict[str, Cell]:
    t0 = time.monotonic()
    error: Exception | None = None
    try:
        await call(hold, str(report), sizes.hold, True, timeout=sizes.timeout)
    except Exception as exc:
        error = exc
    took = time.monotonic() - t0
    pids = _read_pids(report)
    try:
        if len(pids) < 2:
            return {
                name: Cell(False, f"no: {type(error).__name__} before the start")
                for name in ("timeout", "grandchild")
            }
        worker, grandchild = await _gone_within(pids, _GONE_WITHIN)
    finally:
        # The grandchild would outlive the pool; a worker still running the
        # function is left to finish it (killing it would break some pools).
        _kill(pids[1:])
    if error is None:
        timeout = Cell(False, "no: ignored", took)
    elif not _timeout_error(error):
        timeout = Cell(False, f"no: {type(error).__name__}", took)
    elif worker is None:
        timeout = Cell(False, "no: not killed", took)
    else:
        ok = took <= sizes.timeout + 0.5
        timeout = Cell(ok, f"{'yes' if ok else 'no'}, {took:.2f} s", took)
    cell = Cell(True, "yes") if grandchild is not None else Cell(False, "no: runs on")
    return {"timeout": timeout, "grandchild": cell}


async def _probe_cancel(call: Call, sizes: CallSizes, report: Path) -> dict[str, Cell]:
    scope = anyio.CancelScope()
    returned: list[bool] = []

    async def victim() -> None:
        with scope:
            await call(hold, str(report), sizes.hold, False)
            returned.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(victim)
        pids = await _started(report)
        t0 = time.monotonic()
        scope.cancel()
    took = time.monotonic() - t0
    (gone,) = await _gone_within(pids[:1], _GONE_WITHIN)
    if returned:
        return {"cancel": Cell(False, "no: waits", took)}
    if gone is None:
        return {"cancel": Cell(False, "no: not killed", took)}
    ok = took <= _GONE_WITHIN
    total = took + gone  # from the cancellation to the process gone
    return {"cancel": Cell(ok, f"{'yes' if ok else 'no'}, {_ms(total)} ms", total)}


async def _probe_crash(call: Call, sizes: CallSizes, report: Path) -> dict[str, Cell]:
    errors: list[BaseException] = []
    done = anyio.Event()

    async def victim() -> None:
        try:
            await call(hold, str(report), sizes.hold, False)
        except Exception as exc:
            errors.append(exc)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(victim)
        pids = await _started(report)
        t0 = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        with anyio.move_on_after(_CRASH_WAIT):
            await done.wait()
        took = time.monotonic() - t0
        tg.cancel_scope.cancel()  # a call that hangs
    survived = False
    with anyio.move_on_after(_CRASH_WAIT), contextlib.suppress(Exception):
        survived = await call(trivial) == 1
    if not done.is_set():
        return {"crash": Cell(False, "no: hangs", took)}
    if not errors:  # the call's value came back: it ran again somewhere
        return {"crash": Cell(False, "no: returned", took)}
    error, pid = errors[0], pids[0]
    text = str(error)
    code = getattr(error, "exitcode", None) in (-9, 137) or "-9" in text or "SIGKILL" in text
    named = getattr(error, "pid", None) == pid or str(pid) in text
    missing = "/".join(what for what, there in (("code", code), ("pid", named)) if not there)
    problems = ([f"no {missing}"] if missing else []) + ([] if survived else ["broken"])
    if problems:
        return {"crash": Cell(False, ", ".join(problems), took)}
    return {"crash": Cell(True, f"yes, {_ms(took)} ms", took)}


async def _probe_exception(call: Call, sizes: CallSizes, report: Path) -> dict[str, Cell]:
    try:
        await call(raise_value_error)
    except Exception as exc:
        if not isinstance(exc, ValueError):
            return {"exception": Cell(False, "no: type lost")}
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if "_deep_in_the_child" not in text:
            return {"exception": Cell(False, "no traceback")}
        return {"exception": Cell(True, "yes")}
    return {"exception": Cell(False, "no: returned")}


_Probe = Callable[[Call, CallSizes, Path], Any]
#: Each probe, and the cells it fills.
PROBES: tuple[tuple[tuple[str, ...], _Probe], ...] = (
    (("exception",), _probe_exception),
    (("timeout", "grandchild"), _probe_timeout),
    (("cancel",), _probe_cancel),
    (("crash",), _probe_crash),
)
#: The columns of the semantics table, in order.
CHECKS = ("timeout", "cancel", "crash", "exception", "grandchild")


async def _probe(
    peer: CallPeer, sizes: CallSizes, names: tuple[str, ...], probe: _Probe, report: Path
) -> dict[str, Any]:
    """One probe with a fresh pool; the cells it filled, and what went wrong besides."""
    cells: dict[str, Cell] = {}
    errors: list[str] = []
    fired: list[bool] = []

    async def watchdog() -> None:
        # A peer may wait for its worker shielded from cancellation: killing the
        # processes the function reported is what ends such a wait.
        await anyio.sleep(sizes.hold + _START_WAIT)
        fired.append(True)
        _kill(_read_pids(report))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog)
            # A hang guard, well beyond every wait a probe makes itself.
            with anyio.move_on_after(sizes.hold + _START_WAIT + 3 * _CRASH_WAIT) as guard:
                async with peer.open(sizes.workers) as call:
                    cells = await probe(call, sizes, report)
            tg.cancel_scope.cancel()
        if guard.cancelled_caught or fired:
            cells = {name: Cell(False, "no: hung") for name in names}
    except Exception as exc:
        errors.append(f"{names[0]}: {exc!r}")
        if not cells:  # the probe itself failed (not only the pool's shutdown)
            cells = {name: Cell(False, f"no: {type(exc).__name__}") for name in names}
    finally:
        _kill(_read_pids(report))
    return {"cells": {key: asdict(cell) for key, cell in cells.items()}, "errors": errors}


def semantics(peer: CallPeer, sizes: CallSizes, progress: Progress) -> dict[str, Any]:
    """Every probe for *peer*, each with a fresh pool in an event loop of its own."""
    threads = _system.os_threads()
    record: dict[str, Any] = {"way": peer.label, "errors": []}
    with (
        tempfile.TemporaryDirectory(prefix="aioproc-calls-") as tmp,
        _system.adopting_orphans() as left,
    ):
        for i, (names, probe) in enumerate(PROBES):
            report = Path(tmp) / f"probe-{i}"
            found = run_on(peer.backend, _probe, peer, sizes, names, probe, report)
            record.update(found["cells"])
            record["errors"] += found["errors"]
            progress.advance()
    record["left_processes"] = left
    record["left_threads"] = _system.threads_back_to(threads, within=2.0)
    return record


# -- one peer, in a loop of its own, and nothing left afterwards --------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.1f}"


def measure(peer: CallPeer, sizes: CallSizes, progress: Progress) -> dict[str, Any]:
    """The speed figures of *peer*, in a fresh event loop of its backend; then
    every process it left is killed and reaped, and its threads counted."""
    threads = _system.os_threads()
    with _system.adopting_orphans() as left:
        try:
            record: dict[str, Any] = run_on(peer.backend, _measure, peer, sizes, progress)
        except Exception as exc:  # a peer that fails here is reported, and the run goes on
            record = {"way": peer.label, "error": f"{type(exc).__name__}: {exc}"}
    record["left_processes"] = left
    record["left_threads"] = _system.threads_back_to(threads, within=2.0)
    return record
