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


# -- sigchld: a Python handler below a C one ------------------------------------------

import ctypes  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from .test_sigchld_from_c_and_pid_reuse import (  # noqa: E402
    _SRAND,
    c_disposition,
    c_install,
    joined_while,
    sigchld_put_back,  # noqa: F401 - the fixture
    started_child,
)

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


def _other_child_exits() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    time.sleep(0.1)  # the Python handler runs at the next bytecode; give it a moment


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
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    chain = ctypes.CDLL(str(lib))
    seen: list[int] = []
    signal.signal(signal.SIGCHLD, lambda signum, frame: seen.append(signum))
    assert chain.install() == 0
    _other_child_exits()
    assert seen, "setup: the C handler does not chain to Python's"
    p, ours = await started_child(7)
    del seen[:]
    assert await joined_while(p, ours) == 7
    p.close()
    while_watching = len(seen)
    _other_child_exits()
    after = len(seen) - while_watching
    assert while_watching, "the program's Python SIGCHLD handler did not run while aioproc watched"
    assert after, "the program's Python SIGCHLD handler no longer runs after aioproc watched"
