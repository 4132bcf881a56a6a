"""A forkserver child can be gone before the parent opens its pidfd.

The fork server, not us, is the parent of a forkserver child, and it reaps its
children at once.  ``Popen`` learns the child's pid only after it has sent the
child its work, so a child that finishes quickly can be reaped before
``pidfd_open`` runs: the kernel then says "no such process", or, were the pid
reused meanwhile, hands over a pidfd of a stranger.  The benchmark's start+join
throughput run hit the first case with children that return at once.
"""

from __future__ import annotations

import multiprocessing.connection
import multiprocessing.forkserver
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import anyio
import pytest

from aioproc import AsyncProcess
from aioproc._child import Child
from aioproc._watchers import pidfd

from . import targets
from .helpers import DEADLINE, SCRIPTS, fork_server_fd, open_fds

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not pidfd.is_supported(), reason="needs pidfd_open (Linux >= 5.3)"),
]


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is none of aioproc's business; it keeps any SIGTERM pending."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "blocked_sigterm.py")], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def pending_signals(pid: int) -> int:
    """The process-wide pending signal mask of *pid* (bit n-1 for signal n)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("ShdPnd:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no ShdPnd line for pid {pid}")


@pytest.fixture(params=["pid-gone", "pid-reused"])
def late_pidfd_open(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    stranger: subprocess.Popen[bytes],
) -> list[int]:
    """pidfd_open runs only once the fork server has reported the child's exit.

    ``pid-gone``: the real call, which finds no such process.  ``pid-reused``:
    the pid names another live process by then (*stranger* plays it).
    """
    real_open = os.pidfd_open

    def strangers_pidfd(pid: int, flags: int) -> int:
        return real_open(stranger.pid, flags)

    after_exit: Callable[[int, int], int] = (
        real_open if request.param == "pid-gone" else strangers_pidfd
    )
    sentinels: list[int] = []
    opened: list[int] = []
    original_open = Child._open_pidfd

    def open_pidfd(self: Child) -> None:
        sentinels.append(self.popen.sentinel)
        original_open(self)

    def pidfd_open_after_the_exit(pid: int, flags: int = 0) -> int:
        if pid == os.getpid():  # ours, which forkserver children watch
            return real_open(pid, flags)
        assert multiprocessing.connection.wait([sentinels.pop()], DEADLINE)
        opened.append(pid)
        return after_exit(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", pidfd_open_after_the_exit)
    monkeypatch.setattr(Child, "_open_pidfd", open_pidfd)
    return opened


async def test_child_reaped_by_the_fork_server_before_pidfd_open(
    late_pidfd_open: list[int], stranger: subprocess.Popen[bytes]
) -> None:
    multiprocessing.forkserver.ensure_running()  # its own descriptors are not ours to count
    before = open_fds() - fork_server_fd()
    p = AsyncProcess(target=targets.exit_with, args=(7,), context="forkserver")
    p.start()
    assert late_pidfd_open == [p.pid]
    assert p.watcher == "pidfd"
    p.terminate()  # the child is gone: no signal may reach whoever has its pid now
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 7
    assert p.exitcode == 7
    assert not p.is_alive()
    p.close()
    # A stranger's pidfd is not kept (others may have closed meanwhile: count new ones).
    assert open_fds() - fork_server_fd() - before == set()
    assert pending_signals(stranger.pid) == 0  # and the stranger got no SIGTERM
