"""Every misuse of SPEC section 1, committed under ``python -O``; one JSON report.

Run by ``tests/test_reliability.py``: asserts are stripped there, so every
check must be a real exception.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import multiprocessing
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import aioproc
from aioproc import AsyncProcess


def noop() -> None:
    pass


def sleep() -> None:
    import time

    time.sleep(30)


seen: dict[str, object] = {}


def record(case: str, call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as exc:
        seen[case] = [type(exc).__name__, str(exc)]
    else:
        seen[case] = None


async def arecord(case: str, call: Callable[[], Awaitable[object]]) -> None:
    try:
        await call()
    except Exception as exc:
        seen[case] = [type(exc).__name__, str(exc)]
    else:
        seen[case] = None


def misuse_in_child(kind: str, sibling: AsyncProcess | None) -> None:
    # Runs in a child: report the error of joining oneself, a sibling, or
    # starting a child from a daemonic process, through the exit code.
    async def main() -> None:
        if kind == "join-self":
            me: Any = multiprocessing.current_process()  # this AsyncProcess, in the child
            await me.join()
        elif kind == "join-sibling":
            assert sibling is not None
            await sibling.join()
        else:
            AsyncProcess(target=noop).start()

    try:
        anyio.run(main)
    except RuntimeError as exc:
        print(json.dumps([kind, str(exc)]), flush=True)
        os._exit(3)
    os._exit(1)


async def main() -> None:
    p = AsyncProcess(target=noop)
    await arecord("join before start", p.join)
    for name in ("terminate", "kill", "interrupt"):
        record(f"{name} before start", getattr(p, name))
    p.start()
    record("start twice", p.start)
    bad_timeouts: tuple[Any, ...] = (-1, -math.inf, math.nan, "1", True, 1j)
    for timeout in bad_timeouts:
        await arecord(f"join timeout {timeout!r}", functools.partial(p.join, timeout))
    await p.join()
    record("daemon after start", lambda: setattr(p, "daemon", True))
    p.close()
    for name in ("start", "is_alive", "terminate", "kill", "interrupt"):
        record(f"{name} closed", getattr(p, name))
    await arecord("join closed", p.join)
    record("exitcode closed", lambda: p.exitcode)
    record("pid closed", lambda: p.pid)

    running = AsyncProcess(target=sleep)
    running.start()
    record("close running", running.close)
    for kind in ("join-self", "join-sibling"):
        child = AsyncProcess(target=misuse_in_child, args=(kind, running), context="fork")
        child.start()
        seen[f"{kind} exit code"] = await child.join()
    daemon = AsyncProcess(target=misuse_in_child, args=("daemon-child", None), daemon=True)
    daemon.start()
    seen["daemon-child exit code"] = await daemon.join()

    # Two event loops at once: this one joins, another thread's tries to.
    async with anyio.create_task_group() as tg:
        tg.start_soon(running.join)
        await anyio.wait_all_tasks_blocked()
        errors: list[list[str]] = []

        def other_loop() -> None:
            try:
                asyncio.run(running.join())
            except Exception as exc:
                errors.append([type(exc).__name__, str(exc)])

        thread = threading.Thread(target=other_loop)
        thread.start()
        thread.join()
        seen["join from a second loop"] = errors[0] if errors else None
        running.kill()
    running.close()

    wrong: dict[str, dict[str, Any]] = {
        "group": {"group": "g"},
        "target not callable": {"target": 42},
        "args not iterable": {"target": noop, "args": 5},
        "kwargs not a mapping": {"target": noop, "kwargs": [1]},
        "name not a str": {"target": noop, "name": 1},
        "unknown context": {"target": noop, "context": "nope"},
        "context of a wrong type": {"target": noop, "context": 3},
    }
    for case, kwargs in wrong.items():
        record(case, functools.partial(AsyncProcess, **kwargs))
    record("name set to an int", lambda: setattr(AsyncProcess(), "name", 3))
    record("unknown watcher", lambda: aioproc.set_watcher("nope"))  # type: ignore[arg-type]
    record("watcher of a wrong type", lambda: aioproc.set_watcher(3))  # type: ignore[arg-type]
    aioproc.set_watcher("sigchld")
    record("sigchld for a forkserver child", AsyncProcess(target=noop, context="forkserver").start)
    aioproc.set_watcher(None)
    print(json.dumps(seen))


if __name__ == "__main__":
    if __debug__:
        raise SystemExit("this script must run under python -O")
    anyio.run(main)
