"""Edges a sixth hostile review found broken (now kept): a sigchld watch chosen
automatically at start() and joined after set_watcher() changed, a DaskPool
worker that does not answer, children started by other threads during exit."""

from __future__ import annotations

import threading
from typing import Any, Literal

import anyio
import pytest
import uvloop

import aioproc
from aioproc import AsyncProcess
from aioproc._watchers import pidfd

from . import targets
from .conftest import FORK_THREAD_WARNING

pytestmark = pytest.mark.timeout(60)
UVLOOP = {"loop_factory": uvloop.new_event_loop}


# -- a watcher chosen automatically at start(), joined after set_watcher() changed --


@FORK_THREAD_WARNING
@pytest.mark.parametrize("later", ["thread", "sentinel"])
def test_automatic_sigchld_joined_under_uvloop_after_set_watcher_moves_to_thread(
    monkeypatch: pytest.MonkeyPatch, later: Literal["thread", "sentinel"]
) -> None:
    """README: "A sigchld watch chosen by a start() outside any loop and then joined
    under uvloop moves to a thread watch automatically" -- set_watcher() only
    concerns "processes started from now on"."""
    monkeypatch.setattr(pidfd, "supported", False)
    p = AsyncProcess(target=targets.sleep, args=(0.3,))
    p.start()  # no loop, automatic choice: sigchld
    try:
        chosen = p.watcher
        assert chosen == "sigchld"
        aioproc.set_watcher(later)  # for processes started from now on

        async def main() -> int | None:
            with anyio.fail_after(20):
                return await p.join()

        assert anyio.run(main, backend="asyncio", backend_options=UVLOOP) == 0
        assert p.watcher == "thread"
    finally:
        aioproc.set_watcher(None)
        p.kill()
        anyio.run(p.join)
        p.close()


@FORK_THREAD_WARNING
def test_automatic_sigchld_joined_from_another_thread_after_set_watcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pidfd, "supported", False)
    p = AsyncProcess(target=targets.sleep, args=(0.3,))
    p.start()
    result: list[Any] = []
    try:
        assert p.watcher == "sigchld"
        aioproc.set_watcher("thread")

        def in_thread() -> None:
            async def main() -> int | None:
                with anyio.fail_after(20):
                    return await p.join()

            try:
                result.append(anyio.run(main))
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=in_thread)
        t.start()
        t.join(30)
        assert result == [0]
    finally:
        aioproc.set_watcher(None)
        p.kill()
        anyio.run(p.join)
        p.close()


# -- interpreter exit: a child started by another thread while exit handles ours -------

_STARTS_DURING_EXIT = """
import sys, threading, time
import anyio, aioproc
from tests import targets

started = threading.Event()

def keep_running_calls():  # a daemon thread: it runs on while the interpreter exits
    while True:
        started.set()
        try:
            anyio.run(aioproc.run, targets.sleep, 2.0)
        except Exception as exc:
            print("thread:", type(exc).__name__, flush=True)

if __name__ == "__main__":
    threading.Thread(target=keep_running_calls, daemon=True).start()
    started.wait()
    time.sleep(0.3)
    # Waited for at exit: meanwhile the thread starts a new call's child.
    aioproc.AsyncProcess(target=targets.sleep, args=(1.0,)).start()
"""


def test_exit_handles_children_started_while_it_runs(tmp_path: Any) -> None:
    """SPEC 1: "the stdlib's exit handler calls join() synchronously on every active
    child, so an async join must not turn that into an un-awaited coroutine"."""
    import os
    import subprocess
    import sys

    from .helpers import reaping_orphans

    with reaping_orphans():
        out = subprocess.run(
            [sys.executable, "-W", "error::RuntimeWarning", "-c", _STARTS_DURING_EXIT],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert "thread: ProcessDied" in out.stdout  # exit stopped the first call's child
    assert "never awaited" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr


_DAEMON_WITHOUT_DESCRIPTORS = """
import multiprocessing
from aioproc import AsyncProcess
from aioproc._watchers import pidfd
from tests import targets

if __name__ == "__main__":
    pidfd.supported = False  # an old kernel, or a sandbox that refuses pidfd_open
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(
        target=targets.close_every_descriptor_then_sleep, args=(theirs, 60), daemon=True
    )
    p.start()
    theirs.close()
    assert ours.recv() == "ready"
    try:
        ours.recv()
    except EOFError:  # it has closed every descriptor it inherited
        print(p.pid, flush=True)
"""


def test_exit_without_pidfd_stops_a_daemon_that_closed_its_descriptors(tmp_path: Any) -> None:
    """Without pidfd, such a daemon was neither signalled nor waited for at exit: its
    readable sentinel made exit call it gone, then "still alive long after
    SIGKILL" (UnkillableProcessWarning), and it slept on.  Exit now terminates
    it and reaps it, as any daemon."""
    import os
    import subprocess
    import sys

    from .helpers import reaping_orphans, state_of

    with reaping_orphans():
        out = subprocess.run(
            [sys.executable, "-c", _DAEMON_WITHOUT_DESCRIPTORS],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            capture_output=True,
            text=True,
            timeout=30,
        )
        pid = int(out.stdout)
        assert state_of(pid) is None, "the daemon outlived the program"
    assert "UnkillableProcessWarning" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr
