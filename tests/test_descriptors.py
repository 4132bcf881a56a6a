"""One descriptor per child in the parent: the pidfd is the sentinel (issue 14).

Where the kernel has pidfds, a fork or spawn child costs the parent one
descriptor, its pidfd, which is also its ``sentinel`` (pollable, so
``multiprocessing.connection.wait`` keeps working), and the child watches its
parent through a pidfd of its own instead of an inherited pipe
(``multiprocessing.parent_process()`` keeps working).  A forkserver child
needs the server's status pipe and the data pipe the stdlib keeps as the
child's sign that its parent lives: three.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal

import anyio
import pytest

from aioproc import AsyncProcess, _popen
from aioproc._watchers import pidfd

from . import targets
from .helpers import fork_server_fd, open_fds, pid_exists, reaping_orphans

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
PER_CHILD = {"fork": 1, "spawn": 1, "forkserver": 3}


def _kind(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("context", list(PER_CHILD))
async def test_descriptors_per_child(context: str) -> None:
    warm = AsyncProcess(target=targets.noop, context=context)  # fork server, tracker
    warm.start()
    with anyio.fail_after(DEADLINE):
        await warm.join()
    warm.close()
    before = open_fds() - fork_server_fd()
    procs = [AsyncProcess(target=targets.sleep, args=(30,), context=context) for _ in range(4)]
    for p in procs:
        await p.start_async()
    try:
        held = open_fds() - fork_server_fd() - before
        assert len(held) == PER_CHILD[context] * len(procs), {fd: _kind(fd) for fd in held}
        if context != "forkserver":
            assert {p.sentinel for p in procs} == held
            assert {_kind(fd) for fd in held} == {"anon_inode:[pidfd]"}
    finally:
        for p in procs:
            p.kill()
        with anyio.fail_after(DEADLINE):
            for p in procs:
                assert await p.join() == -signal.SIGKILL
                p.close()
    assert open_fds() - fork_server_fd() == before


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


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_the_parent_sentinel_turns_readable_when_the_parent_dies(context: str) -> None:
    """A child's parent is SIGKILLed: ``parent_process().sentinel`` says so at once."""
    ours, theirs = multiprocessing.Pipe()
    with reaping_orphans():
        parent = AsyncProcess(target=targets.outlive_parent, args=(theirs, context))
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
            parent.kill()
            assert await parent.join() == -signal.SIGKILL
            await anyio.wait_readable(ours.fileno())
            assert ours.recv() == ("parent gone", True, False)
        parent.close()
    assert not pid_exists(grandchild)
    ours.close()
