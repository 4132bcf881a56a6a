"""A quick comparison of ``aioproc.Pool`` with the pools people use from async code.

``python -m benchmarks.pool_quick [--calls 200] [--concurrent 2000]``, in one
process, one after the other, each with 2 workers warmed up first:

- p50/p99 of sequential trivial calls, and throughput of concurrent ones,
  with the parent's CPU per call and the threads it had meanwhile;
- 40 CPU-bound calls of 50 ms (the ideal: 40 x 50 ms / 2 workers);
- the event loop's longest block while a 100 MiB argument or result passes
  (a heartbeat task that sleeps 1 ms and records how late it wakes, also less
  the time the kernel kept the loop's thread waiting for a CPU), for
  ``Pool`` and ``run``.

Peers, on the same loop, interleaved with the Pool round by round:
``anyio.to_process.run_sync`` (every backend) and ``ProcessPoolExecutor``
through ``loop.run_in_executor`` (asyncio and uvloop).  The full table is ``./run benchmarks``'s
"calls" scenario; this script is for measuring while working on the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import multiprocessing
import os
import resource
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import anyio
import anyio.to_process

import aioproc

WORKERS = 2
SIZE = 100 << 20


def noop() -> None:
    return None


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def length(data: bytes) -> int:
    return len(data)


def make(size: int) -> bytes:
    return b"\x5a" * size


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Call = Callable[..., Coroutine[Any, Any, Any]]


ROUNDS = 10


async def _measure(ways: dict[str, Call], calls: int, concurrent: int, me: Any) -> dict[str, Any]:
    """Every figure for every way, the ways interleaved round by round, so that a
    machine whose load changes by the minute treats them alike."""
    out: dict[str, dict[str, Any]] = {name: {} for name in ways}
    for name, call in ways.items():  # warm up, and count the threads each way adds
        threads = threading.active_count()
        for _ in range(20):
            await call(me.noop)
        out[name]["threads"] = threading.active_count() - threads
    times: dict[str, list[float]] = {name: [] for name in ways}
    cpu_seq: dict[str, float] = dict.fromkeys(ways, 0.0)
    for _ in range(ROUNDS):
        for name, call in ways.items():
            cpu = _cpu()
            for _ in range(calls // ROUNDS):
                t = time.perf_counter()
                await call(me.noop)
                times[name].append(time.perf_counter() - t)
            cpu_seq[name] += _cpu() - cpu
    rates: dict[str, list[float]] = {name: [] for name in ways}
    cpu_conc: dict[str, float] = dict.fromkeys(ways, 0.0)
    for _ in range(3):
        for name, call in ways.items():
            cpu = _cpu()
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrent):
                    tg.start_soon(call, me.noop)
            rates[name].append(concurrent / (time.perf_counter() - t))
            cpu_conc[name] += _cpu() - cpu
    bound: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(2):
        for name, call in ways.items():
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(call, me.spin, 0.05)
            bound[name].append(time.perf_counter() - t)
    for name in ways:
        samples = sorted(times[name])
        out[name].update(
            {
                "p50 ms": 1000 * statistics.median(samples),
                "p99 ms": 1000 * samples[math.ceil(0.99 * len(samples)) - 1],
                "calls/s": statistics.median(rates[name]),
                "CPU ms/call seq": 1000 * cpu_seq[name] / len(samples),
                "CPU ms/call conc": 1000 * cpu_conc[name] / (3 * concurrent),
                "40x50ms s": min(bound[name]),
            }
        )
    return out


class _RunQueueWait:
    """How long this thread has waited for a CPU while ready to run, in seconds
    (``/proc/thread-self/schedstat``, Linux); 0.0 where that is not known."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> float:
        if self._fd is None:
            return 0.0
        return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


async def _longest_block(
    work: Callable[[], Awaitable[object]], repeat: int = 5
) -> tuple[float, float, float]:
    """The loop's longest stall while *work* runs, in ms, as (wall, CPU, ready):
    the medians of *repeat* runs.  Wall is how late a 1 ms heartbeat woke; CPU is
    the time the loop's thread itself ran within that late gap's interval, which
    leaves out the moments a busy machine gave the thread's core to another
    process; ready is the wall lateness less the time the thread waited for a
    CPU meanwhile (the kernel's run-queue wait): the stall that is the loop's
    own, on the same clock as wall, however busy the machine."""
    runs = [await _longest_block_once(work) for _ in range(repeat)]
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        statistics.median(r[2] for r in runs),
    )


async def _longest_block_once(work: Callable[[], Awaitable[object]]) -> tuple[float, float, float]:
    worst = worst_cpu = worst_ready = 0.0
    done = False
    waited = _RunQueueWait()

    async def heartbeat() -> None:
        nonlocal worst, worst_cpu, worst_ready
        while not done:
            t, cpu, wait = time.perf_counter(), time.thread_time(), waited()
            await anyio.sleep(0.001)
            late = time.perf_counter() - t - 0.001
            worst = max(worst, late)
            worst_cpu = max(worst_cpu, time.thread_time() - cpu)
            worst_ready = max(worst_ready, late - (waited() - wait))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            await anyio.sleep(0.01)
            worst = worst_cpu = worst_ready = 0.0
            result = await work()
            done = True
    finally:
        waited.close()
    del result  # freeing 100 MiB takes 10 ms here: the caller's, not the transfer's
    return 1000 * worst, 1000 * worst_cpu, 1000 * worst_ready


async def backend_case(backend: str, calls: int, concurrent: int, me: Any) -> dict[str, Any]:
    """Pool, anyio.to_process and (asyncio) ProcessPoolExecutor on one loop."""
    limiter = anyio.CapacityLimiter(WORKERS)

    async def anyio_call(func: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_process.run_sync(func, *args, limiter=limiter)

    async with aioproc.Pool(WORKERS) as pool:
        ways: dict[str, Call] = {"Pool": pool.run, "anyio.to_process": anyio_call}
        with contextlib.ExitStack() as stack:
            if backend != "trio":
                ex = stack.enter_context(
                    ProcessPoolExecutor(
                        WORKERS, mp_context=multiprocessing.get_context("forkserver")
                    )
                )
                loop = asyncio.get_running_loop()

                async def ppe_call(func: Callable[..., Any], *args: Any) -> Any:
                    return await loop.run_in_executor(ex, functools.partial(func, *args))

                ways["ProcessPoolExecutor"] = ppe_call
            result = await _measure(ways, calls, concurrent, me)
        big = bytes(SIZE)
        arg = await _longest_block(lambda: pool.run(me.length, big))
        res = await _longest_block(lambda: pool.run(me.make, SIZE))
        row = result["Pool"]
        for what, figures in (("arg", arg), ("result", res)):
            for kind, value in zip(("wall", "CPU", "ready"), figures, strict=True):
                row[f"100MiB {what} block ms ({kind})"] = value
    return result


async def run_case(me: Any) -> dict[str, tuple[float, float, float]]:
    big = bytes(SIZE)
    out = {}
    for method in ("fork", "spawn"):
        out[f"run {method} 100MiB arg block ms"] = await _longest_block(
            lambda m=method: aioproc.run(me.length, big, context=m)  # type: ignore[misc]
        )
        out[f"run {method} 100MiB result block ms"] = await _longest_block(
            lambda m=method: aioproc.run(me.make, SIZE, context=m)  # type: ignore[misc]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--skip-payloads", action="store_true")
    opts = parser.parse_args()
    from benchmarks import pool_quick as me  # noqa: PLW0406 - functions workers import by name

    for backend, options in (
        ("asyncio", {}),
        ("uvloop", {"use_uvloop": True}),
        ("trio", {}),
    ):
        name = "trio" if backend == "trio" else "asyncio"
        rows = anyio.run(
            backend_case, backend, opts.calls, opts.concurrent, me,
            backend=name, backend_options=options,
        )  # fmt: skip
        print(f"\n{backend}, {WORKERS} workers, ways interleaved")
        keys = list(dict.fromkeys(k for row in rows.values() for k in row))
        print(f"{'':30}" + "".join(f"{k:>22}" for k in rows))
        for k in keys:
            cells = "".join(f"{rows[r][k]:>22.3f}" if k in rows[r] else f"{'':>22}" for r in rows)
            print(f"{k:30}{cells}")
        peers = [row for r, row in rows.items() if r != "Pool"]
        pool = rows["Pool"]
        print(
            f"Pool against the best peer: "
            f"p50 {pool['p50 ms'] / min(p['p50 ms'] for p in peers):.2f}x (target <= 0.8), "
            f"p99 {pool['p99 ms'] / min(p['p99 ms'] for p in peers):.2f}x (<= 1.0), "
            f"throughput {pool['calls/s'] / max(p['calls/s'] for p in peers):.2f}x (>= 1.0), "
            f"CPU/call {pool['CPU ms/call conc'] / min(p['CPU ms/call conc'] for p in peers):.2f}x "
            f"(<= 1.0), CPU-bound {pool['40x50ms s'] / 1.0:.3f}x ideal (<= 1.06), "
            f"threads {pool['threads']}"
        )
    if not opts.skip_payloads:
        for k, (wall, cpu, ready) in anyio.run(run_case, me).items():
            print(f"{k}: wall {wall:.2f}, CPU {cpu:.2f}, wall less run-queue wait {ready:.2f}")
    print(f"pid {os.getpid()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
