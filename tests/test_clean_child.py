"""A child starts clean: nothing of its parent's signal handlers or descriptor bookkeeping.

SPEC §8.  A web server sets a SIGTERM handler (uvicorn does); a fork child
must not inherit it, or ``terminate()`` does nothing and ``run``'s timeout
waits out the grace period.  And a process forked by user code with
``os.fork()`` from a parent that had aioproc children, which then closes its
descriptors and uses aioproc itself, must not have its own new descriptors
closed by bookkeeping inherited from that parent.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.util
import os
import signal
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess, ProcessTimeout

from . import targets
from .conftest import FORK_THREAD_WARNING
from .helpers import DEADLINE, handshake, open_fds

#: Signals a server typically handles itself.
HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


def _servers_handler(signum: int, frame: FrameType | None) -> None:
    """What a server's shutdown handler does in the parent: note it, carry on."""


@pytest.fixture
def servers_handlers() -> Iterator[None]:
    """The parent handles SIGTERM, SIGHUP and SIGUSR1 itself, as a server does."""
    previous = {s: signal.signal(s, _servers_handler) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


async def _sent_by(target: Any, arg: object, context: str = "fork") -> Any:
    """What a child running ``target(conn, arg)`` sends, once it has exited with 0."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=target, args=(theirs, arg), context=context)
    p.start()
    theirs.close()
    sent = await handshake(ours)
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    p.close()
    ours.close()
    return sent


@pytest.mark.usefixtures("servers_handlers")
async def test_a_fork_child_starts_with_default_dispositions() -> None:
    dispositions = await _sent_by(targets.send_dispositions, [int(s) for s in HANDLED])
    assert dispositions == {int(s): "default" for s in HANDLED}


@pytest.mark.usefixtures("servers_handlers")
async def test_terminate_ends_a_fork_child_whose_parent_handles_sigterm() -> None:
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_sleep, args=(theirs, 60), context="fork")
    p.start()
    theirs.close()
    assert await handshake(ours) == "ready"
    p.terminate()
    code = await p.join(DEADLINE)
    if code is None:  # SIGTERM was handled by the parent's handler: clean up, then fail
        p.kill()
        await p.join()
    p.close()
    ours.close()
    assert code == -signal.SIGTERM


@pytest.mark.usefixtures("servers_handlers")
async def test_run_timeout_with_a_parent_sigterm_handler_ends_with_sigterm() -> None:
    """SIGTERM ends the child: run does not wait out the grace period to SIGKILL it."""
    with anyio.fail_after(DEADLINE), pytest.raises(ProcessTimeout) as info:
        await aioproc.run(targets.sleep, 60, timeout=0.3, context="fork")
    assert info.value.exitcode == -signal.SIGTERM, str(info.value)


@FORK_THREAD_WARNING
def test_a_process_forked_by_user_code_can_use_aioproc(tmp_path: Path) -> None:
    """os.fork() by user code, descriptors closed, then aioproc.run: its pipes are its own.

    The new process reuses, for its own descriptors, exactly the numbers this
    process holds for its children: bookkeeping inherited from here must not
    make the new process's child close them.
    """
    before = open_fds()
    siblings = [AsyncProcess(target=targets.sleep, args=(60,), context="fork") for _ in range(6)]
    for p in siblings:
        p.start()
    held = sorted(open_fds() - before)  # sentinels, pipe ends, pidfds of the siblings
    report = tmp_path / "report"
    pid = os.fork()
    if pid == 0:  # the process user code forked
        code = 1
        try:
            os.closerange(3, 1 << 16)
            # Every number from 3 to the last held one, except the held ones, is
            # taken: whatever this process opens next gets a held number.
            fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(max(held) - 2)]
            for fd in held:
                os.close(fd)
            assert fillers
            value = anyio.run(functools.partial(aioproc.run, targets.add, 2, 3, context="fork"))
            report.write_text(repr(value))
            code = 0
        except BaseException:
            report.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    try:
        end = time.monotonic() + DEADLINE
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > end:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"the process forked by user code hung for {DEADLINE} s")
            time.sleep(0.01)
    finally:
        for p in siblings:
            p.kill()
            assert anyio.run(p.join) == -signal.SIGKILL
            p.close()
    assert report.read_text() == "5", report.read_text().splitlines()[-1]


async def _after_fork_state(context: str, probe: targets.AfterForkProbe, *, stdlib: bool) -> object:
    ours, theirs = multiprocessing.Pipe()
    args = (theirs, probe)
    if stdlib:
        q = multiprocessing.get_context(context).Process(  # type: ignore[attr-defined]
            target=targets.send_after_fork_state, args=args
        )
        q.start()
        theirs.close()
        state = await handshake(ours)
        await anyio.to_thread.run_sync(q.join, DEADLINE)
        assert q.exitcode == 0
        q.close()
    else:
        p = AsyncProcess(target=targets.send_after_fork_state, args=args, context=context)
        p.start()
        theirs.close()
        state = await handshake(ours)
        assert await p.join(DEADLINE) == 0
        p.close()
    ours.close()
    return state


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
async def test_after_fork_hooks_run_and_the_parents_finalizers_do_not(context: str) -> None:
    """``multiprocessing.util.register_after_fork`` hooks run in the child and the
    parent's finalizers are forgotten there, as in a stdlib child of the same parent."""
    probe = targets.AfterForkProbe()
    multiprocessing.util.register_after_fork(probe, targets.AfterForkProbe.hook)
    finalizer = multiprocessing.util.Finalize(probe, targets.parents_finalizer, exitpriority=10)
    try:
        ours = await _after_fork_state(context, probe, stdlib=False)
        theirs = await _after_fork_state(context, probe, stdlib=True)
    finally:
        finalizer.cancel()
    assert ours == theirs
    if context == "fork":
        assert ours == {"hooked here": True, "finalizers": []}


@pytest.mark.parametrize("where", ["loop thread", "worker thread"])
async def test_a_fork_child_of_a_running_loop_sees_no_loop(where: str) -> None:
    """From the loop's own thread, or from one of anyio's worker threads (which
    carry the loop's token): the child finds no library, no policy loop, no trio
    task and no token of the parent's."""
    recv, send = multiprocessing.Pipe(duplex=False)
    p = AsyncProcess(target=targets.send_loop_state, args=(send,), context="fork")
    if where == "loop thread":
        p.start()
    else:
        await anyio.to_thread.run_sync(p.start)
    send.close()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    assert recv.poll(0), "the child sent nothing"
    seen = recv.recv()
    recv.close()
    assert seen == {"sniffio": None, "policy loop": None, "trio task": None, "anyio token": None}


async def test_a_spawn_child_does_not_import_what_only_a_forked_child_needs() -> None:
    """A new interpreter has nothing to clean: spared those imports (1% of its start)."""
    names = ["aioproc._fds", "aioproc._reset", "contextvars"]
    assert await _sent_by(targets.send_loaded, names, context="spawn") == []


async def test_a_fork_child_of_a_spawn_child_starts_with_default_dispositions() -> None:
    signums = [int(s) for s in HANDLED]
    dispositions = await _sent_by(
        targets.send_dispositions_of_a_fork_child, signums, context="spawn"
    )
    assert dispositions == {int(s): "default" for s in HANDLED}
