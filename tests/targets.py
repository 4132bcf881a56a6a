"""Functions that run in child processes (module level, so spawn can pickle them)."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import time
from multiprocessing.connection import Connection


def noop() -> None:
    pass


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def exit_with(code: int) -> None:
    sys.exit(code)


def hard_exit(code: int) -> None:
    os._exit(code)


def raise_error() -> None:
    raise RuntimeError("boom from the child")


def segfault() -> None:
    faulthandler.disable()  # pytest enables it; a real crash needs no traceback
    ctypes.string_at(0)


def kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(10)


def ready_then_sleep(conn: Connection, seconds: float) -> None:
    conn.send("ready")
    conn.close()
    time.sleep(seconds)


def ready_then_wait_for_sigint(conn: Connection) -> None:
    """Exit 42 if SIGINT raises KeyboardInterrupt, as in a fresh interpreter."""
    try:
        conn.send("ready")
        time.sleep(30)
    except KeyboardInterrupt:
        os._exit(42)
    os._exit(1)


def ignore_sigterm_then_sleep(conn: Connection, seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send("ready")
    time.sleep(seconds)


def fork_grandchild_then_exit(conn: Connection, seconds: float) -> None:
    """Fork a grandchild that inherits every fd and outlives us; report its pid.

    Exits when told to, so that the parent can be joining already.
    """
    pid = os.fork()
    if pid == 0:
        time.sleep(seconds)
        os._exit(0)
    conn.send(pid)
    conn.recv()


def send_name(conn: Connection) -> None:
    import multiprocessing

    conn.send(multiprocessing.current_process().name)


def start_nested_and_send_names(conn: Connection) -> None:
    import anyio

    from aioproc import AsyncProcess

    async def main() -> None:
        p = AsyncProcess(target=noop)
        p.start()
        code = await p.join()
        conn.send((p.name, code))

    anyio.run(main)


def send_value(conn: Connection, value: object) -> None:
    conn.send(value)


def run_asyncio_loop() -> None:
    import asyncio

    async def main() -> int:
        await asyncio.sleep(0)
        return 7

    sys.exit(asyncio.run(main()))


def run_anyio_loop(backend: str) -> None:
    import anyio

    async def main() -> int:
        await anyio.lowlevel.checkpoint()
        return 8

    sys.exit(anyio.run(main, backend=backend))


def run_trio_loop() -> None:
    import trio

    async def main() -> int:
        await trio.lowlevel.checkpoint()
        return 9

    sys.exit(trio.run(main))


def join_self() -> None:
    """Exit 3 if joining the current process raises RuntimeError."""
    import multiprocessing

    import anyio

    me = multiprocessing.current_process()

    async def main() -> None:
        await me.join()  # type: ignore[func-returns-value,misc]

    try:
        anyio.run(main)
    except RuntimeError:
        os._exit(3)
    os._exit(1)


def start_child_from_daemon() -> None:
    """Exit 4 if a daemonic process is refused a child of its own."""
    from aioproc import AsyncProcess

    try:
        AsyncProcess(target=noop).start()
    except RuntimeError:
        os._exit(4)
    os._exit(1)


def sleep_then_exit(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)


def churn_code(i: int) -> int:
    """The exit code child *i* of a churn ends with (negative: killed by that signal)."""
    if i % 97 == 0:
        return -signal.SIGKILL
    return i % 200


def churn(i: int) -> None:
    """Exit as churn_code(i) says, through each way a child can end."""
    code = churn_code(i)
    if code < 0:
        os.kill(os.getpid(), -code)
    if i % 2:
        os._exit(code)
    sys.exit(code)


def exit_after_barrier(read_fd: int, write_fd: int, code: int) -> None:
    """Let go of the barrier's write end, wait until every holder has, then exit."""
    os.close(write_fd)
    os.read(read_fd, 1)
    os._exit(code)


def ready_then_crash(conn: Connection, how: str) -> None:
    """Report ready, wait for the word, then die as *how* says."""
    conn.send("ready")
    conn.recv()
    if how == "segfault":
        segfault()
    elif how == "abort":
        faulthandler.disable()
        os.abort()
    os._exit(99)
