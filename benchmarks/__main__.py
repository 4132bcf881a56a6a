"""A short demo until the benchmark table lands: start and join many processes."""

from __future__ import annotations

import argparse
import random
import threading
import time

import anyio

from aioproc import AsyncProcess


def work(seconds: float) -> None:
    time.sleep(seconds)


async def demo(n: int) -> None:
    procs = [AsyncProcess(target=work, args=(random.uniform(0, 0.5),)) for _ in range(n)]
    threads = threading.active_count()
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    started = time.perf_counter() - t0
    async with anyio.create_task_group() as tg:
        for p in procs:
            tg.start_soon(p.join)
    total = time.perf_counter() - t0
    codes = {p.exitcode for p in procs}
    print(f"started {n} processes in {started:.2f} s ({started / n * 1e3:.2f} ms each)")
    print(f"joined all of them {total:.2f} s after the first start; exit codes {codes}")
    after = threading.active_count()
    print(f"watcher: {procs[0].watcher}; threads before {threads}, after {after}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("-n", type=int, default=500, help="number of processes")
    args = parser.parse_args()
    for backend in ("asyncio", "trio"):
        print(f"-- {backend}")
        anyio.run(demo, args.n, backend=backend)


if __name__ == "__main__":
    main()
