"""20 children started and joined in a fresh interpreter; then: any child left?

Run by ``tests/test_guarantees.py``; prints ``ECHILD`` when the kernel has no
child of this process left, alive or zombie.
"""

from __future__ import annotations

import os

import anyio

from aioproc import AsyncProcess


def noop() -> None:
    pass


async def main() -> None:
    procs = [AsyncProcess(target=noop) for _ in range(20)]
    for p in procs:
        p.start()
    for p in procs:
        if await p.join() != 0:
            raise SystemExit(f"{p!r} did not exit 0")
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        print("ECHILD")


if __name__ == "__main__":
    anyio.run(main)
