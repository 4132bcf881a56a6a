"""Edges a review of the 2026-12-08 changes found broken (now kept): an interrupted
``run`` start's unheld child left its process group running; a Python SIGCHLD
handler under a C-level one was lost once the sigchld watcher put the C one back."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import aioproc
from aioproc import _process
from aioproc._process import AsyncProcess

from .helpers import DEADLINE, state_of, warmed_up
from .test_sigchld_from_c_and_pid_reuse import (
    _SRAND,
    c_disposition,
    c_install,
    joined_while,
    sigchld_put_back,  # noqa: F401 - the fixture
    started_child,
)

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


# -- sigchld: a Python handler below a C one ------------------------------------------

_CHAIN_C = r"""
#include <signal.h>
#include <string.h>
static struct sigaction old;
static void h(int sig, siginfo_t *info, void *ctx) {
    if (old.sa_flags & SA_SIGINFO) old.sa_sigaction(sig, info, ctx);
    else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) old.sa_handler(sig);
}
int install(void) {
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h; sa.sa_flags = SA_SIGINFO | SA_RESTART; sigemptyset(&sa.sa_mask);
    return sigaction(SIGCHLD, &sa, &old);
}
"""


def _other_child_exits(seen: list[int]) -> None:
    """A subprocess exits; wait (DEADLINE at most) for *seen* to grow."""
    before = len(seen)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    deadline = time.monotonic() + DEADLINE
    while len(seen) == before and time.monotonic() < deadline:
        time.sleep(0.001)  # the Python handler runs between bytecodes


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's struct sigaction layout")
@pytest.mark.usefixtures("sigchld_put_back")
async def test_python_handler_below_a_c_handler_is_put_back() -> None:
    """A Python SIGCHLD handler, then a C one installed over it: after aioproc's
    watch both are as they were (Python's module was reset to SIG_DFL)."""
    seen: list[int] = []
    signal.signal(signal.SIGCHLD, lambda signum, frame: seen.append(signum))
    python_handler = signal.getsignal(signal.SIGCHLD)
    c_install(_SRAND)
    p, ours = await started_child(7)
    assert await joined_while(p, ours) == 7
    p.close()
    assert c_disposition() == _SRAND
    assert signal.getsignal(signal.SIGCHLD) is python_handler, (
        f"Python's SIGCHLD handler became {signal.getsignal(signal.SIGCHLD)!r}"
    )


@pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("cc") is None, reason="needs a C compiler, glibc"
)
@pytest.mark.usefixtures("sigchld_put_back")
async def test_python_handler_below_a_chaining_c_handler_keeps_running(tmp_path: Path) -> None:
    """A C library that chains to the handler it replaced (CPython's, so the
    program's Python handler runs): the Python handler still runs while
    aioproc watches, and after."""
    src, lib = tmp_path / "chain.c", tmp_path / "libchain.so"
    src.write_text(_CHAIN_C)
    await anyio.run_process(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)])
    chain = ctypes.CDLL(str(lib))
    seen: list[int] = []
    signal.signal(signal.SIGCHLD, lambda signum, frame: seen.append(signum))
    assert chain.install() == 0
    _other_child_exits(seen)
    assert seen, "setup: the C handler does not chain to Python's"
    p, ours = await started_child(7)
    del seen[:]
    assert await joined_while(p, ours) == 7
    p.close()
    while_watching = len(seen)
    _other_child_exits(seen)
    after = len(seen) - while_watching
    assert while_watching, "the program's Python SIGCHLD handler did not run while aioproc watched"
    assert after, "the program's Python SIGCHLD handler no longer runs after aioproc watched"


def test_no_pidfd_emfile_opening_proc_dir_leaves_no_descriptor_marked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without pidfd, the handle marks the stdlib's pipes as held, then opens the
    child's ``/proc/PID``; EMFILE there fails the start (the child is killed and
    reaped).  The marks went only when the half-made handle was collected, by
    then possibly on another child's descriptors of the same numbers."""
    import errno

    from aioproc import _fds
    from aioproc._watchers import pidfd

    monkeypatch.setattr(pidfd, "supported", False)
    real_open = os.open

    def no_more_descriptors(path: object, *args: object, **kwargs: object) -> int:
        if isinstance(path, str) and path.startswith("/proc/") and path[6:].isdigit():
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    def marked() -> set[int]:
        return {fd for fd, held in enumerate(_fds._held) if held}

    before = marked()  # what earlier tests' processes hold (a fork server's, say)
    monkeypatch.setattr(os, "open", no_more_descriptors)
    p = AsyncProcess(target=time.sleep, args=(30,), context="fork")
    with pytest.raises(OSError, match="EMFILE") as caught:
        p.start()
    monkeypatch.setattr(os, "open", real_open)
    assert caught.value.errno == errno.EMFILE
    assert marked() == before, "descriptors still marked as held for a child"
