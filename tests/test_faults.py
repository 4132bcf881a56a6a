"""Faults: children that die badly, and starts and joins that run out of resources.

Each fault ends with a clear answer (an exit code, or an exception that says
what ran out and what to do), no descriptor or child left behind, and a
process object that can still be used: joined again, or started again.

Covered elsewhere: a child's segfault, SIGKILL of itself and uncaught exception
(test_process.py ``test_exit_codes``), a child that forks a grandchild and exits
(``test_joined_as_soon_as_child_exits_despite_grandchild``).
"""

from __future__ import annotations

import errno
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess
from aioproc._watchers import pidfd

from . import targets
from .helpers import (
    children_of_this_process,
    fork_server_fd,
    has_zombie_child,
    only_free_fds,
    open_fds,
    state_of,
)

DEADLINE = 30
REPO = Path(__file__).resolve().parent.parent


async def _ready(conn: Any) -> object:
    with anyio.fail_after(DEADLINE):
        await anyio.wait_readable(conn.fileno())
    return conn.recv()


# -- children that die badly while joined -------------------------------------


@pytest.mark.parametrize("how", ["sigkill-from-outside", "segfault", "abort"])
async def test_child_dies_while_joined(watcher: str, how: str) -> None:
    """Every joiner wakes with the signal's exit code; nothing is left."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_crash, args=(theirs, how))
    p.start()
    theirs.close()
    assert await _ready(ours) == "ready"
    results: list[int | None] = []

    async def join() -> None:
        results.append(await p.join())

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(join)
            await anyio.wait_all_tasks_blocked()
            assert p.pid is not None
            if how == "sigkill-from-outside":
                os.kill(p.pid, signal.SIGKILL)  # not p.kill(): as the OOM killer would
            else:
                ours.send("go")
    expected = {
        "sigkill-from-outside": -signal.SIGKILL,
        "segfault": -signal.SIGSEGV,
        "abort": -signal.SIGABRT,
    }[how]
    assert results == [expected] * 3
    assert (p.exitcode, p.is_alive()) == (expected, False)
    assert p.pid not in children_of_this_process()
    ours.close()
    p.close()


async def test_sigterm_ignored_then_escalated_to_sigkill(watcher: str) -> None:
    """The escalation a caller writes: terminate, wait a grace period, kill."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ignore_sigterm_then_sleep, args=(theirs, 60))
    p.start()
    assert await _ready(ours) == "ready"
    p.terminate()
    assert await p.join(timeout=0.3) is None  # the grace period passes
    assert p.is_alive()
    assert p.exitcode is None
    p.kill()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGKILL
    p.terminate()  # after the exit: nothing happens, the code stays
    assert await p.join() == -signal.SIGKILL
    p.close()


# -- fork failure: RLIMIT_NPROC, in a helper process ------------------------------


@pytest.mark.parametrize(
    "scenario", ["fork", "spawn", "forkserver-start", "forkserver-fork", "thread-watcher"]
)
def test_fork_failure(scenario: str, tmp_path: Path) -> None:
    """fork() fails with EAGAIN: a clear error, nothing leaked, startable again.

    A helper process does it (see tests/fork_failure.py for how fork is made to
    fail as root); stdlib's own fork start leaks four descriptors here.
    """
    if os.geteuid() != 0:
        pytest.skip("the helper needs root to switch to nobody and back")
    out = subprocess.run(
        [sys.executable, "-W", "error", "-m", "tests.fork_failure", scenario, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    if scenario == "thread-watcher":
        kind, _, message = report["error"]
        assert kind == "RuntimeError"
        assert "could not start the thread watcher's thread" in message
        assert "raise RLIMIT_NPROC" in message
        assert report["alive_after_failure"] is True
        assert report["exitcode_after"] == 0
        return
    kind, code, message = report["error"]
    if scenario == "forkserver-fork":
        assert kind == "RuntimeError"
        assert "the fork server closed the connection" in message
        assert "BlockingIOError" in out.stderr  # the fork server's own report
    else:
        assert (kind, code) == ("BlockingIOError", errno.EAGAIN)
        assert "fork failed: too many processes (EAGAIN)" in message
        assert "raise RLIMIT_NPROC or wait for children to exit" in message
    assert "start() may be called again" in message
    assert report["fds_left"] == []
    assert report["children_left"] == []
    pid, exitcode, alive, text = report["after_failure"]
    assert (pid, exitcode, alive) == (None, None, False)
    assert text.endswith(" initial>")
    assert report["exitcode_of_second_start"] == 0


# -- descriptor exhaustion: RLIMIT_NOFILE -----------------------------------------

# Descriptors a start needs free, by start method.  Where the kernel has pidfds:
# fork only the child's pidfd (1); spawn the data pipe and the exec's error pipe
# (4; the pidfd comes once the error pipe is closed).  Elsewhere: fork opens two
# pipes (4), spawn two pipes and the exec's error pipe (6).
NEEDS = {"fork": 1, "spawn": 4} if pidfd.is_supported() else {"fork": 4, "spawn": 6}


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_start_with_descriptors_running_out(watcher: str, context: str) -> None:
    """With 0, 1, 2, ... free descriptors: a clear EMFILE, nothing leaked, startable."""
    if context == "spawn":  # start the resource tracker while descriptors are plenty
        warm = AsyncProcess(target=targets.noop, context=context)
        warm.start()
        with anyio.fail_after(DEADLINE):
            await warm.join()
        warm.close()
    gc.collect()
    fds = open_fds()
    seen: dict[int, str] = {}
    needs = NEEDS[context]
    for free in range(needs + 1):
        p = AsyncProcess(target=targets.noop, context=context)
        error: OSError | None = None
        with only_free_fds(free):
            try:
                p.start()
            except OSError as exc:
                error = exc
        if error is None:
            seen[free] = "started"
        else:
            assert error.errno == errno.EMFILE
            seen[free] = str(error)
            assert (p.pid, p.exitcode, p.is_alive()) == (None, None, False)
        assert children_of_this_process() <= ({p.pid} if p.pid else set()) | _helpers()
        if p.pid is None:
            p.start()  # the same object, now that descriptors are free again
        with anyio.fail_after(DEADLINE):
            assert await p.join() == 0
        p.close()
        assert open_fds() == fds, f"descriptors leaked with {free} free"
    assert not has_zombie_child()
    assert seen[needs] == "started"
    for free in range(needs):
        assert "too many open files (EMFILE)" in seen[free]
        assert "start() may be called again" in seen[free]
        assert "RLIMIT_NOFILE" in seen[free]


@pytest.mark.parametrize("free", [0, 1, 2, 3, 4, 5])
async def test_forkserver_start_with_descriptors_running_out(free: int) -> None:
    """As above, for the fork server: a request needs a socket and two pipes (5).

    CPython's client (``forkserver.connect_to_new_process``) loses its first
    pipe when the second ``os.pipe()`` fails; aioproc checks the five are free
    first, so nothing is lost.  A request that fails after connecting kills the
    stdlib's fork server; the next start() must still work (it waits for that
    server to go, and starts a new one).
    """
    warm = AsyncProcess(target=targets.noop, context="forkserver")
    warm.start()  # the fork server and the resource tracker, while descriptors are plenty
    with anyio.fail_after(DEADLINE):
        await warm.join()
    warm.close()
    gc.collect()
    fds = open_fds() - fork_server_fd()
    p = AsyncProcess(target=targets.noop, context="forkserver")
    error: OSError | None = None
    with only_free_fds(free):
        try:
            p.start()
        except OSError as exc:
            error = exc
    try:
        if free < 5:
            assert error is not None
            assert error.errno == errno.EMFILE
            assert "too many open files (EMFILE)" in str(error)
            assert (p.pid, p.exitcode, p.is_alive()) == (None, None, False)
            p.start()
        with anyio.fail_after(DEADLINE):
            assert await p.join() == 0
        p.close()
        assert open_fds() - fork_server_fd() == fds
    finally:
        for fd in open_fds() - fork_server_fd() - fds:  # anything lost: closed for the next tests
            os.close(fd)


async def test_pidfd_open_fails_after_the_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child exists but cannot be watched: it is killed and reaped, start() says so.

    RLIMIT_NOFILE cannot make this happen (the start frees descriptors before it
    opens the pidfd): only another thread taking the last descriptor in between
    could.  So pidfd_open is made to fail, with the errno it would have.
    """
    if aioproc.get_watcher() is not None or p_watcher() != "pidfd":
        pytest.skip("needs pidfd_open (Linux >= 5.3)")
    started: list[int] = []
    real_pidfd_open = os.pidfd_open

    def pidfd_open(pid: int, flags: int = 0) -> int:
        started.append(pid)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    gc.collect()
    fds = open_fds()
    p = AsyncProcess(target=targets.noop)
    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    with pytest.raises(OSError, match="could not watch the new child") as caught:
        p.start()
    monkeypatch.setattr(os, "pidfd_open", real_pidfd_open)
    assert caught.value.errno == errno.EMFILE
    message = str(caught.value)
    assert "too many open files (EMFILE)" in message
    assert "killed and reaped" in message
    assert "start() may be called again" in message
    assert "RLIMIT_NOFILE" in message
    assert len(started) == 1
    assert state_of(started[0]) is None  # killed and reaped: no zombie
    assert (p.pid, p.exitcode, p.is_alive()) == (None, None, False)
    assert open_fds() == fds
    p.start()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    p.close()


def p_watcher() -> str | None:
    """The watcher a process started now would get."""
    from aioproc._popen import ForkPopen
    from aioproc._watchers import Place, choose

    return choose(Place.here(ForkPopen)).name


def _helpers() -> set[int]:
    from .helpers import fork_server_and_helpers

    return fork_server_and_helpers()


async def test_join_with_descriptors_running_out(watcher: str) -> None:
    """A join that needs a descriptor (sigchld's pipe, thread's pipe) and gets none."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_crash, args=(theirs, "exit"))
    p.start()
    assert await _ready(ours) == "ready"
    error: OSError | None = None
    with only_free_fds(0):
        try:
            with anyio.move_on_after(0.1):  # the child waits for the word: no exit yet
                await p.join()
        except OSError as exc:
            error = exc
    if watcher in ("pidfd", "sentinel"):  # they wait on a descriptor they already hold
        assert error is None
    else:
        assert error is not None
        assert error.errno == errno.EMFILE
        assert f"could not set up the {watcher} watcher" in str(error)
        assert "can be joined again" in str(error)
        assert "RLIMIT_NOFILE" in str(error)
    assert p.is_alive()
    ours.send("go")
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 99
    p.close()
