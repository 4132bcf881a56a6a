"""The sigchld watcher next to other SIGCHLD users in the same program.

SPEC §8.  A program installs its own SIGCHLD handler before a join, or its
event loop takes SIGCHLD (``loop.add_signal_handler``, trio's
``open_signal_receiver``) while a join waits.  Joins still wake, the other
handler still runs, and it is the one in place afterwards, never SIG_DFL
over it.  Under ``SIG_IGN`` the program's other children are still reaped by
the kernel (or the forced watcher is refused, saying why).  Main thread only:
that is where the sigchld watcher works; not under uvloop, which owns SIGCHLD.
"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import DEADLINE, handshake, state_of


@pytest.fixture(autouse=True)
def _sigchld_watcher(anyio_backend: Any) -> None:
    _, options = anyio_backend
    if "loop_factory" in options:
        pytest.skip("uvloop owns SIGCHLD: no sigchld watcher there (test_watchers.py)")
    aioproc.set_watcher("sigchld")  # conftest puts the automatic choice back


@pytest.fixture
def sigchld_restored() -> Any:
    previous = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, previous)


async def started_child(code: int) -> tuple[AsyncProcess, Any]:
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, code))
    p.start()
    theirs.close()
    assert await handshake(ours) == "ready"
    return p, ours


@pytest.mark.usefixtures("sigchld_restored")
async def test_joins_wake_next_to_the_programs_own_handler() -> None:
    calls: list[int] = []

    def theirs(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    signal.signal(signal.SIGCHLD, theirs)
    p, ours = await started_child(7)
    codes: list[int | None] = []
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _join_into(p, codes))
            await anyio.wait_all_tasks_blocked()
            ours.send("go")
    assert codes == [7]
    assert calls, "the program's own SIGCHLD handler did not run"
    assert signal.getsignal(signal.SIGCHLD) is theirs
    p.close()
    ours.close()


async def _join_into(p: AsyncProcess, codes: list[int | None]) -> None:
    codes.append(await p.join())


@pytest.mark.usefixtures("sigchld_restored")
async def test_joins_wake_when_the_loop_takes_sigchld_while_a_join_waits(
    anyio_backend: Any,
) -> None:
    """asyncio's add_signal_handler, trio's open_signal_receiver: taken mid-join."""
    p, ours = await started_child(7)
    codes: list[int | None] = []
    received: list[str] = []
    with anyio.fail_after(DEADLINE):
        if anyio_backend[0] == "trio":
            import trio

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _join_into(p, codes))
                await anyio.wait_all_tasks_blocked()
                with trio.open_signal_receiver(signal.SIGCHLD) as receiver:
                    installed = signal.getsignal(signal.SIGCHLD)
                    ours.send("go")
                    async for _ in receiver:
                        received.append("trio")
                        break
                    with anyio.fail_after(DEADLINE, shield=False):
                        while not codes:
                            await anyio.sleep(0.01)  # a hang guard: the join must end
                    after = signal.getsignal(signal.SIGCHLD)
        else:
            import asyncio

            loop = asyncio.get_running_loop()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _join_into(p, codes))
                await anyio.wait_all_tasks_blocked()
                loop.add_signal_handler(signal.SIGCHLD, received.append, "asyncio")
                try:
                    installed = signal.getsignal(signal.SIGCHLD)
                    ours.send("go")
                    # The task group waits for the join here.
                finally:
                    pass
            after = signal.getsignal(signal.SIGCHLD)
            while not received:
                await anyio.sleep(0.01)  # the loop's callback runs from its own queue
            loop.remove_signal_handler(signal.SIGCHLD)
    assert codes == [7]
    assert received, "the loop's own SIGCHLD handler did not run"
    assert after == installed, f"the loop's SIGCHLD handler was replaced by {after!r}"
    p.close()
    ours.close()


@pytest.mark.usefixtures("sigchld_restored")
async def test_sig_ign_keeps_its_meaning_for_the_programs_other_children() -> None:
    """SIG_IGN: the kernel reaps the program's other children, even while a join waits."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    outcome: list[object] = []
    other_state: str | None = "not checked"
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 7))
    try:
        p.start()
    except aioproc.WatcherUnavailable as exc:
        outcome.append(exc)
    theirs.close()
    # Started after p, so that p holds no copy of its stdin.
    other = subprocess.Popen(  # noqa: ASYNC220 - the program's other child, the plain way
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    assert other.stdin is not None
    try:
        if not outcome:
            assert await handshake(ours) == "ready"

            async def join() -> None:
                try:
                    outcome.append(await p.join())
                except (aioproc.WatcherUnavailable, aioproc.ExitStatusLost) as exc:
                    outcome.append(exc)

            with anyio.fail_after(DEADLINE):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(join)
                    await anyio.wait_all_tasks_blocked()
                    other.stdin.close()  # the other child exits while the join waits
                    end = time.monotonic() + DEADLINE
                    while state_of(other.pid) not in (None, "Z") and time.monotonic() < end:
                        await anyio.sleep(0.001)
                    other_state = state_of(other.pid)
                    ours.send("go")
            if not isinstance(outcome[0], aioproc.WatcherUnavailable):
                p.close()
        ours.close()
    finally:
        if not other.stdin.closed:
            other.stdin.close()
        other.wait(DEADLINE)  # reaps it if it was left a zombie
    if isinstance(outcome[0], aioproc.WatcherUnavailable):
        assert "SIG_IGN" in str(outcome[0])
    else:
        assert other_state is None, "the program's other child was left a zombie under SIG_IGN"
        assert outcome[0] == 7 or isinstance(outcome[0], aioproc.ExitStatusLost)
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN
