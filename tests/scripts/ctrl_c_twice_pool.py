"""A program whose ``Pool.run`` is interrupted by Ctrl-C, and again while the pool stops.

Run as ``python -m tests.scripts.ctrl_c_twice_pool BACKEND CONTEXT GRACE`` from the
repository's root by ``tests/test_hostile2.py``.  The call ignores SIGTERM (it says
``sigterm`` when one arrives) and prints ``child PID`` once it runs.
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


async def main(context: str, grace: float) -> None:
    async with aioproc.Pool(1, context=context, grace=grace) as pool:
        await pool.run(os.getpid)
        await pool.run(stubborn)


if __name__ == "__main__":
    backend, context, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
    options = {"loop_factory": uvloop.new_event_loop} if backend == "uvloop" else {}
    anyio.run(
        functools.partial(main, context, grace),
        backend="trio" if backend == "trio" else "asyncio",
        backend_options=options,
    )
