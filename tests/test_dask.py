"""aioproc.dask.DaskPool on a real LocalCluster (127.0.0.1, two non-daemonic workers).

Every async test runs on asyncio, uvloop and trio.  What a call leaves on a
worker is checked in /proc: the functions write their pids (worker, child,
grandchild) to a file, the test reads it and checks that they are gone.  The
cluster is another process tree, so "gone" means not running: dead and
reaped, or a zombie waiting for a reaper that is not ours.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

import aioproc
from aioproc.dask import DaemonicWorkers, DaskPool, WorkerLost

from . import dask_targets as targets
from .conftest import FORK_THREAD_WARNING
from .dask_fixtures import Cluster
from .helpers import killed_afterwards, state_of
from .test_guarantees import modules_after

pytestmark = pytest.mark.timeout(120)

HAS_POOL = "Pool" in aioproc.__all__


@pytest.fixture(params=["pool", "fresh"])
def child_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the workers run a call: a worker-local aioproc.Pool, or a fresh child each."""
    mode: str = request.param
    if mode == "pool" and not HAS_POOL:
        pytest.skip("this aioproc has no Pool (SPEC 6, issue 12): workers use fresh children")
    monkeypatch.setenv("AIOPROC_DASK_CHILD", mode)
    return mode


async def read_pids(path: Path) -> list[int]:
    """Wait for the function on the worker to write its pids (the handshake)."""
    with anyio.fail_after(30):
        while not os.path.exists(path):  # noqa: ASYNC240 - a stat, microseconds
            await anyio.sleep(0.005)
    with open(path) as f:  # noqa: ASYNC230 - written whole and renamed: complete once there
        return [int(p) for p in f.read().split()]


def running(pid: int) -> bool:
    return state_of(pid) not in (None, "Z")


async def wait_gone(*pids: int) -> float:
    """Seconds until none of *pids* runs; fails after a generous deadline."""
    start = time.monotonic()
    with anyio.fail_after(30):
        while any(running(pid) for pid in pids):
            await anyio.sleep(0.002)
    return time.monotonic() - start


# -- results -------------------------------------------------------------------------


async def test_run_returns_the_value_from_a_child_of_a_worker(
    dask_cluster: Cluster, child_mode: str
) -> None:
    async with DaskPool(dask_cluster.address) as pool:
        assert await pool.run(targets.square, 7) == 49
        worker_pid, child_pid = await pool.run(targets.where)
    assert worker_pid in dask_cluster.worker_pids.values()
    assert child_pid != worker_pid
    if child_mode == "fresh":
        assert not running(child_pid)


async def test_a_local_function_and_a_lambda_travel_by_value(dask_cluster: Cluster) -> None:
    """cloudpickle, as Dask uses: what a script or a notebook defines reaches the child."""
    offset = 5

    def add(x: int) -> int:
        return x + offset

    async with DaskPool(dask_cluster.address) as pool:
        assert await pool.run(add, 1) == 6
        assert await pool.run(lambda: os.getpid() > 0)


async def test_map_in_order_and_as_finished(dask_cluster: Cluster) -> None:
    async with DaskPool(dask_cluster.address) as pool:
        assert [x async for x in pool.map(targets.square, range(6))] == [0, 1, 4, 9, 16, 25]
        # Two workers: 0.0 starts when the 0.05 call is done, long before 1.0 is.
        finished = [x async for x in pool.map(targets.nap, [1.0, 0.05, 0.0], ordered=False)]
        assert finished == [0.05, 0.0, 1.0]


async def test_map_stops_at_the_first_error(dask_cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "pids"
    async with DaskPool(dask_cluster.address) as pool:

        def first_fails(i: int) -> None:
            if i == 0:
                targets.pids_and_sleep(str(path), 300)
            else:
                import time as t

                while not path.exists():
                    t.sleep(0.005)
                targets.refuse(i)

        with pytest.raises(targets.Refused, match="refused 1"):
            async for _ in pool.map(first_fails, range(2)):
                pass
        pids = [int(p) for p in path.read_text().split()]
        await wait_gone(*pids[1:])


async def test_leaving_map_early_stops_the_calls_in_flight(
    dask_cluster: Cluster, tmp_path: Path
) -> None:
    path = tmp_path / "pids"

    def second_sleeps(i: int) -> int:
        if i == 1:
            targets.pids_and_sleep(str(path), 300)
        import time as t

        while not path.exists():
            t.sleep(0.005)
        return i

    async with DaskPool(dask_cluster.address) as pool:
        async with contextlib.aclosing(pool.map(second_sleeps, range(2))) as results:
            async for value in results:
                assert value == 0
                break
        _, child, grandchild = await read_pids(path)
        assert not running(child)  # stopped before aclose() returned
        await wait_gone(grandchild)


# -- exceptions ----------------------------------------------------------------------


async def test_the_exception_keeps_its_type_and_the_remote_traceback(
    dask_cluster: Cluster,
) -> None:
    async with DaskPool(dask_cluster.address) as pool:
        with pytest.raises(targets.Refused, match="refused 3") as info:
            await pool.run(targets.refuse, 3)
    cause = info.value.__cause__
    assert isinstance(cause, aioproc.RemoteTraceback)
    assert "in refuse" in cause.traceback_text
    assert "Refused: refused 3" in cause.traceback_text


async def test_an_exception_that_cannot_be_unpickled_is_a_remote_error(
    dask_cluster: Cluster,
) -> None:
    def raise_local() -> None:
        class Local(Exception):  # cannot be pickled by reference
            pass

        raise Local("only here")

    async with DaskPool(dask_cluster.address) as pool:
        with pytest.raises(aioproc.RemoteError, match="Local: only here") as info:
            await pool.run(raise_local)
    assert isinstance(info.value.__cause__, aioproc.RemoteTraceback)


async def test_a_crash_is_process_died_and_the_worker_lives_on(
    dask_cluster: Cluster, child_mode: str
) -> None:
    async with DaskPool(dask_cluster.address) as pool:
        with pytest.raises(aioproc.ProcessDied, match="SIGSEGV") as info:
            await pool.run(targets.segfault)
        assert info.value.exitcode == -signal.SIGSEGV
        assert "on Dask worker tcp://127.0.0.1:" in str(info.value)
        worker_pids = {(await pool.run(targets.where))[0] for _ in range(4)}
    assert worker_pids <= set(dask_cluster.worker_pids.values())


# -- timeout, cancellation: nothing left on the worker --------------------------------


async def test_timeout_stops_child_and_grandchild_on_the_worker(
    dask_cluster: Cluster, tmp_path: Path, child_mode: str
) -> None:
    path = tmp_path / "pids"
    async with DaskPool(dask_cluster.address) as pool:
        with pytest.raises(aioproc.ProcessTimeout, match=r"did not finish within 0\.5 s") as info:
            await pool.run(targets.pids_and_sleep, str(path), 300, timeout=0.5)
        assert isinstance(info.value, TimeoutError)
        assert info.value.exitcode == -signal.SIGTERM
        worker, child, grandchild = await read_pids(path)
        assert not running(child)
        await wait_gone(grandchild)
        assert running(worker)


async def test_cancellation_stops_child_and_grandchild_on_the_worker(
    dask_cluster: Cluster, tmp_path: Path, child_mode: str
) -> None:
    path = tmp_path / "pids"
    async with DaskPool(dask_cluster.address) as pool:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.run, targets.pids_and_sleep, str(path), 300)
                worker, child, grandchild = await read_pids(path)
                tg.cancel_scope.cancel()
        # The cancellation returned once the worker had stopped the child.
        assert not running(child)
        await wait_gone(grandchild)
        assert running(worker)
        assert await pool.run(targets.square, 3) == 9


async def test_a_call_leaves_no_process_on_the_worker(
    dask_cluster: Cluster, child_mode: str
) -> None:
    """What the function left running is gone; a fresh child too (a pool's stays, idle)."""
    async with DaskPool(dask_cluster.address) as pool:
        child, grandchild = await pool.run(targets.leave_grandchild)
    if child_mode == "fresh":
        assert not running(child)
    await wait_gone(grandchild)


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01, 0.05])
async def test_a_call_cancelled_at_any_moment_leaves_nothing_running(
    dask_cluster: Cluster, tmp_path: Path, delay: float
) -> None:
    """Cancelled on its way (submitted, queued, starting, running): once the
    cancellation returns, the call never starts, or what it started is gone."""
    path = tmp_path / "pids"
    async with DaskPool(dask_cluster.address) as pool:
        with anyio.move_on_after(delay):
            await pool.run(targets.pids_and_sleep, str(path), 300)
        # Both workers answer a later call: what was on its way has arrived.
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(pool.run, targets.square, 2)
        if os.path.exists(path):  # noqa: ASYNC240 - a stat
            _, child, grandchild = await read_pids(path)
            assert not running(child)
            await wait_gone(grandchild)


async def test_a_call_cancelled_while_it_waits_for_a_slot_starts_nothing(
    dask_cluster: Cluster, tmp_path: Path
) -> None:
    paths = [tmp_path / f"pids{i}" for i in range(3)]
    async with DaskPool(dask_cluster.address) as pool:
        async with anyio.create_task_group() as tg:
            for path in paths[:2]:  # both workers busy
                tg.start_soon(pool.run, targets.pids_and_sleep, str(path), 300)
            pids = [await read_pids(path) for path in paths[:2]]
            with anyio.move_on_after(0.3):
                await pool.run(targets.pids_and_sleep, str(paths[2]), 300)
            tg.cancel_scope.cancel()
        for _, child, grandchild in pids:
            await wait_gone(child, grandchild)
        assert not paths[2].exists()


# -- the worker that goes away ------------------------------------------------------


async def test_a_worker_that_does_not_answer_is_a_client_side_timeout(
    dask_cluster: Cluster, tmp_path: Path, anyio_backend: Any
) -> None:
    """The worker is stopped (SIGSTOP): the caller regains control at its deadline,
    timeout + grace + 1 s from the call (README); it used to wait 1 s more for
    the stop request to reach the worker."""
    if anyio_backend != ("asyncio", {"debug": True}):
        pytest.skip("one loop is enough: the deadline is the client loop's")
    path = tmp_path / "pids"
    took: list[float] = []
    async with DaskPool(dask_cluster.address, grace=0.2) as pool:
        stopped = None
        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:

                    async def call() -> None:
                        start = time.monotonic()
                        with pytest.raises(
                            aioproc.ProcessTimeout, match="no answer from Dask worker"
                        ):
                            await pool.run(targets.pids_and_sleep, str(path), 300, timeout=0.5)
                        took.append(time.monotonic() - start)

                    tg.start_soon(call)
                    stopped, child, grandchild = await read_pids(path)
                    os.kill(stopped, signal.SIGSTOP)
        finally:
            if stopped is not None:
                os.kill(stopped, signal.SIGCONT)
        # Once it runs again, the worker stops the call it was told to stop.
        await wait_gone(child, grandchild)
    # 0.5 s of slack beyond the deadline, for a busy 2-core machine.
    assert took[0] < 0.5 + 0.2 + 1.0 + 0.5, f"the call returned after {took[0]:.2f} s"


def test_worker_lost_survives_pickling() -> None:
    lost = pickle.loads(pickle.dumps(WorkerLost("gone", worker="tcp://w:1", key="k")))
    assert isinstance(lost, WorkerLost)
    assert (str(lost), lost.worker, lost.key, lost.pid, lost.exitcode) == (
        "gone",
        "tcp://w:1",
        "k",
        0,
        None,
    )


# -- checks at connection, misuse -----------------------------------------------------


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_daemonic_workers_are_refused_with_the_fix() -> None:
    cluster = Cluster("--daemonic", "--workers", "1")
    try:
        with pytest.raises(DaemonicWorkers, match="daemonic") as info:
            async with DaskPool(cluster.address):
                pass
    finally:
        cluster.close()
    message = str(info.value)
    assert next(iter(cluster.worker_pids)) in message
    assert "dask worker --no-nanny" in message
    assert "distributed.worker.daemon" in message


def test_dask_pool_none_starts_and_stops_its_own_local_cluster() -> None:
    """Two at once too, warnings as errors: the second cluster's scheduler found
    port 8787 taken, warned, and so failed to start."""
    script = (
        "import anyio, os\n"
        "from aioproc.dask import DaskPool\n"
        "from tests.dask_targets import where\n"
        "async def main():\n"
        "    async with DaskPool(workers=1) as pool:\n"
        "        worker, child = await pool.run(where)\n"
        "        print(worker != os.getpid(), child != worker)\n"
        "async def two():\n"
        "    async with DaskPool(workers=1) as a, DaskPool(workers=1) as b:\n"
        "        print(await a.run(abs, -1) + await b.run(abs, -2) == 3)\n"
        "if __name__ == '__main__':\n"
        "    for backend in ('asyncio', 'trio'):\n"
        "        anyio.run(main, backend=backend)\n"
        "    anyio.run(two)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"] * 5


def test_import_aioproc_does_not_import_dask() -> None:
    dask_modules = ("dask", "distributed", "cloudpickle", "aioproc.dask", "aioproc._dask")
    assert modules_after("import aioproc; aioproc.run; aioproc.ProcessError", dask_modules) == set()


async def test_misuse_is_a_clear_error(dask_cluster: Cluster) -> None:
    with pytest.raises(TypeError, match="scheduler address"):
        DaskPool(8786)
    with pytest.raises(ValueError, match="local cluster"):
        DaskPool("tcp://127.0.0.1:1", workers=2)
    with pytest.raises(TypeError, match="cannot travel"):
        DaskPool(context=__import__("multiprocessing").get_context("fork"))
    with pytest.raises(ValueError, match="unknown start method"):
        DaskPool(context="vfork")
    with pytest.raises(ValueError, match="retries"):
        DaskPool(retries=-1)
    pool = DaskPool(dask_cluster.address)
    with pytest.raises(aioproc.PoolClosed, match="enter it first"):  # as Pool's
        await pool.run(targets.square, 1)
    async with pool:
        with pytest.raises(ValueError, match="timeout"):
            await pool.run(targets.square, 1, timeout=-1)
        with pytest.raises(TypeError, match="async function"):
            await pool.run(cast(Any, anyio.sleep), 1)
        with pytest.raises(pickle.PicklingError, match="square"):
            await pool.run(targets.square, threading.Lock())  # type: ignore[arg-type]
        with pytest.raises(pickle.PicklingError, match="lock") as info:
            await pool.run(targets.unpicklable_result)
        assert isinstance(info.value.__cause__, aioproc.RemoteTraceback)
        with pytest.raises(RuntimeError, match="entered once"):
            await pool.__aenter__()
        errors: list[BaseException] = []

        def from_another_loop() -> None:
            try:
                anyio.run(pool.run, targets.square, 1)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=from_another_loop)
        thread.start()
        thread.join()  # the refusal comes before any await
        assert len(errors) == 1
        assert isinstance(errors[0], RuntimeError)
        assert "belongs to the event loop" in str(errors[0])
    with pytest.raises(aioproc.PoolClosed, match="closed"):
        await pool.run(targets.square, 1)


def test_trio_bridge_creates_no_thread_per_call(dask_cluster: Cluster) -> None:
    """One thread for the pool's client loop, whatever the number of calls in flight."""

    async def main() -> tuple[int, int]:
        async with DaskPool(dask_cluster.address) as pool:
            await pool.run(targets.square, 1)
            idle = threading.active_count()
            most = idle
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(pool.run, targets.nap, 0.05)
                for _ in range(100):
                    await anyio.sleep(0.005)
                    most = max(most, threading.active_count())
            return idle, most

    before = threading.active_count()
    idle, most = anyio.run(main, backend="trio")
    assert most - idle <= 1  # Dask's own offload thread may start once
    assert idle - before <= 2
    assert threading.active_count() <= before + 1  # the client loop's thread is gone


# -- the same contract as aioproc.Pool ------------------------------------------------


@pytest.fixture(params=["Pool", "DaskPool"])
def either_pool(request: pytest.FixtureRequest, dask_cluster: Cluster) -> Any:
    """An aioproc.Pool on this machine, or a DaskPool on the cluster: same calls."""
    if request.param == "Pool":
        if not HAS_POOL:
            pytest.skip("this aioproc has no Pool (SPEC 6, issue 12)")
        pool_class: Any = getattr(aioproc, "Pool")  # noqa: B009 - not a name before issue 12
        return pool_class(2, context="fork")
    return DaskPool(dask_cluster.address)


def _two_then_key_error() -> Iterator[int]:
    yield 1
    yield 2
    raise KeyError("the iterable's")


async def _one_two_three() -> AsyncIterator[int]:
    for i in (1, 2, 3):
        yield i


async def _collect(results: AsyncIterator[Any], into: list[Any]) -> None:
    async for value in results:
        into.append(value)


@FORK_THREAD_WARNING
async def test_both_pools_keep_the_same_contract(either_pool: Any, tmp_path: Path) -> None:
    async with either_pool as pool:
        assert await pool.run(targets.square, 5) == 25
        assert [x async for x in pool.map(targets.square, [1, 2, 3])] == [1, 4, 9]
        assert [x async for x in pool.map(targets.square, _one_two_three())] == [1, 4, 9]
        got: list[int] = []  # an iterable that raises: what it gave first, as a for loop
        with pytest.raises(KeyError, match="the iterable's"):
            await _collect(pool.map(targets.square, _two_then_key_error()), got)
        assert got == [1, 4]
        with pytest.raises(targets.Refused) as refused:
            await pool.run(targets.refuse, 1)
        assert isinstance(refused.value.__cause__, aioproc.RemoteTraceback)
        with pytest.raises(aioproc.ProcessDied) as died:
            await pool.run(targets.segfault)
        assert died.value.exitcode == -signal.SIGSEGV
        path = tmp_path / "timeout"
        with pytest.raises(aioproc.ProcessTimeout) as timed_out:
            await pool.run(targets.pids_and_sleep, str(path), 300, timeout=0.3)
        assert isinstance(timed_out.value, TimeoutError)
        _, child, grandchild = await read_pids(path)
        assert not running(child)
        await wait_gone(grandchild)
        path = tmp_path / "cancel"
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, targets.pids_and_sleep, str(path), 300)
            _, child, grandchild = await read_pids(path)
            tg.cancel_scope.cancel()
        assert not running(child)
        await wait_gone(grandchild)
        _, grandchild = await pool.run(targets.leave_grandchild)
        await wait_gone(grandchild)


# Last: the nanny restarts the worker killed here, under another address, while
# the next test runs.  The tests above check worker pids against the first ones.


async def test_a_lost_worker_fails_its_calls_with_worker_lost(
    dask_cluster: Cluster, tmp_path: Path, child_mode: str
) -> None:
    path = tmp_path / "pids"
    async with DaskPool(dask_cluster.address) as pool:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(WorkerLost) as info:
                    await pool.run(targets.pids_and_sleep, str(path), 300)
                assert info.value.worker.startswith("tcp://127.0.0.1:")
                assert info.value.worker in str(info.value)
                assert "not run again" in str(info.value)

            with anyio.fail_after(60):
                tg.start_soon(call)
                worker, child, grandchild = await read_pids(path)
                with killed_afterwards(grandchild):
                    os.kill(worker, signal.SIGKILL)
        # The child dies with its worker (die_with_parent).  Its own children
        # outlive it: the worker that would kill its group is gone.
        await wait_gone(child)
        assert await pool.run(targets.square, 4) == 16  # the other worker


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_retries_run_a_call_again_on_another_worker(
    dask_cluster: Cluster, tmp_path: Path
) -> None:
    """Only when asked: ``retries=1``."""
    path = tmp_path / "pids"
    result: list[str] = []
    async with DaskPool(dask_cluster.address, retries=1) as pool, anyio.create_task_group() as tg:

        async def call() -> None:
            result.append(await pool.run(targets.sleep_first_time, str(path)))

        with anyio.fail_after(60):
            tg.start_soon(call)
            worker, _, grandchild = await read_pids(path)
            with killed_afterwards(grandchild):
                os.kill(worker, signal.SIGKILL)
    assert result == ["again"]
