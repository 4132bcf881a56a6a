"""1000 children joined from one loop: threads counted, fork warnings recorded.

Run as ``python tests/scripts/no_thread.py BACKEND`` by ``tests/test_guarantees.py``;
prints one JSON report.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings

import anyio

from aioproc import AsyncProcess

N = 1000


def wait_for_eof(read_fd: int, write_fd: int) -> None:
    # Let go of the barrier's write end, then wait for the parent's release.
    os.close(write_fd)
    os.read(read_fd, 1)


async def main() -> dict[str, object]:
    report: dict[str, object] = {"threads_before": threading.active_count()}
    r, w = os.pipe()
    procs = [AsyncProcess(target=wait_for_eof, args=(r, w)) for _ in range(N)]
    try:
        for p in procs:
            p.start()
    finally:
        os.close(w)  # release them all at once (an exit storm)
        os.close(r)
    codes: list[int | None] = [None] * N

    async def join(i: int) -> None:
        codes[i] = await procs[i].join()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(N):
                tg.start_soon(join, i)
            await anyio.lowlevel.checkpoint()
            report["threads_while_joining"] = threading.active_count()
    report["watchers"] = sorted({str(p.watcher) for p in procs})
    report["codes_all_zero"] = codes == [0] * N
    for p in procs:
        p.close()
    return report


if __name__ == "__main__":
    backend, options = sys.argv[1], {}
    if backend == "uvloop":
        import uvloop

        backend, options = "asyncio", {"loop_factory": uvloop.new_event_loop}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = anyio.run(main, backend=backend, backend_options=options)
    report["threads_after"] = threading.active_count()
    report["fork_warnings"] = [str(w.message) for w in caught if "fork" in str(w.message)]
    print(json.dumps(report))
