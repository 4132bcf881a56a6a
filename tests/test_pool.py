"""aioproc.Pool: reused workers that keep every promise of aioproc.run (SPEC §6)."""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest
import uvloop

import aioproc
from aioproc import (
    AsyncProcess,
    InitializerError,
    PoolClosed,
    ProcessDied,
    ProcessTimeout,
    RemoteError,
    RemoteTraceback,
)

from . import targets
from .helpers import (
    children_of_this_process,
    fork_server_and_helpers,
    open_fds,
    pid_exists,
    stopped_by_sigterm,
    warmed_up,
)

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # pragma: no cover
    from typing_extensions import assert_type

pytestmark = pytest.mark.anyio

CONTEXTS = ["fork", "forkserver", "spawn"]
DEADLINE = 60  # seconds; anything slower is a hang


# -- what the workers run (importable by name, for spawn and forkserver) ----------------


def ready_then_sleep(path: str, seconds: float) -> float:
    """Say "ready" (our pid) through the FIFO at *path*, then sleep."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return seconds


def ready_then_wait(path: str, go: str) -> str:
    """Say "ready" (our pid) through the FIFO at *path*, then return once *go* says so."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    with open(go) as f:
        return f.readline().strip()


def ignore_sigterm_ready_then_sleep(path: str, seconds: float) -> float:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return ready_then_sleep(path, seconds)


def grandchild_ready_then_sleep(path: str, seconds: float) -> None:
    """Start a grandchild, say "ready" with both pids, then sleep."""
    grandchild = targets.start_grandchild()
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {grandchild}\n")
    time.sleep(seconds)


def leave_processes_behind() -> tuple[int, int, int]:
    """A child, an orphan (its parent exited) and one in a session of its own; pids."""
    child = subprocess.Popen(["sleep", "1000"]).pid
    out = subprocess.run(
        ["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True
    )
    orphan = int(out.stdout)
    own_session = subprocess.Popen(["sleep", "1000"], start_new_session=True).pid
    return child, orphan, own_session


def append_to(path: str, text: str) -> str:
    with open(path, "a") as f:
        f.write(text)
    return text


_initialized: object = None


def remember(value: object) -> None:
    global _initialized
    _initialized = value


def remembered() -> object:
    return _initialized


def refuse_to_start(message: str) -> None:
    raise ValueError(message)


def same(value: Any) -> Any:
    return value


def fail_on(bad: int, value: int) -> int:
    if value == bad:
        raise KeyError(value)
    time.sleep(0.01)
    return value


async def coroutine_function() -> None:
    pass


def parent_as_seen() -> tuple[bool, str]:
    """``parent_process().is_alive()``, and what its sentinel descriptor is."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    assert parent is not None
    try:
        kind = os.readlink(f"/proc/self/fd/{parent.sentinel}")
    except OSError as exc:
        kind = f"closed ({exc.strerror})"
    return parent.is_alive(), kind


# -- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def go_fifo(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A FIFO a worker waits on (``ready_then_wait``), and our write end."""
    path = tmp_path / "go"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)  # never blocks, and the worker's open does not either
    try:
        yield str(path), fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def fifo(tmp_path: Path, name: str = "ready") -> Iterator[tuple[str, int]]:
    """A FIFO a worker writes "ready" to, and our non-blocking read end."""
    path = tmp_path / name
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        yield str(path), fd
    finally:
        os.close(fd)


async def ready(fd: int) -> list[int]:
    """The pids a worker wrote to its FIFO, once it has."""
    data = b""
    with anyio.fail_after(DEADLINE):
        while not data.endswith(b"\n"):
            await anyio.wait_readable(fd)
            data += os.read(fd, 100)
    return [int(p) for p in data.split()]


def exited_soon(pid: int) -> bool:
    """Whether *pid* (a grandchild, not ours to reap) has exited, or does within seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], 10)[0])
    finally:
        os.close(fd)


def workers_of_this_process() -> set[int]:
    return children_of_this_process() - fork_server_and_helpers()


def reaped(pid: int) -> bool:
    """Whether the worker *pid* is gone: not a child of ours, alive or zombie (its
    pid may already name another process: pid_max is 32768 on busy machines)."""
    return pid not in children_of_this_process()


async def until_gone(pid: int) -> None:
    """Wait until the worker *pid* has exited and been reaped (an idle worker exiting)."""
    with anyio.fail_after(DEADLINE):
        while not reaped(pid):
            await anyio.sleep(0.01)


# -- results, over every backend x start method ---------------------------------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_values_exceptions_and_reuse(context: str) -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, context=context) as pool:
            pid = await pool.run(targets.getpid)
            assert pid != os.getpid()
            assert await pool.run(targets.add, 2, 3) == 5
            assert await pool.run(targets.getpid) == pid  # the same worker, reused
            with pytest.raises(ValueError, match=r"^bad input$") as info:
                await pool.run(targets.raise_value_error, "bad input")
            cause = info.value.__cause__
            assert isinstance(cause, RemoteTraceback)
            assert "in raise_value_error" in cause.traceback_text
            assert "outcome_of" not in cause.traceback_text
            with pytest.raises(RemoteError) as remote:
                await pool.run(targets.raise_unpicklable)
            assert remote.value.type_name == "tests.targets.HoldsALock"
            with pytest.raises(pickle.PicklingError, match="cannot be pickled to send it back"):
                await pool.run(targets.return_lock)
            with pytest.raises(pickle.UnpicklingError, match="cannot be unpickled here"):
                await pool.run(targets.return_loads_only_in_a_child)
            assert await pool.run(targets.getpid) == pid  # none of that broke the worker
    assert reaped(pid)


async def test_static_types() -> None:
    """mypy checks this file: the result has the function's return type."""
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1) as pool:
            result = await pool.run(targets.add, 1, 2)
            assert_type(result, int)
            async for value in pool.map(targets.churn_code, []):
                assert_type(value, int)
            if TYPE_CHECKING:  # checked by mypy, never run
                await pool.run(targets.add, "1", 2)  # type: ignore[arg-type]
                await pool.run(targets.add, 1)  # type: ignore[arg-type]
                await pool.run(targets.greet, "x", punctuation="!")  # type: ignore[arg-type]


@pytest.mark.parametrize("context", CONTEXTS)
async def test_unpicklable_arguments_are_named_and_nothing_is_sent(context: str) -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, context=context) as pool:
            before = workers_of_this_process()
            with pytest.raises(pickle.PicklingError) as info:
                await pool.run(targets.describe, 1, threading.Lock())
            assert str(info.value).startswith(
                f"cannot send argument 1 of describe() (an object of type _thread.lock) to a "
                f"{context} pool worker (TypeError: cannot pickle '_thread.lock' object)"
            )
            assert "every call to a Pool's worker is pickled" in str(info.value)
            with pytest.raises(pickle.PicklingError, match=r"^cannot send the function <function"):
                await pool.run(lambda: None)
            assert workers_of_this_process() == before  # no worker was even started
            assert await pool.run(targets.add, 1, 1) == 2


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
async def test_argument_that_cannot_be_rebuilt_in_the_worker(context: str) -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, context=context) as pool:
            with pytest.raises(pickle.UnpicklingError, match=r"could not unpickle describe\(\)"):
                await pool.run(targets.describe, targets.LoadsOnlyInTheParent())
            assert await pool.run(targets.add, 1, 1) == 2


# -- a worker that dies -----------------------------------------------------------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_worker_killed_from_outside_fails_only_its_call(context: str, tmp_path: Path) -> None:
    with (
        anyio.fail_after(DEADLINE),
        fifo(tmp_path) as (path, fd),
        fifo(tmp_path, "2") as (p2, fd2),
        go_fifo(tmp_path) as (go_path, go),
    ):
        async with aioproc.Pool(2, context=context) as pool:
            outcome: list[BaseException] = []
            survivor: list[str] = []

            async def call() -> None:
                try:
                    await pool.run(ready_then_sleep, path, 60)
                except ProcessDied as exc:
                    outcome.append(exc)

            async def other_call() -> None:
                survivor.append(await pool.run(ready_then_wait, p2, go_path))

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                tg.start_soon(other_call)
                (pid,) = await ready(fd)
                (other,) = await ready(fd2)
                os.kill(pid, signal.SIGKILL)
                while not outcome:
                    await anyio.sleep(0.001)
                assert survivor == []  # it failed while the other call still ran
                assert pid_exists(other)
                os.write(go, b"done\n")
            (err,) = outcome
            assert isinstance(err, ProcessDied)
            assert (err.pid, err.exitcode) == (pid, -9)
            assert str(err).startswith(
                f"pool worker {pid} running ready_then_sleep() died with SIGKILL (exit code -9) "
                "before returning a result"
            )
            assert survivor == ["done"]  # the other worker was left alone
            assert reaped(pid)
            assert pid_exists(other)
            assert await pool.run(targets.add, 1, 2) == 3  # the pool is not broken


async def test_a_worker_forked_while_another_is_forgotten_keeps_its_parent_sentinel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork worker closes the pool's pipe ends it inherited, those open at its fork.

    Starting a worker yields before the fork (``start_async``), and another task
    may forget a dead worker meanwhile, closing its ends: their numbers are then
    the first the new child opens (its parent's sentinel, a pidfd of the
    parent).  Closing a list made before that wait closed them too, and the
    worker's ``parent_process().is_alive()`` said False while the pool's
    process lived.  The wait is widened here: the other worker dies in it.
    """
    await warmed_up("fork")
    held: list[int] = []
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        async with aioproc.Pool(2, context="fork") as pool:
            died: list[BaseException] = []

            async def call() -> None:
                try:
                    await pool.run(ready_then_sleep, path, 60)
                except ProcessDied as exc:
                    died.append(exc)

            original = AsyncProcess._start_async

            async def start_while_another_is_forgotten(self: AsyncProcess, around: Any) -> None:
                os.kill(pid, signal.SIGKILL)
                while any(w.pid == pid for w in pool._all):
                    await anyio.sleep(0.001)
                # The dead worker's ends are now the lowest free numbers.
                while (filler := os.open(os.devnull, os.O_RDONLY)) < min(ends):
                    held.append(filler)
                os.close(filler)
                await original(self, around)

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    (pid,) = await ready(fd)
                    (first,) = pool._all
                    ends = (first.req_fd, first.res_fd)
                    monkeypatch.setattr(
                        AsyncProcess, "_start_async", start_while_another_is_forgotten
                    )
                    alive, kind = await pool.run(parent_as_seen)
                    monkeypatch.undo()
            finally:
                for filler in held:
                    os.close(filler)
            assert len(died) == 1
            assert alive, f"the worker sees its parent as gone; its sentinel is {kind}"
            # A pidfd of the parent, or the stdlib's pipe without pidfds.
            assert kind.startswith(("anon_inode:[pidfd]", "pipe:")), kind


async def test_crashes_are_process_died_with_the_signal() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1) as pool:
            with pytest.raises(ProcessDied, match=r"died with SIGSEGV \(exit code -11\)") as info:
                await pool.run(targets.segfault)
            assert info.value.exitcode == -11
            with pytest.raises(ProcessDied, match="exited with code 3 before returning"):
                await pool.run(targets.hard_exit, 3)
            with pytest.raises(ProcessDied, match="exited with code 4"):
                await pool.run(targets.exit_via_sys_exit, 4)
            assert await pool.run(targets.add, 1, 2) == 3


# -- timeouts and cancellation -------------------------------------------------------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_timeout_stops_only_that_worker(context: str, tmp_path: Path) -> None:
    with (
        anyio.fail_after(DEADLINE),
        fifo(tmp_path) as (path, fd),
        fifo(tmp_path, "2") as (p2, fd2),
        go_fifo(tmp_path) as (go_path, go),
    ):
        # The worker dies of the SIGTERM at once; a generous grace keeps a busy
        # machine (a fork server slow to report the exit) from turning that
        # into a SIGKILL and another message.
        async with aioproc.Pool(2, context=context, grace=DEADLINE / 4) as pool:
            outcome: list[BaseException] = []
            survivor: list[str] = []

            async def call() -> None:
                try:
                    await pool.run(grandchild_ready_then_sleep, path, 60, timeout=1)
                except ProcessTimeout as exc:
                    outcome.append(exc)

            async def other_call() -> None:
                survivor.append(await pool.run(ready_then_wait, p2, go_path))

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                tg.start_soon(other_call)
                pid, grandchild = await ready(fd)
                (other,) = await ready(fd2)
                while not outcome:
                    await anyio.sleep(0.001)
                assert survivor == []  # the timeout stopped its call while the other ran
                os.write(go, b"done\n")
            (err,) = outcome
            assert isinstance(err, ProcessTimeout)
            assert isinstance(err, TimeoutError)
            assert (err.pid, err.exitcode) == (pid, -signal.SIGTERM)
            assert str(err) in stopped_by_sigterm(
                f"pool worker {pid} running grandchild_ready_then_sleep() did not finish "
                "within 1 s; "
            )
            assert reaped(pid)
            assert exited_soon(grandchild)  # its group was stopped with it
            assert survivor == ["done"]
            assert pid_exists(other)
            assert await pool.run(targets.add, 1, 2) == 3


async def test_timeout_counts_from_the_start_on_a_worker() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1) as pool:
            await pool.run(targets.noop)
            results: list[float] = []

            async def call(seconds: float, timeout: float) -> None:
                results.append(await pool.run(targets.sleep_and_return, seconds, timeout=timeout))

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, 1.0, 30)
                await anyio.sleep(0.05)
                tg.start_soon(call, 0.01, 0.9)  # waits ~1 s for the worker, runs 0.01 s
            assert results == [1.0, 0.01]


async def test_timeout_escalates_to_sigkill_and_caller_regains_control(tmp_path: Path) -> None:
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        async with aioproc.Pool(1, grace=0.2) as pool:
            pids: list[int] = []

            async def watch() -> None:
                pids.extend(await ready(fd))

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                start = time.monotonic()
                with pytest.raises(ProcessTimeout) as info:
                    await pool.run(ignore_sigterm_ready_then_sleep, path, 60, timeout=1)
                took = time.monotonic() - start
            assert info.value.exitcode == -signal.SIGKILL
            assert "then SIGKILL after the 0.2 s grace period" in str(info.value)
            assert took >= 1.2
            assert reaped(pids[0])


async def test_cancellation_stops_the_worker_then_propagates(tmp_path: Path) -> None:
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        async with aioproc.Pool(1) as pool:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pool.run, grandchild_ready_then_sleep, path, 60)
                    pid, grandchild = await ready(fd)
                    scope.cancel()
            assert scope.cancelled_caught
            assert reaped(pid)
            assert exited_soon(grandchild)
            assert await pool.run(targets.add, 1, 2) == 3


async def test_cancelled_while_waiting_starts_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        async with aioproc.Pool(1) as pool:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.run, ready_then_sleep, path, 0.5)
                await ready(fd)
                with anyio.CancelScope() as waiting:
                    waiting.cancel()
                    await pool.run(append_to, str(log), "should not run")
                with anyio.move_on_after(0.05):
                    await pool.run(append_to, str(log), "nor this")
            assert await pool.run(append_to, str(log), "this") == "this"
    assert log.read_text() == "this"


async def test_waiting_is_first_come_first_served(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        async with aioproc.Pool(1) as pool, anyio.create_task_group() as tg:
            tg.start_soon(pool.run, ready_then_sleep, path, 0.3)
            await ready(fd)
            for i in range(8):
                tg.start_soon(pool.run, append_to, str(log), f"{i} ")
                await anyio.lowlevel.checkpoint()  # each one queues before the next
    assert log.read_text() == "0 1 2 3 4 5 6 7 "


# -- nothing left behind ---------------------------------------------------------------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_a_call_leaves_no_process_behind(context: str) -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, context=context) as pool:
            worker = await pool.run(targets.getpid)
            pids = await pool.run(leave_processes_behind)
            for pid in pids:
                assert not pid_exists(pid), f"{pid} outlived the call"
            assert await pool.run(targets.getpid) == worker  # and the worker is kept


async def test_no_worker_thread_or_descriptor_left() -> None:
    gc.collect()
    before = open_fds()
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(2) as pool:
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(pool.run, targets.add, i, i)
            with pytest.raises(ProcessDied):
                await pool.run(targets.hard_exit, 1)
            with pytest.raises(ProcessTimeout):
                await pool.run(targets.sleep, 30, timeout=0.05)
            assert len(workers_of_this_process()) <= 2  # the two that failed are gone
    assert workers_of_this_process() == set()
    gc.collect()
    assert open_fds() - before == set()


def _count_threads(backend: str, options: dict[str, Any]) -> list[int]:
    async def main() -> list[int]:
        counts = [threading.active_count()]
        async with aioproc.Pool(2) as pool:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(pool.run, targets.add, i, i)
            counts.append(threading.active_count())
            with pytest.raises(ProcessTimeout):
                await pool.run(targets.sleep, 30, timeout=0.05)
            counts.append(threading.active_count())
        return counts

    return anyio.run(main, backend=backend, backend_options=options)


@pytest.mark.parametrize(
    ("backend", "options"),
    [("asyncio", {}), ("asyncio", {"loop_factory": uvloop.new_event_loop}), ("trio", {})],
    ids=["asyncio", "uvloop", "trio"],
)
def test_no_thread_in_the_parent(backend: str, options: dict[str, Any]) -> None:
    """Its own loop: anyio's pytest plugin runs trio in guest mode, with a thread."""
    before, during, after = _count_threads(backend, options)
    assert (during, after) == (before, before)  # (other tests may have left idle threads)


# -- the options ------------------------------------------------------------------------------


async def test_max_tasks_per_worker() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, max_tasks_per_worker=2) as pool:
            pids = [await pool.run(targets.getpid) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


async def test_idle_workers_exit_after_idle_timeout() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, idle_timeout=0.2) as pool:
            pid = await pool.run(targets.getpid)
            await until_gone(pid)
            assert await pool.run(targets.getpid) != pid


@pytest.mark.parametrize("context", CONTEXTS)
async def test_initializer_runs_in_each_new_worker(context: str) -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(
            1, context=context, initializer=remember, initargs=("set up",), max_tasks_per_worker=1
        ) as pool:
            await pool.run(targets.getpid)  # a worker of its own (max_tasks_per_worker=1)
            assert await pool.run(remembered) == "set up"
            assert await pool.run(remembered) == "set up"


@pytest.mark.parametrize("context", CONTEXTS)
async def test_initializer_that_raises_fails_the_call_without_a_respawn_loop(
    context: str,
) -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(
            2, context=context, initializer=refuse_to_start, initargs=["no"]
        ) as pool:
            for _ in range(2):
                with pytest.raises(InitializerError) as info:
                    await pool.run(targets.add, 1, 2)
                err = info.value
                assert str(err).startswith(
                    f"the pool's initializer refuse_to_start() raised ValueError in new worker "
                    f"{err.pid}, so add() could not run"
                )
                cause = err.__cause__
                assert isinstance(cause, ValueError)
                assert str(cause) == "no"
                assert "in refuse_to_start" in cause.__cause__.traceback_text  # type: ignore[union-attr]
                await until_gone(err.pid)
            assert workers_of_this_process() == set()


async def test_workers_none_means_the_cpus_we_may_use() -> None:
    assert aioproc.Pool().workers == len(os.sched_getaffinity(0))


# -- async with --------------------------------------------------------------------------------


async def test_normal_exit_waits_for_calls_in_progress() -> None:
    results: list[float] = []
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            async with aioproc.Pool(1) as pool:

                async def call() -> None:
                    results.append(await pool.run(targets.sleep_and_return, 0.3))

                tg.start_soon(call)
                tg.start_soon(call)  # waits for the worker; still served
                await anyio.sleep(0.05)
            assert results == [0.3, 0.3]
            assert workers_of_this_process() == set()


async def test_exit_by_exception_stops_the_calls_in_progress(tmp_path: Path) -> None:
    outcome: list[BaseException] = []
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        async with anyio.create_task_group() as tg:
            pool = aioproc.Pool(2)

            async def call(*args: Any) -> None:
                try:
                    await pool.run(*args)
                except PoolClosed as exc:
                    outcome.append(exc)

            async def body() -> tuple[int, int]:
                async with pool:
                    tg.start_soon(call, grandchild_ready_then_sleep, path, 60)
                    pid, grandchild = await ready(fd)
                    raise KeyError((pid, grandchild))

            with pytest.raises(KeyError) as info:  # as it was raised: not in a group
                await body()
            pid, grandchild = info.value.args[0]
    (err,) = outcome
    assert str(err).startswith("the pool closed (its `async with` block ended by an exception")
    assert reaped(pid)
    assert exited_soon(grandchild)
    assert workers_of_this_process() == set()


async def test_exit_by_cancellation_stops_the_workers(tmp_path: Path) -> None:
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        with anyio.CancelScope() as scope:
            async with aioproc.Pool(2) as pool, anyio.create_task_group() as tg:
                tg.start_soon(pool.run, ready_then_sleep, path, 60)
                (pid,) = await ready(fd)
                scope.cancel()
        assert scope.cancelled_caught
        assert reaped(pid)
    assert workers_of_this_process() == set()


async def test_calls_outside_async_with_are_clear_errors() -> None:
    pool = aioproc.Pool(1)
    with pytest.raises(PoolClosed, match=r"^the pool is not open; use it inside `async with"):
        await pool.run(targets.noop)
    async with pool:
        await pool.run(targets.noop)
    with pytest.raises(PoolClosed, match=r"^the pool is closed .* create a new Pool"):
        await pool.run(targets.noop)
    with pytest.raises(PoolClosed, match="the pool is closed"):
        pool.map(same, [])
    with pytest.raises(RuntimeError, match="a Pool can be entered once"):
        async with pool:
            pass


async def test_a_pool_belongs_to_one_event_loop() -> None:
    async with aioproc.Pool(1) as pool:
        await pool.run(targets.noop)
        errors: list[BaseException] = []

        def other_loop() -> None:
            try:
                anyio.run(pool.run, targets.noop)
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_loop)
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        (err,) = errors
        assert str(err).startswith("this Pool belongs to the event loop that entered it")


def test_unpicklable_initializer_is_refused_at_once() -> None:
    with pytest.raises(
        pickle.PicklingError, match=r"^cannot send argument 0 of remember\(\) .* to a spawn pool"
    ):
        aioproc.Pool(1, context="spawn", initializer=remember, initargs=(threading.Lock(),))
    with pytest.raises(pickle.PicklingError, match=r"^cannot send the function <function"):
        aioproc.Pool(1, context="forkserver", initializer=lambda: None)
    aioproc.Pool(1, context="fork", initializer=lambda: None)  # fork: inherited


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: aioproc.Pool(0), ValueError, r"^workers must be >= 1, got 0$"),
        (lambda: aioproc.Pool(-2), ValueError, "workers must be >= 1"),
        (lambda: aioproc.Pool(1.5), TypeError, r"^workers must be an int >= 1, not float 1.5$"),  # type: ignore[arg-type]
        (lambda: aioproc.Pool(True), TypeError, "workers must be an int"),
        (lambda: aioproc.Pool("2"), TypeError, "workers must be an int"),  # type: ignore[arg-type]
        (lambda: aioproc.Pool(1, max_tasks_per_worker=0), ValueError, "max_tasks_per_worker"),
        (
            lambda: aioproc.Pool(1, idle_timeout=-1),
            ValueError,
            r"idle_timeout must be >= 0 \(0: a worker exits once idle",
        ),
        (lambda: aioproc.Pool(1, grace=-1), ValueError, "grace must be a finite"),
        (lambda: aioproc.Pool(1, context="nope"), ValueError, "unknown start method"),
        (lambda: aioproc.Pool(1, initializer=3), TypeError, "initializer must be a callable"),  # type: ignore[arg-type]
        (lambda: aioproc.Pool(1, initargs=3), TypeError, "initargs must be a tuple"),  # type: ignore[arg-type]
    ],
)
def test_bad_construction(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


async def test_bad_calls() -> None:
    async with aioproc.Pool(1) as pool:
        with pytest.raises(TypeError, match=r"^func must be a callable, not int"):
            await pool.run(3)  # type: ignore[arg-type]
        with pytest.raises(
            TypeError,
            match=r"^coroutine_function\(\) is an async function; Pool.run\(\) calls a plain "
            r"function in the child.*functools.partial\(anyio.run, func\)",
        ):
            _ = await pool.run(coroutine_function)
        with pytest.raises(
            TypeError,
            match=r"^Pool.run\(\) got an unexpected keyword argument 'punctuation'; keyword "
            r"arguments for greet\(\) go through functools.partial",
        ):
            await pool.run(targets.greet, "x", punctuation="!")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="timeout must be a real number"):
            await pool.run(targets.noop, timeout="1")  # type: ignore[arg-type]
        with pytest.raises(
            TypeError, match="iterable must be an iterable or an async iterable, not int"
        ):
            pool.map(same, 3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ordered must be True or False"):
            pool.map(same, [], ordered=None)  # type: ignore[arg-type]
        assert workers_of_this_process() == set()


# -- map ------------------------------------------------------------------------------------------


async def test_map_in_order_and_as_they_come() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(2) as pool:
            assert [v async for v in pool.map(same, range(50))] == list(range(50))
            got = [v async for v in pool.map(same, range(50), ordered=False)]
            assert sorted(got) == list(range(50))
            assert [v async for v in pool.map(same, [])] == []


async def test_map_over_an_endless_iterable_keeps_a_bounded_number_in_flight() -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(2) as pool:
            results: AsyncIterator[int] = pool.map(same, endless())
            async with contextlib.aclosing(results):  # type: ignore[type-var]
                async for value in results:
                    if value == 20:
                        break
            assert pulled <= 20 + 1 + 2 * pool.workers
            assert await pool.run(targets.add, 1, 2) == 3


async def test_map_first_error_stops_the_rest_and_is_raised() -> None:
    seen: list[int] = []
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(2) as pool:

            async def consume() -> None:
                async for value in pool.map(functools.partial(fail_on, 5), range(1000)):
                    seen.append(value)

            with pytest.raises(KeyError) as info:
                await consume()
            assert info.value.args == (5,)
            assert isinstance(info.value.__cause__, RemoteTraceback)
            assert len(seen) < 100
            assert await pool.run(targets.add, 1, 2) == 3


async def test_map_with_timeout() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(2) as pool:
            with pytest.raises(ProcessTimeout):
                async for _ in pool.map(targets.sleep_and_return, [0.01, 30, 0.01], timeout=0.3):
                    pass
            assert await pool.run(targets.add, 1, 2) == 3


# -- payloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_big_arguments_and_results(context: str) -> None:
    size = 100 << 20
    data = targets.pattern(size)
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, context=context) as pool:
            assert await pool.run(len, data) == size
            back = await pool.run(targets.pattern, size)
            assert type(back) is bytes
            assert back == data
            del back
            mutable = await pool.run(bytearray, memoryview(data)[: 1 << 20])
            assert type(mutable) is bytearray
            assert mutable == data[: 1 << 20]
            echoed = await pool.run(same, [bytearray(data[:200_000]), b"small", data[:70_000]])
            assert echoed == [bytearray(data[:200_000]), b"small", data[:70_000]]
            assert [type(x) for x in echoed] == [bytearray, bytes, bytes]
            view = memoryview(bytearray(data[: 1 << 20])).cast("I")
            round_trip = await pool.run(same, view)
            assert type(round_trip) is memoryview
            assert round_trip.format == "I"
            assert round_trip.tobytes() == view.tobytes()


# -- hostile conditions ------------------------------------------------------------------------


def ready_then_exit(path: str, seconds: float, code: int) -> None:
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    os._exit(code)


async def test_worker_reaped_by_someone_else(tmp_path: Path) -> None:
    """A foreign waitpid takes the worker's status: ExitStatusLost, and the pool goes on."""
    outcome: list[BaseException] = []
    with anyio.fail_after(DEADLINE), fifo(tmp_path) as (path, fd):
        async with aioproc.Pool(1) as pool:

            async def call() -> None:
                try:
                    await pool.run(ready_then_exit, path, 0.2, 3)
                except aioproc.ExitStatusLost as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                (pid,) = await ready(fd)
                assert os.waitpid(pid, 0)[0] == pid  # blocks the loop for 0.2 s at most
            (err,) = outcome
            assert f"child pid {pid} was consumed by someone else" in str(err)
            assert await pool.run(targets.add, 1, 2) == 3


async def test_already_cancelled_call_sends_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1) as pool:
            pid = await pool.run(targets.getpid)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await pool.run(append_to, str(log), "no")
            assert await pool.run(targets.getpid) == pid  # the worker was not stopped
    assert not log.exists()


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_cancellation_at_any_moment_leaves_a_working_pool(context: str) -> None:
    """Cancel calls after 0 to 30 ms: while waiting, starting a worker, sending, running."""
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(2, context=context) as pool:
            for i in range(40):
                with anyio.move_on_after(i * 0.00075):
                    async with anyio.create_task_group() as tg:
                        for _ in range(3):
                            tg.start_soon(pool.run, targets.sleep_and_return, 0.01)
                assert len(workers_of_this_process()) <= 2 or context != "fork"
            assert await pool.run(targets.add, 1, 2) == 3
    assert workers_of_this_process() == set()


def fork_and_return() -> int:
    """Fork, and return in both copies: only the worker's own answer may arrive."""
    return os.fork()


async def test_a_forked_copy_of_the_worker_does_not_answer() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1) as pool:
            for _ in range(3):
                child = await pool.run(fork_and_return)
                assert child > 0  # the worker's answer, not the copy's (0)
                assert reaped(child)
            assert await pool.run(targets.add, 1, 2) == 3


async def test_idle_timeout_zero_retires_a_worker_once_it_is_free() -> None:
    with anyio.fail_after(DEADLINE):
        async with aioproc.Pool(1, idle_timeout=0) as pool:
            first = await pool.run(targets.getpid)
            await until_gone(first)
            assert await pool.run(targets.getpid) != first
