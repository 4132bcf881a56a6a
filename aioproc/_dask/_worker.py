"""The Dask worker's side of ``DaskPool``: run each call in a child, stop it on request.

Theory of operation.  ``DaskPool`` submits ``execute`` as a Dask task.  It is
a coroutine function, so the worker runs it on its event loop instead of in
its thread pool, and it holds no thread while the call runs: it awaits the
call in a child of the worker, on a worker-local ``aioproc.Pool`` (one per
start method and grace period, as many workers as the Dask worker has
threads, kept open by a task on the worker's loop and closed with the worker)
where this aioproc has ``Pool``, else in a fresh child from ``aioproc.run``.
Either way the child leads its own process group, and what the call leaves
running is killed when it ends.  The worker's Dask slot stays taken meanwhile,
so the cluster runs as many calls at once as it has threads.

Dask cannot stop a running task (``client.cancel`` returns, the task runs on:
dask/distributed#4694).  Here every running call is registered, by its Dask
key, in a ``CallRegistry`` — a worker plugin installed on first use — with the
anyio cancel scope around the call.  Two things cancel that scope, and the
pool or ``aioproc.run`` then stops the child and its group (SIGTERM, grace,
SIGKILL) before the task returns:

- ``stop_call``, which the client runs on the worker when its caller is
  cancelled.  It returns once the child is gone, which is how the caller
  knows nothing is left; a call that has not started yet is marked so that
  it never starts.
- the plugin's ``transition`` hook, when the worker is told to let the key go
  while it executes (``client.cancel``, a client that went away, a future
  dropped): whoever releases the key, nothing keeps running for it.

The outcome travels back as a tagged tuple made by ``_outcome``, not as a
raised exception: Dask pickles exceptions without their ``__cause__``, and
the cause is where the child's traceback lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.process
import pickle
import time
from typing import TYPE_CHECKING, Any

import anyio
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

import aioproc

from ._child import PickledCall
from ._errors import DaemonicWorkers

if TYPE_CHECKING:
    from distributed import Worker

PLUGIN_NAME = "aioproc-calls"
#: The start method on a worker when the pool is given none.  fork: a child of
#: the worker dies with it (die_with_parent), where a forkserver child outlives
#: it; a fresh fork child costs 15-25 ms here, a forkserver one 300 ms (each
#: re-imports the worker's main module, which imports Dask).  The fork from a
#: multi-threaded worker happens once per local pool worker, not per call.
DEFAULT_CONTEXT = "fork"
_HAS_POOL = "Pool" in getattr(aioproc, "__all__", ())
# A call stopped before it started stays marked this long, in case the worker
# is told to start it after all (a message that was on its way).
_DOOMED_FOR = 600.0

Outcome = tuple[Any, ...]


class _Running:
    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.finished = anyio.Event()


class _LocalPool:
    """A worker-local ``aioproc.Pool``, held open by a task on the worker's loop."""

    def __init__(self, workers: int, context: str, grace: float) -> None:
        self._pool: Any = None
        self._ready = anyio.Event()
        self._closing = anyio.Event()
        self._error: BaseException | None = None
        self._task = asyncio.ensure_future(self._serve(workers, context, grace))

    async def _serve(self, workers: int, context: str, grace: float) -> None:
        try:
            # Not a name before aioproc.Pool (issue 12) is in; _HAS_POOL says whether.
            pool_class: Any = getattr(aioproc, "Pool")  # noqa: B009
            async with pool_class(workers, context=context, grace=grace) as pool:
                self._pool = pool
                self._ready.set()
                await self._closing.wait()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()

    async def run(self, call: PickledCall, timeout: float | None) -> Any:  # noqa: ASYNC109
        await self._ready.wait()
        if self._pool is None:
            raise RuntimeError(f"the worker's aioproc.Pool did not start: {self._error!r}")
        return await self._pool.run(call, timeout=timeout)

    def ended(self) -> bool:
        return self._task.done()

    async def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(BaseException):
            await self._task


class CallRegistry(WorkerPlugin):
    """The calls running on this worker, by Dask key, and the keys stopped early."""

    def __init__(self) -> None:
        self.running: dict[str, _Running] = {}
        self.doomed: dict[str, float] = {}
        self.pools: dict[tuple[str, float], _LocalPool] = {}

    def local_pool(self, nthreads: int, context: str, grace: float) -> _LocalPool:
        """The worker-local ``aioproc.Pool`` for these settings, started on first use."""
        pool = self.pools.get((context, grace))
        if pool is None or pool.ended():  # never started, or failed to: try again
            pool = self.pools[context, grace] = _LocalPool(nthreads, context, grace)
        return pool

    async def teardown(self, worker: Worker) -> None:
        """The worker closes: its local pools stop their children."""
        pools, self.pools = self.pools, {}
        for pool in pools.values():
            await pool.close()

    def transition(self, key: object, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Stop the call whose key the worker lets go of while it executes."""
        if finish in ("cancelled", "released", "forgotten"):
            call = self.running.get(key)  # type: ignore[call-overload]
            if call is not None:
                call.scope.cancel()

    def doom(self, key: str) -> None:
        now = time.monotonic()
        for stale in [k for k, until in self.doomed.items() if until < now]:
            del self.doomed[stale]
        self.doomed[key] = now + _DOOMED_FOR


def registry(worker: Worker) -> CallRegistry:
    """This worker's registry, installed on first use (no await: no race)."""
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CallRegistry):
        plugin = CallRegistry()
        worker.plugins[PLUGIN_NAME] = plugin
    return plugin


def daemonic() -> bool:
    """Whether this process is daemonic, so that it may not start children."""
    return bool(multiprocessing.process.current_process().daemon)


def facts(dask_worker: Worker) -> dict[str, Any]:
    """What the pool checks on each worker when it connects."""
    return {"daemonic": daemonic(), "nthreads": dask_worker.state.nthreads}


def daemonic_message(workers: list[str]) -> str:
    return (
        f"the Dask worker(s) {', '.join(workers)} run in daemonic processes, which "
        "may not start children, so aioproc cannot run calls there; start the "
        "workers without a nanny (`dask worker --no-nanny tcp://scheduler:8786`), "
        "or with the Dask setting distributed.worker.daemon set to False where "
        "the nanny runs (`DASK_DISTRIBUTED__WORKER__DAEMON=False dask worker ...`, "
        "or dask.config.set({'distributed.worker.daemon': False}) before creating "
        "a LocalCluster); DaskPool(None) starts a local cluster configured so"
    )


async def execute(key: str, call: PickledCall, options: dict[str, Any]) -> Outcome:
    """The task ``DaskPool`` submits: ``call()`` in a child of this worker.

    *options*: ``timeout``, ``grace``, ``context`` (start method or None) and
    ``child``: ``"pool"`` (a worker-local ``aioproc.Pool``), ``"fresh"``
    (``aioproc.run``), or None (the pool where this aioproc has one).
    Returns ``("value", value)``, ``("raised", ...)`` (see ``_outcome``), or
    ``("cancelled",)`` when the call was stopped (or never started) because
    its key was let go of.
    """
    timeout, grace, context = options["timeout"], options["grace"], options["context"]
    worker = get_worker()
    if daemonic():
        return _outcome(DaemonicWorkers(daemonic_message([worker.address])), worker.address)
    calls = registry(worker)
    task = worker.state.tasks.get(key)
    if key in calls.doomed or task is None or task.state != "executing":
        calls.doomed.pop(key, None)
        return ("cancelled",)
    running = calls.running[key] = _Running()
    try:
        with running.scope:
            try:
                if options["child"] == "pool" or (options["child"] is None and _HAS_POOL):
                    pool = calls.local_pool(
                        worker.state.nthreads, context or DEFAULT_CONTEXT, grace
                    )
                    value = await pool.run(call, timeout)
                else:
                    value = await aioproc.run(
                        call, timeout=timeout, context=context or DEFAULT_CONTEXT, grace=grace
                    )
            except Exception as exc:
                return _outcome(exc, worker.address)
            return ("value", value)
        return ("cancelled",)
    finally:
        del calls.running[key]
        running.finished.set()


async def stop_call(key: str, dask_worker: Worker) -> bool:
    """Stop the call *key* on this worker and return once its child is gone.

    True if it was running; a call that has not started is marked never to
    start (False).
    """
    calls = registry(dask_worker)
    running = calls.running.get(key)
    if running is None:
        calls.doom(key)
        return False
    running.scope.cancel()
    await running.finished.wait()
    return True


def _outcome(exc: BaseException, worker: str) -> Outcome:
    """``("raised", pickled exception or None, type name, message, traceback, usage)``.

    The exception is pickled here so that one the client cannot unpickle
    still arrives with its name.  An ``aioproc.ProcessError`` gets the
    worker's address in its message: its pid means nothing elsewhere.
    """
    cause = exc.__cause__
    traceback_text = cause.traceback_text if isinstance(cause, aioproc.RemoteTraceback) else None
    usage = cause.resource_usage if isinstance(cause, aioproc.RemoteTraceback) else None
    if isinstance(exc, aioproc.ProcessError):
        usage = exc.resource_usage
        try:
            exc = type(exc)(
                f"{exc} (on Dask worker {worker})",
                pid=exc.pid,
                exitcode=exc.exitcode,
                resource_usage=exc.resource_usage,
            )
        except Exception:  # a subclass with another signature: keep it as it is
            pass
    try:
        blob: bytes | None = pickle.dumps(exc)
    except Exception:
        blob = None
    name = type(exc).__qualname__
    if type(exc).__module__ != "builtins":
        name = f"{type(exc).__module__}.{name}"
    return ("raised", blob, name, str(exc), traceback_text, usage)
