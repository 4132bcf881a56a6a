"""Edges of SPEC §1, §6, §7 and §8 that a second hostile review probed.

Its two findings are tested where they belong: a second Ctrl-C while a Pool
stops its worker in test_exit.py, DaskPool's PoolClosed in test_dask.py.  What
held up: a status lost to someone else, seen first by any call; close() between
an exit and a waiting join.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import DEADLINE, handshake, open_fds

REPO = Path(__file__).resolve().parent.parent
GRACE = 1.0
ROUNDS = 3  # the bug showed in about 2 of 3 rounds under asyncio and uvloop


# -- probes that held up ------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_close_between_exit_and_a_waiting_join_wakes_it(watcher: str) -> None:
    """close() after the child exited, while another task waits in join(): the join
    returns the exit code, nothing leaks."""
    import multiprocessing

    fds = open_fds()
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 5))
    p.start()
    theirs.close()
    assert await handshake(ours) == "ready"
    outcome: list[object] = []
    entered = anyio.Event()

    async def joiner() -> None:
        entered.set()
        outcome.append(await p.join())

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(joiner)
            await entered.wait()
            await anyio.wait_all_tasks_blocked()  # the joiner waits inside join()
            ours.send("go")
            assert p.pid is not None
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
            p.close()
    assert outcome == [5]
    ours.close()
    assert open_fds() == fds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", ["is_alive", "terminate", "join0"])
async def test_lost_status_first_seen_by_other_calls_is_said_once(watcher: str, first: str) -> None:
    """A foreign waitpid reaped the child; whichever call looks first, ExitStatusLost is
    raised exactly once by join()/join(0), and afterwards the object is consistent."""
    import multiprocessing

    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 0))
    p.start()
    theirs.close()
    assert await handshake(ours) == "ready"
    ours.send("go")
    assert p.pid is not None
    os.waitpid(p.pid, 0)
    raised = 0
    if first == "is_alive":
        assert not p.is_alive()
    elif first == "terminate":
        p.terminate()  # nothing sent: the pidfd says the process is gone
    for _ in range(2):
        try:
            with anyio.fail_after(DEADLINE):
                await p.join(0 if first == "join0" else None)
        except aioproc.ExitStatusLost:
            raised += 1
    assert raised == 1
    assert not p.is_alive()
    assert p.exitcode is None
    p.close()
    ours.close()
