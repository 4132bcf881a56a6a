"""Edges of SPEC §2, §6 and §7 that a fourth hostile review probed.

Pool.map was broken three ways (a BaseException subclass from the function
crashed the pool; an iterable that raised dropped the results of the items it
had given; an async iterable, which DaskPool.map takes, was refused).  What
held: large data both ways, run's options, DaskPool under trio.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioproc

from . import dask_targets
from .conftest import FORK_THREAD_WARNING
from .dask_fixtures import Cluster
from .helpers import state_of

pytestmark = pytest.mark.timeout(120)


def ident(x: object) -> object:
    return x


class Fatal(BaseException):
    """A BaseException subclass: pool.run keeps its type (test_contract_edges)."""


def fatal_at_3(x: int) -> int:
    if x == 3:
        raise Fatal("boom")
    return x


def three_then_fail() -> Iterator[int]:
    yield 0
    yield 1
    yield 2
    raise KeyError("the iterable failed")


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- 1. Pool.map: a BaseException subclass from func crashes the pool ----------------


async def test_pool_map_base_exception_subclass_is_raised_as_is_and_the_pool_survives() -> None:
    """README: a BaseException subclass comes back with its type (pool.run does it);
    the first error of map is raised; "the exception propagates as it was raised,
    never wrapped in a group"; the pool is never broken.  Observed: map's consumer
    is cancelled (trio: gets trio.Cancelled), the pool's own task group crashes and
    `async with Pool` raises a nested BaseExceptionGroup."""
    outcome: list[object] = []
    try:
        async with aioproc.Pool(2, context="fork") as pool:
            got: list[int] = []
            try:
                async for v in pool.map(fatal_at_3, range(8)):
                    got.append(v)
            except Fatal as exc:
                outcome.append(exc)
            assert await pool.run(ident, 7) == 7  # the pool still works
    except BaseException as exc:
        pytest.fail(f"the pool's block raised {exc!r}; map's consumer saw {outcome!r}")
    assert len(outcome) == 1
    assert isinstance(outcome[0], Fatal)


async def _collect(results: AsyncIterator[Any], into: list[Any]) -> None:
    async for value in results:
        into.append(value)


# -- 2. Pool.map: an iterable that fails mid-way drops the results of its items ------


async def test_pool_map_iterable_failing_midway_yields_the_earlier_results_first() -> None:
    """multiprocessing.Pool.imap (and a plain `for`) yields the results of the
    items the iterable produced, then raises the iterable's exception.  aioproc
    cancels the calls for items 0..2 (stopping their workers) and raises the
    KeyError without any result.  The README's "first call that fails stops the
    others" is about calls; items 0..2 succeeded."""
    got: list[object] = []
    async with aioproc.Pool(2, context="fork") as pool:
        with pytest.raises(KeyError):
            await _collect(pool.map(ident, three_then_fail()), got)
    assert got == [0, 1, 2]


# -- probes that held: map ------------------------------------------------------------


def pulls() -> Iterator[int]:
    i = 0
    while True:
        PULLED.append(i)
        yield i
        i += 1


PULLED: list[int] = []


@pytest.mark.parametrize("ordered", [True, False])
async def test_pool_map_endless_iterable_is_bounded_and_aclosing_stops_it(ordered: bool) -> None:
    PULLED.clear()
    async with aioproc.Pool(2, context="fork") as pool:
        results = pool.map(ident, pulls(), ordered=ordered)
        async with contextlib.aclosing(results) as it:  # type: ignore[type-var]
            async for _ in it:
                with anyio.fail_after(30):
                    while "busy=0" not in repr(pool):
                        await anyio.sleep(0.01)
                break
        assert len(PULLED) <= 2 * pool.workers + 1
        assert await pool.run(ident, 1) == 1


# -- 3. large data: cancellation mid-transfer leaves nothing, next call works --------


def big(n: int) -> bytes:
    return bytes(n)


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
async def test_large_transfers_cancelled_midway_leave_nothing(context: str) -> None:
    await aioproc.run(ident, 1, context=context)  # the fork server, if any, exists
    before = fds()
    async with aioproc.Pool(1, context=context) as pool:
        for delay in (0.02, 0.1, 0.3):
            with anyio.move_on_after(delay):
                await pool.run(big, 40 << 20)
            with anyio.move_on_after(delay):
                await pool.run(ident, bytes(40 << 20))
            with anyio.move_on_after(delay):
                await aioproc.run(big, 40 << 20, context=context)
        assert await pool.run(big, 1 << 20) == bytes(1 << 20)
        mv = await pool.run(ident, memoryview(bytearray(b"x" * (1 << 17))).cast("B", (512, 256)))
        assert isinstance(mv, memoryview)
        assert mv.shape == (512, 256)
    assert fds() <= before


# -- 4. DaskPool under trio (the bridge) -----------------------------------------------


@FORK_THREAD_WARNING
@pytest.mark.parametrize("anyio_backend", [pytest.param(("trio", {}), id="trio")])
async def test_daskpool_trio_errors_timeout_cancel(dask_cluster: Cluster, tmp_path: Path) -> None:
    from aioproc.dask import DaskPool

    async with DaskPool(dask_cluster.address) as pool:
        with pytest.raises(dask_targets.Refused):
            await pool.run(dask_targets.refuse, 1)
        start = time.monotonic()
        with pytest.raises(aioproc.ProcessTimeout):
            await pool.run(dask_targets.nap, 30, timeout=0.5)
        assert time.monotonic() - start < 10
        path = tmp_path / "pids"
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.run, dask_targets.pids_and_sleep, str(path), 60)
                with anyio.fail_after(30):
                    while not path.exists():
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        pids = [int(p) for p in path.read_text().split()]
        with anyio.fail_after(30):
            while any(state_of(p) not in (None, "Z") for p in pids[1:]):
                await anyio.sleep(0.01)
        assert [v async for v in pool.map(dask_targets.square, range(5))] == [0, 1, 4, 9, 16]
        got: list[int] = []
        with pytest.raises(dask_targets.Refused):
            await _collect(pool.map(dask_targets.refuse, range(3)), got)
        assert await pool.run(dask_targets.square, 3) == 9


# -- 5. Pool.map and DaskPool.map take different iterables ------------------------------


async def _numbers(n: int):  # type: ignore[no-untyped-def]
    for i in range(n):
        yield i


async def test_pool_map_takes_an_async_iterable_as_daskpool_map_does() -> None:
    """SPEC §7: "code written against pool.run and pool.map moves from one machine
    to a cluster by constructing the other pool".  DaskPool.map accepts an async
    iterable (aioproc/_dask/_pool.py _Map); Pool.map raises TypeError for one."""
    async with aioproc.Pool(1, context="fork") as pool:
        assert [v async for v in pool.map(ident, _numbers(3))] == [0, 1, 2]
