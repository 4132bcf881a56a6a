"""aioproc.run: a function's result from a child, and no child left behind."""

from __future__ import annotations

import asyncio
import functools
import gc
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import warnings
from multiprocessing import resource_tracker
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest
import uvloop

import aioproc
import aioproc._exit
import aioproc._run
from aioproc import (
    ProcessDied,
    ProcessError,
    ProcessTimeout,
    RemoteError,
    RemoteTraceback,
    UnkillableProcessWarning,
)

from . import targets
from .helpers import (
    DEADLINE,
    SCRIPTS,
    Tracer,
    children_of_this_process,
    fork_server_and_helpers,
    handshake,
    open_fds,
    pid_exists,
    reaping_orphans,
    state_of,
)

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # pragma: no cover
    from typing_extensions import assert_type

pytestmark = pytest.mark.anyio

CONTEXTS = ["fork", "forkserver", "spawn"]
ASYNCIO_UVLOOP = ("asyncio", {"loop_factory": uvloop.new_event_loop})
REPO = Path(__file__).resolve().parent.parent
RT_SIGNAL = int(signal.SIGRTMIN) + 1  # a signal without a name of its own


def assert_gone(pids: list[int]) -> None:
    alive = [(pid, state_of(pid)) for pid in pids if pid_exists(pid)]
    assert alive == [], "children still alive or unreaped (pid, state)"


# -- results, over every backend x watcher x start method ---------------------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_returns_the_value(watcher: str, context: str) -> None:
    with anyio.fail_after(DEADLINE):
        pid = await aioproc.run(targets.getpid, context=context)
        assert await aioproc.run(targets.add, 2, 3, context=context) == 5
    assert pid != os.getpid()
    assert_gone([pid])


async def test_keyword_arguments_through_partial() -> None:
    greet = functools.partial(targets.greet, punctuation="!")
    with anyio.fail_after(DEADLINE):
        assert await aioproc.run(greet, "susan") == "hello susan!"


async def test_static_types() -> None:
    """mypy checks this file: the result has the function's return type."""
    with anyio.fail_after(DEADLINE):
        result = await aioproc.run(targets.add, 1, 2)
    assert_type(result, int)
    if TYPE_CHECKING:  # checked by mypy, never run: wrong argument types are refused
        await aioproc.run(targets.add, "1", 2)  # type: ignore[arg-type]
        await aioproc.run(targets.add, 1)  # type: ignore[arg-type]


async def test_big_result_does_not_deadlock(watcher: str) -> None:
    """100 MiB, far beyond a pipe's buffer: the pipe is drained while the child is joined."""
    size = 100 << 20
    with anyio.fail_after(DEADLINE):
        data = await aioproc.run(targets.pattern, size, context="fork")
    assert len(data) == size
    assert data == targets.pattern(size)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("context", ["forkserver", "spawn"])
async def test_big_result_other_start_methods(context: str) -> None:
    size = 100 << 20
    with anyio.fail_after(DEADLINE):
        data = await aioproc.run(targets.pattern, size, context=context)
    assert data == targets.pattern(size)


async def test_no_fd_left_open(watcher: str) -> None:
    gc.collect()
    before = open_fds()
    with anyio.fail_after(DEADLINE):
        for _ in range(10):
            assert await aioproc.run(targets.add, 1, 1) == 2
        with pytest.raises(ValueError, match="boom"):
            await aioproc.run(targets.raise_value_error, "boom")
        with pytest.raises(ProcessDied):
            await aioproc.run(targets.hard_exit, 1)
        with pytest.raises(ProcessTimeout):
            await aioproc.run(targets.sleep, 30, timeout=0.05)
    gc.collect()
    assert open_fds() - before == set()


# -- exceptions -----------------------------------------------------------------------


@pytest.mark.parametrize("context", CONTEXTS)
async def test_exception_same_type_with_the_childs_traceback(context: str) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(ValueError, match=r"^bad input$") as info:
        await aioproc.run(targets.raise_value_error, "bad input", context=context)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in raise_value_error" in cause.traceback_text
    assert "raise ValueError(message)" in cause.traceback_text
    assert cause.traceback_text.rstrip().endswith("ValueError: bad input")
    assert "outcome_of" not in cause.traceback_text  # aioproc's own frame is left out
    assert cause.traceback_text in str(cause)


async def test_exception_keeps_attributes_notes_and_chain_text() -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(targets.CarriesData) as info:
        await aioproc.run(targets.raise_with_data)
    assert info.value.code == 42
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == ["a note from the child"]
    with anyio.fail_after(DEADLINE), pytest.raises(RuntimeError, match="lookup failed") as chained:
        await aioproc.run(targets.raise_chained)
    text = chained.value.__cause__.traceback_text  # type: ignore[union-attr]
    assert "KeyError: 'missing'" in text
    assert "direct cause" in text


@pytest.mark.parametrize(
    ("target", "type_name", "message"),
    [
        (targets.raise_unpicklable, "tests.targets.HoldsALock", "locked in"),
        (targets.raise_unloadable, "tests.targets.NeedsTwoArguments", "half of it"),
    ],
    ids=["not-picklable-in-child", "not-unpicklable-in-parent"],
)
async def test_exception_that_cannot_cross_becomes_remote_error(
    target: Any, type_name: str, message: str
) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(RemoteError) as info:
        await aioproc.run(target)
    err = info.value
    assert (err.type_name, err.message) == (type_name, message)
    assert str(err) == f"{type_name}: {message}"
    assert f"in {target.__name__}" in err.traceback_text
    assert isinstance(err.__cause__, RemoteTraceback)
    assert err.__cause__.traceback_text == err.traceback_text
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.type_name, copy.message, copy.traceback_text) == (
        err.type_name,
        err.message,
        err.traceback_text,
    )


# -- a child that dies without a result --------------------------------------------


@pytest.mark.parametrize(
    ("target", "args", "exitcode", "words"),
    [
        (targets.hard_exit, (3,), 3, "exited with code 3"),
        (targets.exit_via_sys_exit, (4,), 4, "exited with code 4"),
        (targets.kill_self, (signal.SIGKILL,), -9, "died with SIGKILL (exit code -9)"),
        (targets.segfault, (), -11, "died with SIGSEGV (exit code -11)"),
        (
            targets.kill_self,
            (RT_SIGNAL,),
            -RT_SIGNAL,
            f"died with signal {RT_SIGNAL} (exit code {-RT_SIGNAL})",
        ),
    ],
    ids=["os._exit", "sys.exit", "sigkill", "segfault", "realtime-signal"],
)
async def test_child_dies_without_result(
    watcher: str, target: Any, args: tuple[Any, ...], exitcode: int, words: str
) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(ProcessDied) as info:
        await aioproc.run(target, *args)
    err = info.value
    assert isinstance(err, ProcessError)
    assert err.exitcode == exitcode
    hint = " (SIGKILL: the out-of-memory killer, or another process, killed it)"
    assert str(err) == (
        f"process {err.pid} running {target.__name__}() {words} before returning a result"
        + (hint if exitcode == -9 else "")
    )
    assert_gone([err.pid])


@pytest.mark.parametrize("context", CONTEXTS)
async def test_out_of_memory_comes_back_as_memory_error(context: str) -> None:
    """RLIMIT_AS in the child: the allocation fails, MemoryError crosses over."""
    with anyio.fail_after(DEADLINE), pytest.raises(MemoryError) as info:
        await aioproc.run(targets.allocate_beyond_rlimit_as, context=context)
    assert "in allocate_beyond_rlimit_as" in info.value.__cause__.traceback_text  # type: ignore[union-attr]


async def test_killed_while_out_of_memory_is_process_died() -> None:
    """A child that has taken all the memory RLIMIT_AS allows, then SIGKILL.

    The kernel's out-of-memory killer acts with SIGKILL; here the test sends it,
    so as not to drive this shared machine out of memory.
    """
    recv, send = multiprocessing.Pipe(duplex=False)
    outcome: list[BaseException] = []

    async def run_it() -> None:
        try:
            await aioproc.run(targets.run_out_of_memory_then_wait, send)
        except ProcessDied as exc:
            outcome.append(exc)

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_it)
            pid, hoarded = await handshake(recv)
            assert hoarded > 0
            os.kill(pid, signal.SIGKILL)
    (err,) = outcome
    assert isinstance(err, ProcessDied)
    assert err.exitcode == -signal.SIGKILL
    assert "died with SIGKILL" in str(err)
    assert "out-of-memory killer" in str(err)
    assert err.pid == pid


async def test_exit_status_taken_by_someone_else() -> None:
    """Another part of the program reaps the child before it returned: ExitStatusLost.

    (One that had returned gives its result: test_lost_status.py.)
    """
    recv, send = multiprocessing.Pipe(duplex=False)
    outcome: list[BaseException] = []

    async def run_it() -> None:
        try:
            await aioproc.run(targets.send_pid_then_sleep, send, 60)
        except aioproc.ExitStatusLost as exc:
            outcome.append(exc)

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_it)
            pid = await handshake(recv)
            os.kill(pid, signal.SIGKILL)
            assert os.waitpid(pid, 0)[0] == pid
    (err,) = outcome
    assert f"child pid {pid} was consumed by someone else" in str(err)


# -- timeouts and cancellation ---------------------------------------------------------


async def test_cancel_scope_stops_the_child_then_propagates(watcher: str) -> None:
    """A cancelled scope: SIGTERM is ignored, so SIGKILL after the grace period."""
    recv, send = multiprocessing.Pipe(duplex=False)
    reached_the_end = False
    with anyio.fail_after(DEADLINE):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    functools.partial(
                        aioproc.run,
                        targets.ignore_sigterm_send_pid_then_sleep,
                        send,
                        60,
                        grace=0.1,
                    )
                )
                pid = await handshake(recv)
                scope.cancel()
                await anyio.sleep(DEADLINE)
            reached_the_end = True
    assert scope.cancelled_caught
    assert not reached_the_end
    assert_gone([pid])


async def test_already_cancelled_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_start(*args: object) -> None:
        raise AssertionError("a child was started in a cancelled scope")

    monkeypatch.setattr(aioproc._run, "_prepare", must_not_start)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await aioproc.run(targets.noop)
    assert scope.cancelled_caught


@pytest.mark.parametrize("anyio_backend", ["asyncio", ASYNCIO_UVLOOP], ids=["asyncio", "uvloop"])
async def test_asyncio_task_cancel_stops_the_child() -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    task = asyncio.ensure_future(aioproc.run(targets.send_pid_then_sleep, send, 60))
    pid = await handshake(recv)
    task.cancel()
    with anyio.fail_after(DEADLINE), pytest.raises(asyncio.CancelledError):
        await task
    assert_gone([pid])


async def test_failing_sibling_stops_the_other_children(watcher: str) -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    pids: list[int] = []

    async def fail_once_the_others_run() -> None:
        while len(pids) < 3:
            pids.append(await handshake(recv))
        await aioproc.run(targets.raise_value_error, "sibling failed")

    async def group() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(aioproc.run, targets.send_pid_then_sleep, send, 60)
            tg.start_soon(fail_once_the_others_run)

    with anyio.fail_after(DEADLINE), pytest.raises(Exception) as info:  # noqa: PT011
        await group()
    assert type(info.value).__name__ == "ExceptionGroup"
    assert info.group_contains(ValueError, match="sibling failed")
    assert_gone(pids)


async def test_cancelled_task_group_of_50_leaves_no_child(
    watcher: str, request: pytest.FixtureRequest, record_property: Any
) -> None:
    """50 runs in a task group, cancelled half-way: 25 returned, 25 still running.

    Every child reports its pid (the finished ones as their result, the running
    ones on a pipe); afterwards none of the 50 pids may exist, not even as a
    zombie.
    """
    n = 50
    recv, send = multiprocessing.Pipe(duplex=False)
    finished: list[int] = []
    running: list[int] = []
    half_finished = anyio.Event()

    async def quick() -> None:
        finished.append(await aioproc.run(targets.getpid))
        if len(finished) == n // 2:
            half_finished.set()

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                if i % 2:
                    tg.start_soon(aioproc.run, targets.send_pid_then_sleep, send, 60)
                else:
                    tg.start_soon(quick)
            while len(running) < n // 2:
                running.append(await handshake(recv))
            await half_finished.wait()
            tg.cancel_scope.cancel()
    started = finished + running
    alive = [pid for pid in started if pid_exists(pid)]
    line = f"children started: {len(set(started))}, alive afterwards: {len(alive)}"
    print(f"\n[{request.node.callspec.id}] {line}")
    record_property("cancellation", line)
    assert len(set(started)) == n
    assert alive == []
    assert children_of_this_process() & set(started) == set()


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
async def test_cancelled_task_group_other_start_methods(context: str) -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    pids: list[int] = []
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(
                    functools.partial(
                        aioproc.run, targets.send_pid_then_sleep, send, 60, context=context
                    )
                )
            while len(pids) < 6:
                pids.append(await handshake(recv))
            tg.cancel_scope.cancel()
    assert_gone(pids)


# -- a child that survives SIGKILL --------------------------------------------------------


async def test_child_that_survives_sigkill_is_reported_and_reaped_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cleanup gives up after a bounded wait, warns, and reaps the child later.

    The child is really killed (SIGTERM ignored, then SIGKILL) while a ptrace
    tracer holds it in its exit stop: dying, not dead, not reapable, its pidfd
    not readable, as a child stuck in the kernel.
    """
    monkeypatch.setattr(aioproc._run, "_KILL_WAIT", 0.3)
    recv, send = multiprocessing.Pipe(duplex=False)
    tracers: list[Tracer] = []

    async def cancel_while_held() -> int:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    functools.partial(
                        aioproc.run,
                        targets.ignore_sigterm_send_pid_then_sleep,
                        send,
                        60,
                        grace=0.1,
                    )
                )
                pid: int = await handshake(recv)
                tracers.append(Tracer(pid))
                scope.cancel()
                await anyio.sleep(DEADLINE)
        assert scope.cancelled_caught
        return pid

    try:
        with anyio.fail_after(DEADLINE):
            # Not pytest.warns: it would record, then re-raise, the fork warning of
            # a trio test's lingering thread (Python >= 3.12).
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always", aioproc.UnkillableProcessWarning)
                pid = await cancel_while_held()
            (tracer,) = tracers
            assert [str(w.message) for w in warned if w.category is UnkillableProcessWarning] == [
                f"process {pid} is still alive 0.3 s after SIGKILL (stuck in the kernel, or "
                "stopped by a debugger); aioproc stopped waiting for it and will reap it "
                "later, at the next aioproc.run() or at interpreter exit"
            ]
            assert tracer.readline() == "holding\n"
            assert state_of(pid) == "t"  # stopped in its exit, not reaped
            assert pid in aioproc._exit._stragglers
            assert pid not in [p.pid for p in multiprocessing.active_children()]
            tracer.release()
            fd = os.pidfd_open(pid)
            try:
                await anyio.wait_readable(fd)
            finally:
                os.close(fd)
            assert state_of(pid) == "Z"
            await aioproc.run(targets.noop)  # the next run reaps it
        assert aioproc._exit._stragglers == {}
        assert not pid_exists(pid)
    finally:
        for tracer in tracers:
            if tracer.proc.returncode is None:
                tracer.release()


# -- pickling ------------------------------------------------------------------------------


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
async def test_unpicklable_argument_is_a_clear_error_and_starts_nothing(context: str) -> None:
    resource_tracker.ensure_running()  # started by spawn's first attempt, and kept
    gc.collect()
    before = children_of_this_process()
    fds_before = open_fds()
    with pytest.raises(pickle.PicklingError) as info:
        await aioproc.run(targets.describe, 1, threading.Lock(), context=context)
    assert str(info.value).startswith(
        f"cannot send argument 1 of describe() (an object of type _thread.lock) to a {context} "
        "child (TypeError: cannot pickle '_thread.lock' object)"
    )
    assert "context='fork'" in str(info.value)
    with pytest.raises(pickle.PicklingError, match=r"^cannot send the function <function"):
        await aioproc.run(lambda: None, context=context)
    assert children_of_this_process() - before <= fork_server_and_helpers()
    assert open_fds() - fds_before == set()


async def test_fork_does_not_pickle_arguments() -> None:
    lock = threading.Lock()
    with anyio.fail_after(DEADLINE):
        assert await aioproc.run(repr, lock, context="fork") == repr(lock)
        assert await aioproc.run(lambda: 7, context="fork") == 7


@pytest.mark.parametrize("context", CONTEXTS)
async def test_unpicklable_result_is_a_clear_error(context: str) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(pickle.PicklingError) as info:
        await aioproc.run(targets.return_lock, context=context)
    assert str(info.value).startswith("the result of return_lock() in process ")
    assert (
        "(an object of type _thread.lock) cannot be pickled to send it back "
        "(TypeError: cannot pickle '_thread.lock' object)"
    ) in str(info.value)


async def test_result_that_cannot_be_rebuilt_in_the_parent() -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(pickle.UnpicklingError) as info:
        await aioproc.run(targets.return_loads_only_in_a_child)
    assert str(info.value).startswith(
        "the result of return_loads_only_in_a_child() (an object of type "
        "tests.targets.LoadsOnlyInAChild) came back from process "
    )
    assert str(info.value).endswith(
        "but cannot be unpickled here (ImportError: this object cannot be rebuilt in the "
        "parent); return a type the parent can import"
    )
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
async def test_argument_that_cannot_be_rebuilt_in_the_child(context: str) -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(pickle.UnpicklingError) as info:
        await aioproc.run(targets.describe, targets.LoadsOnlyInTheParent(), context=context)
    assert "could not unpickle describe() or its arguments" in str(info.value)
    assert "ImportError: this object cannot be rebuilt in the child" in str(info.value)


# -- Ctrl-C ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "context"),
    [
        ("asyncio", "fork"),
        ("uvloop", "fork"),
        ("trio", "fork"),
        ("asyncio", "spawn"),
        ("asyncio", "forkserver"),
    ],
)
def test_ctrl_c_to_the_process_group(backend: str, context: str, tmp_path: Path) -> None:
    """SIGINT to the whole group: no child prints a traceback, the parent stops them all.

    The start method matters for the children, the backend for the parent.
    """
    script = SCRIPTS / "ctrl_c.py"
    with reaping_orphans():
        proc = subprocess.Popen(
            [sys.executable, str(script), backend, context],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
            assert ready, "the script did not start its children"
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 4, proc.communicate(timeout=DEADLINE)
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=DEADLINE)
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "interrupted, alive: []"
    assert "KeyboardInterrupt" not in err
    assert "Traceback" not in err
    assert_gone(pids)


async def test_sigint_mask_is_restored_after_start() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with anyio.fail_after(DEADLINE):
        await aioproc.run(targets.noop, context="spawn")
        await aioproc.run(targets.noop, context="fork")
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


async def test_start_waits_in_the_loop_with_sigint_blocked_only_while_creating_the_child() -> None:
    """4 MiB of arguments for a spawn child: ``run`` writes them as the child reads
    (on the call's own pipe, once the child exists), other tasks run meanwhile, and
    none of them sees SIGINT blocked (a child they started would inherit the mask)."""
    seen: list[bool] = []
    done = anyio.Event()

    async def other_task() -> None:
        while not done.is_set():
            seen.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()))
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            await anyio.lowlevel.checkpoint()
            turns = len(seen)
            send = aioproc._run._Inbox._send_call
            turns_during_send = 0

            async def counting_send(self: aioproc._run._Inbox) -> None:
                nonlocal turns_during_send
                before = len(seen)
                await send(self)
                turns_during_send = len(seen) - before

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(aioproc._run._Inbox, "_send_call", counting_send)
                assert await aioproc.run(len, b"x" * (4 << 20), context="spawn") == 4 << 20
            done.set()
    assert len(seen) > turns
    assert turns_during_send > 0  # the 4 MiB waited for the child in the loop
    assert not any(seen)


def test_process_errors_survive_pickling() -> None:
    for err in (
        ProcessDied("died", pid=12, exitcode=-9),
        ProcessTimeout("late", pid=13, exitcode=None),
    ):
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err)
        assert (str(copy), copy.pid, copy.exitcode) == (str(err), err.pid, err.exitcode)
    assert isinstance(ProcessTimeout("late", pid=1, exitcode=None), TimeoutError)
