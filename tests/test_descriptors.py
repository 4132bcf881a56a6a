"""One descriptor per child in the parent: the pidfd is the sentinel (issue 14).

Where the kernel has pidfds, a fork or spawn child costs the parent one
descriptor, its pidfd, which is also its Popen's ``sentinel``, and the child
watches its parent through a pidfd of its own instead of an inherited pipe
(``multiprocessing.parent_process()`` keeps working).  ``AsyncProcess.sentinel``
(pollable, so ``multiprocessing.connection.wait`` keeps working) is a duplicate
made when first asked for: one descriptor more, for the children asked about.  A forkserver child
costs two: the server's status pipe (its ``sentinel``, where the exit code
arrives) and its pidfd.  Its parent lives as long as a pidfd of the parent,
sent with the request, is not readable; the data pipe, which the stdlib keeps
open in the parent as that sign, is closed once the data is sent.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
from multiprocessing import resource_tracker

import anyio
import pytest

from aioproc import AsyncProcess, _popen
from aioproc._watchers import pidfd

from . import targets
from .helpers import (
    fork_server_fd,
    handshake,
    open_fds,
    parent_of,
    pid_exists,
    reaping_orphans,
    warmed_up,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not pidfd.is_supported(), reason="needs pidfd_open (Linux >= 5.3)"),
    pytest.mark.skipif(
        not _popen.ONE_DESCRIPTOR_PER_CHILD,
        reason="one descriptor per child is switched off (aioproc._popen, issue 14)",
    ),
]
DEADLINE = 20
#: Descriptors the parent holds per running child, by start method.
PER_CHILD = {"fork": 1, "spawn": 1, "forkserver": 2}


def _kind(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("context", list(PER_CHILD))
async def test_descriptors_per_child(context: str) -> None:
    await warmed_up(context)
    before = open_fds() - fork_server_fd()
    procs = [AsyncProcess(target=targets.sleep, args=(30,), context=context) for _ in range(4)]
    for p in procs:
        await p.start_async()
    try:
        held = open_fds() - fork_server_fd() - before
        assert len(held) == PER_CHILD[context] * len(procs), {fd: _kind(fd) for fd in held}
        if context != "forkserver":
            assert {_popen_sentinel(p) for p in procs} == held
            assert {_kind(fd) for fd in held} == {"anon_inode:[pidfd]"}
        else:  # the status pipe and the handle's pidfd
            assert {fd for p in procs for fd in _held_for(p)} == held
        # The sentinel given out is a descriptor of its own, made when asked for.
        given = {p.sentinel for p in procs}
        assert len(given) == len(procs)
        assert open_fds() - fork_server_fd() - before == held | given
    finally:
        for p in procs:
            p.kill()
        with anyio.fail_after(DEADLINE):
            for p in procs:
                assert await p.join() == -signal.SIGKILL
                p.close()
    assert open_fds() - fork_server_fd() == before


def _popen_sentinel(p: AsyncProcess) -> int:
    """The sentinel the child's Popen holds (``sentinel`` gives out a duplicate)."""
    assert p._child is not None
    return p._child.popen.sentinel


def _held_for(p: AsyncProcess) -> tuple[int, int]:
    """A forkserver child's status pipe and pidfd, checked to be what they say."""
    assert p._child is not None
    sentinel, pidfd_ = _popen_sentinel(p), p._child.pidfd
    assert _kind(sentinel).startswith("pipe:")
    assert _kind(pidfd_) == "anon_inode:[pidfd]"
    return sentinel, pidfd_


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_the_sentinel_works_with_connection_wait(context: str) -> None:
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_sleep, args=(theirs, 30), context=context)
    p.start()
    theirs.close()
    with anyio.fail_after(DEADLINE):
        await anyio.wait_readable(ours.fileno())
    assert ours.recv() == "ready"
    assert multiprocessing.connection.wait([p.sentinel], timeout=0) == []
    p.terminate()
    assert multiprocessing.connection.wait([p.sentinel], timeout=DEADLINE) == [p.sentinel]
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGTERM
    p.close()
    ours.close()


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
async def test_parent_process_in_the_child(context: str) -> None:
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.report_parent, args=(theirs,), context=context)
    p.start()
    theirs.close()
    with anyio.fail_after(DEADLINE):
        await anyio.wait_readable(ours.fileno())
        assert ours.recv() == (os.getpid(), False, True)
        assert await p.join() == 0
    p.close()
    ours.close()


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfds", "no-pidfds"])
async def test_a_forkserver_child_needs_only_what_the_parent_keeps(
    pidfds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once started, a forkserver child's parent holds two descriptors for it, and
    nothing else: the data pipe is closed.  The child, told to go only then,
    still finds its parent alive.

    With pidfds: the status pipe and the pidfd (the child watches a pidfd of
    the parent).  Without (an old kernel): the stdlib's way, the status pipe and
    the duplicate of the data pipe's write end that the child watches.
    """
    if not pidfds:
        monkeypatch.setattr(pidfd, "supported", False)
    await warmed_up("forkserver")
    ours, theirs = multiprocessing.Pipe()
    before = open_fds() - fork_server_fd()
    p = AsyncProcess(target=targets.report_parent, args=(theirs, True), context="forkserver")
    p.start()
    theirs.close()
    held = open_fds() - fork_server_fd() - before
    assert p._child is not None
    if pidfds:
        assert held == set(_held_for(p))
    else:
        assert p._child.pidfd == -1
        assert len(held) == 2
        assert _popen_sentinel(p) in held
        assert {_kind(fd)[:5] for fd in held} == {"pipe:"}
    ours.send("go")
    assert await handshake(ours) == (os.getpid(), False, True)
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    p.close()
    ours.close()
    assert open_fds() - fork_server_fd() - before == set()


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
async def test_the_parent_sentinel_turns_readable_when_the_parent_dies(context: str) -> None:
    """A child's parent is SIGKILLed: ``parent_process().sentinel`` says so at once."""
    # A fork child cannot use its parent's fork server (the stdlib's
    # ensure_running() waits for a server that is not its child): spawn it.
    middle = "spawn" if context == "forkserver" else None
    resource_tracker.ensure_running()  # kept: not an orphan for reaping_orphans to wait for
    ours, theirs = multiprocessing.Pipe()
    with reaping_orphans():
        parent = AsyncProcess(target=targets.outlive_parent, args=(theirs, context), context=middle)
        parent.start()
        theirs.close()
        with anyio.fail_after(DEADLINE):
            said: dict[str, int] = {}
            while len(said) < 2:  # the parent's "started", the grandchild's "waiting"
                await anyio.wait_readable(ours.fileno())
                tag, pid = ours.recv()
                said[tag] = pid
            grandchild = said["started"]
            assert said["waiting"] == parent.pid
            # The grandchild's parent: the middle process, or the middle's fork
            # server, which ends only after the grandchild: it must end while we
            # adopt orphans, or the grandchild is handed to init, not to us.
            reaper_pid = parent_of(grandchild)
            assert reaper_pid is not None
            reaper = os.pidfd_open(reaper_pid)
            try:
                parent.kill()
                assert await parent.join() == -signal.SIGKILL
                await anyio.wait_readable(ours.fileno())
                assert ours.recv() == ("parent gone", True, False)
                await anyio.wait_readable(reaper)
            finally:
                os.close(reaper)
        parent.close()
    assert not pid_exists(grandchild)
    ours.close()


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_without_pidfds_a_child_holds_its_two_pipes_and_its_proc_directory(
    context: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old kernel (or a sandbox that refuses pidfd_open): the stdlib's two pipes,
    and the child's ``/proc/PID`` directory, which tells whether the pid still
    names the child; all closed by ``close()``."""
    monkeypatch.setattr(pidfd, "supported", False)
    await warmed_up(context)
    before = open_fds() - fork_server_fd()
    p = AsyncProcess(target=targets.sleep, args=(60,), context=context)
    p.start()
    held = open_fds() - fork_server_fd() - before
    assert p._child is not None
    assert p._child.pidfd == -1
    assert sorted(_kind(fd)[:5] for fd in held) == ["/proc", "pipe:", "pipe:"]
    assert f"/proc/{p.pid}" in {_kind(fd) for fd in held}
    p.kill()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGKILL
    p.close()
    assert open_fds() - fork_server_fd() - before == set()
