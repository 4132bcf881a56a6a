"""start_async(): a start whose waits all happen in the event loop."""

from __future__ import annotations

import errno
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aioproc import AsyncProcess

from . import targets
from .helpers import DEADLINE, children_of_this_process, fork_server_fd, only_free_fds, open_fds

pytestmark = pytest.mark.anyio

CONTEXTS = ["fork", "forkserver", "spawn"]
PAYLOAD = 4 << 20  # far more than a pipe holds (64 KiB): the child must read as we write


def children_of(pid: int) -> set[int]:
    pids: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def fork_server_children() -> set[int]:
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return children_of(pid) if pid else set()


async def warm_fork_server() -> None:
    """Start the fork server (if need be) outside the measured part of a test."""
    p = AsyncProcess(target=targets.noop, context="forkserver")
    p.start()
    with anyio.fail_after(DEADLINE):
        await p.join()
    p.close()


@pytest.mark.parametrize("context", CONTEXTS)
async def test_start_async_then_join(context: str) -> None:
    p = AsyncProcess(target=targets.exit_with, args=(5,), context=context)
    with anyio.fail_after(DEADLINE):
        await p.start_async()
        assert p.pid is not None
        assert p.watcher is not None
        assert await p.join() == 5
    p.close()


async def count_turns(turns: list[int], done: anyio.Event) -> None:
    while not done.is_set():
        turns[0] += 1
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
async def test_the_loop_runs_while_the_child_is_fed(context: str) -> None:
    """Another task keeps running while megabytes of arguments go through the pipe."""
    if context == "forkserver":
        await warm_fork_server()
    p = AsyncProcess(target=targets.exit_with_length, args=(b"x" * PAYLOAD,), context=context)
    turns = [0]
    done = anyio.Event()
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(count_turns, turns, done)
            await anyio.lowlevel.checkpoint()  # let it start
            before = turns[0]
            await p.start_async()
            during = turns[0] - before
            done.set()
        assert await p.join() == PAYLOAD >> 20
    assert during > 0, "start_async() never let another task run"
    p.close()


def cancel_at_wait(
    monkeypatch: pytest.MonkeyPatch, scope: anyio.CancelScope, nth: int
) -> list[str]:
    """Cancel *scope* at the *nth* wait of the start (wait_readable/wait_writable)."""
    waits: list[str] = []

    def wrap(name: str) -> Callable[[int], Awaitable[None]]:
        original = getattr(anyio, name)

        async def wait(fd: Any) -> None:
            if len(waits) == nth:
                scope.cancel()
            waits.append(name)
            await original(fd)

        return wait

    for name in ("wait_readable", "wait_writable"):
        monkeypatch.setattr(anyio, name, wrap(name))
    return waits


@pytest.mark.parametrize("nth", [0, 1])
@pytest.mark.parametrize("context", ["forkserver", "spawn"])
async def test_cancelled_start_leaves_nothing(
    context: str, nth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled at its first or second wait: no child, no descriptor; it can start again.

    forkserver: the pid, then the data; spawn: the data, twice.
    """
    if context == "forkserver":
        await warm_fork_server()
    children, server_children = children_of_this_process(), fork_server_children()
    fds = open_fds() - fork_server_fd()
    p = AsyncProcess(target=targets.exit_with_length, args=(b"x" * PAYLOAD,), context=context)
    with monkeypatch.context() as patch, anyio.fail_after(DEADLINE):
        with anyio.CancelScope() as scope:
            waits = cancel_at_wait(patch, scope, nth)
            await p.start_async()
        assert scope.cancelled_caught, f"start_async() finished after waits {waits}"
    # forkserver awaits the server's reply (the pid) first; spawn only ever the pipe.
    first = "wait_readable" if context == "forkserver" else "wait_writable"
    assert waits[0] == first, waits
    assert p.pid is None
    assert children_of_this_process() == children
    assert fork_server_children() == server_children
    assert open_fds() - fork_server_fd() == fds
    with anyio.fail_after(DEADLINE):
        await p.start_async()  # the same object, still unstarted
        assert await p.join() == PAYLOAD >> 20
    p.close()


@pytest.mark.parametrize("context", CONTEXTS)
async def test_cancelled_before_it_starts_starts_nothing(context: str) -> None:
    children = children_of_this_process()
    p = AsyncProcess(target=targets.noop, context=context)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await p.start_async()
    assert scope.cancelled_caught
    assert p.pid is None
    assert children_of_this_process() == children
    p.close()


async def test_misuse_is_refused_as_by_start(monkeypatch: pytest.MonkeyPatch) -> None:
    p = AsyncProcess(target=targets.noop, context="fork")
    await p.start_async()
    with pytest.raises(RuntimeError, match="cannot start a process twice"):
        await p.start_async()
    with anyio.fail_after(DEADLINE):
        await p.join()
    p.close()
    with pytest.raises(ValueError, match="closed"):
        await p.start_async()

    other = AsyncProcess(target=targets.noop)
    monkeypatch.setitem(multiprocessing.current_process()._config, "daemon", True)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="daemonic process is not allowed to have children"):
        await other.start_async()
    monkeypatch.undo()
    monkeypatch.setattr(other, "_parent_pid", os.getpid() + 1)
    with pytest.raises(RuntimeError, match="created by the current process"):
        await other.start_async()
    assert other.pid is None


async def test_a_start_in_progress_refuses_another() -> None:
    p = AsyncProcess(target=targets.exit_with_length, args=(b"x" * PAYLOAD,), context="spawn")
    refused: list[BaseException] = []

    async def meddle(started: anyio.Event) -> None:
        await started.wait()

        def set_daemon() -> None:
            p.daemon = True

        for attempt in (p.start_async, p.start, p.close, set_daemon):
            try:
                result = attempt()
                if result is not None:
                    await result
            except (RuntimeError, ValueError) as exc:
                refused.append(exc)

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            started = anyio.Event()
            tg.start_soon(meddle, started)
            started.set()
            await p.start_async()
        assert await p.join() == PAYLOAD >> 20
    p.close()
    messages = [str(exc) for exc in refused]
    assert len(messages) == 4, messages
    assert "start_async() of" in messages[0]
    assert "in progress in another task" in messages[1]
    assert "cannot close a process that start_async() is starting" in messages[2]
    assert "cannot set daemon on a process that has been started" in messages[3]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("context", "frees"),
    # forkserver with 3 or 4 free: the stdlib's client loses a pipe (test_faults.py).
    [("spawn", range(7)), ("forkserver", (0, 1, 2, 5))],
)
async def test_descriptors_running_out(context: str, frees: range) -> None:
    """As start(): a clear EMFILE, nothing leaked, and the same object starts later."""
    if context == "forkserver":
        await warm_fork_server()
    warm = AsyncProcess(target=targets.noop, context=context)
    await warm.start_async()  # the resource tracker, while descriptors are plenty
    with anyio.fail_after(DEADLINE):
        await warm.join()
    warm.close()
    fds = open_fds() - fork_server_fd()
    outcomes = []
    for free in frees:
        p = AsyncProcess(target=targets.noop, context=context)
        error: OSError | None = None
        with only_free_fds(free), anyio.fail_after(DEADLINE):
            try:
                await p.start_async()
            except OSError as exc:
                error = exc
        if error is not None:
            assert error.errno == errno.EMFILE
            assert "too many open files (EMFILE)" in str(error)
            assert p.pid is None
            await p.start_async()
        outcomes.append(error is None)
        with anyio.fail_after(DEADLINE):
            assert await p.join() == 0
        p.close()
        assert open_fds() - fork_server_fd() == fds, f"descriptors leaked with {free} free"
    assert outcomes[0] is False
    assert outcomes[-1] is True
