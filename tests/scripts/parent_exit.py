"""A parent that exits with daemonic and non-daemonic children, some with children.

Run as ``python tests/scripts/parent_exit.py METHOD`` by ``tests/test_exit.py``;
prints one JSON report of every child's pid and exit code, made after
multiprocessing's exit handler.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from multiprocessing import util
from multiprocessing.connection import Connection

import anyio

from aioproc import AsyncProcess


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def after_exit_handling(report: Callable[[], object]) -> None:
    # Finalizers of negative priority run last in multiprocessing's exit
    # handler, after its children were terminated or waited for.
    util.Finalize(None, report, exitpriority=-1)


def nested(conn: Connection) -> None:
    # A non-daemonic child that leaves children of its own behind: its own
    # exit terminates its daemon and waits for its worker.
    daemon = AsyncProcess(target=sleep, args=(60,), daemon=True)
    worker = AsyncProcess(target=sleep, args=(0.2,))
    daemon.start()
    worker.start()
    after_exit_handling(
        lambda: conn.send(
            {
                "nested_daemon": [daemon.pid, daemon.exitcode],
                "nested_worker": [worker.pid, worker.exitcode],
            }
        )
    )


def main() -> None:
    import multiprocessing

    context = sys.argv[1]
    reader, writer = multiprocessing.Pipe(duplex=False)
    procs: dict[str, AsyncProcess] = {}

    async def start_all() -> None:
        for i in range(3):
            procs[f"daemon{i}"] = AsyncProcess(
                target=sleep, args=(60,), daemon=True, context=context
            )
        for i in range(2):
            procs[f"worker{i}"] = AsyncProcess(target=sleep, args=(0.1 * (i + 1),), context=context)
        procs["nested"] = AsyncProcess(target=nested, args=(writer,), context=context)
        for p in procs.values():
            p.start()

    def report() -> None:
        report: dict[str, object] = {name: [p.pid, p.exitcode] for name, p in procs.items()}
        report.update(reader.recv())
        print(json.dumps(report), flush=True)

    after_exit_handling(report)
    anyio.run(start_all)  # the loop is gone; the interpreter exits with children running


if __name__ == "__main__":
    main()
