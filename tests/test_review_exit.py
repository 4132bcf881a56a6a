"""Review: interpreter exit, uvloop, watchers changed between start and join, DaskPool."""

from __future__ import annotations

import threading
from typing import Any

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
    monkeypatch: pytest.MonkeyPatch, later: str
) -> None:
    """README: "A sigchld watch chosen by a start() outside any loop and then joined
    under uvloop moves to a thread watch automatically" -- set_watcher() only
    concerns "processes started from now on"."""
    monkeypatch.setattr(pidfd, "supported", False)
    p = AsyncProcess(target=targets.sleep, args=(0.3,))
    p.start()  # no loop, automatic choice: sigchld
    try:
        assert p.watcher == "sigchld"
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


# -- DaskPool: a worker that does not answer ------------------------------------------


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_dask_unreachable_worker_timeout_returns_at_the_documented_deadline(
    dask_cluster: Any, tmp_path: Any
) -> None:
    """README (Beyond one machine): "The client backs it with a deadline of
    `timeout + grace + 1 s` from the submission, for a worker that does not answer
    (stopped, partitioned): the caller then gets `ProcessTimeout` ... and the stop
    request is left on its way."  SPEC 7: "The caller gets control back within
    milliseconds of the timeout, even if the worker is unreachable"."""
    import os
    import signal
    import time

    from aioproc.dask import DaskPool

    from . import dask_targets
    from .test_dask import read_pids, wait_gone

    path = tmp_path / "pids"
    timeout, grace = 0.5, 0.2
    async with DaskPool(dask_cluster.address, grace=grace) as pool:
        stopped = None
        outcome: list[Any] = []
        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:

                    async def call() -> None:
                        start = time.monotonic()
                        try:
                            await pool.run(
                                dask_targets.pids_and_sleep, str(path), 300, timeout=timeout
                            )
                        except aioproc.ProcessTimeout as exc:
                            outcome.append(exc)
                        outcome.append(time.monotonic() - start)

                    tg.start_soon(call)
                    stopped, child, grandchild = await read_pids(path)
                    os.kill(stopped, signal.SIGSTOP)
        finally:
            if stopped is not None:
                os.kill(stopped, signal.SIGCONT)
        await wait_gone(child, grandchild)
    exc, elapsed = outcome
    assert isinstance(exc, aioproc.ProcessTimeout)
    assert "no answer from Dask worker" in str(exc)
    # Generous slack for a busy 2-core machine: 0.5 s beyond the documented deadline.
    assert elapsed < timeout + grace + 1.0 + 0.5, elapsed


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
