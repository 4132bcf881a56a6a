"""The ways of calling a function in another process that the "calls" scenario compares.

Every peer implements one protocol, ``CallPeer``: ``open(workers)`` is an async
context manager that starts the peer's pool (or nothing, for ``aioproc.run``)
and yields ``call(fn, *args, timeout=None)``, which returns ``fn(*args)``
computed in another process.  A timeout is given the way a user of that
library gives it: the library's own per-call timeout where it has one
(``aioproc``, pebble), otherwise the loop's (``asyncio.wait_for``, a cancel
scope).  Leaving ``open`` shuts the pool down; the scenario checks that no
thread and no process is left afterwards.

Each peer uses its library's defaults apart from the number of workers (and the
documented knobs a semantics row names, such as ``cancellable=True``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio

import aioproc

from ._callees import as_coroutine

Backend = Literal["asyncio", "trio"]


class Call(Protocol):
    def __call__(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
    ) -> Coroutine[Any, Any, Any]: ...


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@dataclass(frozen=True)
class CallPeer:
    """A way of calling a function in another process, with a pool of *workers*."""

    label: str
    #: What it is, for the list of ways under the tables.
    how: str
    backend: Backend = "asyncio"
    #: Modules that must be importable for the peer to run.
    needs: tuple[str, ...] = ()
    #: False: a variant that only the semantics table shows (same speed as another row).
    timed: bool = True
    #: Slow enough per call that the scenario makes fewer concurrent calls.
    slow: bool = False
    #: A Dask cluster: slower still, and fewer sequential calls too.
    cluster: bool = False
    #: Another reason it may not run here, beyond a missing module.
    check: Callable[[], str | None] | None = None

    def matches(self, term: str) -> bool:
        return term in (self.label, self.label.split()[0], self.backend)

    def unavailable(self) -> str | None:
        """Why this peer cannot run here (None: it can)."""
        for module in self.needs:
            if not _installed(module):
                return f"{module} is not installed (pip install aioproc[bench])"
        return self.check() if self.check is not None else None

    def open(self, workers: int) -> contextlib.AbstractAsyncContextManager[Call]:
        return _OPENERS[self.label](workers)


# -- each peer's pool, opened and shut down ----------------------------------------


@contextlib.asynccontextmanager
async def _aioproc_pool(workers: int) -> AsyncIterator[Call]:
    pool_class = getattr(aioproc, "Pool", None)
    if pool_class is None:
        raise RuntimeError("aioproc.Pool is not there")
    async with pool_class(workers=workers, context="fork") as pool:

        async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
            return await pool.run(fn, *args, timeout=timeout)

        yield call


@contextlib.asynccontextmanager
async def _aioproc_run(workers: int) -> AsyncIterator[Call]:
    limiter = anyio.CapacityLimiter(workers)

    async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        async with limiter:
            return await aioproc.run(fn, *args, timeout=timeout, context="fork")

    yield call


def _anyio(cancellable: bool) -> Callable[[int], contextlib.AbstractAsyncContextManager[Call]]:
    @contextlib.asynccontextmanager
    async def open_(workers: int) -> AsyncIterator[Call]:
        import anyio.to_process

        limiter = anyio.CapacityLimiter(workers)

        async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
            with anyio.fail_after(timeout):
                return await anyio.to_process.run_sync(
                    fn, *args, cancellable=cancellable, limiter=limiter
                )

        # The workers belong to the event loop: anyio kills them when it ends.
        yield call

    return open_


@contextlib.asynccontextmanager
async def _executor(executor: Any, shutdown: Callable[[], None]) -> AsyncIterator[Call]:
    """A ``concurrent.futures`` executor driven by ``loop.run_in_executor``."""
    loop = asyncio.get_running_loop()
    try:

        async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
            return await asyncio.wait_for(loop.run_in_executor(executor, fn, *args), timeout)

        yield call
    finally:
        shutdown()


@contextlib.asynccontextmanager
async def _process_pool_executor(workers: int) -> AsyncIterator[Call]:
    from concurrent.futures import ProcessPoolExecutor

    executor = ProcessPoolExecutor(max_workers=workers)
    async with _executor(
        executor, lambda: executor.shutdown(wait=True, cancel_futures=True)
    ) as call:
        yield call


@contextlib.asynccontextmanager
async def _loky(workers: int) -> AsyncIterator[Call]:
    import loky

    executor = loky.ProcessPoolExecutor(max_workers=workers)
    async with _executor(executor, lambda: executor.shutdown(wait=True, kill_workers=True)) as call:
        yield call


@contextlib.asynccontextmanager
async def _pebble(workers: int) -> AsyncIterator[Call]:
    import pebble

    pool = pebble.ProcessPool(max_workers=workers)
    try:

        async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
            # Cancelling the asyncio future cancels pebble's, which stops its worker.
            return await asyncio.wrap_future(pool.schedule(fn, args=args, timeout=timeout))

        yield call
    finally:
        pool.stop()  # type: ignore[no-untyped-call,unused-ignore]  # typed in some pebble versions
        pool.join(timeout=10)


@contextlib.asynccontextmanager
async def _aiomultiprocess(workers: int) -> AsyncIterator[Call]:
    import aiomultiprocess

    aiomultiprocess.set_start_method("spawn")  # its default (scenario 1 may have changed it)
    pool = aiomultiprocess.Pool(processes=workers)
    try:

        async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
            return await asyncio.wait_for(pool.apply(as_coroutine, (fn, *args)), timeout)

        yield call
    finally:
        pool.terminate()
        # Its join waits for its polling loop, which never ends once a worker
        # died during a call: bounded here, and the scenario kills what is left.
        with anyio.move_on_after(10, shield=True):
            await pool.join()
        stop_aiomultiprocess_manager()


def stop_loky_resource_tracker() -> None:
    """Stop the resource tracker process loky starts with its first pool, for the
    whole run (stopped between pools, it would be told of semaphores it never saw)."""
    from loky.backend import resource_tracker

    resource_tracker._resource_tracker._stop()


def stop_aiomultiprocess_manager() -> None:
    """Stop the manager process aiomultiprocess starts for its workers' namespaces."""
    import aiomultiprocess.core

    manager = aiomultiprocess.core._manager
    if manager is not None:
        manager.shutdown()
        aiomultiprocess.core._manager = None


def _trio_parallel(kill: bool) -> Callable[[int], contextlib.AbstractAsyncContextManager[Call]]:
    @contextlib.asynccontextmanager
    async def open_(workers: int) -> AsyncIterator[Call]:
        import trio
        import trio_parallel

        limiter = trio.CapacityLimiter(workers)
        async with trio_parallel.open_worker_context(grace_period=5) as ctx:

            async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
                with anyio.fail_after(timeout):
                    return await ctx.run_sync(fn, *args, kill_on_cancel=kill, limiter=limiter)

            yield call

    return open_


@contextlib.asynccontextmanager
async def _local_cluster(workers: int) -> AsyncIterator[Any]:
    """A Dask LocalCluster on 127.0.0.1 whose workers may start processes."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.daemon": False}):
        async with LocalCluster(  # type: ignore[no-untyped-call,unused-ignore]
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            # No dashboard, and its HTTP server on a free port: the default 8787
            # may be taken, and the warning that says so would be an error here.
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            asynchronous=True,
        ) as cluster:
            yield cluster


@contextlib.asynccontextmanager
async def _dask_submit(workers: int) -> AsyncIterator[Call]:
    from distributed import Client

    async with (
        _local_cluster(workers) as cluster,
        Client(cluster, asynchronous=True) as client,  # type: ignore[no-untyped-call,unused-ignore]
    ):

        async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
            future = client.submit(fn, *args, pure=False)
            try:
                return await asyncio.wait_for(future, timeout)
            finally:
                if not future.done():
                    await client.cancel(future, force=True)

        yield call


@contextlib.asynccontextmanager
async def _dask_pool(workers: int) -> AsyncIterator[Call]:
    from aioproc.dask import DaskPool  # type: ignore[import-not-found,unused-ignore]

    async with _local_cluster(workers) as cluster, DaskPool(cluster.scheduler_address) as pool:

        async def call(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
            return await pool.run(fn, *args, timeout=timeout)

        yield call


_OPENERS: dict[str, Callable[[int], contextlib.AbstractAsyncContextManager[Call]]] = {
    "aioproc.Pool": _aioproc_pool,
    "aioproc.run": _aioproc_run,
    "anyio.to_process": _anyio(cancellable=False),
    "anyio cancellable": _anyio(cancellable=True),
    "ProcessPoolExecutor": _process_pool_executor,
    "pebble": _pebble,
    "aiomultiprocess": _aiomultiprocess,
    "trio_parallel": _trio_parallel(kill=False),
    "trio_parallel kill": _trio_parallel(kill=True),
    "loky": _loky,
    "dask submit": _dask_submit,
    "aioproc DaskPool": _dask_pool,
}


def _pool_unavailable() -> str | None:
    if getattr(aioproc, "Pool", None) is None:
        return "aioproc.Pool does not exist in this checkout yet"
    return None


POOL = CallPeer(
    "aioproc.Pool",
    "aioproc.Pool(workers=2, context='fork'), await pool.run()",
    check=_pool_unavailable,
)
PEERS: tuple[CallPeer, ...] = (
    POOL,
    CallPeer("aioproc.run", "aioproc.run(..., context='fork'): a fresh child per call", slow=True),
    CallPeer("anyio.to_process", "anyio.to_process.run_sync (its defaults)"),
    CallPeer("anyio cancellable", "anyio.to_process.run_sync(cancellable=True)", timed=False),
    CallPeer("ProcessPoolExecutor", "concurrent.futures.ProcessPoolExecutor, run_in_executor"),
    CallPeer("pebble", "pebble.ProcessPool.schedule(timeout=)", needs=("pebble",)),
    CallPeer("aiomultiprocess", "aiomultiprocess.Pool.apply (spawn)", needs=("aiomultiprocess",)),
    CallPeer(
        "trio_parallel",
        "trio_parallel worker context run_sync, under trio",
        backend="trio",
        needs=("trio", "trio_parallel"),
    ),
    CallPeer(
        "trio_parallel kill",
        "trio_parallel run_sync(kill_on_cancel=True)",
        backend="trio",
        needs=("trio", "trio_parallel"),
        timed=False,
    ),
    CallPeer("loky", "loky.ProcessPoolExecutor, run_in_executor", needs=("loky",)),
    CallPeer(
        "dask submit",
        "dask.distributed Client.submit, LocalCluster of 2 worker processes",
        needs=("distributed",),
        slow=True,
        cluster=True,
    ),
    CallPeer(
        "aioproc DaskPool",
        "aioproc.dask.DaskPool on the same LocalCluster",
        needs=("distributed", "aioproc.dask"),
        slow=True,
        cluster=True,
    ),
)
