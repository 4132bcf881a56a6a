"""A program with four aioproc.run calls in flight, interrupted by Ctrl-C.

Run as ``python tests/scripts/ctrl_c.py BACKEND CONTEXT`` by ``tests/test_run.py``;
prints the children's pids, then what is left alive after the interrupt.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys

import anyio
import uvloop

import aioproc
from tests import targets

N = 4
pids: list[int] = []


def ctrl_c(exc: BaseException) -> bool:
    # How anyio.run ends on Ctrl-C: KeyboardInterrupt, bare (asyncio) or in trio's
    # nursery groups; on Python 3.10 asyncio cannot uncancel the main task and
    # lets its CancelledError out instead.
    group = getattr(exc, "exceptions", None)  # a BaseExceptionGroup (3.10: exceptiongroup's)
    if isinstance(group, tuple):
        return all(ctrl_c(e) for e in group)
    if sys.version_info < (3, 11) and type(exc).__name__ == "CancelledError":
        return True
    return isinstance(exc, KeyboardInterrupt)


async def main(context: str) -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    async with anyio.create_task_group() as tg:
        for _ in range(N):
            tg.start_soon(
                functools.partial(
                    aioproc.run, targets.send_pid_then_sleep, send, 60, context=context
                )
            )
        while len(pids) < N:
            await anyio.wait_readable(recv.fileno())
            while recv.poll():
                pids.append(recv.recv())
        print(" ".join(map(str, pids)), flush=True)
        await anyio.sleep(60)


if __name__ == "__main__":
    backend, context = sys.argv[1:]
    options = {"loop_factory": uvloop.new_event_loop} if backend == "uvloop" else {}
    try:
        anyio.run(
            main,
            context,
            backend="trio" if backend == "trio" else "asyncio",
            backend_options=options,
        )
    except BaseException as exc:
        if not ctrl_c(exc):
            raise
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        print("interrupted, alive:", alive, flush=True)
