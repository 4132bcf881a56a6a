"""Review of 2918ee2..HEAD: reproducers."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import aioproc
from aioproc import _process
from aioproc._process import AsyncProcess

from .helpers import DEADLINE, state_of, warmed_up

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class Interrupted(BaseException):
    pass


def fork_grandchild_then_ready(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    g = os.fork()
    if g == 0:
        time.sleep(60)
        os._exit(0)
    os.write(fd, f"ready {g}\n".encode())
    time.sleep(60)


def _read_line(fd: int) -> str:
    import select
    got = b""
    end = time.monotonic() + DEADLINE
    while not got.endswith(b"\n"):
        if not select.select([fd], [], [], max(0, end - time.monotonic()))[0]:
            raise AssertionError("nothing said")
        got += os.read(fd, 100)
    return got.decode().strip()


async def test_interrupted_before_handle_leaves_no_grandchild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run: the child's whole group ends with the call, also when the start is interrupted
    after the function runs (the unheld path)."""
    await warmed_up("fork")
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    grand: list[int] = []

    def child_then_interrupted(*args: object) -> object:
        line = _read_line(fd)
        grand.append(int(line.split()[1]))
        raise Interrupted

    monkeypatch.setattr(_process, "_Child", child_then_interrupted)
    try:
        with pytest.raises(Interrupted):
            await aioproc.run(fork_grandchild_then_ready, fifo, context="fork", grace=0.5)
        time.sleep(0.2)
        [g] = grand
        alive = state_of(g) not in (None, "Z")
        if alive:
            os.kill(g, signal.SIGKILL)
        assert not alive, f"grandchild {g} of the interrupted run() was left running"
    finally:
        os.close(fd)
