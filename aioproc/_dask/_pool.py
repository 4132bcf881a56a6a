"""``DaskPool``: the calls of ``aioproc.Pool``, made on a Dask cluster.

Theory of operation.  The caller's side (``run``, ``map``) checks its input,
pickles the call with cloudpickle, and hands it to a task on the *client
loop* (see ``_bridge``), which does the rest with Dask's asyncio client:

1. Wait for a free slot: the pool knows every worker and its number of
   threads, and hands slots out first come, first served.  So a call waits
   here, in the open, rather than in the scheduler's queue.
2. Submit ``_worker.execute`` pinned to that worker (``workers=[address]``,
   no other worker allowed).  Dask would otherwise run the task again on
   another worker if this one is lost; pinned, it waits for a worker that
   never comes, and the pool fails it with ``WorkerLost`` instead, as soon as
   the scheduler reports the worker gone (its ``remove-worker`` event).  With
   ``retries`` the pool itself submits it again, as a new call.
3. Wait for the outcome, the worker's loss, or the client-side deadline
   (``timeout + grace + _MARGIN``), whichever comes first.  The worker
   enforces the timeout itself and answers with ``ProcessTimeout``; the
   client's deadline is for a worker that does not answer.
4. On cancellation, the client-side deadline or the worker's loss, stop the
   call on the worker (``_worker.stop_call``: its child and process group are
   gone when it returns; a call that has not started never will) and cancel
   its key, shielded and bounded, before the caller sees the outcome.

The outcome comes back as a tagged tuple (``_worker._outcome``), turned here
into the value or the exception with the child's traceback as its cause.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import math
import multiprocessing
import os
import pickle
import uuid
import warnings
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import anyio
import anyio.lowlevel
import cloudpickle

from .._exceptions import PoolClosed, ProcessTimeout, RemoteError, RemoteTraceback
from . import _worker
from ._bridge import ClientLoop, Handle
from ._child import PickledCall
from ._errors import DaemonicWorkers, WorkerLost

if TYPE_CHECKING:
    import sys

    from distributed import Client, Future

    if sys.version_info >= (3, 11):
        from typing import Self, TypeVarTuple, Unpack
    else:
        from typing_extensions import Self, TypeVarTuple, Unpack

    PosArgsT = TypeVarTuple("PosArgsT")

T = TypeVar("T")
U = TypeVar("U")

#: Seconds the client waits beyond ``timeout + grace`` before it gives up on
#: the worker's answer: the worker's own timeout counts from the child's
#: start, which comes after the submission, the trip to the worker and the
#: start of the child.
_MARGIN = 1.0
# How long stopping a call on the worker may take: SIGTERM, grace, SIGKILL,
# and the bounded wait after it that aioproc.run allows (5 s), plus the trip.
_KILL_WAIT = 5.0
# AIOPROC_DASK_CHILD, read by each new pool, says how the workers run a call:
# "pool" (a worker-local aioproc.Pool), "fresh" (aioproc.run: a new child each),
# or unset: the pool where the workers' aioproc has one.  For measurements and
# tests; the README's "Beyond one machine" has the figures behind the default.
_CHILD_VARIABLE = "AIOPROC_DASK_CHILD"


def _name(func: Callable[..., object]) -> str:
    target: object = func
    while isinstance(target, functools.partial):
        target = target.func
    return str(getattr(target, "__qualname__", None) or type(target).__qualname__)


def _check_number(what: str, value: object, *, allow_none: bool, rule: str) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0 ({rule}), got {value!r}")
    return float(value)


class _Worker:
    def __init__(self, address: str, nthreads: int) -> None:
        self.address = address
        self.nthreads = nthreads
        self.busy = 0
        self.calls: dict[str, asyncio.Future[None]] = {}  # key -> set when lost


class DaskPool:
    """The calls of ``aioproc.Pool`` (``run``, ``map``), made on a Dask cluster.

    *address*: a scheduler address (``"tcp://host:8786"``), a ``distributed``
    cluster object (``LocalCluster``, ``SSHCluster``, ...), or None to start a
    local cluster on 127.0.0.1 for the pool's lifetime (processes, no
    dashboard, workers allowed to start processes; *workers* of them, one
    thread each, or Dask's choice for this machine when *workers* is None).

    Each call runs in a fresh child of a Dask worker, started by
    ``aioproc.run`` with the start method *context* (None: ``"fork"``, see the
    README's "Beyond one machine" for why); a timeout or a cancellation stops
    that child and its process group on the worker (SIGTERM, *grace* seconds,
    SIGKILL).  The workers must be able to start processes: the pool checks
    that when it connects (``DaemonicWorkers``).  A worker lost during a call
    fails the call with ``WorkerLost``; with *retries* the pool submits it
    again, that many times at most.

    The pool belongs to the event loop that enters it (asyncio, uvloop or
    trio); use it as ``async with DaskPool(...) as pool``.
    """

    def __init__(
        self,
        address: str | object | None = None,
        *,
        workers: int | None = None,
        context: str | None = None,
        grace: float = 1.0,
        retries: int = 0,
    ) -> None:
        if not (
            address is None
            or isinstance(address, str)
            or isinstance(getattr(address, "scheduler_address", None), str)
        ):
            raise TypeError(
                "address must be a scheduler address such as 'tcp://host:8786', a "
                "distributed cluster object (with a scheduler_address) or None for a "
                f"local cluster, not {type(address).__name__}"
            )
        if workers is not None:
            if isinstance(workers, bool) or not isinstance(workers, int):
                raise TypeError(f"workers must be an int or None, not {type(workers).__name__}")
            if workers < 1:
                raise ValueError(f"workers must be at least 1, got {workers}")
            if address is not None:
                raise ValueError(
                    "workers is the size of the local cluster DaskPool(None) starts; with "
                    f"an address ({address!r}) the cluster decides how many workers it has"
                )
        if context is not None:
            if not isinstance(context, str):
                raise TypeError(
                    "context must be a start method name ('fork', 'forkserver', 'spawn') "
                    f"or None, not {type(context).__name__}: a multiprocessing context "
                    "cannot travel to the workers"
                )
            methods = multiprocessing.get_all_start_methods()
            if context not in methods:
                raise ValueError(f"unknown start method {context!r}; use one of {methods}")
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int, not {type(retries).__name__}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0 (0: never run a call twice), got {retries}")
        self._address = address
        self._n_workers = workers
        self._context = context
        self._grace = cast(
            float,
            _check_number(
                "grace", grace, allow_none=False, rule="the wait between SIGTERM and SIGKILL"
            ),
        )
        self._retries = retries
        child = os.environ.get(_CHILD_VARIABLE) or None
        if child not in (None, "pool", "fresh"):
            raise ValueError(
                f"{_CHILD_VARIABLE} must be 'pool', 'fresh' or unset (the worker decides), "
                f"not {child!r}"
            )
        self._child = child
        self._state = "new"
        self._loop: ClientLoop | None = None
        # Client-loop state:
        self._client: Client | None = None
        self._cluster: Any = None
        self._config: contextlib.AbstractContextManager[Any] | None = None
        self._workers: dict[str, _Worker] = {}
        self._waiters: collections.deque[asyncio.Future[str]] = collections.deque()
        self._refused: set[str] = set()
        self._handles: set[Handle[Any]] = set()
        self._background: set[asyncio.Future[None]] = set()
        # Stopping a call on its worker: SIGTERM, grace, SIGKILL, aioproc.run's
        # bounded wait after it, and the trip there and back.
        self._stop_bound = self._grace + _KILL_WAIT + _MARGIN

    def __repr__(self) -> str:
        where = (
            self._address
            if isinstance(self._address, str)
            else ("local cluster" if self._address is None else type(self._address).__name__)
        )
        return f"<DaskPool {where} {self._state}>"

    # -- lifetime ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError(f"a DaskPool can be entered once ({self!r}); create a new DaskPool")
        self._state = "opening"
        self._loop = ClientLoop()
        try:
            await self._loop.call(self._open)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._loop.call(self._shutdown)
            self._loop.close()
            self._state = "closed"
            raise
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = self._loop
        if self._state != "open" or loop is None:
            return
        self._state = "closing"
        try:
            if exc_type is not None:
                for handle in list(self._handles):
                    handle.cancel()
            try:
                for handle in list(self._handles):
                    await handle.wait()
            except BaseException:  # cancelled while waiting for the calls in progress
                for handle in list(self._handles):
                    handle.cancel()
                with anyio.CancelScope(shield=True):
                    for handle in list(self._handles):
                        await handle.wait()
                raise
        finally:
            with anyio.CancelScope(shield=True):
                await loop.call(self._shutdown)
            loop.close()
            self._state = "closed"

    async def _open(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        address = self._address
        if address is None:
            # Read by each nanny whenever it (re)starts its worker: kept for the
            # pool's lifetime.
            self._config = dask.config.set({"distributed.worker.daemon": False})
            self._config.__enter__()
            if self._n_workers is None:
                kwargs: dict[str, Any] = {}
            else:
                kwargs = {"n_workers": self._n_workers, "threads_per_worker": 1}
            self._cluster = await LocalCluster(
                host="127.0.0.1",
                processes=True,
                dashboard_address=None,
                # No dashboard, but the scheduler still serves /health and
                # /metrics: on a free loopback port, not 8787 (taken by another
                # cluster, that is a warning, and an error under -W error).
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                asynchronous=True,
                **kwargs,
            )
            address = self._cluster.scheduler_address
        elif not isinstance(address, str):
            address = cast(str, getattr(address, "scheduler_address"))  # noqa: B009
        self._client = client = await Client(address, asynchronous=True, set_as_default=False)
        client.subscribe_topic("all", self._on_cluster_event)
        try:
            found = await client.run(_worker.facts)
        except Exception as exc:
            raise RuntimeError(
                f"could not check the Dask workers of {address} ({type(exc).__name__}: "
                f"{exc}); aioproc must be installed on every worker, in the same version"
            ) from exc
        daemonic = sorted(addr for addr, facts in found.items() if facts["daemonic"])
        if daemonic:
            raise DaemonicWorkers(_worker.daemonic_message(daemonic))
        for addr, facts in found.items():
            self._add(addr, int(facts["nthreads"]))

    async def _shutdown(self) -> None:
        for waiter in self._waiters:
            waiter.cancel()
        if self._background:  # stop requests still on their way: a last chance
            await asyncio.wait(self._background, timeout=_MARGIN)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic("all")
            with contextlib.suppress(Exception):
                await client.close()
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster.close()
        config, self._config = self._config, None
        if config is not None:
            config.__exit__(None, None, None)

    def _check_open(self) -> ClientLoop:
        if self._state != "open" or self._loop is None:
            if self._state == "new":
                raise PoolClosed(
                    "a DaskPool is used inside `async with DaskPool(...) as pool:`; enter it first"
                )
            raise PoolClosed(f"this DaskPool is {self._state}; create a new one ({self!r})")
        if not self._loop.is_home():
            raise RuntimeError(
                "a DaskPool belongs to the event loop that entered it; use it from that loop"
            )
        return self._loop

    # -- the workers (client loop) -------------------------------------------------

    def _on_cluster_event(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        action = msg.get("action") if isinstance(msg, dict) else None
        if action == "add-worker":
            task = asyncio.ensure_future(self._join(msg["worker"]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        elif action == "remove-worker":
            self._remove(msg["worker"])

    async def _join(self, address: str) -> None:
        client = self._client
        if client is None or address in self._workers:
            return
        try:
            found = await client.run(_worker.facts, workers=[address])
        except Exception:
            return  # gone again, or not reachable: the pool goes on without it
        facts = found.get(address)
        if facts is None:
            return
        if facts["daemonic"]:
            if address not in self._refused:
                self._refused.add(address)
                warnings.warn(
                    f"DaskPool does not use a worker that joined the cluster: "
                    f"{_worker.daemonic_message([address])}",
                    RuntimeWarning,
                    stacklevel=1,
                )
            return
        self._add(address, int(facts["nthreads"]))

    def _add(self, address: str, nthreads: int) -> None:
        if address not in self._workers:
            self._workers[address] = _Worker(address, max(1, nthreads))
            self._hand_out()

    def _remove(self, address: str) -> None:
        worker = self._workers.pop(address, None)
        if worker is not None:
            for lost in worker.calls.values():
                if not lost.done():
                    lost.set_result(None)

    def capacity(self) -> int:
        """How many calls the cluster can run at once (its workers' threads)."""
        # Read from the caller's thread too (trio): copy first, in one step.
        return sum(w.nthreads for w in list(self._workers.values()))

    def _free(self) -> _Worker | None:
        best: _Worker | None = None
        for worker in self._workers.values():
            if worker.busy < worker.nthreads and (
                best is None or worker.busy * best.nthreads < best.busy * worker.nthreads
            ):
                best = worker
        return best

    def _hand_out(self) -> None:
        while self._waiters:
            worker = self._free()
            if worker is None:
                return
            waiter = self._waiters.popleft()
            if not waiter.done():
                worker.busy += 1
                waiter.set_result(worker.address)

    async def _acquire(self) -> str:
        if not self._waiters:
            worker = self._free()
            if worker is not None:
                worker.busy += 1
                return worker.address
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self, address: str) -> None:
        worker = self._workers.get(address)
        if worker is not None:
            worker.busy -= 1
        self._hand_out()

    # -- one call (client loop) ----------------------------------------------------

    async def _call(self, name: str, blob: bytes, timeout: float | None) -> Any:  # noqa: ASYNC109
        attempt = 0
        while True:
            address = await self._acquire()
            if address not in self._workers:
                continue  # lost while the call waited to run: nothing was sent there
            try:
                return await self._call_on(address, name, blob, timeout)
            except WorkerLost:
                if attempt >= self._retries:
                    raise
                attempt += 1
            finally:
                self._release(address)

    async def _call_on(
        self,
        address: str,
        name: str,
        blob: bytes,
        timeout: float | None,  # noqa: ASYNC109 - the worker's timeout, passed on
    ) -> Any:
        client = self._client
        if client is None:
            raise PoolClosed("this DaskPool is closing; the call was not made")
        key = f"aioproc-{name}-{uuid.uuid4().hex}"
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._workers[address].calls[key] = lost
        future = client.submit(
            _worker.execute,
            key,
            PickledCall(name, blob),
            {
                "timeout": timeout,
                "grace": self._grace,
                "context": self._context,
                "child": self._child,
            },
            key=key,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        answer = asyncio.ensure_future(future.result())
        deadline = None if timeout is None else timeout + self._grace + _MARGIN
        try:
            try:
                waits: set[asyncio.Future[Any]] = {answer, lost}
                await asyncio.wait(waits, timeout=deadline, return_when="FIRST_COMPLETED")
            except asyncio.CancelledError:
                await self._stop(client, future, address, key, self._stop_bound)
                raise
            if answer.done():
                return self._decode(answer.result())
            if lost.done():
                # Nothing to stop there: the worker is gone.  Drop the key, which
                # would otherwise wait for that worker forever.
                await self._stop(client, future, address, key, _MARGIN, worker_gone=True)
                raise WorkerLost(
                    f"Dask worker {address} was lost while it ran {name}() (key {key}); the "
                    "call was not run again: create the DaskPool with retries=N to run it "
                    "again elsewhere",
                    worker=address,
                    key=key,
                )
            # The worker does not answer: tell it to stop, and do not wait for
            # it (it is not answering): the request goes on in the background.
            await self._stop(client, future, address, key, 0)
            raise ProcessTimeout(
                f"no answer from Dask worker {address} for {name}() within {deadline:g} s "
                f"(the timeout of {timeout:g} s, the {self._grace:g} s grace period and a "
                f"{_MARGIN:g} s margin); a request to stop the call is on its way to the worker",
                pid=0,
                exitcode=None,
            )
        finally:
            answer.cancel()
            with contextlib.suppress(BaseException):
                await answer
            with contextlib.suppress(KeyError):
                del self._workers[address].calls[key]
            future.release()

    async def _stop(
        self,
        client: Client,
        future: Future[Any],
        address: str,
        key: str,
        bound: float,
        *,
        worker_gone: bool = False,
    ) -> None:
        """Stop the call on its worker and cancel its key; wait *bound* seconds at most.

        What is not done by then goes on in the background (a worker that does
        not answer must not hold the caller up), until the client closes.
        """

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await client.run(_worker.stop_call, key, workers=[address])

        async def cancel() -> None:
            with contextlib.suppress(Exception):
                await client.cancel([future])

        tasks = {asyncio.ensure_future(cancel())}
        if not worker_gone:
            tasks.add(asyncio.ensure_future(stop()))
        self._background |= tasks
        for task in tasks:
            task.add_done_callback(self._background.discard)
        await asyncio.wait(tasks, timeout=bound)

    @staticmethod
    def _decode(outcome: tuple[Any, ...]) -> Any:
        if outcome[0] == "value":
            return outcome[1]
        if outcome[0] == "cancelled":
            raise RuntimeError(
                "the call was cancelled on the Dask cluster by someone else (its key was "
                "released, e.g. by client.cancel) before it finished"
            )
        _, blob, type_name, message, traceback_text, usage = outcome
        rebuilt: object = None
        if blob is not None:
            with contextlib.suppress(Exception):
                rebuilt = pickle.loads(blob)
        exc = (
            rebuilt
            if isinstance(rebuilt, BaseException)
            else RemoteError(type_name, message, traceback_text or "")
        )
        if traceback_text is not None:
            exc.__cause__ = RemoteTraceback(traceback_text, usage)
        raise exc

    # -- the caller's side -----------------------------------------------------------

    def _prepare(
        self, func: Callable[..., object], args: tuple[Any, ...], timeout: object
    ) -> tuple[str, bytes, float | None]:
        if not callable(func):
            raise TypeError(
                f"func must be a callable, not {type(func).__name__}; "
                "call pool.run(func, *args) with the function first"
            )
        name = _name(func)
        if inspect.iscoroutinefunction(func):
            raise TypeError(
                f"{name}() is an async function; the pool calls a plain function in the "
                "child. Pass a plain function that runs its own event loop, e.g. "
                "functools.partial(anyio.run, func)"
            )
        checked = _check_number("timeout", timeout, allow_none=True, rule="None for no limit")
        try:
            blob = cloudpickle.dumps((func, args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise pickle.PicklingError(
                f"cannot send {name}() and its arguments to the Dask cluster "
                f"({type(exc).__name__}: {exc}); pass picklable arguments"
            ) from exc
        return name, blob, checked

    def _spawn(
        self, loop: ClientLoop, name: str, blob: bytes, timeout: float | None
    ) -> Handle[Any]:
        handle: Handle[Any] = loop.spawn(lambda: self._call(name, blob, timeout))
        self._handles.add(handle)
        handle.add_done_callback(lambda: self._handles.discard(handle))
        return handle

    async def run(
        self,
        func: Callable[[Unpack[PosArgsT]], T],
        *args: Unpack[PosArgsT],
        timeout: float | None = None,  # noqa: ASYNC109 - counts on the worker, from the child's start
    ) -> T:
        """Call ``func(*args)`` in a child on a Dask worker and return its result.

        The contract of ``aioproc.Pool.run``: the value; the function's
        exception, same type, with the child's traceback as its ``__cause__``;
        ``RemoteError`` for one that cannot be pickled; ``ProcessDied`` (exit
        code, the worker's pid) when the child dies; ``ProcessTimeout`` after
        *timeout* seconds, the child and its group stopped on the worker.
        Cancellation stops them too, then propagates.  ``WorkerLost`` when the
        worker is lost during the call.  Waiting for a free slot is first come,
        first served; *timeout* counts from the child's start on the worker.
        """
        loop = self._check_open()
        name, blob, checked = self._prepare(func, args, timeout)
        await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled already: send nothing
        return cast(T, await self._spawn(loop, name, blob, checked).result())

    def map(
        self,
        func: Callable[[U], T],
        iterable: Iterable[U] | AsyncIterable[U],
        *,
        timeout: float | None = None,
        ordered: bool = True,
    ) -> AsyncGenerator[T, None]:
        """``func(item)`` for every item, as an async iterator (``async for``).

        At most about twice the cluster's capacity is in flight, so the
        iterable may be endless; results come in the input's order, or as
        they finish with ``ordered=False``.  The first error stops the calls
        in flight (their children on the workers too) and is raised; leaving
        the loop early (``break``, an exception, closing the iterator) stops
        them too.
        """
        self._check_open()
        _check_number("timeout", timeout, allow_none=True, rule="None for no limit")
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, not {type(ordered).__name__}")
        return self._map(_Map(self, func, iterable, timeout, ordered))

    async def _map(self, calls: _Map[U, T]) -> AsyncGenerator[T, None]:
        # A generator, so that leaving the loop early (break, an exception) closes
        # it and stops the calls in flight, as the event loop finalizes it.
        try:
            async for value in calls:
                yield value
        finally:
            await calls.aclose()


class _Map(Generic[U, T]):
    """The async iterator of ``DaskPool.map``; its calls are tasks on the client loop."""

    def __init__(
        self,
        pool: DaskPool,
        func: Callable[[U], T],
        iterable: Iterable[U] | AsyncIterable[U],
        timeout: float | None,
        ordered: bool,
    ) -> None:
        self._pool = pool
        self._func = func
        self._timeout = timeout
        self._ordered = ordered
        if isinstance(iterable, AsyncIterable):
            self._aiter: AsyncIterator[U] | None = aiter(iterable)
            self._iter: Iterable[U] | None = None
        elif isinstance(iterable, Iterable):
            self._aiter = None
            self._iter = iter(iterable)
        else:
            raise TypeError(
                f"map() needs an iterable or an async iterable, not {type(iterable).__name__}"
            )
        self._pending: collections.deque[Handle[Any]] = collections.deque()
        self._finished: collections.deque[Handle[Any]] = collections.deque()
        self._wake = anyio.Event()
        self._exhausted = False
        self._end_error: Exception | None = None
        self._closed = False

    def __aiter__(self) -> _Map[U, T]:
        return self

    async def _next_item(self) -> tuple[bool, U | None]:
        try:
            if self._aiter is not None:
                return True, await self._aiter.__anext__()
            return True, next(cast(Iterator[U], self._iter))
        except (StopIteration, StopAsyncIteration):
            self._exhausted = True
            return False, None
        except Exception as exc:  # raised where the results end, as a for loop would
            self._exhausted = True
            self._end_error = exc
            return False, None

    async def _fill(self) -> None:
        limit = max(2, 2 * self._pool.capacity())
        while not self._exhausted and len(self._pending) < limit:
            more, item = await self._next_item()
            if not more:
                return
            loop = self._pool._check_open()
            name, blob, timeout = self._pool._prepare(self._func, (item,), self._timeout)
            handle = self._pool._spawn(loop, name, blob, timeout)
            self._pending.append(handle)
            handle.add_done_callback(functools.partial(self._done, handle))

    def _done(self, handle: Handle[Any]) -> None:
        self._finished.append(handle)
        self._wake.set()

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        try:
            await self._fill()
            while self._pending:
                failed = next((h for h in self._finished if h.failed()), None)
                if failed is not None:
                    await failed.result()  # raises
                if self._ordered:
                    head = self._pending[0]
                    if head.is_done():
                        return cast(T, await self._take(head))
                elif self._finished:
                    return cast(T, await self._take(self._finished[0]))
                self._wake = anyio.Event()  # callbacks run at awaits only: none lost
                await self._wake.wait()
        except BaseException:
            await self.aclose()
            raise
        self._closed = True
        error, self._end_error = self._end_error, None
        if error is not None:
            raise error
        raise StopAsyncIteration

    async def _take(self, handle: Handle[Any]) -> Any:
        self._pending.remove(handle)
        with contextlib.suppress(ValueError):
            self._finished.remove(handle)
        value = await handle.result()
        await self._fill()
        return value

    async def aclose(self) -> None:
        """Stop the calls in flight (on the workers too) and wait until they are stopped."""
        if self._closed and not self._pending:
            return
        self._closed = True
        pending = list(self._pending)
        self._pending.clear()
        for handle in pending:
            handle.cancel()
        with anyio.CancelScope(shield=True):
            for handle in pending:
                await handle.wait()
