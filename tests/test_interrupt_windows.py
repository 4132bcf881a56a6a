"""Interruptions that land while a child is being started, or right after.

trio delivers a KeyboardInterrupt wherever Python code runs, so it can land
between the child's creation and the join.  The child must then be stopped as
a cancellation stops it (SIGTERM, the grace period, SIGKILL), not killed at
once, and not left running: a program that gets Ctrl-C while ``run`` is still
starting its child lets that child clean up as well.

aioproc also blocks SIGINT around the fork (so that the child does not lose
it); a Ctrl-C that arrives during the fork stays pending and is delivered the
moment the mask is restored, in the parent, right after the child was
created, where its pid was not yet kept anywhere.  Some tests here send a real
SIGINT (while it is blocked), with a handler that raises ``Interrupted``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproc
from aioproc._process import AsyncProcess

from . import targets
from .helpers import (
    DEADLINE,
    children_of_this_process,
    fork_server_and_helpers,
    fork_server_fd,
    open_fds,
    pid_exists,
    state_of,
    warmed_up,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


class Interrupted(BaseException):
    """Stands for trio's KeyboardInterrupt; a test must not raise the real one."""


def read_line(fd: int) -> str:
    """One line from the non-blocking FIFO *fd*, waiting at most DEADLINE seconds."""
    got = b""
    end = time.monotonic() + DEADLINE
    while not got.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"nothing said within {DEADLINE} s (so far {got!r})")
        chunk = os.read(fd, 100)
        if not chunk:
            return got.decode()  # every writer is gone
        got += chunk
    return got.decode().strip()


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
async def test_an_interruption_right_after_the_child_exists_leaves_no_child_and_no_descriptor(
    context: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Raised as soon as ``run`` holds its child: ``run`` raises it, the child is
    reaped (the suite's check after every test) and no descriptor stays open."""
    await warmed_up(context)
    before = open_fds()
    original = AsyncProcess._started
    pids: list[int | None] = []

    def started_then_interrupted(self: AsyncProcess, *args: Any) -> None:
        original(self, *args)
        pids.append(self.pid)
        raise Interrupted

    monkeypatch.setattr(AsyncProcess, "_started", started_then_interrupted)
    with pytest.raises(Interrupted):
        await aioproc.run(targets.sleep, 60, context=context)
    [pid] = pids
    assert pid is not None
    assert state_of(pid) is None, f"child {pid} is still there"
    assert open_fds() - fork_server_fd() == before - fork_server_fd()


@contextlib.contextmanager
def ctrl_c_during_the_fork(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """SIGINT raises ``Interrupted``; one SIGINT is sent by the parent right after
    each fork (while aioproc keeps SIGINT blocked around it).  Yields the pids forked."""
    forked: list[int] = []
    real_fork = os.fork

    def fork_then_ctrl_c() -> int:
        pid = real_fork()
        if pid:
            forked.append(pid)
            # To this thread, which blocks it: pending until aioproc unblocks it.
            # (os.kill would let another thread take it, whose handler then
            # runs here at once, in this wrapper.)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return pid

    def interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupted)
    monkeypatch.setattr(os, "fork", fork_then_ctrl_c)  # as _popen calls it
    try:
        yield forked
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, previous)
        for pid in forked:  # whatever the outcome, leave nothing for the next test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def ours_left() -> set[int]:
    return children_of_this_process() - fork_server_and_helpers()


@pytest.mark.parametrize("how", ["start", "start_async", "run"])
async def test_a_ctrl_c_during_the_fork_leaves_no_child_running(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SIGINT is delivered as the mask is restored, right after the fork.
    Before the fix the child's pid was lost there: the child ran on, unreaped,
    forever, and its pidfd stayed open (never a lost child, nothing leaked)."""
    await warmed_up("fork")
    before = open_fds()
    p = AsyncProcess(target=targets.sleep, args=(60,), context="fork")

    async def start() -> None:
        if how == "run":
            await aioproc.run(targets.sleep, 60, context="fork")
        elif how == "start":
            p.start()
        else:
            await p.start_async()

    with ctrl_c_during_the_fork(monkeypatch) as forked:
        with pytest.raises(Interrupted):
            await start()
        [pid] = forked
        left = ours_left()
    assert pid not in left, f"child {pid} was left running, known to nothing"
    # Nothing was started (unused, for run): the process may be started again.
    assert p.pid is None
    with pytest.raises(RuntimeError, match="not been started"):
        p.kill()
    assert open_fds() == before


@pytest.mark.parametrize("where", ["while its handle is made", "once it has its handle"])
async def test_an_interruption_once_a_fork_child_runs_stops_it_with_sigterm(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interruption is raised as soon as the child runs its function (it
    said ``ready``): while ``_started`` makes its handle, or right after.
    Before the fixes ``run`` killed it with SIGKILL there (the start abandoned
    it, or ``run`` stopped it at once), so it never said ``sigterm``; run:
    "Cancellation ... terminates and reaps the child the same way" (SIGTERM,
    grace, SIGKILL).  (Only fork: a spawn or forkserver child begins its
    function once the join has sent it the call.)"""
    from aioproc import _process

    await warmed_up("fork")
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    real_child, real_started = _process._Child, AsyncProcess._started

    def child_then_interrupted(*args: object) -> object:
        assert read_line(fd) == "ready"
        raise Interrupted

    def started_then_interrupted(self: AsyncProcess, *args: Any) -> None:
        real_started(self, *args)
        assert read_line(fd) == "ready"
        raise Interrupted

    if where == "while its handle is made":
        monkeypatch.setattr(_process, "_Child", child_then_interrupted)
    else:
        monkeypatch.setattr(AsyncProcess, "_started", started_then_interrupted)
    try:
        with pytest.raises(Interrupted):
            await aioproc.run(targets.say_sigterm_on_fifo, fifo, context="fork", grace=DEADLINE)
        monkeypatch.setattr(_process, "_Child", real_child)
        assert read_line(fd) == "sigterm"
    finally:
        os.close(fd)


async def test_an_interruption_while_the_handle_opens_the_pidfd_of_a_forkserver_child_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handle of a forkserver child opens the child's pidfd, then asks the
    fork server's pipe whether the child still runs (Python code: trio's
    KeyboardInterrupt can land there).  The start abandons the child; before
    the fix the new pidfd stayed open (no descriptor outlives the process object)."""
    from aioproc._popen import ForkServerPopen

    await warmed_up("forkserver")
    before = open_fds() - fork_server_fd()
    real = ForkServerPopen.exit_state
    calls: list[int] = []

    def interrupted_once(self: ForkServerPopen) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Interrupted
        return real(self)

    monkeypatch.setattr(ForkServerPopen, "exit_state", interrupted_once)
    p = AsyncProcess(target=targets.sleep, args=(60,), context="forkserver")
    with pytest.raises(Interrupted):
        await p.start_async()
    monkeypatch.setattr(ForkServerPopen, "exit_state", real)
    assert calls
    assert p.pid is None  # abandoned: killed and reaped (the suite checks no child is left)
    assert open_fds() - fork_server_fd() == before


@pytest.mark.parametrize("context", ["fork", "forkserver"])
async def test_an_interruption_after_a_pool_worker_started_leaves_no_worker(
    context: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker exists (``start_async`` returned) and the pool is making its
    record of it when the interruption lands.  Before the fix nothing knew of
    the worker any more: it was left running after ``async with`` ended, with
    its pidfd open ("either way no worker is left")."""
    from aioproc import _pool

    await warmed_up(context)
    before = open_fds() - fork_server_fd()
    pids: list[int] = []
    real_worker = _pool._Worker

    def worker_then_interrupted(proc: AsyncProcess, *args: Any) -> Any:
        pids.append(proc.pid)  # type: ignore[arg-type]
        raise Interrupted

    monkeypatch.setattr(_pool, "_Worker", worker_then_interrupted)
    with pytest.raises(Interrupted):
        async with aioproc.Pool(1, context=context) as pool:
            await pool.run(targets.add, 1, 2)
    monkeypatch.setattr(_pool, "_Worker", real_worker)
    [pid] = pids
    assert pid not in ours_left(), f"pool worker {pid} was left behind"
    assert open_fds() - fork_server_fd() == before


@pytest.mark.parametrize("how", ["start", "start_async"])
async def test_an_interruption_right_after_the_spawn_leaves_no_child(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C during a spawn start: the signal arrives while the vfork + exec
    runs in C, and trio raises KeyboardInterrupt in the first Python line after
    it, inside ``multiprocessing.util.spawnv_passfds``, before its pid is
    returned.  Before the fix nothing blocked SIGINT around a plain spawn start
    (``run`` does): the new child was known to nothing and never reaped (never
    a lost child).  Now it is blocked, and delivered once the pid is kept."""
    from multiprocessing import util

    await warmed_up("spawn")
    real = util.spawnv_passfds
    pids: list[int] = []

    def spawned_then_ctrl_c(*args: Any) -> int:
        pid = real(*args)
        pids.append(pid)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return pid

    def interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    monkeypatch.setattr(util, "spawnv_passfds", spawned_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, interrupted)
    p = AsyncProcess(target=targets.sleep, args=(60,), context="spawn")

    async def start() -> None:
        if how == "start":
            p.start()
        else:
            await p.start_async()

    try:
        with pytest.raises(Interrupted):
            await start()
        signal.signal(signal.SIGINT, previous)
        monkeypatch.setattr(util, "spawnv_passfds", real)
        [pid] = pids
        with anyio.move_on_after(3):  # it exits at once: its data pipe is closed
            while pid_exists(pid):
                await anyio.sleep(0.01)
        assert not pid_exists(pid), f"spawned child {pid} is left ({state_of(pid)}), unreaped"
    finally:
        signal.signal(signal.SIGINT, previous)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def test_a_ctrl_c_taken_by_another_thread_during_the_fork_loses_no_child() -> None:
    """SIGINT is blocked in the forking thread, but another thread (trio's guest-mode
    I/O thread, a worker thread) may take it; Python then runs trio's handler in
    the main thread right after ``os.fork()`` returns, before the pid is kept.
    trio now delivers that KeyboardInterrupt at the task's next checkpoint: the
    child is held, and the script kills and reaps it.  Before, it was lost
    (the script printed ``lost``, and the child slept on as an orphan)."""
    import subprocess
    import sys

    from .helpers import reaping_orphans

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with reaping_orphans():
        out = subprocess.run(
            [sys.executable, "-m", "tests.scripts.ctrl_c_in_another_thread"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=60,
        )
        said = out.stdout.split()
        assert said[:1] == ["forked"], out.stdout + out.stderr
        child = int(said[1])
        assert state_of(child) is None, f"the child (pid {child}) outlived the program"
    assert said[2:] == ["interrupted", "reaped"], out.stdout + out.stderr
