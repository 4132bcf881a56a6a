"""The sigchld watcher's joiners are never left without a leader.

One joining task per loop (the leader) reads the SIGCHLD pipe; when it leaves
it hands the lead to a waiting task.  If that task's own child exits before it
runs, it leaves too, and must pass the lead on: otherwise every other joiner
waits forever, since nobody reads the pipe any more.  The benchmark's
scenario 1 (1000 children, sigchld on trio) hung exactly so.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess
from aioproc._watchers import sigchld
from aioproc._watchers._base import running_under_uvloop

from . import targets
from .helpers import DEADLINE

pytestmark = pytest.mark.anyio


async def test_task_handed_the_lead_whose_child_exits_passes_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if running_under_uvloop():
        pytest.skip("uvloop owns SIGCHLD: no sigchld watcher there")
    aioproc.set_watcher("sigchld")  # conftest puts the automatic choice back
    first = AsyncProcess(target=targets.sleep, args=(0.1,))
    others = [AsyncProcess(target=targets.sleep, args=(1.0,)) for _ in range(2)]
    killed: list[AsyncProcess] = []
    original = sigchld._Hub.hand_over

    def hand_over_then_kill(hub: Any) -> None:
        before = {w: w.wake.is_set() for w in hub.watches if w.wake is not None}
        original(hub)
        if killed:
            return
        for watch, was_set in before.items():
            if not was_set and watch.wake is not None and watch.wake.is_set():
                # The task just given the lead finds its child gone when it runs.
                pid = watch.popen.pid
                os.kill(pid, signal.SIGKILL)
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                killed.extend(p for p in others if p.pid == pid)

    monkeypatch.setattr(sigchld._Hub, "hand_over", hand_over_then_kill)
    for p in (first, *others):
        p.start()
    codes: dict[int | None, int | None] = {}

    async def join(p: AsyncProcess) -> None:
        codes[p.pid] = await p.join()

    try:
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                for p in (first, *others):  # the first join takes the lead
                    tg.start_soon(join, p)
                    await anyio.wait_all_tasks_blocked()
    finally:
        for p in (first, *others):  # if the joins deadlocked: no child left behind
            if p.exitcode is None:
                p.kill()
            with anyio.fail_after(DEADLINE):
                while p.is_alive():
                    await anyio.sleep(0.01)
    assert len(killed) == 1
    survivor = next(p for p in others if p not in killed)
    assert codes == {first.pid: 0, killed[0].pid: -signal.SIGKILL, survivor.pid: 0}
    for p in (first, *others):
        p.close()
