"""A quick comparison of ``aioproc.Pool`` with the pools people use from async code.

``python -m benchmarks.pool_quick [--calls 200] [--concurrent 2000]``, in one
process, one after the other, each with 2 workers warmed up first:

- p50/p99 of sequential trivial calls, and throughput of concurrent ones,
  with the parent's CPU per call and the threads it had meanwhile;
- 40 CPU-bound calls of 50 ms (the ideal: 40 x 50 ms / 2 workers);
- the event loop's longest block while a 100 MiB argument or result passes
  (a heartbeat task that sleeps 1 ms and records how late it wakes), for
  ``Pool`` and ``run``.

Peers: ``anyio.to_process.run_sync`` (asyncio) and ``ProcessPoolExecutor``
through ``loop.run_in_executor``.  The full table is ``./run benchmarks``'s
"calls" scenario; this script is for measuring while working on the pool.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def _measure(call: Call, calls: int, concurrent: int, me: Any) -> dict[str, float]:
    for _ in range(20):
        await call(me.noop)
    threads = threading.active_count()
    times = []
    cpu = _cpu()
    for _ in range(calls):
        t = time.perf_counter()
        await call(me.noop)
        times.append(time.perf_counter() - t)
    cpu_seq = (_cpu() - cpu) / calls
    times.sort()
    cpu = _cpu()
    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrent):
            tg.start_soon(call, me.noop)
    rate = concurrent / (time.perf_counter() - t)
    cpu_conc = (_cpu() - cpu) / concurrent
    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(call, me.spin, 0.05)
    cpu_bound = time.perf_counter() - t
    threads = max(threads, threading.active_count())
    return {
        "p50 ms": 1000 * statistics.median(times),
        "p99 ms": 1000 * times[math.ceil(0.99 * len(times)) - 1],
        "calls/s": rate,
        "CPU ms/call seq": 1000 * cpu_seq,
        "CPU ms/call conc": 1000 * cpu_conc,
        "40x50ms s": cpu_bound,
        "threads": threads - 1,
    }


async def _longest_block(
    work: Callable[[], Awaitable[object]], repeat: int = 5
) -> tuple[float, float]:
    """The loop's longest stall while *work* runs, in ms, as (wall, CPU): the medians
    of *repeat* runs.  Wall is how late a 1 ms heartbeat woke; CPU is the time the
    loop's thread itself ran within that late gap, which leaves out the moments a
    busy machine gave the thread's core to another process."""
    runs = [await _longest_block_once(work) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


async def _longest_block_once(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    worst = worst_cpu = 0.0
    done = False

    async def heartbeat() -> None:
        nonlocal worst, worst_cpu
        while not done:
            t, cpu = time.perf_counter(), time.thread_time()
            await anyio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)
            worst_cpu = max(worst_cpu, time.thread_time() - cpu)

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        await anyio.sleep(0.01)
        worst = worst_cpu = 0.0
        result = await work()
        done = True
    del result  # freeing 100 MiB takes 10 ms here: the caller's, not the transfer's
    return 1000 * worst, 1000 * worst_cpu


async def pool_case(backend: str, calls: int, concurrent: int, me: Any) -> dict[str, float]:
    async with aioproc.Pool(WORKERS) as pool:
        result = await _measure(pool.run, calls, concurrent, me)
        big = bytes(SIZE)
        arg = await _longest_block(lambda: pool.run(me.length, big))
        res = await _longest_block(lambda: pool.run(me.make, SIZE))
        result["100MiB arg block ms (wall)"], result["100MiB arg block ms (CPU)"] = arg
        result["100MiB result block ms (wall)"], result["100MiB result block ms (CPU)"] = res
    return result


async def run_case(me: Any) -> dict[str, tuple[float, float]]:
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


async def anyio_case(calls: int, concurrent: int, me: Any) -> dict[str, float]:
    limiter = anyio.CapacityLimiter(WORKERS)

    async def call(func: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_process.run_sync(func, *args, limiter=limiter)

    return await _measure(call, calls, concurrent, me)


async def ppe_case(calls: int, concurrent: int, me: Any) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(WORKERS, mp_context=ctx) as ex:

        async def call(func: Callable[..., Any], *args: Any) -> Any:
            return await loop.run_in_executor(ex, functools.partial(func, *args))

        return await _measure(call, calls, concurrent, me)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--skip-payloads", action="store_true")
    opts = parser.parse_args()
    from benchmarks import pool_quick as me  # noqa: PLW0406 - functions workers import by name

    rows: dict[str, dict[str, float]] = {}
    rows["anyio.to_process"] = anyio.run(anyio_case, opts.calls, opts.concurrent, me)
    rows["ProcessPoolExecutor"] = anyio.run(ppe_case, opts.calls, opts.concurrent, me)
    for backend, options in (
        ("asyncio", {}),
        ("uvloop", {"use_uvloop": True}),
        ("trio", {}),
    ):
        name = "trio" if backend == "trio" else "asyncio"
        rows[f"Pool {backend}"] = anyio.run(
            pool_case, backend, opts.calls, opts.concurrent, me,
            backend=name, backend_options=options,
        )  # fmt: skip
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    print(f"{'':28}" + "".join(f"{k:>22}" for k in rows))
    for k in keys:
        cells = "".join(f"{rows[r][k]:>22.3f}" if k in rows[r] else f"{'':>22}" for r in rows)
        print(f"{k:28}{cells}")
    peers = [rows["anyio.to_process"], rows["ProcessPoolExecutor"]]
    best_p50 = min(p["p50 ms"] for p in peers)
    best_p99 = min(p["p99 ms"] for p in peers)
    best_rate = max(p["calls/s"] for p in peers)
    best_cpu = min(p["CPU ms/call conc"] for p in peers)
    for r, row in rows.items():
        if r.startswith("Pool"):
            print(
                f"{r}: p50 {row['p50 ms'] / best_p50:.2f}x best peer (target <= 0.8), "
                f"p99 {row['p99 ms'] / best_p99:.2f}x (<= 1.0), "
                f"throughput {row['calls/s'] / best_rate:.2f}x (>= 1.0), "
                f"CPU/call {row['CPU ms/call conc'] / best_cpu:.2f}x (<= 1.0), "
                f"CPU-bound {row['40x50ms s'] / 1.0:.3f}x ideal (<= 1.06)"
            )
    if not opts.skip_payloads:
        for k, (wall, cpu) in anyio.run(run_case, me).items():
            print(f"{k}: wall {wall:.2f}, CPU {cpu:.2f}")
    print(f"pid {os.getpid()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
