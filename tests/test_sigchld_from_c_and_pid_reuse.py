"""The sigchld watcher next to SIGCHLD users Python cannot see; pid reuse without pidfd.

SPEC §3 and §8, README "Watchers".  A C library (libuv, libev, glib, an
extension module) installs its SIGCHLD disposition with ``sigaction()``, not
through Python's ``signal`` module; ``signal.getsignal`` then still returns
what Python last installed.  The sigchld watcher must keep its promises there:
refuse SIG_IGN, chain to the handler it replaced, put it back, and never
overwrite a handler installed over its own.

The "C library" here is libc itself, reached with ctypes: ``srand`` is a
``void (int)`` function, so it serves as a SIGCHLD handler whose call is
visible afterwards (``srand(SIGCHLD)`` fixes the next ``rand()``; Python never
calls ``rand``).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import (
    DEADLINE,
    NS_LAST_PID,
    handshake,
    signals_pending,
    state_of,
    why_pids_cannot_be_chosen,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform != "linux", reason="glibc's struct sigaction layout"),
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.srand.argtypes = [ctypes.c_uint]
_SIG_DFL, _SIG_IGN = 0, 1
_SRAND: int = ctypes.cast(_libc.srand, ctypes.c_void_p).value  # type: ignore[assignment]


def _raw_action() -> ctypes.Array[ctypes.c_char]:
    """The kernel's SIGCHLD action, as an opaque buffer (big enough for any libc)."""
    buf = ctypes.create_string_buffer(512)
    if _libc.sigaction(signal.SIGCHLD, None, buf) != 0:
        raise OSError(ctypes.get_errno(), "sigaction")
    return buf


def c_disposition() -> int:
    """The SIGCHLD handler the kernel will run (sa_handler, the first field)."""
    return ctypes.c_void_p.from_buffer(_raw_action()).value or _SIG_DFL


def c_install(handler: int) -> None:
    """``sigaction(SIGCHLD, {handler})`` from C: Python's signal module does not see it."""
    buf = ctypes.create_string_buffer(512)  # empty mask, no flags
    ctypes.c_void_p.from_buffer(buf).value = handler
    if _libc.sigaction(signal.SIGCHLD, buf, None) != 0:
        raise OSError(ctypes.get_errno(), "sigaction")


def c_handler_reset() -> None:
    """Seed rand(): until srand(SIGCHLD) runs, the next rand() is the seed 12345's."""
    _libc.srand(12345)


def c_handler_called() -> bool:
    """Whether srand(SIGCHLD) ran (as a handler) since the last ``c_handler_reset()``."""
    got = _libc.rand()
    _libc.srand(signal.SIGCHLD)
    return bool(got == _libc.rand())


@pytest.fixture
def sigchld_put_back(anyio_backend: Any) -> Iterator[None]:
    """The sigchld watcher, forced; SIGCHLD as it was, for Python and for the kernel."""
    _, options = anyio_backend
    if "loop_factory" in options:
        pytest.skip("uvloop owns SIGCHLD: no sigchld watcher there")
    aioproc.set_watcher("sigchld")  # conftest puts the automatic choice back
    python_handler = signal.getsignal(signal.SIGCHLD)
    raw = _raw_action()
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, python_handler)
        _libc.sigaction(signal.SIGCHLD, raw, None)


async def started_child(code: int) -> tuple[AsyncProcess, Any]:
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, code), context="fork")
    p.start()
    theirs.close()
    assert await handshake(ours) == "ready"
    return p, ours


async def joined_while(p: AsyncProcess, ours: Any, during: Any = None) -> int | None:
    """Join *p* in a task; once it waits, run *during()*, then let the child exit."""
    codes: list[int | None] = []
    lost: list[aioproc.ExitStatusLost] = []

    async def join() -> None:
        try:
            codes.append(await p.join())
        except aioproc.ExitStatusLost as exc:
            lost.append(exc)

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(join)
            await anyio.wait_all_tasks_blocked()
            if during is not None:
                during()
            ours.send("go")
    ours.close()
    if lost:
        raise lost[0]
    return codes[0]


def other_child_state_after_exit() -> str | None:
    """Start a plain subprocess, let it exit, return its state (None: reaped by the kernel)."""
    other = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + DEADLINE
        while state_of(other.pid) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.005)
        return state_of(other.pid)
    finally:
        with contextlib.suppress(ChildProcessError):
            other.wait(DEADLINE)


# -- findings: SIGCHLD set from C -----------------------------------------------------


@pytest.mark.usefixtures("sigchld_put_back")
async def test_c_level_sig_ign_is_refused_and_kept() -> None:
    """SIGCHLD ignored at the C level: forcing sigchld is refused, saying SIG_IGN,
    and the disposition is SIG_IGN afterwards (the program's other children are
    still reaped by the kernel).

    README: the sigchld watcher is refused "while SIGCHLD is SIG_IGN (... a
    handler would turn the program's other children into zombies)"; SPEC §3: a
    forced watcher that cannot work is a clear error.
    """
    c_install(_SIG_IGN)
    assert signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN  # invisible to Python
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 3), context="fork")
    refused: aioproc.WatcherUnavailable | None = None
    try:
        p.start()
    except aioproc.WatcherUnavailable as exc:
        refused = exc
    theirs.close()
    if refused is None:  # it started: join it (the status may be lost), then close
        assert await handshake(ours) == "ready"
        with contextlib.suppress(aioproc.ExitStatusLost):
            await joined_while(p, ours)
        p.close()
    else:
        ours.close()
    disposition = c_disposition()
    other = other_child_state_after_exit()
    assert refused is not None, "sigchld was forced while SIGCHLD is SIG_IGN and was not refused"
    assert "SIG_IGN" in str(refused)
    assert disposition == _SIG_IGN, f"SIGCHLD's SIG_IGN was replaced by {disposition:#x}"
    assert other is None, "the program's other child was left a zombie"


@pytest.mark.usefixtures("sigchld_put_back")
async def test_c_level_handler_is_chained_while_watching() -> None:
    """README: "it chains to the one it replaced" — also a handler installed from C."""
    c_install(_SRAND)
    p, ours = await started_child(7)
    c_handler_reset()
    assert await joined_while(p, ours) == 7
    p.close()
    assert c_handler_called(), "the C-level SIGCHLD handler was not run while aioproc watched"


@pytest.mark.usefixtures("sigchld_put_back")
async def test_c_level_handler_is_put_back_after_watching() -> None:
    """README: "... and puts it back when no child is watched any more"."""
    c_install(_SRAND)
    p, ours = await started_child(7)
    assert await joined_while(p, ours) == 7
    p.close()
    disposition = c_disposition()
    assert disposition == _SRAND, (
        f"the C-level SIGCHLD handler {_SRAND:#x} was replaced by {disposition:#x}"
    )


@pytest.mark.usefixtures("sigchld_put_back")
async def test_c_level_handler_installed_over_ours_while_joining_stays() -> None:
    """README: "... unless someone installed another since, which then stays"."""
    p, ours = await started_child(7)
    assert await joined_while(p, ours, during=lambda: c_install(_SRAND)) == 7
    p.close()
    disposition = c_disposition()
    assert disposition == _SRAND, (
        f"the SIGCHLD handler installed over aioproc's ({_SRAND:#x}) was replaced by "
        f"{disposition:#x} when the join ended"
    )


# -- findings: a pid reused by another child of ours ---------------------------------


def our_child_at(pid: int) -> int | None:
    """Fork a child of ours (all signals blocked, so they stay pending) at *pid*.

    Returns its pid, or None if another process took *pid* first.
    """
    with open(NS_LAST_PID) as f:
        cursor = f.read().strip()
    everything = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, everything)
    try:
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        child = os.fork()
        if child == 0:
            time.sleep(DEADLINE)
            os._exit(0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        with open(NS_LAST_PID, "w") as f:
            f.write(cursor)
    if child != pid:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        return None
    return child


@contextlib.asynccontextmanager
async def reaped_and_reused() -> AsyncIterator[tuple[AsyncProcess, int]]:
    """A fork child reaped by a foreign ``waitpid`` while its grandchild still holds
    the sentinel pipe, and its pid given to another child of this process (all
    signals blocked, so that any sent stay pending).  Yields both; cleans up."""
    for _ in range(8):  # another process may take the freed pid first
        ours, theirs = multiprocessing.Pipe()
        p = AsyncProcess(
            target=targets.fork_grandchild_then_exit, args=(theirs, DEADLINE), context="fork"
        )
        p.start()
        theirs.close()
        pid = p.pid
        assert pid is not None
        grandchild = await handshake(ours)
        other = None
        try:
            ours.send("go")
            assert os.waitpid(pid, 0)[0] == pid  # the foreign reap
            other = our_child_at(pid)
            if other is not None:
                yield p, other
                return
        finally:
            ours.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)
            if other is not None:
                os.kill(other, signal.SIGKILL)
                os.waitpid(other, 0)
            with anyio.fail_after(DEADLINE), contextlib.suppress(aioproc.ExitStatusLost):
                await p.join()
            p.close()
    pytest.fail("another process took the freed pid first, 8 times in a row")


@pytest.mark.skipif(
    why_pids_cannot_be_chosen() is not None, reason=str(why_pids_cannot_be_chosen())
)
@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfds", "no-pidfds"])
@pytest.mark.parametrize("name", ["pidfd", "sigchld", "sentinel", "thread"])
async def test_after_a_foreign_reap_and_pid_reuse_by_our_other_child_nothing_reaches_it(
    name: str, pidfds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signals, is_alive(), join() and close() of the reaped child: no signal reaches
    our other child at the reused pid, is_alive() is False, join() says
    ExitStatusLost (it neither waits for that child nor takes its status), and
    the other child's status stays ours to collect.  Without pidfds (an old
    kernel, played as test_strangers.py does) terminate() reached it, and
    join() took its status, before the child's ``/proc/PID`` was kept.

    SPEC §8: "No stranger is ever signalled ... also after the child was reaped
    by someone else ... and its pid was reused"; §1: "aioproc never reaps a
    child it did not start"."""
    if not pidfds:
        if name == "pidfd":
            pytest.skip("the pidfd watcher needs pidfds")
        monkeypatch.setattr(aioproc._watchers.pidfd, "supported", False)
    aioproc.set_watcher(name)  # type: ignore[arg-type]
    async with reaped_and_reused() as (p, other):
        p.terminate()
        p.interrupt()
        p.kill()
        touched = signals_pending(other)
        assert not touched, f"signals {touched} reached another child of ours at pid {other}"
        assert not p.is_alive()
        with anyio.fail_after(DEADLINE), pytest.raises(aioproc.ExitStatusLost):
            await p.join()
        assert p.exitcode is None
        assert os.waitpid(other, os.WNOHANG) == (0, 0), "our other child was touched"


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
@pytest.mark.parametrize("name", ["sigchld", "sentinel", "thread"])
async def test_no_pidfd_a_child_that_closed_its_descriptors_can_still_be_terminated(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pidfd, the child's end of the sentinel pipe told whether the pid was
    still its own; a child that closed every inherited descriptor was never
    signalled again (terminate() did nothing, the join waited on).  Its
    ``/proc/PID`` tells instead."""
    monkeypatch.setattr(aioproc._watchers.pidfd, "supported", False)
    aioproc.set_watcher(name)  # type: ignore[arg-type]
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(
        target=targets.close_every_descriptor_then_sleep, args=(theirs, DEADLINE), context="fork"
    )
    p.start()
    theirs.close()
    try:
        assert await handshake(ours) == "ready"
        with anyio.fail_after(DEADLINE), pytest.raises(EOFError):
            await anyio.to_thread.run_sync(ours.recv)  # it closed its end too
        p.terminate()
        with anyio.fail_after(DEADLINE):
            assert await p.join() == -signal.SIGTERM
    finally:
        ours.close()
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
            with anyio.fail_after(DEADLINE):
                await p.join()
        p.close()


# -- SIG_IGN set while a join waits ---------------------------------------------------


@pytest.mark.usefixtures("sigchld_put_back")
@pytest.mark.parametrize("how", ["python", "c"])
async def test_sig_ign_set_while_a_join_waits_gives_a_result_and_stays(how: str) -> None:
    """SIG_IGN set (through Python, or from C) while a sigchld join waits: the join ends
    at once with ExitStatusLost (or the code), and SIG_IGN is still in place after."""
    p, ours = await started_child(7)

    def ignore() -> None:
        if how == "python":
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        else:
            c_install(_SIG_IGN)

    start = time.monotonic()
    try:
        code: object = await joined_while(p, ours, during=ignore)
    except aioproc.ExitStatusLost as exc:
        code = exc
    took = time.monotonic() - start
    p.close()
    assert code == 7 or isinstance(code, aioproc.ExitStatusLost)
    assert took < 2, f"the join took {took:.2f} s"
    assert c_disposition() == _SIG_IGN
    assert other_child_state_after_exit() is None
