"""Running out: descriptors (RLIMIT_NOFILE), a fork server that dies, a thread that ends.

Each ends with a clear answer (an exit code, or an exception that says what
ran out and what to do), no descriptor or child left behind, and a process
object that can still be used: joined again, or started again.  Never a
made-up exit code: a forkserver child whose fork server died before it could
report the exit code is said to have lost its status, not to have exited 255.
Fork failure (RLIMIT_NPROC) is in ``test_faults.py``.
"""

from __future__ import annotations

import errno
import gc
import multiprocessing
import os
import re

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess, _popen
from aioproc._watchers import pidfd

from . import targets
from .helpers import (
    DEADLINE,
    children_of_this_process,
    fork_server_and_helpers,
    fork_server_fd,
    handshake,
    has_zombie_child,
    only_free_fds,
    open_fds,
    reaping_orphans,
    state_of,
    warmed_up,
)

# -- descriptor exhaustion: RLIMIT_NOFILE -----------------------------------------

# Descriptors a start needs free, by start method.  Where the kernel has pidfds:
# fork only the child's pidfd (1); spawn the data pipe and the exec's error pipe
# (4; the pidfd comes once the error pipe is closed).  Elsewhere: fork opens two
# pipes (4), spawn two pipes and the exec's error pipe (6).
NEEDS = {"fork": 1, "spawn": 4} if _popen.ONE_DESCRIPTOR_PER_CHILD else {"fork": 4, "spawn": 6}


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_start_with_descriptors_running_out(watcher: str, context: str) -> None:
    """With 0, 1, 2, ... free descriptors: a clear EMFILE, nothing leaked, startable."""
    # While descriptors are plenty: the resource tracker (spawn), and a child whose
    # pidfd shows that children's pidfds work here (then they are its only one).
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
        assert (
            children_of_this_process() <= ({p.pid} if p.pid else set()) | fork_server_and_helpers()
        )
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


@pytest.mark.parametrize(
    "free",
    [0, 1, 2, 3, 4, 5],
)
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


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
async def test_pidfd_open_fails_after_the_fork(
    context: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child exists but cannot be watched: it is killed and reaped, start() says so.

    RLIMIT_NOFILE cannot make this happen (the start frees descriptors before it
    opens the pidfd): only another thread taking the last descriptor in between
    could.  So pidfd_open is made to fail, with the errno it would have.  A
    forkserver child is the fork server's to reap: it is killed all the same,
    and gone once the server has said so; it must not run on unwatched while
    start() says that nothing is left.
    """
    if not pidfd.is_supported():
        pytest.skip("needs pidfd_open (Linux >= 5.3)")
    await warmed_up(context)
    started: list[int] = []
    real_pidfd_open = os.pidfd_open

    def pidfd_open(pid: int, flags: int = 0) -> int:
        if pid == os.getpid():  # the pidfd of this process that forkserver children get
            return real_pidfd_open(pid, flags)
        started.append(pid)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    gc.collect()
    fds = open_fds() - fork_server_fd()
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 0), context=context)
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
    assert state_of(started[0]) is None  # killed and reaped: no zombie, nothing running
    assert (p.pid, p.exitcode, p.is_alive()) == (None, None, False)
    assert open_fds() - fork_server_fd() - {ours.fileno(), theirs.fileno()} == fds
    while ours.poll():  # what the killed child may have said before it was killed
        ours.recv()
    p.start()
    theirs.close()
    assert await handshake(ours) == "ready"
    ours.send("go")
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    p.close()
    ours.close()


async def test_join_with_descriptors_running_out(watcher: str) -> None:
    """A join that needs a descriptor (sigchld's pipe, thread's pipe) and gets none."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_crash, args=(theirs, "exit"))
    p.start()
    assert await handshake(ours) == "ready"
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


async def test_a_dead_fork_server_never_makes_up_an_exit_code() -> None:
    """The fork server dies (a request ran out of descriptors half-way) while a child runs.

    The child exits 0, but the fork server is not there to report it: the
    stdlib's Popen says 255.  The join says what happened instead, or, since
    the test adopts orphans (a subreaper) and so becomes the child's parent,
    reads the true exit code itself.
    """
    warm = AsyncProcess(target=targets.noop, context="forkserver")
    warm.start()  # the fork server, while descriptors are plenty
    with anyio.fail_after(DEADLINE):
        assert await warm.join() == 0
    warm.close()
    said = ""
    other = AsyncProcess(target=targets.noop, context="forkserver")
    try:
        with reaping_orphans():  # the child outlives its fork server: adopt and reap it
            ours, theirs = multiprocessing.Pipe()
            p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 0), context="forkserver")
            p.start()
            theirs.close()
            assert await handshake(ours) == "ready"
            with only_free_fds(1), pytest.raises(OSError, match="too many open files"):
                other.start()  # connected, then out of descriptors: the fork server exits
            ours.send("go")
            ours.close()
            with anyio.fail_after(DEADLINE):
                try:
                    code = await p.join()
                except aioproc.ExitStatusLost as exc:
                    said = str(exc)
                else:
                    # Adopted by this process (a subreaper here), its status is ours
                    # to read: then the true code.  Never the stdlib's made-up 255.
                    assert code == 0, f"join() returned {code} for a child that exited 0"
                    said = "fork server: the true code"
            assert not p.is_alive()
            p.close()
    finally:
        other.start()  # a new fork server (outside the block: it lives on); the old one reaped
        with anyio.fail_after(DEADLINE):
            assert await other.join() == 0
        other.close()
    assert re.search(r"fork ?server", said), said
