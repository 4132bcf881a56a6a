"""Edges of the promises of SPEC §2 and §6 that a hostile review found broken (now kept)."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sys
import time
from typing import Any

import pytest

import aioproc

from . import targets
from .helpers import state_of

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


# -- what children run (module level: picklable by name) ------------------------------


def my_pid() -> int:
    return os.getpid()


class Abort(BaseException):
    """A BaseException subclass that is not SystemExit/KeyboardInterrupt/GeneratorExit."""


def raise_abort(message: str) -> None:
    raise Abort(message)


def exit_in_initializer() -> None:
    sys.exit("bad configuration")


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _wait_zombie(pid: int) -> None:
    """Block (without yielding to the loop) until *pid* has exited; do not reap it."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


# -- 1. an idle worker that died is handed to the next call ----------------------------


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
async def test_idle_worker_killed_from_outside_does_not_fail_the_next_call(context: str) -> None:
    """SPEC §6: a worker that dies "fails only the call it was running ... The pool is
    never broken: the next call works."  An idle worker SIGKILLed from outside (the OOM
    killer) is taken by the next call if that call comes before the watcher ran."""
    async with aioproc.Pool(1, context=context) as pool:
        pid = await pool.run(my_pid)
        os.kill(pid, signal.SIGKILL)
        if context != "forkserver":
            _wait_zombie(pid)
        else:  # the fork server's child: wait (blocking the loop) until it has exited
            while state_of(pid) not in (None, "Z"):
                time.sleep(0.001)
        # The call never ran on that worker: it must not fail, and runs on another.
        assert await pool.run(my_pid) not in (pid, None)


# -- 2. BaseException subclasses raised by the function ---------------------------------


async def test_run_base_exception_subclass_keeps_its_type() -> None:
    """SPEC §2: "If func raises, the same exception type is raised in the parent".
    (concurrent.futures and anyio.to_process both send BaseException subclasses back.)"""
    with pytest.raises(Abort, match="stop here"):
        await aioproc.run(raise_abort, "stop here", context="fork")


async def test_pool_base_exception_subclass_keeps_its_type() -> None:
    """SPEC §6: the same result contract as run: the function's exception, same type."""
    async with aioproc.Pool(1, context="fork") as pool:
        with pytest.raises(Abort, match="stop here"):
            await pool.run(raise_abort, "stop here")


async def test_pool_initializer_calling_sys_exit_is_an_initializer_error() -> None:
    """SPEC §6: "if [the initializer] raises, the calls that needed that worker fail with an
    error that carries its exception".  sys.exit() in an initializer raises SystemExit."""
    async with aioproc.Pool(1, context="fork", initializer=exit_in_initializer) as pool:
        with pytest.raises(aioproc.InitializerError) as info:
            await pool.run(targets.noop)
    assert isinstance(info.value.__cause__, SystemExit)


# -- 2b. what the parent unpickles may raise a BaseException --------------------------


class ExitsWhenUnpickled:
    def __reduce__(self) -> tuple[object, ...]:
        return (sys.exit, ("unpickled in the parent",))


def return_exits_when_unpickled() -> ExitsWhenUnpickled:
    return ExitsWhenUnpickled()


class ErrorExitsWhenUnpickled(Exception):
    def __reduce__(self) -> tuple[object, ...]:
        return (sys.exit, ("unpickled in the parent",))


def raise_exits_when_unpickled() -> None:
    raise ErrorExitsWhenUnpickled("e")


async def _outcome(coro: Any) -> BaseException | None:
    """What awaiting *coro* raised (SystemExit too: caught so pytest survives it)."""
    try:
        await coro
    except BaseException as exc:
        return exc
    return None


async def test_run_result_that_cannot_be_unpickled_is_a_clear_error_not_system_exit() -> None:
    """SPEC §2: "An unpicklable argument or result is a clear error": a result whose
    unpickling raises SystemExit makes aioproc.run raise SystemExit (the program exits)."""
    outcome = await _outcome(aioproc.run(return_exits_when_unpickled, context="fork"))
    assert isinstance(outcome, pickle.UnpicklingError), f"got {outcome!r}"


async def test_run_exception_that_cannot_be_unpickled_is_a_remote_error() -> None:
    """SPEC §2 / RemoteError's docstring: an exception that cannot be unpickled in the
    parent arrives as RemoteError; here SystemExit escapes from aioproc.run."""
    outcome = await _outcome(aioproc.run(raise_exits_when_unpickled, context="fork"))
    assert isinstance(outcome, aioproc.RemoteError), f"got {outcome!r}"


async def test_pool_result_that_cannot_be_unpickled_is_a_clear_error_not_system_exit() -> None:
    async with aioproc.Pool(1, context="fork") as pool:
        outcome = await _outcome(pool.run(return_exits_when_unpickled))
        assert isinstance(outcome, pickle.UnpicklingError), f"got {outcome!r}"
        assert await pool.run(targets.add, 1, 2) == 3


# -- 3. a small idle_timeout turns the worker's watcher into a polling loop --------------


async def test_small_idle_timeout_does_not_poll_while_a_call_runs() -> None:
    """SPEC §6: workers are "joined by the same watchers: no thread and no polling in the
    parent".  While a call runs, the worker is not idle, yet its watcher wakes up every
    idle_timeout seconds."""
    async with aioproc.Pool(1, context="fork", idle_timeout=1e-6) as pool:
        await pool.run(targets.noop)  # worker started
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        await pool.run(sleep_for, 1.0)
        elapsed = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # A parent that waits for one 1-second call should use a few ms of CPU, not most of it.
    assert cpu < 0.2 * elapsed, f"parent used {cpu:.3f} s CPU while waiting {elapsed:.3f} s"
