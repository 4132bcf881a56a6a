"""AsyncProcess: the multiprocessing.Process API with an awaitable join."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from typing import Any

import anyio
import pytest
import uvloop

from aioproc import AsyncProcess, _popen
from aioproc._watchers import pidfd

from . import targets
from .helpers import (
    DEADLINE,
    handshake,
    joined,
    killed_afterwards,
    pid_exists,
    state_of,
    warmed_up,
)

pytestmark = pytest.mark.anyio

CONTEXTS = ["fork", "forkserver", "spawn"]
ASYNCIO_UVLOOP = ("asyncio", {"loop_factory": uvloop.new_event_loop})


def started(target: Any, *args: Any, **kwargs: Any) -> AsyncProcess:
    p = AsyncProcess(target=target, args=args, **kwargs)
    p.start()
    return p


# -- basic lifecycle, on every backend x watcher x start method -----------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_start_and_join_returns_exit_code(watcher: str, context: str) -> None:
    p = AsyncProcess(target=targets.exit_with, args=(3,), context=context)
    assert (p.pid, p.ident, p.exitcode, p.is_alive()) == (None, None, None, False)
    p.start()
    assert p.watcher == watcher
    assert isinstance(p.pid, int)
    assert p.pid == p.ident
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 3
    assert p.exitcode == 3
    assert not p.is_alive()
    assert p not in multiprocessing.active_children()
    p.close()


@pytest.mark.parametrize(
    ("target", "args", "expected"),
    [
        (targets.noop, (), 0),
        (targets.exit_with, (5,), 5),
        (targets.hard_exit, (7,), 7),
        (targets.raise_error, (), 1),
        (targets.kill_self, (signal.SIGKILL,), -signal.SIGKILL),
        (targets.segfault, (), -signal.SIGSEGV),
    ],
    ids=["zero", "sys.exit", "os._exit", "exception", "sigkill", "segfault"],
)
async def test_exit_codes(watcher: str, target: Any, args: tuple[Any, ...], expected: int) -> None:
    p = started(target, *args)
    with anyio.fail_after(DEADLINE):
        assert await p.join() == expected
    assert p.exitcode == expected


async def test_terminate_kill_and_interrupt(watcher: str) -> None:
    for method, expected in (("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)):
        recv, send = multiprocessing.Pipe(duplex=False)
        p = started(targets.ready_then_sleep, send, 30)
        await handshake(recv)
        assert p.is_alive()
        getattr(p, method)()
        with anyio.fail_after(DEADLINE):
            assert await p.join() == expected
        assert p.exitcode == expected
        getattr(p, method)()  # after exit: nothing happens
    recv, send = multiprocessing.Pipe(duplex=False)
    p = started(targets.ready_then_wait_for_sigint, send)
    await handshake(recv)
    p.interrupt()
    assert await joined(p) == 42


async def test_sigint_raises_keyboard_interrupt_in_forked_child() -> None:
    """The parent loop's SIGINT handler is not inherited, whatever the parent loop."""
    recv, send = multiprocessing.Pipe(duplex=False)
    p = started(targets.ready_then_wait_for_sigint, send, context="fork")
    await handshake(recv)
    p.interrupt()
    assert await joined(p) == 42


async def test_loop_signal_handlers_are_not_inherited(anyio_backend_name: str) -> None:
    """A SIGTERM handler of the parent's loop would make a forked child immortal."""
    if anyio_backend_name != "asyncio":
        with anyio.open_signal_receiver(signal.SIGTERM):
            await _terminate_forked_child()
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    try:
        await _terminate_forked_child()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _terminate_forked_child() -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    p = started(targets.ready_then_sleep, send, 30, context="fork")
    await handshake(recv)
    p.terminate()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGTERM


@pytest.mark.parametrize(
    ("target", "args", "expected"),
    [
        (targets.run_asyncio_loop, (), 7),
        (targets.run_anyio_loop, ("asyncio",), 8),
        (targets.run_anyio_loop, ("trio",), 8),
        (targets.run_trio_loop, (), 9),
    ],
    ids=["asyncio.run", "anyio.run-asyncio", "anyio.run-trio", "trio.run"],
)
@pytest.mark.parametrize("context", CONTEXTS)
async def test_child_can_run_its_own_event_loop(
    context: str, target: Any, args: tuple[Any, ...], expected: int
) -> None:
    p = started(target, *args, context=context)
    with anyio.fail_after(DEADLINE):
        assert await p.join() == expected


# -- join: timeouts, many joiners, cancellation ---------------------------------


async def test_cancelled_joins_leave_the_child_running(watcher: str) -> None:
    p = started(targets.sleep, 30)
    # anyio cancel scope
    with anyio.move_on_after(0.05) as scope:
        await p.join()
    assert scope.cancelled_caught
    assert p.is_alive()
    # a task group cancelled while many tasks join
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(p.join)
        await anyio.wait_all_tasks_blocked()  # every join waits
        tg.cancel_scope.cancel()
    assert p.is_alive()
    assert p.exitcode is None
    # one joiner cancelled while another keeps waiting: the other still wakes
    result: list[int | None] = []

    async def survivor() -> None:
        result.append(await p.join())

    async with anyio.create_task_group() as tg:
        tg.start_soon(survivor)
        with anyio.move_on_after(0.05):
            await p.join()
        p.terminate()
    assert result == [-signal.SIGTERM]
    assert await p.join() == -signal.SIGTERM


@pytest.mark.parametrize("anyio_backend", ["asyncio", ASYNCIO_UVLOOP], ids=["asyncio", "uvloop"])
async def test_asyncio_task_cancel_leaves_the_child_running() -> None:
    p = started(targets.sleep, 30)
    task = asyncio.ensure_future(p.join())
    await anyio.wait_all_tasks_blocked()  # the join waits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.is_alive()
    p.kill()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGKILL


async def test_join_does_not_block_the_loop(watcher: str) -> None:
    """Another task ticks 10 times while the join waits; then it lets the child exit."""
    ours, theirs = multiprocessing.Pipe()
    p = started(targets.ready_then_exit, theirs, 0)
    await handshake(ours)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(10):
            await anyio.sleep(0.01)
            ticks += 1
        ours.send("go")

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        with anyio.fail_after(DEADLINE):  # a join that blocked the loop: the ticker never ends
            assert await p.join() == 0
    assert ticks == 10
    ours.close()


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfds", "no-pidfds"])
async def test_joined_as_soon_as_child_exits_despite_grandchild(
    watcher: str, pidfds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grandchild holding the sentinel pipe must not delay the join.

    Where the kernel has pidfds a fork child's sentinel is its pidfd: no pipe
    at all.  Without them, the sentinel watcher shows its documented limit: it
    waits until the grandchild lets go of the pipe.
    """
    if not pidfds:
        if watcher == "pidfd":
            pytest.skip("the pidfd watcher needs pidfds")
        monkeypatch.setattr(pidfd, "supported", False)
    elif not pidfd.is_supported():
        pytest.skip("needs pidfd_open (Linux >= 5.3)")
    limited = watcher == "sentinel" and not (pidfds and _popen.ONE_DESCRIPTOR_PER_CHILD)
    ours, theirs = multiprocessing.Pipe()
    p = started(targets.fork_grandchild_then_exit, theirs, 30)
    grandchild = await handshake(ours)
    assert isinstance(grandchild, int)
    with killed_afterwards(grandchild):
        async with anyio.create_task_group() as tg:
            result: list[int | None] = []

            async def join() -> None:
                result.append(await p.join(timeout=2 if limited else 10))

            tg.start_soon(join)
            await anyio.wait_all_tasks_blocked()  # the join is waiting on the watcher now
            ours.send("exit")
        assert pid_exists(grandchild)
        if limited:
            assert result == [None]
            assert state_of(p.pid or 0) == "Z"  # the child had exited all along
            os.kill(grandchild, signal.SIGKILL)
            with anyio.fail_after(5):
                assert await p.join() == 0
        else:
            assert result == [0]


# -- the stdlib API -----------------------------------------------------------


async def test_names() -> None:
    p = AsyncProcess(target=targets.noop)
    assert p.name.startswith("AsyncProcess-")
    assert int(p.name.split("-")[1]) > 0
    q = AsyncProcess(target=targets.noop, name="worker")
    assert q.name == "worker"
    q.name = "renamed"
    assert q.name == "renamed"
    with pytest.raises(TypeError, match="name must be a str"):
        q.name = 3  # type: ignore[assignment]

    recv, send = multiprocessing.Pipe(duplex=False)
    r = started(targets.start_nested_and_send_names, send)
    nested = await handshake(recv)
    assert isinstance(nested, tuple)
    nested_name, nested_code = nested
    with anyio.fail_after(DEADLINE):
        assert await r.join() == 0
    assert nested_code == 0
    outer_n = r.name.split("-")[1]
    assert nested_name == f"AsyncProcess-{outer_n}:1"

    recv, send = multiprocessing.Pipe(duplex=False)
    s = AsyncProcess(target=targets.send_name, args=(send,), name="custom")
    s.start()
    assert await handshake(recv) == "custom"
    await s.join()


class Doubler(AsyncProcess):
    def __init__(
        self, conn: multiprocessing.connection.Connection, value: int, context: str
    ) -> None:
        super().__init__(context=context)
        self.conn = conn
        self.value = value

    def run(self) -> None:
        self.conn.send(self.value * 2)


@pytest.mark.parametrize("context", CONTEXTS)
async def test_run_overridden_in_subclass(context: str) -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    p = Doubler(send, 21, context)
    p.start()
    assert await handshake(recv) == 42
    assert p.name.startswith("Doubler-")
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0


@pytest.mark.parametrize("context", CONTEXTS)
async def test_run_assigned_on_instance(context: str) -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    p = AsyncProcess(context=context)
    p.run = lambda: None  # type: ignore[method-assign]
    p.run = _SendFortyTwo(send)  # type: ignore[method-assign]
    p.start()
    assert await handshake(recv) == 42
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0


class _SendFortyTwo:
    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn

    def __call__(self) -> None:
        self.conn.send(42)


async def test_kwargs_and_args() -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    p = AsyncProcess(target=targets.send_value, args=[send], kwargs={"value": "kw"})
    p.start()
    assert await handshake(recv) == "kw"
    await p.join()


async def test_daemon_flag() -> None:
    p = AsyncProcess(target=targets.start_child_from_daemon, daemon=True)
    assert p.daemon
    p.start()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 4
    with pytest.raises(RuntimeError, match="before start"):
        p.daemon = False
    q = AsyncProcess(target=targets.noop)
    assert not q.daemon
    q.daemon = True
    assert q.daemon


async def test_active_children_and_connection_wait() -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    p = started(targets.ready_then_sleep, send, 30)
    await handshake(recv)
    assert p in multiprocessing.active_children()
    assert multiprocessing.connection.wait([p.sentinel], timeout=0) == []
    p.terminate()
    with anyio.fail_after(DEADLINE):
        await p.join()
    assert multiprocessing.connection.wait([p.sentinel], timeout=5) == [p.sentinel]
    assert p not in multiprocessing.active_children()


@pytest.mark.parametrize("context", CONTEXTS)
async def test_the_sentinel_can_be_awaited_in_the_loop_while_a_task_joins(
    watcher: str, context: str
) -> None:
    """Code written for multiprocessing waits for ``p.sentinel`` in its event loop
    (``anyio.wait_readable``, ``loop.add_reader``); a task joins meanwhile: both wake.

    An event loop takes one waiter per descriptor (anyio and trio refuse a second,
    asyncio's ``add_reader`` silently replaces the first, which then never wakes),
    so the descriptor ``sentinel`` gives out must not be the one a join waits on.
    """
    await warmed_up(context)  # a process's first child gets the stdlib's pipes too
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 5), context=context)
    p.start()
    theirs.close()
    woken: list[object] = []

    async def wait_for_the_sentinel() -> None:
        await anyio.wait_readable(p.sentinel)
        woken.append("sentinel")

    async def join() -> None:
        woken.append(await p.join())

    try:
        assert await handshake(ours) == "ready"
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_the_sentinel)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(join)
                await anyio.wait_all_tasks_blocked()
                ours.send("go")
    finally:
        p.kill()  # nothing once it has exited
        assert await joined(p) is not None
    assert sorted(woken, key=str) == [5, "sentinel"]
    # Not timeout=0: a join read a forkserver child's exit code from the status
    # pipe, which turns readable again once the fork server closes its end.
    assert multiprocessing.connection.wait([p.sentinel], timeout=DEADLINE) == [p.sentinel]
    p.close()
    ours.close()


async def test_active_children_reaps_through_the_same_popen() -> None:
    """multiprocessing's own polling collects the status; join() still reports it."""
    p = started(targets.exit_with, 6)
    deadline = time.monotonic() + DEADLINE
    while p in multiprocessing.active_children():
        assert time.monotonic() < deadline
        await anyio.sleep(0.01)
    assert p.exitcode == 6
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 6


async def test_authkey_and_sentinel() -> None:
    p = AsyncProcess(target=targets.noop)
    assert p.authkey == multiprocessing.current_process().authkey
    with pytest.raises(ValueError, match="not started"):
        _ = p.sentinel
    p.start()
    assert isinstance(p.sentinel, int)
    await p.join()


async def test_repr() -> None:
    p = AsyncProcess(target=targets.sleep, args=(30,), name="r", daemon=True)
    assert repr(p) == "<AsyncProcess name='r' initial daemon>"
    p.start()
    assert repr(p) == f"<AsyncProcess name='r' pid={p.pid} running daemon>"
    p.terminate()
    await p.join()
    assert repr(p) == f"<AsyncProcess name='r' pid={p.pid} exitcode=-SIGTERM daemon>"
    p.close()
    assert repr(p) == "<AsyncProcess name='r' closed daemon>"


async def test_close_releases_and_forbids_use() -> None:
    p = started(targets.noop)
    with anyio.fail_after(DEADLINE):
        await p.join()
    p.close()
    p.close()  # twice is fine, as in the stdlib
    for call in (p.start, p.is_alive, p.terminate, p.kill, p.interrupt):
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(ValueError, match="closed"):
        await p.join()
    with pytest.raises(ValueError, match="closed"):
        _ = p.exitcode
    with pytest.raises(ValueError, match="closed"):
        _ = p.pid


async def test_close_while_another_task_joins(watcher: str) -> None:
    """close() right after the exit, before the joining task has run, wakes it."""
    recv, send = multiprocessing.Pipe(duplex=False)
    p = started(targets.ready_then_sleep, send, 30)
    await handshake(recv)
    result: list[int | None] = []

    async def joiner() -> None:
        result.append(await p.join())

    async with anyio.create_task_group() as tg:
        tg.start_soon(joiner)
        await anyio.wait_all_tasks_blocked()
        p.kill()
        while p.exitcode is None:  # collected here, not by the joiner
            await anyio.sleep(0.001)
        p.close()
    assert result == [-signal.SIGKILL]
