"""A program whose ``aioproc.run`` is interrupted by Ctrl-C, and again while it stops.

Run as ``python -m tests.scripts.ctrl_c_twice BACKEND GRACE [pool]`` from the
repository's root by ``tests/test_exit.py`` (with ``pool``: the call is a
``Pool``'s).  The child of ``run`` ignores
SIGTERM (it says ``sigterm`` when one arrives), so stopping it takes the whole
grace period, and it would otherwise sleep 600 s.  It prints ``child PID``
once it runs.  The test sends SIGINT to this program once, waits for
``sigterm``, and sends SIGINT again.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from types import FrameType

import anyio
import uvloop

import aioproc


def _say_sigterm(signum: int, frame: FrameType | None) -> None:
    os.write(1, b"sigterm\n")


def stubborn() -> None:
    signal.signal(signal.SIGTERM, _say_sigterm)
    print(f"child {os.getpid()}", flush=True)
    time.sleep(600)


async def main(grace: float) -> None:
    # A first call loads what starting a child needs, so that the second child
    # is watched a long while before it can say "child" (a Ctrl-C under trio
    # lands wherever the parent is, and this test is not about starting).
    await aioproc.run(os.getpid, context="fork")
    await aioproc.run(stubborn, grace=grace, context="fork")


async def main_pool(grace: float) -> None:
    async with aioproc.Pool(1, context="fork", grace=grace) as pool:
        await pool.run(os.getpid)  # the worker is up before the call says "child"
        await pool.run(stubborn)


if __name__ == "__main__":
    backend, grace = sys.argv[1], float(sys.argv[2])
    options = {"loop_factory": uvloop.new_event_loop} if backend == "uvloop" else {}
    anyio.run(
        functools.partial(main_pool if sys.argv[3:] == ["pool"] else main, grace),
        backend="trio" if backend == "trio" else "asyncio",
        backend_options=options,
    )
