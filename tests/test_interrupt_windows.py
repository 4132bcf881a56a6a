"""An interruption that lands right after ``run`` created its child.

trio delivers a KeyboardInterrupt wherever Python code runs, so it can land
between the child's creation and the join.  The child must then be stopped as
a cancellation stops it (SIGTERM, the grace period, SIGKILL), not killed at
once, and not left running: a program that gets Ctrl-C while ``run`` is still
starting its child lets that child clean up as well.
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path
from typing import Any

import pytest

import aioproc
from aioproc._process import AsyncProcess

from . import targets
from .helpers import DEADLINE, fork_server_fd, open_fds, state_of, warmed_up

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


async def test_an_interruption_right_after_a_fork_child_exists_stops_it_with_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interruption is raised as soon as the child runs its function (it
    said ``ready``).  Before the fix, ``run`` killed it with SIGKILL there, so
    it never said ``sigterm``.  (Only fork: a spawn or forkserver child begins
    its function once the join has sent it the call.)"""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    original = AsyncProcess._started

    def started_then_interrupted(self: AsyncProcess, *args: Any) -> None:
        original(self, *args)
        assert read_line(fd) == "ready"
        raise Interrupted

    monkeypatch.setattr(AsyncProcess, "_started", started_then_interrupted)
    try:
        with pytest.raises(Interrupted):
            await aioproc.run(targets.say_sigterm_on_fifo, fifo, context="fork", grace=DEADLINE)
        assert read_line(fd) == "sigterm"
    finally:
        os.close(fd)


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
