"""DaskPool on a local cluster: latency, throughput, and how fast it stops things.

``python -m benchmarks.dask_quick [--calls 200] [--rounds 5]`` (run from the repository)

One ``LocalCluster`` (2 workers, 1 thread each, processes, 127.0.0.1, not
daemonic) serves every way, in one run:

- ``client.submit``: plain Dask, the function in the worker's thread (no
  child, no kill on timeout or cancel: the baseline);
- ``client.submit`` with at most 2 calls in flight, as many as DaskPool
  lets run at once on this cluster (it waits for a free slot client-side);
- ``DaskPool`` with a worker-local ``aioproc.Pool`` (where aioproc has one),
  and with a fresh child per call, fork and forkserver on the worker.

For each: p50 of a trivial call made one at a time, and throughput with
``--calls`` calls in flight.  Then, on the pool: timeout, cancellation, crash
and lost-worker latencies, with the child and grandchild checked gone in /proc.
Figures are ratios to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast


def trivial() -> int:
    return 1


def pids_and_sleep(path: str) -> None:
    from tests.dask_targets import dask_worker_pid

    grandchild = subprocess.Popen(["sleep", "300"])
    with open(path + ".tmp", "w") as f:
        f.write(f"{dask_worker_pid()} {os.getpid()} {grandchild.pid}\n")
    os.rename(path + ".tmp", path)
    time.sleep(300)


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _pids(path: str) -> list[int]:
    while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - a stat per poll
        await asyncio.sleep(0.002)
    with open(path) as f:  # noqa: ASYNC230 - written whole, renamed
        return [int(p) for p in f.read().split()]


async def _gone_after(start: float, *pids: int) -> float:
    while any(_running(pid) for pid in pids):  # noqa: ASYNC110 - /proc is the truth
        await asyncio.sleep(0.001)
    return time.perf_counter() - start


async def _p50(call: Callable[[], Awaitable[Any]], rounds: int) -> float:
    await call()  # warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _rate(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(call() for _ in range(calls)))
    return calls / (time.perf_counter() - start)


async def stops(pool: Any, tmp: str) -> dict[str, float]:
    """Seconds: timeout, cancellation, crash and lost worker, as the caller sees them."""
    import aioproc
    from aioproc.dask import WorkerLost

    out: dict[str, float] = {}
    path = os.path.join(tmp, "t")
    start = time.perf_counter()
    try:
        await pool.run(pids_and_sleep, path, timeout=0.5)
    except aioproc.ProcessTimeout:
        out["timeout: caller back after the 0.5 s timeout"] = time.perf_counter() - start - 0.5
    _, child, grandchild = await _pids(path)
    out["timeout: child + grandchild gone (from the timeout)"] = (
        await _gone_after(start, child, grandchild) - 0.5
    )

    path = os.path.join(tmp, "c")
    task = asyncio.ensure_future(pool.run(pids_and_sleep, path))
    _, child, grandchild = await _pids(path)
    start = time.perf_counter()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        out["cancel: caller back (child stopped on the worker)"] = time.perf_counter() - start
    out["cancel: child + grandchild gone"] = await _gone_after(start, child, grandchild)

    start = time.perf_counter()
    try:
        await pool.run(segfault)
    except aioproc.ProcessDied:
        out["crash: ProcessDied (SIGSEGV) after the call"] = time.perf_counter() - start

    path = os.path.join(tmp, "l")
    task = asyncio.ensure_future(pool.run(pids_and_sleep, path))
    worker, child, grandchild = await _pids(path)
    start = time.perf_counter()
    os.kill(worker, signal.SIGKILL)
    try:
        await task
    except WorkerLost:
        out["worker SIGKILLed: WorkerLost raised"] = time.perf_counter() - start
    out["worker SIGKILLed: its child gone (die_with_parent)"] = await _gone_after(start, child)
    os.kill(grandchild, signal.SIGKILL)  # its group's killer died with the worker
    return out


async def main(calls: int, rounds: int) -> None:
    import dask
    from distributed import Client, LocalCluster

    from aioproc.dask import DaskPool

    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = await LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
            asynchronous=True,
        )
        try:
            rows: list[tuple[str, float, float]] = []
            async with Client(cluster, asynchronous=True) as client:

                async def submit() -> Any:
                    return await client.submit(trivial, pure=False)

                two = asyncio.Semaphore(2)

                async def submit_two() -> Any:
                    async with two:
                        return await submit()

                base_p50 = await _p50(submit, rounds)
                rows.append(("client.submit (no child)", base_p50, await _rate(submit, calls)))
                rows.append(
                    ("client.submit, 2 in flight", base_p50, await _rate(submit_two, calls))
                )
            import aioproc

            ways = [("pool", "fork"), ("fresh", "fork"), ("fresh", "forkserver")]
            if "Pool" not in aioproc.__all__:
                ways = ways[1:]
            for child, context in ways:
                async with DaskPool(cluster, context=context) as pool:
                    pool._child = child

                    async def run(pool: DaskPool = pool) -> Any:
                        return await pool.run(trivial)

                    label = "worker-local Pool" if child == "pool" else "fresh child"
                    rows.append(
                        (
                            f"DaskPool, {label} ({context})",
                            await _p50(run, rounds),
                            await _rate(run, calls),
                        )
                    )
            base_p50, base_rate = rows[0][1], rows[0][2]
            print(f"{'way':40} {'p50 ms':>8} {'x base':>7} {'calls/s':>8} {'x base':>7}")
            for name, p50, rate in rows:
                print(
                    f"{name:40} {p50 * 1e3:8.1f} {p50 / base_p50:7.1f} {rate:8.0f} "
                    f"{rate / base_rate:7.2f}"
                )
            for child in ("pool", "fresh") if "Pool" in aioproc.__all__ else ("fresh",):
                with tempfile.TemporaryDirectory() as tmp:
                    async with DaskPool(cluster) as pool:
                        pool._child = child
                        figures = await stops(pool, tmp)
                print(f"\nstopping, {'worker-local Pool' if child == 'pool' else 'fresh child'}:")
                for what, seconds in figures.items():
                    print(f"  {what:55} {seconds * 1e3:8.1f} ms")
        finally:
            await cast(Any, cluster).close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls in flight (throughput)")
    parser.add_argument("--rounds", type=int, default=20, help="calls one at a time (p50)")
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    asyncio.run(main(args.calls, args.rounds))
