"""Timeouts: join()'s and run()'s, every accepted kind of value, and the wrong ones.

A join that times out returns None and leaves the child running; run's
timeout stops the child (SIGTERM, grace, SIGKILL), reaps it and raises
``ProcessTimeout``.  No test depends on how fast this machine is: a timeout
that must pass after the child started is retried longer if it had not.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess, ProcessTimeout

from . import targets
from .helpers import DEADLINE, handshake, pid_exists, state_of, stopped_by_sigterm


def started(target: Any, *args: Any, **kwargs: Any) -> AsyncProcess:
    p = AsyncProcess(target=target, args=args, **kwargs)
    p.start()
    return p


def assert_gone(pids: list[int]) -> None:
    alive = [(pid, state_of(pid)) for pid in pids if pid_exists(pid)]
    assert alive == [], "children still alive or unreaped (pid, state)"


# -- join ------------------------------------------------------------------------


async def test_join_timeout_returns_none_and_child_keeps_running(watcher: str) -> None:
    p = started(targets.sleep, 30)
    assert await p.join(0) is None
    assert await p.join(0.05) is None
    assert await p.join(timeout=0.0) is None
    assert p.exitcode is None
    assert p.is_alive()
    p.kill()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGKILL
    for _ in range(3):  # joined again and again: same answer, at once
        assert await p.join() == -signal.SIGKILL
        assert await p.join(0) == -signal.SIGKILL


async def test_many_joiners_all_wake(watcher: str) -> None:
    recv, send = multiprocessing.Pipe(duplex=False)
    p = started(targets.ready_then_sleep, send, 0.3)
    await handshake(recv)
    results: list[int | None] = []

    async def joiner() -> None:
        results.append(await p.join())

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(joiner)
    assert results == [0] * 50


@pytest.mark.parametrize(
    ("timeout", "error", "match"),
    [
        ("1", TypeError, "timeout must be a real number"),
        (True, TypeError, "timeout must be a real number"),
        ([], TypeError, "timeout must be a real number"),
        (-1, ValueError, "timeout must be >= 0"),
        (-0.5, ValueError, "timeout must be >= 0"),
        (float("nan"), ValueError, "NaN"),
    ],
)
async def test_bad_timeouts(timeout: Any, error: type[Exception], match: str) -> None:
    p = started(targets.noop)
    with pytest.raises(error, match=match):
        await p.join(timeout)
    with anyio.fail_after(DEADLINE):
        await p.join()


async def test_huge_and_infinite_timeouts() -> None:
    p = started(targets.sleep, 0.1)
    with anyio.fail_after(DEADLINE):
        assert await p.join(float("inf")) == 0
    q = started(targets.sleep, 0.1)
    with anyio.fail_after(DEADLINE):
        assert await q.join(1e300) == 0


@pytest.mark.parametrize(
    ("timeout", "running", "exited"),
    [
        (-0.0, None, 0),  # negative zero is zero: a poll
        (1e-9, None, 0),
        (Fraction(1, 50), None, 0),
        (sys.float_info.max, "waits", 0),
        (10**400, "waits", 0),  # too large for a float: forever
        (float("inf"), "waits", 0),
    ],
    ids=["-0.0", "1e-9", "Fraction", "float-max", "10**400", "inf"],
)
async def test_absurd_timeouts(timeout: Any, running: str | None, exited: int) -> None:
    """Tiny, huge and unusual timeouts mean what they say; none overflows a timer."""
    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(target=targets.ready_then_crash, args=(theirs, "exit"))
    p.start()
    with anyio.fail_after(DEADLINE):
        await anyio.wait_readable(ours.fileno())
    assert ours.recv() == "ready"
    if running is None:
        assert await p.join(timeout) is None
        assert p.is_alive()
        ours.send("go")
        with anyio.fail_after(DEADLINE):
            assert await p.join() == 99
        assert await p.join(timeout) == 99
    else:
        async with anyio.create_task_group() as tg:
            result: list[int | None] = []

            async def join() -> None:
                result.append(await p.join(timeout))

            tg.start_soon(join)
            await anyio.wait_all_tasks_blocked()
            ours.send("go")
        assert result == [99]
    p.close()
    ours.close()


# -- aioproc.run -------------------------------------------------------------------


async def timed_out_after_the_start(
    func: Callable[..., object], timeout: float, **options: Any
) -> tuple[ProcessTimeout, float, int]:
    """``run(func, conn, 60)`` until its timeout passes after the child has started.

    On a busy machine the child may not have reached the function when the
    timeout passes; then the call is made again with twice the timeout.
    Returns the error, the timeout that worked, and the pid the child sent.
    """
    while True:
        recv, send = multiprocessing.Pipe(duplex=False)
        with anyio.fail_after(DEADLINE), pytest.raises(ProcessTimeout) as info:
            await aioproc.run(func, send, 60, timeout=timeout, **options)
        started = recv.poll()
        pid = recv.recv() if started else None
        recv.close()
        send.close()
        if pid is not None:
            return info.value, timeout, pid
        assert timeout < DEADLINE / 4, f"the child never started within {timeout:g} s"
        timeout *= 2


async def test_timeout_terminates_reaps_and_raises(watcher: str) -> None:
    err, timeout, pid = await timed_out_after_the_start(targets.send_pid_then_sleep, 0.5)
    assert isinstance(err, TimeoutError)
    assert err.pid == pid
    assert err.exitcode == -signal.SIGTERM
    assert str(err) in stopped_by_sigterm(
        f"process {err.pid} running send_pid_then_sleep() did not finish within {timeout:g} s; "
    )
    assert_gone([err.pid])


async def test_timeout_escalates_to_sigkill() -> None:
    """A child that ignores SIGTERM is killed after the grace period."""
    err, _, pid = await timed_out_after_the_start(
        targets.ignore_sigterm_send_pid_then_sleep, 1, grace=0.2
    )
    assert err.pid == pid
    assert err.exitcode == -signal.SIGKILL
    assert "it was sent SIGTERM, then SIGKILL after the 0.2 s grace period, and reaped" in str(err)
    assert_gone([err.pid])


async def test_result_within_timeout_is_returned() -> None:
    with anyio.fail_after(DEADLINE):
        assert await aioproc.run(targets.sleep_and_return, 0.01, timeout=DEADLINE) == 0.01
