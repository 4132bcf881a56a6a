"""What one SIGCHLD costs the sigchld watcher with many children watched.

``python -m benchmarks.sigchld_cost [-n 1000] [--signals 300]``

Starts *n* children that wait on a barrier, joins all of them with the sigchld
watcher (so *n* children are watched in one loop), then sends the parent
SIGCHLDs that no child exit caused and measures the parent's CPU time per
signal: every SIGCHLD makes the hub ask the kernel about every watched child.
The same is measured with a single child watched, for comparison.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import anyio

import aioproc
from aioproc import AsyncProcess
from aioproc._watchers import sigchld


def _wait_for_eof(read_fd: int, write_fd: int) -> None:
    os.close(write_fd)
    os.read(read_fd, 1)


async def _cost_per_signal(n: int, signals: int) -> tuple[float, float, int]:
    r, w = os.pipe()
    procs = [AsyncProcess(target=_wait_for_eof, args=(r, w)) for _ in range(n)]
    for p in procs:
        p.start()
    os.close(r)
    result: tuple[float, float, int] = (0.0, 0.0, 0)
    async with anyio.create_task_group() as tg:
        for p in procs:
            tg.start_soon(p.join)
        await anyio.sleep(0.5)  # every joiner is registered with the hub now
        hub = next(iter(sigchld._hubs.values()))
        assert len(hub.watches) == n
        wakeups = hub.wakeups
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGCHLD)
            await anyio.sleep(0.002)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        seen = hub.wakeups - wakeups
        # The same loop without signals: what sleeping alone costs.
        cpu0 = time.process_time()
        for _ in range(signals):
            await anyio.sleep(0.002)
        idle = time.process_time() - cpu0
        result = ((cpu - idle) / signals, wall / signals, seen)
        os.close(w)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sigchld_cost")
    parser.add_argument("-n", type=int, default=1000, help="children watched")
    parser.add_argument("--signals", type=int, default=300)
    args = parser.parse_args()
    aioproc.set_watcher("sigchld")
    for backend in ("asyncio", "trio"):
        for n in (1, args.n):
            cpu, _wall, seen = anyio.run(_cost_per_signal, n, args.signals, backend=backend)
            print(
                f"{backend:8} {n:5} children watched: {cpu * 1e6:8.1f} us of parent CPU "
                f"per SIGCHLD ({seen} signals handled)"
            )


if __name__ == "__main__":
    main()
