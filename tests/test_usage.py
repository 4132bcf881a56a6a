"""Resource usage on exit: what the kernel accounted to a child when it was reaped."""

from __future__ import annotations

import pickle
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess, ProcessDied, ProcessTimeout, RemoteTraceback, ResourceUsage
from aioproc._exit import _at_exit as _join_children_at_exit

from . import targets
from .helpers import DEADLINE

pytestmark = pytest.mark.anyio

MIB = 1 << 20
ALLOCATED = 200  # MiB


def usage_of(p: AsyncProcess) -> ResourceUsage | None:
    return p.resource_usage  # a call: no narrowing across the kill


def check_usage(usage: ResourceUsage | None) -> None:
    """The child of ``allocate_and_burn(ALLOCATED, 0.2)``, as the kernel saw it."""
    assert isinstance(usage, ResourceUsage)
    assert 0.1 <= usage.user_time < 60
    assert 0 <= usage.system_time < 60
    # At least what it wrote; far below what a KiB/byte mix-up would give.
    assert ALLOCATED * MIB <= usage.max_rss < 4096 * MIB


async def test_usage_after_join(watcher: str) -> None:
    p = AsyncProcess(target=targets.allocate_and_burn, args=(ALLOCATED, 0.2), context="fork")
    assert p.resource_usage is None  # not started
    p.start()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    check_usage(p.resource_usage)
    assert p.resource_usage is p.resource_usage  # collected once, kept
    p.close()
    with pytest.raises(ValueError, match="closed"):
        _ = p.resource_usage


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_usage_of_a_spawn_child() -> None:
    p = AsyncProcess(target=targets.allocate_and_burn, args=(ALLOCATED, 0.2), context="spawn")
    p.start()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    check_usage(p.resource_usage)
    p.close()


async def test_forkserver_children_have_none() -> None:
    """The fork server reaps them: the kernel's accounting never reaches us."""
    for watcher in ("pidfd", "sentinel"):
        aioproc.set_watcher(watcher)
        p = AsyncProcess(target=targets.exit_with, args=(3,), context="forkserver")
        p.start()
        with anyio.fail_after(DEADLINE):
            assert await p.join() == 3
        assert p.watcher == watcher
        assert p.resource_usage is None
        p.close()


def test_none_while_running_and_collected_by_every_sync_path() -> None:
    """is_alive(), exitcode, the exit handler's blocking wait: each reap keeps it."""
    for collect in ("is_alive", "exitcode", "exit handler"):
        p = AsyncProcess(target=targets.sleep, args=(30,), context="fork")
        p.start()
        assert usage_of(p) is None  # running
        p.kill()
        if collect == "is_alive":
            while p.is_alive():
                pass
        elif collect == "exitcode":
            while p.exitcode is None:
                pass
        else:
            _join_children_at_exit()
            assert p._popen is not None
            assert p._popen.returncode == -9
        usage = p.resource_usage
        assert isinstance(usage, ResourceUsage), collect
        assert usage.max_rss > 0
        p.close()


async def test_run_errors_carry_it() -> None:
    with anyio.fail_after(DEADLINE), pytest.raises(ProcessDied) as died:
        await aioproc.run(targets.hard_exit, 3, context="fork")
    assert isinstance(died.value.resource_usage, ResourceUsage)

    with anyio.fail_after(DEADLINE), pytest.raises(ProcessTimeout) as late:
        await aioproc.run(targets.sleep, 30, timeout=0.1, grace=0.5, context="fork")
    assert isinstance(late.value.resource_usage, ResourceUsage)

    with anyio.fail_after(DEADLINE), pytest.raises(RuntimeError, match="boom") as raised:
        await aioproc.run(targets.raise_error, context="fork")
    cause: Any = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert isinstance(cause.resource_usage, ResourceUsage)

    with anyio.fail_after(DEADLINE), pytest.raises(ProcessDied) as died:
        await aioproc.run(targets.hard_exit, 3, context="forkserver")
    assert died.value.resource_usage is None


def test_it_survives_pickling() -> None:
    usage = ResourceUsage(user_time=1.5, system_time=0.25, max_rss=123 * MIB)
    err = ProcessDied("died", pid=12, exitcode=-9, resource_usage=usage)
    copy = pickle.loads(pickle.dumps(err))
    assert copy.resource_usage == usage
    cause = pickle.loads(pickle.dumps(RemoteTraceback("text", usage)))
    assert (cause.traceback_text, cause.resource_usage) == ("text", usage)
