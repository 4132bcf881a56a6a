"""Lost exit status: someone else took it, and the process object stays consistent.

SPEC §8.  Another part of the program reaps our child (a foreign ``waitpid``)
or the kernel does (``SIGCHLD`` set to ``SIG_IGN``).  The first ``join()`` or
``exitcode`` says so with ``ExitStatusLost``, once; afterwards the object is
a finished process like any other: ``is_alive()`` False, out of
``multiprocessing.active_children()``, ``close()`` works, and nothing of
aioproc's is left (descriptor, SIGCHLD handler).  ``aioproc.run`` returns a
result that had arrived complete.  And under ``SIG_IGN``, ``start()`` of
children that exit at once never fails.
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing import resource_tracker
from pathlib import Path

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import (
    DEADLINE,
    Fifos,
    free_the_pid,
    handshake,
    open_fds,
    run_reporting_pid,
    sigchld_ignored,
    skip_if_sig_ign_replaces_sigchld,
)

#: (start method, who takes the status)
LOST = [
    pytest.param(("fork", "waitpid-any"), id="fork-waitpid_any"),
    pytest.param(("fork", "sig_ign"), id="fork-sig_ign"),
    pytest.param(("spawn", "waitpid"), id="spawn-waitpid"),
    pytest.param(("spawn", "sig_ign"), id="spawn-sig_ign"),
]


@pytest.mark.parametrize("first", ["join", "exitcode"])
@pytest.mark.parametrize("case", LOST)
async def test_lost_status_is_said_once_then_the_process_is_consistent(
    watcher: str, case: tuple[str, str], first: str
) -> None:
    context, taken_by = case
    resource_tracker.ensure_running()  # spawn starts it once, and keeps its pipe
    fds = open_fds()
    handler = signal.getsignal(signal.SIGCHLD)
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 0), context=context)
    p.start()
    theirs.close()
    pid = p.pid
    assert pid is not None
    assert await handshake(ours) == "ready"
    with sigchld_ignored(taken_by == "sig_ign"):
        ours.send("go")
        free_the_pid(pid, taken_by)
    ours.close()
    with anyio.fail_after(DEADLINE):
        if first == "join":
            with pytest.raises(aioproc.ExitStatusLost) as info:
                await p.join()
        else:
            with pytest.raises(aioproc.ExitStatusLost) as info:
                p.exitcode  # noqa: B018 - the property collects the status
    assert f"child pid {pid}" in str(info.value)
    assert info.value.pid == pid
    with anyio.fail_after(DEADLINE):
        await p.join()  # said once: no ExitStatusLost again, and no hang
    p.exitcode  # noqa: B018 - nor from the property
    assert not p.is_alive()
    assert p not in multiprocessing.active_children()
    p.close()
    assert open_fds() == fds
    assert signal.getsignal(signal.SIGCHLD) == handler


#: (start method, who takes the status) for aioproc.run's child.
RUN_LOST = [
    pytest.param(("fork", "waitpid"), id="fork-waitpid"),
    pytest.param(("fork", "sig_ign"), id="fork-sig_ign"),
    pytest.param(("spawn", "waitpid"), id="spawn-waitpid"),
]


@pytest.mark.parametrize("case", RUN_LOST)
async def test_run_returns_a_result_that_arrived_before_the_status_was_lost(
    watcher: str, case: tuple[str, str], tmp_path: Path
) -> None:
    """The child wrote its whole result and exited; someone else reaped it: the value."""
    context, taken_by = case
    skip_if_sig_ign_replaces_sigchld(watcher, taken_by)
    fifos = Fifos(tmp_path)
    outcome: list[object] = []

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_reporting_pid, fifos, {"result": 42}, context, outcome)
            pid = int(await fifos.ready())
            # The loop does not run until the status is gone.
            with sigchld_ignored(taken_by == "sig_ign"):
                fifos.go()
                free_the_pid(pid, taken_by)
    fifos.close()
    assert outcome == [{"result": 42}]


@pytest.mark.parametrize(("context", "count"), [("fork", 150), ("spawn", 10)])
async def test_start_never_fails_under_sig_ign(watcher: str, context: str, count: int) -> None:
    """Children that exit at once, auto-reaped by the kernel: every start() succeeds.

    The forced sigchld watcher may refuse (WatcherUnavailable, naming SIG_IGN):
    its handler would take SIG_IGN's meaning away from the program's other children.
    """
    resource_tracker.ensure_running()  # spawn starts it once, and keeps its pipe
    fds = open_fds()
    started: list[AsyncProcess] = []
    failed: list[str] = []
    refused: list[str] = []
    with sigchld_ignored(True):
        for _ in range(count):
            p = AsyncProcess(target=targets.noop, context=context)
            try:
                p.start()
            except aioproc.WatcherUnavailable as exc:
                refused.append(str(exc))
                break
            except OSError as exc:
                failed.append(str(exc))
                continue
            started.append(p)
        inconsistent = []
        for p in started:
            with anyio.fail_after(DEADLINE):
                try:
                    assert await p.join() == 0
                except aioproc.ExitStatusLost:
                    pass
            if p.is_alive():
                inconsistent.append(repr(p))
            else:
                p.close()
    assert failed == []
    if refused:
        assert watcher == "sigchld"
        assert "SIG_IGN" in refused[0]
    assert inconsistent == []
    assert multiprocessing.active_children() == []
    assert open_fds() == fds
