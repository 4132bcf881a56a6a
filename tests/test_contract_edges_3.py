"""Edges of SPEC §1, §3 and §8 that a third hostile review found broken (now kept).

An inherited process object closing the child's own descriptor; sys.exit() with
an int too large for os._exit making a fork child run on in the parent's code;
the sigchld watcher disabling the loop's own signal handlers, and losing the
program's SIGCHLD handler from the chain.  Compared side by side with
``multiprocessing.Process`` on Python 3.10, 3.11 and 3.13.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import DEADLINE, handshake

pytestmark = pytest.mark.timeout(120)


def ready_then_exit(conn: Any, code: int) -> None:
    conn.send("ready")
    conn.recv()
    os._exit(code)


# -- 1. close() of an inherited process object in a fork child closes a stranger fd --


def _close_inherited_sibling(sibling: AsyncProcess, number: int, conn: Any) -> None:
    """In a fork child: take descriptor *number* for a file of our own, close the
    inherited (exited, joined) sibling object, report whether our file survived."""
    mine = []
    fd = -1
    for _ in range(4096):  # the lowest free numbers first: *number* was freed at start
        fd = os.open(os.devnull, os.O_RDONLY)
        mine.append(fd)
        if fd == number:
            break
    got_it = fd == number
    sibling.close()  # the stdlib allows it (the child has exited); it must touch nothing of ours
    try:
        os.fstat(number)
        survived = True
    except OSError:
        survived = False
    conn.send((got_it, survived))


async def test_close_of_an_inherited_process_object_never_closes_the_childs_own_fd() -> None:
    """README (tests of _fds): the objects that own the parent's descriptors "are
    inherited too; in the child they must not use or close them again (they check
    their owner pid)".  The stdlib's copy closes nothing (its Finalize checks the pid).

    It was broken: ``Child.close()`` closed the duplicate that ``p.sentinel`` gave
    out by number in the forked copy; the child had closed the inherited one
    (``_fds.close_inherited``), so the number named a file the child opened
    itself, and that file was closed behind its back.
    """
    sibling = AsyncProcess(target=targets.noop)
    sibling.start()
    with anyio.fail_after(DEADLINE):
        assert await sibling.join() == 0
    number = sibling.sentinel  # the duplicate, held for the child of this process
    recv, send = multiprocessing.Pipe(duplex=False)
    p = AsyncProcess(target=_close_inherited_sibling, args=(sibling, number, send), context="fork")
    p.start()
    got_it, survived = await handshake(recv)
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    sibling.close()
    assert got_it, "the child could not take the freed number (test setup)"
    assert survived, (
        "closing an inherited AsyncProcess in a fork child closed a file the child "
        f"had opened itself (fd {number})"
    )


# -- 2. sys.exit(huge int) in a fork child: the child runs the parent's code ---------


def _exit_with(value: int) -> None:
    sys.exit(value)


@pytest.mark.parametrize("value", [2**31, 2**40, -(2**40)])
async def test_a_fork_child_never_returns_into_the_parents_code(value: int) -> None:
    """SPEC §1: a child runs its target and exits.  ``sys.exit(2**40)`` ends a
    spawn child with the interpreter's status (0: the low byte) and a plain
    ``python -c 'import sys; sys.exit(2**40)'`` too.

    It was broken (fork): the child ended with ``os._exit(code)``, which raises
    OverflowError for such a code; the exception left the forked child's
    ``start()`` and the child went on running the *parent's* code (here: this
    test, its event loop, then pytest).  The stdlib's popen_fork has that flaw.
    """
    parent = os.getpid()
    r, w = os.pipe()
    p = AsyncProcess(target=_exit_with, args=(value,), context="fork")
    try:
        p.start()
    finally:
        if os.getpid() != parent:  # the child, in the parent's code
            os.write(w, b"escaped")
            os._exit(99)
    os.close(w)
    with anyio.fail_after(DEADLINE):
        code = await p.join()
    escaped = os.read(r, 100)
    os.close(r)
    assert escaped == b"", f"the child ran the parent's code after start() (exit code {code})"
    assert code != 99


# -- 3. sigchld watcher: the loop's signal wake-up fd is taken away ------------------


@pytest.fixture
def signals_restored() -> Any:
    previous = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, previous)
    signal.set_wakeup_fd(-1)
    aioproc.set_watcher(None)


async def _a_join_waiting() -> tuple[AsyncProcess, Connection, asyncio.Future[int | None]]:
    """A child that exits with 7 when sent "go", and a join of it waiting on its watch."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=ready_then_exit, args=(theirs, 7))
    p.start()
    theirs.close()
    assert ours.poll(DEADLINE)
    assert ours.recv() == "ready"
    join = asyncio.ensure_future(p.join())
    while not _joining(p):
        await asyncio.sleep(0)  # until the join waits on its watch (its hub is set up)
    return p, ours, join


async def _join_then_signal_usr1() -> tuple[int | None, bool]:
    loop = asyncio.get_running_loop()
    p, ours, join = await _a_join_waiting()
    got = asyncio.Event()
    # The program's own signal handling, set up while the join waits (a server's
    # SIGTERM handler, asyncio's SafeChildWatcher, ...).
    loop.add_signal_handler(signal.SIGUSR1, got.set)
    try:
        ours.send("go")
        code = await asyncio.wait_for(join, DEADLINE)
        os.kill(os.getpid(), signal.SIGUSR1)
        try:
            await asyncio.wait_for(got.wait(), 5)
            ran = True
        except asyncio.TimeoutError:
            ran = False
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    p.close()
    ours.close()
    return code, ran


def _joining(p: AsyncProcess) -> bool:
    child = p._child
    return child is not None and child._watch is not None and child._joiners is not None


@pytest.mark.usefixtures("signals_restored")
def test_sigchld_watcher_leaves_the_loops_own_signal_handlers_working() -> None:
    """SPEC §1/§8: aioproc coexists with the program's other signal users.

    Under asyncio with no wake-up fd, the sigchld hub makes its pipe the wake-up
    fd.  ``loop.add_signal_handler`` while a join waits replaces it with
    asyncio's own.  When the join ended, the hub reset the wake-up fd to -1,
    believing it still its own, which removed asyncio's: from then on no
    ``add_signal_handler`` callback of that loop ran (SIGTERM handlers,
    SafeChildWatcher's SIGCHLD).
    """
    aioproc.set_watcher("sigchld")
    code, ran = asyncio.run(_join_then_signal_usr1())
    assert code == 7
    assert ran, "asyncio's SIGUSR1 callback never ran: its signal wake-up fd was reset to -1"


# -- 4. sigchld watcher: a handler installed before aioproc is dropped from the chain --


async def _join_while_a_library_chains_on_top(calls: list[str]) -> int | None:
    p, ours, join = await _a_join_waiting()
    replaced = signal.getsignal(signal.SIGCHLD)

    def library(signum: int, frame: FrameType | None) -> None:  # chains, as it should
        calls.append("library")
        if callable(replaced):
            replaced(signum, frame)

    signal.signal(signal.SIGCHLD, library)
    ours.send("go")
    code = await asyncio.wait_for(join, DEADLINE)
    p.close()
    ours.close()
    calls.clear()
    signal.raise_signal(signal.SIGCHLD)  # handlers run before this returns
    return code


@pytest.mark.usefixtures("signals_restored")
def test_sigchld_watcher_keeps_the_programs_earlier_handler_in_the_chain() -> None:
    """README, Watchers: the sigchld watcher "chains to the one it replaced".

    The program installs its SIGCHLD handler; aioproc's goes on top (chaining to
    it); a library then installs its own the well-behaved way, calling the one
    it replaced (aioproc's).  Without aioproc the library's handler would reach
    the program's.  It was lost: once the join ended, ``_uninstall`` forgot what
    aioproc's handler chained to while that handler was still reachable through
    the library's (and going back on top of the library's replaced it).
    """
    calls: list[str] = []

    def program(signum: int, frame: FrameType | None) -> None:
        calls.append("program")

    signal.signal(signal.SIGCHLD, program)
    aioproc.set_watcher("sigchld")
    code = asyncio.run(_join_while_a_library_chains_on_top(calls))
    assert code == 7
    assert "library" in calls
    assert "program" in calls, f"the program's SIGCHLD handler is no longer called: {calls}"
