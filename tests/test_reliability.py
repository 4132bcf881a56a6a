"""Reliability under load, at exit and with bad input.

Churn and exit storms run on every backend x watcher.  Their sizes scale with
the environment variable ``AIOPROC_STRESS_SCALE`` (default 1, what CI runs on
its main Python): churn ``1000 x scale`` children per backend x watcher, in
waves of ``WAVE`` at once (``AIOPROC_STRESS_SCALE=10`` is the full 10,000 per
watcher; give it ``--timeout=1800``); exit storms of 1000 children, fewer
below scale 1 (CI's runs on the other Pythons use 0.1).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import threading
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import aioproc
from aioproc import AsyncProcess
from aioproc._watchers import sigchld

from . import targets
from .helpers import (
    DEADLINE,
    children_of_this_process,
    fork_server_and_helpers,
    has_zombie_child,
    open_fds,
    rss_bytes,
)

SLOW_DEADLINE = 4 * DEADLINE  # one wave or one storm; longer is a hang

SCALE = float(os.environ.get("AIOPROC_STRESS_SCALE", "1"))
CHURN = max(1, round(1000 * SCALE))
WAVE = max(1, min(250, CHURN // 4))  # at least four waves: one warms up, three are measured
STORM = max(50, round(1000 * min(SCALE, 1)))

#: Parent memory a churn may add once warmed up, whatever its size.  A leak of
#: one small object per child (about 1 KiB) shows at the CI size through the
#: object count below, and through this bound at the full size.
RSS_BOUND = 8 * 2**20
OBJECTS_BOUND = 300


async def _churn_wave(first: int, count: int) -> None:
    procs = [
        AsyncProcess(target=targets.churn, args=(i,), context="fork")
        for i in range(first, first + count)
    ]
    try:
        for p in procs:
            p.start()
    finally:  # after a failed start too: the ones that started are joined
        codes: dict[int, int | None] = {}

        async def join(i: int, p: AsyncProcess) -> None:
            codes[i] = await p.join()

        with anyio.fail_after(SLOW_DEADLINE):
            async with anyio.create_task_group() as tg:
                for i, p in enumerate(procs, first):
                    if p.pid is not None:
                        tg.start_soon(join, i, p)
    assert codes == {i: targets.churn_code(i) for i in range(first, first + count)}
    for p in procs:
        assert not p.is_alive()
        p.close()


@pytest.mark.slow
async def test_churn(watcher: str, record_property: Any) -> None:
    """CHURN short children, WAVE at a time: nothing is left, nothing grows."""
    helpers = fork_server_and_helpers()
    listed = set(multiprocessing.active_children())
    await _churn_wave(0, min(WAVE, CHURN))  # warm-up: imports, arenas, the loop's tables
    await anyio.lowlevel.checkpoint()  # let the loop drop its last references
    gc.collect()
    fds = open_fds()
    rss = rss_bytes()
    objects = len(gc.get_objects())

    done = min(WAVE, CHURN)
    while done < CHURN:
        count = min(WAVE, CHURN - done)
        await _churn_wave(done, count)
        done += count
    await anyio.lowlevel.checkpoint()
    gc.collect()

    growth = rss_bytes() - rss
    record_property("churned", done)
    record_property("rss_growth", growth)
    print(f"churn: {done} children, parent RSS {growth / 2**20:+.1f} MiB after warm-up")
    assert children_of_this_process() - helpers == set()
    assert not has_zombie_child()
    assert open_fds() == fds
    assert [t.name for t in threading.enumerate() if t.name.startswith("aioproc-")] == []
    assert set(multiprocessing.active_children()) <= listed
    assert sigchld._hubs == {}
    assert len(gc.get_objects()) - objects < OBJECTS_BOUND
    assert rss_bytes() - rss < RSS_BOUND


@pytest.mark.slow
async def test_exit_storm(watcher: str, record_property: Any) -> None:
    """STORM (1000) children released at the same instant are all joined, none missed.

    The children wait on a pipe until every copy of its write end is closed;
    the parent closes its own once every join is waiting, so they all exit
    together.  With the sigchld watcher, their SIGCHLDs coalesce: the hub counts
    fewer signals than children, and every child is still found.
    """
    read_fd, write_fd = os.pipe()
    procs = [
        AsyncProcess(
            target=targets.exit_after_barrier, args=(read_fd, write_fd, i % 256), context="fork"
        )
        for i in range(STORM)
    ]
    codes: list[int | None] = [None] * STORM
    signals = None
    try:
        for p in procs:
            p.start()

        async def join(i: int) -> None:
            codes[i] = await procs[i].join()

        with anyio.fail_after(SLOW_DEADLINE):
            async with anyio.create_task_group() as tg:
                for i in range(STORM):
                    tg.start_soon(join, i)
                await anyio.wait_all_tasks_blocked()
                hub = sigchld._hubs.get(anyio.lowlevel.current_token())
                if watcher == "sigchld":
                    assert hub is not None
                    assert len(hub.watches) == STORM  # every join is waiting
                    before = hub.wakeups
                os.close(write_fd)  # the release
                write_fd = -1
        if hub is not None:
            signals = hub.wakeups - before
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        for p in procs:  # only after a failure: make sure nothing is left
            if p.pid is not None and p.exitcode is None:
                p.kill()
                with anyio.fail_after(SLOW_DEADLINE):
                    await p.join()

    assert codes == [i % 256 for i in range(STORM)]
    for p in procs:
        p.close()
    record_property("children", STORM)
    if watcher == "sigchld":
        assert signals is not None
        record_property("sigchld_signals", signals)
        print(f"exit storm: {STORM} children, {signals} SIGCHLD handled")
        assert 1 <= signals <= STORM
    assert sigchld._hubs == {}


# -- when the parent exits -----------------------------------------------------


@pytest.mark.parametrize("name", ["pidfd", "sigchld", "sentinel", "thread"])
def test_join_in_a_thread_of_its_own(name: str) -> None:
    """p.join() run by asyncio.run in another thread: a loop of its own there.

    It works wherever the watcher does; the sigchld watcher cannot wait off the
    main thread, and says so.  Nothing here runs a loop in the main thread.
    """
    aioproc.set_watcher(name)  # type: ignore[arg-type]
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_crash, args=(theirs, "exit"))
    p.start()
    assert ours.recv() == "ready"

    def in_a_thread(timeout: float) -> object:
        outcome: list[object] = []

        def run() -> None:
            try:
                outcome.append(asyncio.run(p.join(timeout)))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(SLOW_DEADLINE)
        [result] = outcome
        return result

    waited = in_a_thread(0.1)  # the child waits for the word: this times out
    if name == "sigchld":
        assert isinstance(waited, aioproc.WatcherUnavailable)
        assert "only the main thread may install a SIGCHLD handler" in str(waited)
    else:
        assert waited is None
    ours.send("go")
    if name == "sigchld":
        assert asyncio.run(p.join(SLOW_DEADLINE)) == 99  # in the main thread it can
    else:
        assert in_a_thread(SLOW_DEADLINE) == 99
    p.close()
    ours.close()


async def test_join_called_without_await_does_nothing_but_warn() -> None:
    """From sync code, p.join() only makes a coroutine: Python warns it was never awaited."""
    p = AsyncProcess(target=targets.sleep, args=(30,))
    p.start()
    with pytest.warns(RuntimeWarning, match="coroutine 'AsyncProcess.join' was never awaited"):
        p.join()  # type: ignore[unused-coroutine]  # dropped at once: CPython warns here
    assert p.is_alive()  # nothing waited, nothing changed
    p.kill()
    with anyio.fail_after(SLOW_DEADLINE):
        assert await p.join() == -signal.SIGKILL
    p.close()


async def test_one_process_joined_from_two_event_loops(watcher: str) -> None:
    """A second loop is refused while the first joins, and accepted once it stops."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_crash, args=(theirs, "exit"))
    p.start()
    with anyio.fail_after(SLOW_DEADLINE):
        await anyio.wait_readable(ours.fileno())
    assert ours.recv() == "ready"

    def join_in_another_loop(timeout: float = SLOW_DEADLINE) -> object:
        try:
            return asyncio.run(p.join(timeout))
        except Exception as exc:
            return exc

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.join)
            await anyio.wait_all_tasks_blocked()
            refused = await anyio.to_thread.run_sync(join_in_another_loop)
            scope.cancel()  # this loop stops joining
    assert isinstance(refused, RuntimeError)
    assert f"pid {p.pid} is already being joined in another event loop" in str(refused)
    assert "join a process from one event loop at a time" in str(refused)
    accepted = await anyio.to_thread.run_sync(join_in_another_loop, 0.2)
    if watcher == "sigchld":  # forced, and the other loop is not in the main thread
        assert isinstance(accepted, aioproc.WatcherUnavailable)
    else:
        assert accepted is None  # it waited, and timed out: the child still runs
    ours.send("go")
    with anyio.fail_after(SLOW_DEADLINE):
        assert await p.join() == 99
    p.close()
    ours.close()
