"""Never a stranger: no signal of aioproc's reaches a process that took a freed pid.

SPEC §8.  A child's pid is freed behind aioproc's back (the fork server reaped
it, a foreign ``waitpid`` did, or the kernel did because ``SIGCHLD`` is
``SIG_IGN``), and the test places a process of its own at that very pid (see
``helpers.StrangerMaker``), leading a group of the same number.  Then every
signal aioproc can send for the child (``terminate()``, ``interrupt()``,
``kill()``, alone or as a group, and ``run``'s kill of what is left of the
group at exit) must leave the stranger untouched.  Also on a kernel without
pidfd (played by ``pidfd.supported = False``), where the rule is: no signal
once the status may have been taken by someone else.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import (
    DEADLINE,
    Fifos,
    Stranger,
    StrangerMaker,
    free_the_pid,
    handshake,
    run_reporting_pid,
    sigchld_ignored,
    skip_if_sig_ign_replaces_sigchld,
    why_pids_cannot_be_chosen,
)

pytestmark = pytest.mark.skipif(
    why_pids_cannot_be_chosen() is not None, reason=str(why_pids_cannot_be_chosen())
)

#: (start method, who frees the pid, new_process_group) for an AsyncProcess.
FREED = [
    pytest.param(("fork", "waitpid-any", False), id="fork-waitpid_any-alone"),
    pytest.param(("fork", "waitpid-any", True), id="fork-waitpid_any-group"),
    pytest.param(("fork", "sig_ign", True), id="fork-sig_ign-group"),
    pytest.param(("spawn", "waitpid", True), id="spawn-waitpid-group"),
    pytest.param(("spawn", "sig_ign", False), id="spawn-sig_ign-alone"),
    pytest.param(("forkserver", "fork-server", False), id="forkserver-fork_server-alone"),
    pytest.param(("forkserver", "fork-server", True), id="forkserver-fork_server-group"),
]
KERNELS = ["pidfd", "no-pidfd"]
ATTEMPTS = 20  # another process may take the freed pid first (a busy machine forks a lot)


@pytest.fixture
def stranger_maker() -> Iterator[StrangerMaker]:
    maker = StrangerMaker()
    try:
        yield maker
    finally:
        maker.close()


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest, watcher: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel aioproc sees: this one, or one without pidfd."""
    name: str = request.param
    if name == "no-pidfd":
        if watcher == "pidfd":
            pytest.skip("the pidfd watcher cannot be forced without pidfd (test_watchers.py)")
        monkeypatch.setattr(aioproc._watchers.pidfd, "supported", False)
    return name


def skip_impossible(watcher: str, context: str) -> None:
    if watcher == "sigchld" and context == "forkserver":
        pytest.skip("sigchld cannot watch a forkserver child (test_watchers.py checks the error)")


async def ready_child(context: str, group: bool) -> tuple[AsyncProcess, int, Connection]:
    """A child that said "ready" and exits with 0 when it is sent "go"."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(
        target=targets.ready_then_exit, args=(theirs, 0), context=context, new_process_group=group
    )
    p.start()
    theirs.close()
    assert p.pid is not None
    assert await handshake(ours) == "ready"
    return p, p.pid, ours


async def settle(p: AsyncProcess, freed_by: str, code: int) -> None:
    """Join and close the process, whose status was lost unless the fork server had it."""
    with anyio.fail_after(DEADLINE):
        if freed_by == "fork-server":
            assert await p.join() == code
        else:
            with pytest.raises(aioproc.ExitStatusLost):
                await p.join()
    p.close()


Scenario = Callable[[], Awaitable[tuple[Stranger | None, Callable[[], Awaitable[None]]]]]


async def with_a_stranger(scenario: Scenario, touched: list[str], expected: list[str]) -> None:
    """Run *scenario* until its stranger took the freed pid (another process may first).

    What reached the stranger (*touched*, filled by the scenario) must be
    *expected*; then the scenario's clean-up runs.
    """
    for _ in range(ATTEMPTS):
        touched.clear()
        stranger, clean_up = await scenario()
        if stranger is not None:
            assert touched == expected
            await clean_up()
            return
        await clean_up()
    pytest.fail(f"another process took the freed pid first, {ATTEMPTS} times in a row")


@pytest.mark.parametrize("case", FREED)
@pytest.mark.usefixtures("kernel")
async def test_signals_never_reach_a_stranger_at_the_freed_pid(
    watcher: str, case: tuple[str, str, bool], stranger_maker: StrangerMaker
) -> None:
    """terminate(), interrupt(), kill() after the pid was freed and taken: nothing arrives."""
    context, freed_by, group = case
    skip_impossible(watcher, context)
    touched: list[str] = []

    async def scenario() -> tuple[Stranger | None, Callable[[], Awaitable[None]]]:
        p, pid, ours = await ready_child(context, group)
        with sigchld_ignored(freed_by == "sig_ign"):
            ours.send("go")
            free_the_pid(pid, freed_by)
            if freed_by == "fork-server":  # and it has written the exit code
                with anyio.fail_after(DEADLINE):
                    await anyio.wait_readable(p.sentinel)
            stranger = stranger_maker.place(pid)
            if stranger is not None:
                p.terminate()
                p.interrupt()
                touched.append(f"after terminate() and interrupt(): {stranger.touched()}")
                p.kill()
                touched.append(f"after kill(): {stranger.touched()}")
        ours.close()
        return stranger, lambda: settle(p, freed_by, 0)

    await with_a_stranger(
        scenario, touched, ["after terminate() and interrupt(): None", "after kill(): None"]
    )


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.usefixtures("kernel")
async def test_signals_after_the_lost_status_was_reported_never_reach_a_stranger(
    context: str, stranger_maker: StrangerMaker
) -> None:
    """Once join() said ExitStatusLost, the pid is not ours: signals are no-ops."""
    touched: list[str] = []

    async def scenario() -> tuple[Stranger | None, Callable[[], Awaitable[None]]]:
        p, pid, ours = await ready_child(context, True)
        ours.send("go")
        free_the_pid(pid, "waitpid")
        ours.close()
        with anyio.fail_after(DEADLINE), pytest.raises(aioproc.ExitStatusLost):
            await p.join()
        stranger = stranger_maker.place(pid)
        if stranger is not None:
            p.terminate()
            p.interrupt()
            p.kill()
            touched.append(f"{stranger.touched()}")

        async def clean_up() -> None:
            p.close()

        return stranger, clean_up

    await with_a_stranger(scenario, touched, ["None"])


#: (start method, who frees the pid) for aioproc.run's child.
RUN_FREED = [
    pytest.param(("fork", "waitpid"), id="fork-waitpid"),
    pytest.param(("fork", "sig_ign"), id="fork-sig_ign"),
    pytest.param(("spawn", "waitpid"), id="spawn-waitpid"),
    pytest.param(("forkserver", "fork-server"), id="forkserver-fork_server"),
]


@pytest.mark.parametrize("case", RUN_FREED)
@pytest.mark.usefixtures("kernel")
async def test_runs_group_kill_at_exit_never_reaches_a_stranger(
    watcher: str, case: tuple[str, str], stranger_maker: StrangerMaker, tmp_path: Path
) -> None:
    """run() kills what is left of its child's group at exit: never a stranger's group.

    The child returns; before the loop runs again (the test blocks it), its pid
    is freed and a stranger leading a group of that number takes it.
    """
    context, freed_by = case
    skip_impossible(watcher, context)
    skip_if_sig_ign_replaces_sigchld(watcher, freed_by)
    touched: list[str] = []
    attempt = 0

    async def scenario() -> tuple[Stranger | None, Callable[[], Awaitable[None]]]:
        nonlocal attempt
        attempt += 1
        directory = tmp_path / str(attempt)
        directory.mkdir()
        fifos = Fifos(directory)
        outcome: list[object] = []

        stranger = None
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_reporting_pid, fifos, "done", context, outcome)
                pid = int(await fifos.ready())
                # From here to the end of the block the loop does not run.
                with sigchld_ignored(freed_by == "sig_ign"):
                    fifos.go()
                    free_the_pid(pid, freed_by)
                    stranger = stranger_maker.place(pid)
        if stranger is not None:
            touched.append(f"{stranger.touched()}")
        fifos.close()
        assert len(outcome) == 1

        async def clean_up() -> None:
            pass

        return stranger, clean_up

    await with_a_stranger(scenario, touched, ["None"])
