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
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import anyio

import aioproc
from aioproc._watchers import why_unavailable

from . import _system
from ._children import (
    Barrier,
    noop,
    noop_async,
    note_and_exit,
    stamp_and_exit,
    stamp_and_exit_async,
)
from ._progress import Progress
from ._runner import Backend, run_on

Kind = Literal[
    "raw", "waitid", "wake", "stdwake", "sync", "thread", "poll", "aiomultiprocess", "aioproc"
]
T = TypeVar("T")

BACKENDS: tuple[Backend, ...] = ("asyncio", "uvloop", "trio")
HOW: dict[str, str] = {
    "raw": "os.fork + os._exit, reaped by os.waitpid (the floor)",
    "waitid": "AsyncProcess children, but found by a blocking waitid (their own floor)",
    "wake": "AsyncProcess children, the loop woken by their sentinel (a pidfd) and nothing "
    "else: the event loop's own floor, as `wake/LOOP`",
    "stdwake": "multiprocessing.Process children, the loop woken by a pidfd of each and "
    "nothing else: the thinnest join of stdlib children from an event loop, as `stdwake/LOOP`",
    "sync": "multiprocessing.Process, blocking join() in start order",
    "thread": "multiprocessing.Process + await asyncio.to_thread(p.join)",
    "poll": "multiprocessing.Process + is_alive() every 5 ms",
    "aiomultiprocess": "aiomultiprocess.Process (polls exitcode every 5 ms)",
    "aioproc": "AsyncProcess + await p.join(), as `aioproc WATCHER/LOOP`",
}
#: The heartbeat task's period: its lateness is the event loop's lag.
HEARTBEAT = 0.001
_SILENT = Progress(1, enabled=False)


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
        if self.kind in ("wake", "stdwake"):
            return f"{self.kind}/{self.backend}"
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

    def children(self, start_method: str) -> Children:
        """This way's implementation of the ``Children`` protocol."""
        return _KINDS[self.kind](start_method)

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


# -- the protocol every way implements ----------------------------------------


class Children:
    """Start, join and release the children of one way, with one start method.

    Every way implements ``start`` (timed by the scenarios: it is what blocks
    the caller) and ``close``, and then either ``join_all``, blocking, or
    ``join``, awaitable: ``is_async`` says which.  The scenarios drive every
    way through these four calls, in one skeleton for the blocking ways and
    one for the async ones.
    """

    is_async: ClassVar[bool] = True

    def __init__(self, start_method: str) -> None:
        self.start_method = start_method
        self.ctx = multiprocessing.get_context(start_method)

    def start(self, target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        p = self.ctx.Process(target=target, args=args)  # type: ignore[attr-defined]
        p.start()
        return p

    def join_all(self, handles: Sequence[Any]) -> Iterator[tuple[int, int | None]]:
        """Block until each child has exited; yield (its index, its exit code) as it does."""
        raise NotImplementedError

    async def join(self, handle: Any) -> int | None:
        raise NotImplementedError

    def close(self, handle: Any) -> None:
        handle.close()


def _next_exited(pending: Container[int]) -> int:
    """Block until any child has exited, without reaping it; its pid.

    Not reaping: a child that is not the benchmark's (the fork server, a
    manager) must keep its status.
    """
    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
    if info is None or info.si_pid not in pending:
        raise RuntimeError(f"a child that is not the benchmark's exited: {info}")
    return info.si_pid


class _RawChildren(Children):
    """Bare ``os.fork`` children, reaped in the order they exit."""

    is_async = False

    def start(self, target: Callable[..., Any], args: tuple[Any, ...]) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                target(*args)
            finally:
                os._exit(0)
        return pid

    def join_all(self, handles: Sequence[Any]) -> Iterator[tuple[int, int | None]]:
        index = {pid: i for i, pid in enumerate(handles)}
        while index:
            pid = _next_exited(index)
            _, status = os.waitpid(pid, 0)
            yield index.pop(pid), os.waitstatus_to_exitcode(status)

    def close(self, handle: Any) -> None:
        pass


class _WaitidChildren(Children):
    """AsyncProcess children, found in the order they exit by a blocked ``waitid``."""

    is_async = False

    def start(self, target: Callable[..., Any], args: tuple[Any, ...]) -> aioproc.AsyncProcess:
        p = aioproc.AsyncProcess(target=target, args=args, context=self.start_method)
        p.start()
        return p

    def join_all(self, handles: Sequence[Any]) -> Iterator[tuple[int, int | None]]:
        index = {p.pid: i for i, p in enumerate(handles)}
        while index:
            i = index.pop(_next_exited(index))
            handles[i].is_alive()  # collects the exit status, through the process's own Popen
            yield i, handles[i].exitcode


class _SyncChildren(Children):
    """``multiprocessing.Process``, a blocking ``join()`` in start order."""

    is_async = False

    def join_all(self, handles: Sequence[Any]) -> Iterator[tuple[int, int | None]]:
        for i, p in enumerate(handles):
            p.join()
            yield i, p.exitcode


class _ThreadChildren(Children):
    async def join(self, handle: Any) -> int | None:
        await asyncio.to_thread(handle.join)
        code: int | None = handle.exitcode
        return code


class _PollChildren(Children):
    async def join(self, handle: Any) -> int | None:
        while handle.is_alive():  # noqa: ASYNC110 - this baseline is that very pattern
            await asyncio.sleep(0.005)
        code: int | None = handle.exitcode
        return code


class _AiomultiprocessChildren(Children):
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
        if target is stamp_and_exit:
            target = stamp_and_exit_async
        elif target is noop:
            target = noop_async
        else:
            raise ValueError(f"aiomultiprocess runs coroutine functions only, not {target}")
        p = self.Process(target=target, args=args)
        p.start()
        return p

    async def join(self, handle: Any) -> int | None:
        await handle.join()
        code: int | None = handle.exitcode
        return code

    def close(self, handle: Any) -> None:
        handle.aio_process.close()


class _WakeChildren(_WaitidChildren):
    """AsyncProcess children, each found by the loop waking on its sentinel.

    The thinnest join an event loop can make (``anyio.wait_readable``, then
    the status collected through the process's Popen): what ``aioproc``
    adds is the difference.
    """

    is_async = True

    async def join(self, handle: Any) -> int | None:
        await anyio.wait_readable(handle.sentinel)
        handle.is_alive()  # collects the exit status
        code: int | None = handle.exitcode
        return code


class _StdwakeChildren(Children):
    """``multiprocessing.Process`` children, each found by the loop waking on a pidfd.

    What any way of joining stdlib children from an event loop pays at the
    least: a pidfd, ``anyio.wait_readable``, the status collected by
    ``join()``, which no longer blocks.  A child that the stdlib's ``start()``
    already reaped (it polls its live children) is not watched.
    """

    is_async = True

    async def join(self, handle: Any) -> int | None:
        if handle._popen.returncode is None:
            try:
                fd = os.pidfd_open(handle.pid)
            except ProcessLookupError:  # reaped meanwhile
                fd = -1
            if fd >= 0:
                try:
                    await anyio.wait_readable(fd)
                finally:
                    os.close(fd)
        handle.join()
        code: int | None = handle.exitcode
        return code


class _AioprocChildren(Children):
    def start(self, target: Callable[..., Any], args: tuple[Any, ...]) -> aioproc.AsyncProcess:
        p = aioproc.AsyncProcess(target=target, args=args, context=self.start_method)
        p.start()
        return p

    async def join(self, handle: Any) -> int | None:
        code: int | None = await handle.join()
        return code


_KINDS: dict[str, type[Children]] = {
    "raw": _RawChildren,
    "waitid": _WaitidChildren,
    "wake": _WakeChildren,
    "stdwake": _StdwakeChildren,
    "sync": _SyncChildren,
    "thread": _ThreadChildren,
    "poll": _PollChildren,
    "aiomultiprocess": _AiomultiprocessChildren,
    "aioproc": _AioprocChildren,
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


@dataclass
class _Joined:
    """What one batch measured, before latencies are computed from the stamps."""

    n: int
    joined: list[float] = field(default_factory=list)
    codes: list[int | None] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    cpu: float = 0.0
    wall: float = 0.0
    threads: int = 0
    lags: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.joined = [math.nan] * self.n
        self.codes = [None] * self.n


def run_batch(way: Way, batch: Batch, progress: Progress) -> BatchResult:
    """Start every child of *batch* (fork), release them, join them all.

    Latency of a child: from its stamp (its last instruction) to the moment
    the parent's join of it returned, both on CLOCK_MONOTONIC.
    """
    n = len(batch.delays)
    if n < 1:
        raise ValueError(f"a batch needs at least one child, got {n}")
    children = way.children("fork")
    stamps = mmap.mmap(-1, 8 * n)
    barrier = Barrier()
    calls = [(stamp_and_exit, (stamps, i, barrier.ends, d)) for i, d in enumerate(batch.delays)]
    try:
        with forced_watcher(way):
            if children.is_async:
                got = run_on(way.backend, _async_batch, children, calls, batch, barrier, progress)
            else:
                got = _sync_batch(children, calls, barrier, progress)
        bad = Counter(code for code in got.codes if code != 0)
        if bad:
            raise RuntimeError(f"{way.label}: children exited with codes {dict(bad)}")
        latencies = []
        for i in range(n):
            (stamp,) = struct.unpack_from("d", stamps, 8 * i)
            if stamp == 0:
                raise RuntimeError(f"{way.label}: child {i} exited without its stamp")
            latencies.append(got.joined[i] - stamp)
    finally:
        barrier.close()
        stamps.close()
    return BatchResult(
        way.label, n, latencies, got.starts, got.cpu, got.wall, got.threads, got.lags
    )


_Calls = Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]


def _start_all(
    children: Children, calls: _Calls, progress: Progress
) -> tuple[list[Any], list[float]]:
    """Start one child per call, timing each ``start``."""
    handles, starts = [], []
    for target, args in calls:
        t = time.perf_counter()
        handles.append(children.start(target, args))
        starts.append(time.perf_counter() - t)
        progress.advance()
    return handles, starts


def _sync_batch(children: Children, calls: _Calls, barrier: Barrier, progress: Progress) -> _Joined:
    got = _Joined(len(calls))
    threads_before = _system.os_threads()
    cpu0, wall0 = _system.cpu_seconds(), time.perf_counter()
    handles, got.starts = _start_all(children, calls, progress)
    threads = _system.os_threads()
    barrier.release()
    for i, code in children.join_all(handles):
        got.joined[i] = time.monotonic()
        got.codes[i] = code
        progress.advance()
    got.cpu, got.wall = _system.cpu_seconds() - cpu0, time.perf_counter() - wall0
    got.threads = max(threads, _system.os_threads()) - threads_before
    for handle in handles:
        children.close(handle)
    return got


async def _watch_threads(peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], _system.os_threads())
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


def storm_lags(
    backend: Backend,
    delays: Sequence[float],
    progress: Progress,
    way: Way | None = None,
    *,
    woken: bool = False,
) -> list[float]:
    """The heartbeat's lateness while children exit on *delays*, unjoined.

    The loop does nothing but the heartbeat; the children are reaped after it
    stops.  What remains is the machine's own cost of the exits (each one
    takes CPU from a core the loop could be running on): the floor for any
    way of joining them.  *way* says whose children: bare forks (``raw``, the
    default) or AsyncProcess children (``waitid``), whose exits cost the
    machine more (they have more pages to free).  With *woken*, each bare
    fork also writes a byte to a pipe the loop reads just before it exits:
    the loop is woken once per exit, as any way of joining wakes it, and
    does nothing else.  That alone makes the heartbeat later, because an
    event loop's timer waits in ``epoll_wait``, whose timeout is whole
    milliseconds: a wait cut short is resumed for its remaining time rounded
    up to the next millisecond.
    """
    children = (way or RAW).children("fork")
    barrier = Barrier()
    note_r, note_w = os.pipe() if woken else (-1, -1)
    handles = []
    try:
        for delay in delays:
            if woken:
                handles.append(children.start(note_and_exit, (note_w, barrier.ends, delay)))
            else:
                handles.append(children.start(stamp_and_exit, (None, 0, barrier.ends, delay)))
        barrier.release()
        lags: list[float] = run_on(backend, _woken_lags, max(delays) + 0.05, note_r)
    finally:
        barrier.close()
        for _ in children.join_all(handles):
            progress.advance()
        for handle in handles:
            children.close(handle)
        for fd in (note_r, note_w):
            if fd >= 0:
                os.close(fd)
    return lags


async def _woken_lags(seconds: float, note: int) -> list[float]:
    """``idle_lags``, with a task that reads what arrives on *note* (-1: none)."""
    if note < 0:
        return await idle_lags(seconds)

    async def drain() -> None:
        os.set_blocking(note, False)
        while True:
            await anyio.wait_readable(note)
            with contextlib.suppress(BlockingIOError):
                os.read(note, 4096)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        lags = await idle_lags(seconds)
        tg.cancel_scope.cancel()
    return lags


async def _async_batch(
    children: Children, calls: _Calls, batch: Batch, barrier: Barrier, progress: Progress
) -> _Joined:
    got = _Joined(len(calls))
    threads_before = _system.os_threads()
    peak = [threads_before]
    cpu0, wall0 = _system.cpu_seconds(), time.perf_counter()
    handles, got.starts = _start_all(children, calls, progress)
    waiting = 0
    all_waiting = anyio.Event()

    async def join(i: int) -> None:
        nonlocal waiting
        waiting += 1
        if waiting == got.n:
            all_waiting.set()
        got.codes[i] = await children.join(handles[i])
        got.joined[i] = time.monotonic()
        progress.advance()

    with anyio.fail_after(max(batch.delays) + 60):
        async with anyio.create_task_group() as helpers:
            if not batch.heartbeat:
                # (Not beside the heartbeat: reading /proc every 10 ms would
                # delay it, and the lag floors run no such task.)
                helpers.start_soon(_watch_threads, peak)
            async with anyio.create_task_group() as joins:
                for i in range(got.n):
                    joins.start_soon(join, i)
                # Every join is waiting before the first child may exit.
                await all_waiting.wait()
                barrier.release()
                if batch.heartbeat:
                    helpers.start_soon(_heartbeat, got.lags)
            helpers.cancel_scope.cancel()
    got.cpu, got.wall = _system.cpu_seconds() - cpu0, time.perf_counter() - wall0
    got.threads = max(peak[0], _system.os_threads()) - threads_before
    for handle in handles:
        children.close(handle)
    return got


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
    children = way.children(start_method)
    with forced_watcher(way):
        if children.is_async:
            seconds, cpu, starts = run_on(way.backend, _async_throughput, children, sizes, progress)
        else:
            seconds, cpu, starts = _sync_throughput(children, sizes, progress)
    return ThroughputResult(way.label, start_method, n, seconds, cpu, starts)


def _check_codes(children: Children, codes: list[int | None]) -> None:
    bad = Counter(code for code in codes if code != 0)
    if bad:
        raise RuntimeError(f"{type(children).__name__}: children exited with {dict(bad)}")


def _sync_throughput(
    children: Children, sizes: list[int], progress: Progress
) -> tuple[float, float, list[float]]:
    starts: list[float] = []
    codes: list[int | None] = []
    cpu0, wall0 = _system.cpu_seconds(), time.perf_counter()
    for size in sizes:
        handles, some = _start_all(children, [(noop, ())] * size, _SILENT)
        starts += some
        for _, code in children.join_all(handles):
            codes.append(code)
            progress.advance()
        for handle in handles:
            children.close(handle)
    seconds, cpu = time.perf_counter() - wall0, _system.cpu_seconds() - cpu0
    _check_codes(children, codes)
    return seconds, cpu, starts


async def _async_throughput(
    children: Children, sizes: list[int], progress: Progress
) -> tuple[float, float, list[float]]:
    starts: list[float] = []
    codes: list[int | None] = []

    async def join(handle: Any) -> None:
        codes.append(await children.join(handle))
        progress.advance()

    cpu0, wall0 = _system.cpu_seconds(), time.perf_counter()
    for size in sizes:
        handles, some = _start_all(children, [(noop, ())] * size, _SILENT)
        starts += some
        async with anyio.create_task_group() as tg:
            for handle in handles:
                tg.start_soon(join, handle)
        for handle in handles:
            children.close(handle)
    seconds, cpu = time.perf_counter() - wall0, _system.cpu_seconds() - cpu0
    _check_codes(children, codes)
    return seconds, cpu, starts
