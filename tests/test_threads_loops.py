"""Threads and loops: one process joined from several threads and event loops.

SPEC §8, "no hang".  Two loops in two threads joining one process at once both
return (or one is refused with the documented RuntimeError); ``is_alive()``
and ``exitcode`` polled from another thread never disturb a loop's join; a
loop closed while one of its tasks was joining leaves nothing behind, and the
process can be joined from the next loop.  Each race is run many times: a
hang shows as a thread still running after the deadline.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import uvloop

import aioproc
from aioproc import AsyncProcess

from . import targets
from .conftest import BACKENDS, FORK_THREAD_WARNING
from .helpers import DEADLINE, handshake, open_fds

ROUNDS = 40  # a two-loop join hung about once in 30 rounds before issue 11


def started_child(code: int) -> tuple[AsyncProcess, Any]:
    """A child that has said ready and exits with *code* when told; our end of its pipe."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, code))
    p.start()
    theirs.close()
    assert ours.poll(DEADLINE), "the child did not say ready"
    assert ours.recv() == "ready"
    return p, ours


def run_loop(backend: str, func: Callable[[], Awaitable[object]]) -> object:
    """``func()`` in a new event loop of *backend* in this thread; its value or its error."""
    name, options = BACKENDS[backend]
    try:
        return anyio.run(func, backend=name, backend_options=options)
    except Exception as exc:
        return exc


@FORK_THREAD_WARNING
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", ["pidfd", "sentinel", "thread"])
def test_two_loops_in_two_threads_join_one_process_at_once(name: str, backend: str) -> None:
    """Both joins return the exit code, or one is refused; never a hang."""
    aioproc.set_watcher(name)  # type: ignore[arg-type]
    for round_ in range(ROUNDS):
        p, ours = started_child(7)
        outcomes: list[object] = [None, None]
        barrier = threading.Barrier(3)

        def join(
            i: int,
            p: AsyncProcess = p,
            barrier: threading.Barrier = barrier,
            outcomes: list[object] = outcomes,
        ) -> None:
            barrier.wait()
            outcomes[i] = run_loop(backend, p.join)

        threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        barrier.wait()
        ours.send("go")
        for thread in threads:
            thread.join(DEADLINE)
        hung = [i for i, thread in enumerate(threads) if thread.is_alive()]
        assert hung == [], f"round {round_}: join {hung} still waiting after {DEADLINE} s"
        for outcome in outcomes:
            if isinstance(outcome, RuntimeError):
                assert "is already being joined in another event loop" in str(outcome)
            else:
                assert outcome == 7, f"round {round_}: {outcomes}"
        assert 7 in outcomes
        p.close()
        ours.close()


@FORK_THREAD_WARNING
async def test_is_alive_polled_from_another_thread_while_a_loop_joins(watcher: str) -> None:
    """The join returns the exit code; the poller sees it too; nothing raised, nothing leaked."""
    fds = open_fds()
    for round_ in range(ROUNDS // 2):
        ours, theirs = multiprocessing.Pipe()
        p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 7))
        p.start()
        theirs.close()
        assert await handshake(ours) == "ready"
        seen: list[object] = []

        def poll(p: AsyncProcess = p, seen: list[object] = seen) -> None:
            try:
                while p.is_alive() or p.exitcode is None:
                    pass
                seen.append(p.exitcode)
            except Exception as exc:
                seen.append(exc)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        ours.send("go")
        with anyio.fail_after(DEADLINE):
            code = await p.join()
        poller.join(DEADLINE)
        assert not poller.is_alive(), f"round {round_}: the poller never saw the exit"
        assert (code, seen) == (7, [7]), f"round {round_}"
        p.close()
        ours.close()
    assert open_fds() == fds


async def _a_few_iterations() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("name", ["pidfd", "sigchld", "sentinel", "thread"])
def test_a_loop_closed_while_joining_leaves_nothing(name: str, loop_kind: str) -> None:
    """The join's task is abandoned with its loop; a new loop joins; nothing is left."""
    if name == "sigchld" and loop_kind == "uvloop":
        pytest.skip("the sigchld watcher cannot work under uvloop (test_watchers.py)")
    aioproc.set_watcher(name)  # type: ignore[arg-type]
    gc.collect()
    fds = open_fds()
    handler = signal.getsignal(signal.SIGCHLD)
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    p, ours = started_child(7)
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    task = loop.create_task(p.join())
    loop.run_until_complete(_a_few_iterations())
    assert not task.done()  # waiting for the child
    loop.close()
    del task, loop
    gc.collect()
    ours.send("go")
    ours.close()

    async def join_again() -> int | None:
        return await asyncio.wait_for(p.join(), DEADLINE)

    assert asyncio.run(join_again()) == 7
    p.close()
    gc.collect()
    assert open_fds() == fds
    assert signal.getsignal(signal.SIGCHLD) == handler
    assert signal.set_wakeup_fd(wakeup_fd) == wakeup_fd
