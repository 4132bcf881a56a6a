"""The ways of joining processes that the benchmark compares, and one run of each.

Baselines, measured in the same invocation as aioproc:

- ``raw``: ``os.fork`` + ``os._exit`` children, reaped with ``os.waitpid`` by a
  parent blocked in ``waitid`` (the floor: no Python between the kernel and us);
- ``sync``: ``multiprocessing.Process``, ``start()`` then a blocking ``join()``
  in start order, no event loop;
- ``thread``: ``multiprocessing.Process`` + ``await asyncio.to_thread(p.join)``
  (asyncio's default executor);
- ``poll``: ``while p.is_alive(): await asyncio.sleep(0.005)``;
- ``aiomultiprocess``: its ``Process.join``, which polls the same way (optional).

and ``aioproc`` with a forced watcher on asyncio, uvloop or trio.  One more,
``waitid``, tells aioproc's part from its children's: AsyncProcess children
found the way ``raw`` finds its own, by a parent blocked in ``waitid``.  They
exit later than bare forks (the multiprocessing bootstrap and the loop-state
reset leave them more private pages to free); what aioproc's join adds on top
is the difference between ``aioproc pidfd`` and ``waitid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import mmap
import multiprocessing
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio

import aioproc
from aioproc._watchers import why_unavailable

from ._children import noop, stamp_and_exit, stamp_and_exit_async
from ._runner import Backend, run_on
from ._system import cpu_seconds, os_threads

if TYPE_CHECKING:
    from ._progress import Progress

Kind = Literal["raw", "waitid", "sync", "thread", "poll", "aiomultiprocess", "aioproc"]
T = TypeVar("T")

BACKENDS: tuple[Backend, ...] = ("asyncio", "uvloop", "trio")
HOW: dict[str, str] = {
    "raw": "os.fork + os._exit, reaped by os.waitpid (the floor)",
    "waitid": "AsyncProcess children, but found by a blocking waitid (their own floor)",
    "sync": "multiprocessing.Process, blocking join() in start order",
    "thread": "multiprocessing.Process + await asyncio.to_thread(p.join)",
    "poll": "multiprocessing.Process + is_alive() every 5 ms",
    "aiomultiprocess": "aiomultiprocess.Process (polls exitcode every 5 ms)",
    "aioproc": "AsyncProcess + await p.join(), as `aioproc WATCHER/LOOP`",
}
#: The heartbeat task's period: its lateness is the event loop's lag.
HEARTBEAT = 0.001


@dataclass(frozen=True)
class Way:
    """One way of starting and joining children: a baseline, or aioproc + watcher + loop."""

    kind: Kind
    backend: Backend = "none"
    watcher: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "aioproc":
            return f"aioproc {self.watcher}/{self.backend}"
        return self.kind

    def matches(self, term: str) -> bool:
        """Whether *term* names this way: its label, kind, watcher, loop or watcher/loop."""
        names = {self.label, self.kind, self.backend}
        if self.watcher is not None:
            names |= {self.watcher, f"{self.watcher}/{self.backend}"}
        return term in names

    @property
    def is_async(self) -> bool:
        return self.kind not in ("raw", "waitid", "sync")

    def unavailable(self, start_method: str) -> str | None:
        """Why this way cannot run here with *start_method* (None: it can)."""
        if self.kind == "raw" and start_method != "fork":
            return "raw is os.fork itself"
        for module in ("aiomultiprocess", "uvloop", "trio"):
            if module in (self.kind, self.backend) and not _installed(module):
                return f"{module} is not installed (pip install aioproc[bench])"
        if self.kind != "aioproc" or self.watcher is None:
            return None
        return why_unavailable(self.watcher, start_method, uvloop=self.backend == "uvloop")


RAW = Way("raw")
WAITID = Way("waitid")
SYNC = Way("sync")
THREAD = Way("thread", "asyncio")
POLL = Way("poll", "asyncio")
AIOMULTIPROCESS = Way("aiomultiprocess", "asyncio")


def aioproc_way(watcher: str, backend: Backend = "asyncio") -> Way:
    return Way("aioproc", backend, watcher)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def forced_watcher(way: Way) -> Iterator[None]:
    aioproc.set_watcher(way.watcher)  # type: ignore[arg-type]
    try:
        yield
    finally:
        aioproc.set_watcher(None)


class Barrier:
    """A pipe every child blocks on until the parent closes the write end."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()

    @property
    def ends(self) -> tuple[int, int]:
        return self.read_end, self.write_end

    def release(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def close(self) -> None:
        self.release()
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1


# -- starting and joining, per kind of async way ------------------------------


class _Ops:
    """Start, join and release the children of one async way."""

    def __init__(self, start_method: str) -> None:
        self.start_method = start_method
        self.ctx = multiprocessing.get_context(start_method)

    def start(self, target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        p = self.ctx.Process(target=target, args=args)  # type: ignore[attr-defined]
        p.start()
        return p

    async def join(self, p: Any) -> int | None:
        raise NotImplementedError

    def close(self, p: Any) -> None:
        p.close()


class _ThreadOps(_Ops):
    async def join(self, p: Any) -> int | None:
        await asyncio.to_thread(p.join)
        code: int | None = p.exitcode
        return code


class _PollOps(_Ops):
    async def join(self, p: Any) -> int | None:
        while p.is_alive():  # noqa: ASYNC110 - this baseline is that very pattern
            await asyncio.sleep(0.005)
        code: int | None = p.exitcode
        return code


class _AiomultiprocessOps(_Ops):
    def __init__(self, start_method: str) -> None:
        super().__init__(start_method)
        import aiomultiprocess
        import aiomultiprocess.core

        aiomultiprocess.set_start_method(start_method)
        self.Process = aiomultiprocess.Process
        # Its manager process must exist before the barrier: a copy of the
        # barrier's write end in it would keep the barrier shut for good.
        aiomultiprocess.core.get_manager()

    def start(self, target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if target is not stamp_and_exit:
            raise ValueError(f"aiomultiprocess runs coroutine functions only, not {target}")
        p = self.Process(target=stamp_and_exit_async, args=args)
        p.start()
        return p

    async def join(self, p: Any) -> int | None:
        await p.join()
        code: int | None = p.exitcode
        return code

    def close(self, p: Any) -> None:
        p.aio_process.close()


class _AioprocOps(_Ops):
    def start(self, target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        p = aioproc.AsyncProcess(target=target, args=args, context=self.start_method)
        p.start()
        return p

    async def join(self, p: Any) -> int | None:
        code: int | None = await p.join()
        return code


_OPS: dict[str, type[_Ops]] = {
    "thread": _ThreadOps,
    "poll": _PollOps,
    "aiomultiprocess": _AiomultiprocessOps,
    "aioproc": _AioprocOps,
}


def shutdown_extras() -> None:
    """Stop the helper processes that libraries keep for the whole run."""
    from ._peers import stop_aiomultiprocess_manager, stop_loky_resource_tracker

    if "aiomultiprocess.core" in sys.modules:
        stop_aiomultiprocess_manager()
    if "loky.backend.resource_tracker" in sys.modules:
        stop_loky_resource_tracker()


# -- scenario building blocks: a latency batch, a throughput run -------------


@dataclass
class Batch:
    """Children that wait for one barrier, then each sleep their delay and exit."""

    delays: Sequence[float]
    heartbeat: bool = False


@dataclass
class BatchResult:
    way: str
    n: int
    latencies: list[float]
    start_seconds: list[float]
    cpu_seconds: float
    wall_seconds: float
    extra_threads: int
    lags: list[float] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def run_batch(way: Way, batch: Batch, progress: Progress) -> BatchResult:
    """Start every child of *batch* (fork), release them, join them all.

    Latency of a child: from its stamp (its last instruction) to the moment
    the parent's join of it returned, both on CLOCK_MONOTONIC.
    """
    n = len(batch.delays)
    if n < 1:
        raise ValueError(f"a batch needs at least one child, got {n}")
    ops = _OPS[way.kind]("fork") if way.is_async else None
    stamps = mmap.mmap(-1, 8 * n)
    barrier = Barrier()
    try:
        if ops is None:
            batch_fn = {"raw": _raw_batch, "waitid": _waitid_batch, "sync": _sync_batch}[way.kind]
            raw = batch_fn(batch, stamps, barrier, progress)
        else:
            with forced_watcher(way):
                raw = run_on(way.backend, _async_batch, ops, batch, stamps, barrier, progress)
        joined, codes, starts, cpu, wall, threads, lags = raw
        bad = Counter(code for code in codes if code != 0)
        if bad:
            raise RuntimeError(f"{way.label}: children exited with codes {dict(bad)}")
        latencies = []
        for i in range(n):
            (stamp,) = struct.unpack_from("d", stamps, 8 * i)
            if stamp == 0:
                raise RuntimeError(f"{way.label}: child {i} exited without its stamp")
            latencies.append(joined[i] - stamp)
    finally:
        barrier.close()
        stamps.close()
    return BatchResult(way.label, n, latencies, starts, cpu, wall, threads, lags)


_Raw = tuple[list[float], list["int | None"], list[float], float, float, int, list[float]]


def _raw_batch(batch: Batch, stamps: mmap.mmap, barrier: Barrier, progress: Progress) -> _Raw:
    n = len(batch.delays)
    threads_before = os_threads()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    index: dict[int, int] = {}
    starts = []
    for i, delay in enumerate(batch.delays):
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            stamp_and_exit(stamps, i, barrier.ends, delay)
        starts.append(time.perf_counter() - t)
        index[pid] = i
        progress.advance()
    threads = os_threads()
    barrier.release()
    joined = [math.nan] * n
    codes: list[int | None] = [None] * n
    while index:
        # Block until any child is waitable, without reaping: a child that is
        # not ours (the fork server, a manager) must keep its status.
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is None or info.si_pid not in index:
            raise RuntimeError(f"a child that is not the benchmark's exited: {info}")
        _, status = os.waitpid(info.si_pid, 0)
        i = index.pop(info.si_pid)
        joined[i] = time.monotonic()
        codes[i] = os.waitstatus_to_exitcode(status)
        progress.advance()
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    return joined, codes, starts, cpu, wall, max(threads, os_threads()) - threads_before, []


def _waitid_batch(batch: Batch, stamps: mmap.mmap, barrier: Barrier, progress: Progress) -> _Raw:
    n = len(batch.delays)
    threads_before = os_threads()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    procs: dict[int, tuple[int, aioproc.AsyncProcess]] = {}
    starts = []
    for i, delay in enumerate(batch.delays):
        t = time.perf_counter()
        p = aioproc.AsyncProcess(
            target=stamp_and_exit, args=(stamps, i, barrier.ends, delay), context="fork"
        )
        p.start()
        starts.append(time.perf_counter() - t)
        procs[p.pid or 0] = (i, p)
        progress.advance()
    threads = os_threads()
    barrier.release()
    joined = [math.nan] * n
    codes: list[int | None] = [None] * n
    while procs:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is None or info.si_pid not in procs:
            raise RuntimeError(f"a child that is not the benchmark's exited: {info}")
        i, p = procs.pop(info.si_pid)
        p.is_alive()  # collects the exit status, through the process's own Popen
        joined[i] = time.monotonic()
        codes[i] = p.exitcode
        p.close()
        progress.advance()
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    return joined, codes, starts, cpu, wall, max(threads, os_threads()) - threads_before, []


def _sync_batch(batch: Batch, stamps: mmap.mmap, barrier: Barrier, progress: Progress) -> _Raw:
    n = len(batch.delays)
    ctx = multiprocessing.get_context("fork")
    threads_before = os_threads()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    procs = []
    starts = []
    for i, delay in enumerate(batch.delays):
        t = time.perf_counter()
        p = ctx.Process(target=stamp_and_exit, args=(stamps, i, barrier.ends, delay))
        p.start()
        starts.append(time.perf_counter() - t)
        procs.append(p)
        progress.advance()
    threads = os_threads()
    barrier.release()
    joined = [math.nan] * n
    codes: list[int | None] = [None] * n
    for i, p in enumerate(procs):
        p.join()
        joined[i] = time.monotonic()
        codes[i] = p.exitcode
        progress.advance()
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    for p in procs:
        p.close()
    return joined, codes, starts, cpu, wall, max(threads, os_threads()) - threads_before, []


async def _watch_threads(peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], os_threads())
        await anyio.sleep(0.01)


async def _heartbeat(lags: list[float]) -> None:
    while True:
        t = time.monotonic()
        await anyio.sleep(HEARTBEAT)
        lags.append(time.monotonic() - t - HEARTBEAT)


async def idle_lags(seconds: float) -> list[float]:
    """The heartbeat's lateness on an event loop with nothing else to do."""
    lags: list[float] = []
    with anyio.move_on_after(seconds):
        await _heartbeat(lags)
    return lags


def storm_lags(backend: Backend, delays: Sequence[float], progress: Progress) -> list[float]:
    """The heartbeat's lateness while bare fork children exit on *delays*, unjoined.

    The loop does nothing but the heartbeat; the children are reaped after it
    stops.  What remains is the machine's own cost of the exits (each one
    takes CPU from a core the loop could be running on): the floor for any
    way of joining them.
    """
    barrier = Barrier()
    pids = []
    try:
        for delay in delays:
            pid = os.fork()
            if pid == 0:
                stamp_and_exit(None, 0, barrier.ends, delay)
            pids.append(pid)
        barrier.release()
        lags: list[float] = run_on(backend, idle_lags, max(delays) + 0.05)
    finally:
        barrier.close()
        for pid in pids:
            os.waitpid(pid, 0)
            progress.advance()
    return lags


async def _async_batch(
    ops: _Ops, batch: Batch, stamps: mmap.mmap, barrier: Barrier, progress: Progress
) -> _Raw:
    n = len(batch.delays)
    threads_before = os_threads()
    peak = [threads_before]
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    procs = []
    starts = []
    for i, delay in enumerate(batch.delays):
        t = time.perf_counter()
        procs.append(ops.start(stamp_and_exit, (stamps, i, barrier.ends, delay)))
        starts.append(time.perf_counter() - t)
        progress.advance()
    joined = [math.nan] * n
    codes: list[int | None] = [None] * n
    lags: list[float] = []
    waiting = 0
    all_waiting = anyio.Event()

    async def join(i: int) -> None:
        nonlocal waiting
        waiting += 1
        if waiting == n:
            all_waiting.set()
        codes[i] = await ops.join(procs[i])
        joined[i] = time.monotonic()
        progress.advance()

    deadline = max(batch.delays) + 60
    with anyio.fail_after(deadline):
        await _join_all(
            n, join, all_waiting, barrier, heartbeat=batch.heartbeat, lags=lags, peak=peak
        )
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    peak[0] = max(peak[0], os_threads())
    for p in procs:
        ops.close(p)
    return joined, codes, starts, cpu, wall, peak[0] - threads_before, lags


async def _join_all(
    n: int,
    join: Callable[[int], Coroutine[Any, Any, None]],
    all_waiting: anyio.Event,
    barrier: Barrier,
    *,
    heartbeat: bool,
    lags: list[float],
    peak: list[int],
) -> None:
    async with anyio.create_task_group() as helpers:
        helpers.start_soon(_watch_threads, peak)
        async with anyio.create_task_group() as joins:
            for i in range(n):
                joins.start_soon(join, i)
            # Every join is waiting before the first child may exit.
            await all_waiting.wait()
            barrier.release()
            if heartbeat:
                helpers.start_soon(_heartbeat, lags)
        helpers.cancel_scope.cancel()


@dataclass
class ThroughputResult:
    way: str
    start_method: str
    n: int
    seconds: float
    cpu_seconds: float
    start_seconds: list[float]

    @property
    def per_second(self) -> float:
        return self.n / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "per_second": self.per_second}


def run_throughput(
    way: Way, start_method: str, n: int, batch: int, progress: Progress
) -> ThroughputResult:
    """Start and join *n* children that return at once, *batch* at a time."""
    sizes = [min(batch, n - done) for done in range(0, n, batch)]
    if way.kind == "raw":
        seconds, cpu, starts = _raw_throughput(sizes, progress)
    elif way.kind == "sync":
        seconds, cpu, starts = _sync_throughput(start_method, sizes, progress)
    else:
        ops = _OPS[way.kind](start_method)
        with forced_watcher(way):
            seconds, cpu, starts = run_on(way.backend, _async_throughput, ops, sizes, progress)
    return ThroughputResult(way.label, start_method, n, seconds, cpu, starts)


def _raw_throughput(sizes: list[int], progress: Progress) -> tuple[float, float, list[float]]:
    starts = []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for size in sizes:
        pids = []
        for _ in range(size):
            t = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            starts.append(time.perf_counter() - t)
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise RuntimeError(f"raw: a child exited with status {status}")
            progress.advance()
    return time.perf_counter() - wall0, cpu_seconds() - cpu0, starts


def _sync_throughput(
    start_method: str, sizes: list[int], progress: Progress
) -> tuple[float, float, list[float]]:
    ctx = multiprocessing.get_context(start_method)
    starts = []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for size in sizes:
        procs = []
        for _ in range(size):
            t = time.perf_counter()
            p = ctx.Process(target=noop)  # type: ignore[attr-defined]
            p.start()
            starts.append(time.perf_counter() - t)
            procs.append(p)
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"sync: a child exited with {p.exitcode}")
            p.close()
            progress.advance()
    return time.perf_counter() - wall0, cpu_seconds() - cpu0, starts


async def _async_throughput(
    ops: _Ops, sizes: list[int], progress: Progress
) -> tuple[float, float, list[float]]:
    starts = []
    codes: list[int | None] = []

    async def join(p: Any) -> None:
        codes.append(await ops.join(p))
        progress.advance()

    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for size in sizes:
        procs = []
        for _ in range(size):
            t = time.perf_counter()
            procs.append(ops.start(noop, ()))
            starts.append(time.perf_counter() - t)
        async with anyio.create_task_group() as tg:
            for p in procs:
                tg.start_soon(join, p)
        for p in procs:
            ops.close(p)
    seconds, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    bad = [code for code in codes if code != 0]
    if bad:
        raise RuntimeError(f"children exited with {Counter(bad)}")
    return seconds, cpu, starts
