"""Faults: children that die badly, and starts and joins that cannot fork (RLIMIT_NPROC).

Each fault ends with a clear answer (an exit code, or an exception that says
what ran out and what to do), no descriptor or child left behind, and a
process object that can still be used: joined again, or started again.

Covered elsewhere: a child's segfault, SIGKILL of itself and uncaught exception
(test_process.py ``test_exit_codes``), a child that forks a grandchild and exits
(``test_joined_as_soon_as_child_exits_despite_grandchild``); running out of
descriptors and a fork server that dies (test_running_out.py).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from aioproc import AsyncProcess

from . import targets
from .helpers import (
    DEADLINE,
    children_of_this_process,
    handshake,
)

REPO = Path(__file__).resolve().parent.parent


# -- children that die badly while joined -------------------------------------


@pytest.mark.parametrize("how", ["sigkill-from-outside", "segfault", "abort"])
async def test_child_dies_while_joined(watcher: str, how: str) -> None:
    """Every joiner wakes with the signal's exit code; nothing is left."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_crash, args=(theirs, how))
    p.start()
    theirs.close()
    assert await handshake(ours) == "ready"
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
    assert await handshake(ours) == "ready"
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

    A helper process does it (see tests/scripts/fork_failure.py for how fork is made to
    fail as root); stdlib's own fork start leaks four descriptors here.
    """
    if os.geteuid() != 0:
        pytest.skip("the helper needs root to switch to nobody and back")
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "tests.scripts.fork_failure",
            scenario,
            str(tmp_path),
        ],
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
