"""``aioproc.Pool``: reused worker processes with the guarantees of ``aioproc.run``.

Theory of operation.

Workers.  A worker is an ``AsyncProcess`` of this process running
``_poolworker.worker_main``, leader of its own process group, killed with the
parent where the kernel allows it (``die_with_parent``; not forkserver), and
started on demand by the call that needs it, up to ``workers``.  It has two
pipes: requests (parent to worker) and results (worker to parent).  Each
carries frames (see ``_wire``): the parent's ends are non-blocking and read
and written in the event loop, the worker's are blocking.  Each worker has
one task in the pool's task group, its *watcher*, which joins it (woken by
the kernel, through the process's watcher: no thread, no polling) and
retires it when it has been idle for ``idle_timeout``.

Protocol.  The worker first runs the initializer and sends ``("ready",
clean)``, or ``("init-failed", outcome)`` and exits.  Then, per call, it reads
a request frame (meta None, body the pickled function and arguments, large
buffers out of band), calls the function, kills and reaps whatever the call
left running (``end_leftovers``: the worker is a child subreaper on Linux),
and answers ``(outcome, clean)``; ``clean`` False means leftovers could not be
ended here (no ``/proc``, not Linux) and the worker exits after answering, its
group killed as it exits.  A request with a meta (``("exit",)``) or the end of
the request pipe makes it exit.  The first call on a new worker writes its
request at once and reads "ready" then its answer: starting a worker costs
no extra round trip.

States of a worker, in the parent::

    starting --ready--> idle <--call--> busy
                         |               |  timeout, cancellation, pool closed
                         |               +--> stopping: SIGTERM (group), grace,
                         |                    SIGKILL (group), bounded wait
       idle_timeout, max_tasks_per_worker,    |
       not clean, pool exit: ("exit",)        v
                         +------------> exiting --watcher joins--> gone

A call takes an idle worker (last used first), else starts one if fewer than
``workers`` are live, else waits in a first-come-first-served queue; a worker
that becomes free is handed to the first waiter directly.  A waiter cancelled
before it got a worker leaves the queue and nothing was sent; one cancelled
just after passes the worker on.

A call's timeout counts from the moment it has a worker.  The call waits for
its answer in a cancel scope that its worker's watcher cancels if the worker
exits: the caller then reads what the pipe still holds (an answer written
just before the death is returned) and raises ``ProcessDied`` with the exit
code.  On a timeout or a cancellation the caller stops the worker as ``run``
stops its child (shielded, bounded), and the pool starts a new one when a
call needs it.  The pool is never broken by a worker's death.

Closing.  Leaving ``async with`` normally refuses new calls, waits for the
calls in progress and the waiters, sends ``("exit",)`` to every worker and
waits for them (``grace``, then SIGKILL).  Leaving it by an exception or a
cancellation stops every busy worker at once (their calls raise
``PoolClosed``), tells idle ones to exit, and waits for all of them the same
bounded way.  A worker that survives SIGKILL is reported and reaped later, as
``run`` does.  The watchers are shielded: the pool's task group lives inside the
scopes of the code that entered it, and a cancellation there must not stop
the watching that closing relies on.

Cost of a call.  Calls need no task of their own: a frame write (one
``writev``), a wait on the result pipe, a frame read.  The wait is woken by the
pipe or, if the worker exits, by its watcher (``_Reader.wake``); a cancel
scope is entered only for a call with a timeout or a large request.  On
asyncio and uvloop the result pipe stays registered with the loop while calls
wait on it, and the loop's reader callback reads the frame itself, so the
call resumes once, with its answer complete; a call waiting for a worker waits
on a future of the loop.  A worker that has answered looks for its next
request for a moment before it sleeps (``_poolworker.SPIN``): a sequence of
calls then finds it awake.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from . import _run, _wire
from ._checks import (
    PDEATHSIG_SUPPORTED,
    check_grace,
    check_timeout,
    lifeline_problem,
    resolve_context,
)
from ._exceptions import (
    ExitStatusLost,
    InitializerError,
    PoolClosed,
    ProcessTimeout,
    UnkillableProcessWarning,
)
from ._exit import adopt
from ._poolworker import worker_main
from ._popen import POPEN_CLASSES
from ._process import AsyncProcess

if sys.version_info >= (3, 11):
    from typing import Never, TypeVarTuple, Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Never, TypeVarTuple, Unpack

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import BaseContext

    from ._usage import ResourceUsage

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

_EXIT = _wire.frame(("exit",))
_SMALL = 1 << 15  # a request this small is written at once (an idle worker's pipe is empty)

# Every pool's ends of its workers' pipes in this process: a fork worker closes
# the ones it inherited, so that a worker's pipes are held by it and us only.
_parent_ends: set[int] = set()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Reader:
    """Reads a frame from a worker's result pipe; ``wake()`` ends the read early
    (the worker exited: the call then reads what the pipe still holds).

    The portable way: ``anyio.wait_readable`` in a cancel scope that ``wake()``
    cancels, then non-blocking reads, ``_wire.BUDGET`` bytes per turn of the loop.
    """

    __slots__ = ("_fd", "_scope", "_woken")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._woken = False
        self._scope: anyio.CancelScope | None = None

    async def read(self, inc: _wire.Incoming) -> bool:
        """True once *inc* is complete; False at the pipe's end or once woken."""
        fd = self._fd
        while True:
            await self._wait()
            while True:
                done = inc.read_some(fd, _wire.BUDGET)
                if done:
                    return True
                if inc.eof:
                    return False
                if done is False:
                    break
                await anyio.lowlevel.checkpoint()
            if self._woken:
                return False

    async def _wait(self) -> None:
        if self._woken:
            await anyio.lowlevel.checkpoint()
            return
        with anyio.CancelScope() as self._scope:
            await anyio.wait_readable(self._fd)
        self._scope = None

    def wake(self) -> None:
        self._woken = True
        if self._scope is not None:
            self._scope.cancel()

    def close(self) -> None:
        pass


class _AsyncioReader(_Reader):
    """The same on asyncio and uvloop, read in the loop's reader callback itself.

    The reader stays registered while calls go on (adding and removing it per
    call costs two ``epoll_ctl`` and the bookkeeping around them), and the
    callback reads as soon as the loop sees data, so the pipe is empty again
    before the loop polls next: no second, empty wake-up, and the waiting call
    resumes once, with its frame complete.  Each callback moves at most
    ``_wire.BUDGET`` bytes: a large frame takes one slice per turn of the loop.
    """

    __slots__ = ("_future", "_inc", "_loop", "_registered")

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(fd)
        self._loop = loop
        self._future: asyncio.Future[bool] | None = None
        self._inc: _wire.Incoming | None = None
        self._registered = False

    async def read(self, inc: _wire.Incoming) -> bool:
        if self._woken:
            return await super().read(inc)
        future = self._future = self._loop.create_future()
        self._inc = inc
        if not self._registered:
            self._loop.add_reader(self._fd, self._ready)
            self._registered = True
        try:
            complete: bool = await future
        finally:
            self._future = self._inc = None
        return complete

    def _ready(self) -> None:
        future, inc = self._future, self._inc
        if future is None or inc is None:
            # Nobody reads (level-triggered: it would fire again and again).
            self._loop.remove_reader(self._fd)
            self._registered = False
            return
        if future.done():  # complete, its reader not yet resumed: the rest is the next frame's
            return
        try:
            done = inc.read_some(self._fd, _wire.BUDGET)
        except Exception as exc:
            future.set_exception(exc)
            return
        if done:
            future.set_result(True)
        elif inc.eof:
            future.set_result(False)
        # else: the pipe is empty or the slice is done; called again when it is readable

    def wake(self) -> None:
        self._woken = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(False)

    def close(self) -> None:
        if self._registered:
            self._loop.remove_reader(self._fd)
            self._registered = False


class _TrioReader(_Reader):
    """The same on trio, without a cancel scope per wait: ``wake()`` is trio's
    ``notify_closing``, which wakes the waiter with ClosedResourceError (the pipe
    is not closed: what the worker wrote before it exited is still read)."""

    __slots__ = ()

    async def _wait(self) -> None:
        if self._woken:
            await anyio.lowlevel.checkpoint()
            return
        with contextlib.suppress(anyio.ClosedResourceError):
            await anyio.wait_readable(self._fd)

    def wake(self) -> None:
        self._woken = True
        anyio.notify_closing(self._fd)


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio (or uvloop) loop; None under another backend."""
    native = anyio.lowlevel.current_token().native_token
    return native if isinstance(native, asyncio.AbstractEventLoop) else None


def _reader_for(fd: int, loop: asyncio.AbstractEventLoop | None) -> _Reader:
    if loop is not None:
        return _AsyncioReader(fd, loop)
    native = anyio.lowlevel.current_token().native_token
    if type(native).__module__.split(".", 1)[0] == "trio":
        return _TrioReader(fd)
    return _Reader(fd)


class _Unsent(Exception):
    """The call's request could not reach its worker (dead while idle): nothing ran."""


class _Worker:
    __slots__ = (
        "busy",
        "calls",
        "clean",
        "exitcode",
        "exited",
        "idle_since",
        "idle_wake",
        "pid",
        "proc",
        "reader",
        "ready",
        "req",
        "req_fd",
        "res",
        "res_fd",
        "retiring",
        "scope",
        "stopped_by_pool",
        "unsent",
        "usage",
        "watch_scope",
    )

    def __init__(
        self,
        proc: AsyncProcess,
        req: Connection,
        res: Connection,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.proc = proc
        self.pid: int = proc.pid  # type: ignore[assignment]
        self.req, self.res = req, res
        self.req_fd, self.res_fd = req.fileno(), res.fileno()
        os.set_blocking(self.req_fd, False)
        os.set_blocking(self.res_fd, False)
        self.ready = False
        self.busy = False  # a call holds it (and reads its pipe)
        self.clean = True
        self.calls = 0
        self.idle_since = 0.0
        self.retiring = False
        self.stopped_by_pool = False
        #: A request could not be written: the worker had died, idle.
        self.unsent = False
        #: While it is busy, its watcher waits without a timer; the call that
        #: releases it cancels this so that the idle timer starts.
        self.idle_wake: anyio.CancelScope | None = None
        self.scope: anyio.CancelScope | None = None
        self.exited = anyio.Event()
        self.exitcode: int | None = None
        self.usage: ResourceUsage | None = None
        # Shielded: the pool's group lives inside its user's scopes, whose cancellation
        # must not stop the watching (closing waits for the exits it reports).
        self.watch_scope = anyio.CancelScope(shield=True)
        self.reader = _reader_for(self.res_fd, loop)


class _Waiter:
    """A call waiting for a worker; ``grant()`` wakes it.  On asyncio a future of
    the loop's (an ``anyio.Event`` costs several times as much to make and set)."""

    __slots__ = ("_event", "_future", "granted", "worker")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._future = None if loop is None else loop.create_future()
        self._event = anyio.Event() if loop is None else None
        #: None while waiting; then "worker" (in ``worker``), "slot" (the right to
        #: start one) or "closed" (the pool closed).
        self.granted: str | None = None
        self.worker: _Worker | None = None

    def grant(self, what: str, worker: _Worker | None = None) -> None:
        self.granted, self.worker = what, worker
        if self._future is not None:
            if not self._future.done():
                self._future.set_result(None)
        else:
            assert self._event is not None
            self._event.set()

    async def wait(self) -> None:
        if self._future is not None:
            await self._future
        else:
            assert self._event is not None
            await self._event.wait()


_ctrl_c_protected = False


def _protect_tasks_from_ctrl_c() -> None:
    """Under trio: no KeyboardInterrupt is raised inside the pool's own tasks.

    trio raises the KeyboardInterrupt of a Ctrl-C in whatever unprotected code
    is running when it arrives: in a worker's watcher task, that task would
    end without marking the worker exited, and stopping the worker would wait
    out the grace period and the kill wait, then warn that it is unkillable
    (and the interrupt would come out of the pool wrapped in an exception
    group).  Protected, trio delivers it to the main task instead.
    """
    global _ctrl_c_protected
    if _ctrl_c_protected:
        return
    import trio  # noqa: PLC0415 - only under trio

    # trio >= 0.28 records the code object and returns the function itself;
    # before, it returns a wrapper, which must take its place.
    Pool._task = trio.lowlevel.enable_ki_protection(Pool._task)  # type: ignore[method-assign]
    _ctrl_c_protected = True


class Pool:
    """Worker processes, reused across calls, that keep every promise of ``aioproc.run``.

    ``async with Pool(...) as pool:`` then ``await pool.run(func, *args)`` or
    ``async for value in pool.map(func, items)``.  See SPEC §6 and the README.

    *workers*: at most this many worker processes (None: the CPUs this
    process may run on).  *context*: a start method name or a
    ``multiprocessing`` context (None: the default).  *max_tasks_per_worker*:
    a worker is replaced after that many calls (None: never).
    *idle_timeout*: seconds after which an unused worker exits (None: never).
    *initializer* is called with *initargs* first thing in every new worker.
    *grace*: seconds between SIGTERM and SIGKILL when a worker is stopped.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        context: str | BaseContext | None = None,
        max_tasks_per_worker: int | None = None,
        idle_timeout: float | None = 300,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        grace: float = 1.0,
    ) -> None:
        if workers is None:
            workers = _cpus()
        self._workers = _positive_int("workers", workers)
        self._ctx = resolve_context(context) or multiprocessing.get_context()
        self._method = self._ctx.get_start_method()
        self._max_tasks = (
            None
            if max_tasks_per_worker is None
            else _positive_int("max_tasks_per_worker", max_tasks_per_worker)
        )
        self._idle_timeout = check_timeout(
            idle_timeout, "idle_timeout", "0: a worker exits once idle, None: never"
        )
        if initializer is not None and not callable(initializer):
            raise TypeError(
                f"initializer must be a callable or None, not {type(initializer).__name__}"
            )
        self._initializer = initializer
        try:
            self._initargs = tuple(initargs)
        except TypeError:
            raise TypeError(
                f"initargs must be a tuple (or another iterable), not {type(initargs).__name__}"
            ) from None
        if initializer is not None and not POPEN_CLASSES[self._method].inherits_memory:
            try:
                _wire.dumps_call(initializer, self._initargs)
            except Exception as exc:
                raise _wire.unpicklable_call(
                    initializer,
                    self._initargs,
                    exc,
                    to=f"a {self._method} pool worker",
                    fix=" as the initializer and its initargs, or use context='fork'",
                ) from exc
        self._grace = check_grace(grace)
        self._die_with_parent = PDEATHSIG_SUPPORTED and not lifeline_problem(self._method)
        self._state = "new"  # -> open -> closing -> closed
        self._token: object = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._live = 0  # workers starting, idle or busy (not exiting)
        self._busy = 0
        self._waiters: deque[_Waiter] = deque()
        self._maps: set[_MapState[Any]] = set()
        self._tasks = 0
        self._tasks_done: anyio.Event | None = None
        self._shutting_down = False
        self._quiet: anyio.Event | None = None  # set when no call is in progress
        self._gone: anyio.Event | None = None  # set when no worker is left

    def __repr__(self) -> str:
        return (
            f"<aioproc.Pool {self._state} workers={self._workers} context={self._method!r} "
            f"live={self._live} busy={self._busy} waiting={len(self._waiters)}>"
        )

    @property
    def workers(self) -> int:
        """The most worker processes this pool runs at once."""
        return self._workers

    # -- async with -------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        if self._state != "new":
            raise RuntimeError(
                f"a Pool can be entered once; this one is {self._state}; create a new Pool"
            )
        self._token = anyio.lowlevel.current_token()
        # On asyncio the running loop tells the same, for a twentieth of the cost.
        self._loop = _asyncio_loop()
        if self._loop is None:
            _protect_tasks_from_ctrl_c()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._state = "open"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        tg = self._tg
        if tg is None:  # pragma: no cover - __aexit__ without __aenter__
            return
        graceful = exc_type is None
        self._state = "closing"
        try:
            if graceful:
                try:
                    while self._busy or self._waiters:
                        self._quiet = anyio.Event()
                        await self._quiet.wait()
                except BaseException:
                    graceful = False
                    raise
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self._shut_down(graceful)
            finally:
                self._state = "closed"
                if self._tasks:  # only if the shut-down failed: let the group end them
                    tg.cancel_scope.cancel()
                # Every task of the group has ended: this returns at once, and the
                # exception that ends the block is left as it is, never wrapped.
                await tg.__aexit__(None, None, None)

    async def _shut_down(self, graceful: bool) -> None:
        """Tell every worker to exit (stop the busy ones unless *graceful*); wait for them."""
        self._shutting_down = True
        for waiter in self._waiters:
            waiter.grant("closed")
        self._waiters.clear()
        for state in list(self._maps):
            state.scope.cancel()
        for w in list(self._all):
            if w.exited.is_set():
                continue
            if w.busy and not graceful:  # its call raises PoolClosed
                w.stopped_by_pool = True
                w.proc.terminate()
            else:
                self._retire(w)
        with anyio.move_on_after(self._grace):
            await self._all_gone()
        left = [w for w in self._all if not w.exited.is_set()]
        for w in left:
            w.proc.kill()
        if left:
            with anyio.move_on_after(_run._KILL_WAIT):
                await self._all_gone()
        for w in list(self._all):
            if not w.exited.is_set():
                # The watcher is about to be cancelled: the process goes to run's
                # stragglers, reaped later.
                warnings.warn(
                    f"pool worker {w.pid} is still alive {_run._KILL_WAIT:g} s after "
                    "SIGKILL (stuck in the kernel, or stopped by a debugger); aioproc "
                    "will reap it later, at the next aioproc.run() or at interpreter exit",
                    UnkillableProcessWarning,
                    stacklevel=3,
                )
                adopt(w.proc)
                w.watch_scope.cancel()
                w.reader.close()  # unregistered before its descriptor is closed
                self._close_fds(w)
                self._all.discard(w)
        while self._tasks:
            self._tasks_done = anyio.Event()
            await self._tasks_done.wait()

    async def _all_gone(self) -> None:
        while self._all:
            self._gone = anyio.Event()
            await self._gone.wait()

    # -- workers ----------------------------------------------------------------

    async def _start_worker(self) -> _Worker:
        """Start a worker for the caller (its slot is counted in ``_live`` already)."""
        try:
            req_r, req_w = _wire.pipe("Pool")
            try:
                res_r, res_w = _wire.pipe("Pool")
            except BaseException:
                req_r.close()
                req_w.close()
                raise
        except BaseException:
            self._slot_freed()
            raise
        proc: AsyncProcess | None = None
        w: _Worker | None = None
        try:
            inherits = POPEN_CLASSES[self._method].inherits_memory
            proc = AsyncProcess(
                target=worker_main,
                args=(req_r, res_w, self._initializer, self._initargs, inherits),
                context=self._ctx,
                new_process_group=True,
                die_with_parent=self._die_with_parent,
            )
            proc._kill_group_at_exit = True  # what a dead worker left is killed
            proc._stop_at_exit = True  # a pool left open at interpreter exit: stopped
            proc._exit_grace = self._grace
            await proc._start_async(lambda: _run._sigint_blocked(self._method))
            w = _Worker(proc, req_w, res_r, self._loop)
            if not self._shutting_down:  # else the pool closed while this worker started
                _parent_ends.update((w.req_fd, w.res_fd))
                self._all.add(w)
                assert self._tg is not None
                self._tg.start_soon(self._task, self._watch, w)
                return w
        except BaseException:
            # Also trio's KeyboardInterrupt once the worker exists, before its
            # watcher does: nothing else would stop it.
            if w is not None:
                self._all.discard(w)
                _parent_ends.difference_update((w.req_fd, w.res_fd))
            try:
                if proc is not None and proc._child is not None:
                    await self._kill_unwatched(proc)
            finally:
                req_w.close()
                res_r.close()
                self._slot_freed()
            raise
        finally:
            req_r.close()
            res_w.close()
        try:
            await self._kill_unwatched(proc)
        finally:
            req_w.close()
            res_r.close()
            self._slot_freed()
        raise PoolClosed("the pool closed while this call started a worker for it")

    async def _kill_unwatched(self, proc: AsyncProcess) -> None:
        """SIGKILL and reap a new worker that has no watcher; adopted if it survives."""
        with anyio.CancelScope(shield=True):
            proc.kill()
            with contextlib.suppress(ExitStatusLost):  # reaped by someone else: gone
                await proc.join(_run._KILL_WAIT)
        if proc.is_alive():
            adopt(proc)
        else:
            proc.close()

    async def _task(self, func: Callable[..., Any], *args: Any) -> None:
        """Run a task of the pool's group, counted so that closing knows when all ended.

        Under trio it is protected from KeyboardInterrupt (see
        ``_protect_tasks_from_ctrl_c``), and so is every task started through it.
        """
        self._tasks += 1
        try:
            await func(*args)
        finally:
            self._tasks -= 1
            if not self._tasks and self._tasks_done is not None:
                self._tasks_done.set()

    async def _watch(self, w: _Worker) -> None:
        """Join the worker; retire it when idle too long; clean up after it."""
        proc = w.proc
        idle_timeout = self._idle_timeout or None  # 0: retired at once by _release
        try:
            with w.watch_scope:
                await self._join(w, proc, idle_timeout)
        except anyio.get_cancelled_exc_class():
            # Only a cancellation from outside anyio gets through the shield:
            # asyncio's runner cancelling every task as it shuts down (a second
            # Ctrl-C).  The calls and the pool's closing wait for this watch to
            # see the worker exit: kill it and see that, bounded, before ending.
            if not w.exited.is_set():
                with contextlib.suppress(Exception):
                    proc.kill()
                code = None
                with contextlib.suppress(Exception):
                    code = await proc.join(_run._KILL_WAIT)
                if code is not None:
                    self._exited(w, proc, code)
            raise
        # Here too when the pool cancelled the watch scope itself: a worker
        # it gave up on (a straggler), adopted by run's machinery.

    async def _join(self, w: _Worker, proc: AsyncProcess, idle_timeout: float | None) -> None:
        code: int | None = None
        delay = 0.01
        while True:
            wait: float | None = None
            if idle_timeout is not None and not w.retiring:
                if w in self._idle:
                    wait = w.idle_since + idle_timeout - anyio.current_time()
                    if wait <= 0:
                        self._idle.remove(w)
                        self._retire(w)
                        wait = None
                else:  # busy: no timer (no wake-ups) until a call releases it
                    w.idle_wake = anyio.CancelScope()
            try:
                if w.idle_wake is not None:
                    with w.idle_wake:
                        code = await proc.join()
                else:
                    code = await proc.join(wait)
            except ExitStatusLost:
                break  # reaped by someone else: the call running on it says so
            except Exception:
                # The watch could not be set up (out of descriptors): stop the worker,
                # and try again until its exit can be seen.
                with contextlib.suppress(Exception):
                    proc.kill()
                await anyio.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            finally:
                w.idle_wake = None
            if code is not None:
                break
        self._exited(w, proc, code)

    def _exited(self, w: _Worker, proc: AsyncProcess, code: int | None) -> None:
        """The worker has exited (*code*; None: someone else reaped it)."""
        w.exitcode = code
        with contextlib.suppress(Exception):
            w.usage = proc.resource_usage
        with contextlib.suppress(Exception):
            proc.close()
        self._slot_freed(w)
        w.exited.set()
        if w.busy:  # the call running on it reads what is left, and raises
            w.reader.wake()
            if w.scope is not None:
                w.scope.cancel()
        else:
            self._forget(w)

    def _retire(self, w: _Worker) -> None:
        """Ask an idle worker to exit (its watcher reaps it)."""
        self._slot_freed(w)
        with contextlib.suppress(OSError):
            os.write(w.req_fd, _EXIT[0])

    def _slot_freed(self, w: _Worker | None = None) -> None:
        """A worker stops counting (exiting, gone, or never started): start another
        one for the first waiter, if any."""
        if w is not None:
            if w.retiring:
                return
            w.retiring = True
        self._live -= 1
        if self._waiters and self._state in ("open", "closing"):
            waiter = self._waiters.popleft()
            self._live += 1
            waiter.grant("slot")

    def _close_fds(self, w: _Worker) -> None:
        _parent_ends.difference_update((w.req_fd, w.res_fd))
        w.req.close()
        w.res.close()

    def _forget(self, w: _Worker) -> None:
        """The worker is gone and no call holds it."""
        if w not in self._all:
            return
        if w in self._idle:
            self._idle.remove(w)
        w.reader.close()
        self._close_fds(w)
        self._all.discard(w)
        if not self._all and self._gone is not None:
            self._gone.set()

    async def _acquire(self) -> _Worker:
        if self._idle and not self._waiters:
            return self._idle.pop()
        if not self._waiters and self._live < self._workers:
            self._live += 1
            await anyio.lowlevel.checkpoint_if_cancelled()
            return await self._start_worker()
        waiter = _Waiter(self._loop)
        self._waiters.append(waiter)
        try:
            await waiter.wait()
        except BaseException:
            if waiter.granted is None:
                self._waiters.remove(waiter)
            elif waiter.worker is not None:
                self._release(waiter.worker, used=False)
            elif waiter.granted == "slot":
                self._slot_freed()
            raise
        if waiter.worker is not None:
            return waiter.worker
        if waiter.granted == "closed":
            raise PoolClosed("the pool closed while this call waited for a worker")
        return await self._start_worker()

    def _release(self, w: _Worker, *, used: bool = True) -> None:
        """A call is done with a live worker: hand it on, keep it, or retire it."""
        w.calls += used
        if (
            not w.clean
            or self._idle_timeout == 0
            or (self._max_tasks is not None and w.calls >= self._max_tasks)
        ):
            self._retire(w)
        elif self._waiters:
            waiter = self._waiters.popleft()
            waiter.grant("worker", w)
            return
        else:
            w.idle_since = anyio.current_time()
            self._idle.append(w)
            if w.idle_wake is not None:
                w.idle_wake.cancel()  # its watcher starts the idle timer
        self._check_quiet()

    def _check_quiet(self) -> None:
        if self._quiet is not None and not self._busy and not self._waiters:
            self._quiet.set()

    # -- calls --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise PoolClosed(
                {
                    "new": "the pool is not open; use it inside `async with Pool(...) as pool:`",
                    "closing": "the pool is closing (its `async with` block has ended); "
                    "no new call can start",
                    "closed": "the pool is closed (its `async with` block has ended); "
                    "create a new Pool",
                }[self._state]
            )
        loop = self._loop
        if (
            asyncio._get_running_loop() is not loop
            if loop is not None
            else anyio.lowlevel.current_token() != self._token
        ):
            raise RuntimeError(
                "this Pool belongs to the event loop that entered it; a pool cannot be "
                "used from another event loop or thread: create one Pool per loop"
            )

    async def run(
        self,
        func: Callable[[Unpack[PosArgsT]], T],
        *args: Unpack[PosArgsT],
        timeout: float | None = None,  # noqa: ASYNC109 - counts from the worker's start of the call
        **kwargs: Never,
    ) -> T:
        """Call ``func(*args)`` in a worker and return its result.

        The same contract as ``aioproc.run``: the value; the function's
        exception, same type, with the worker's traceback as ``__cause__``;
        ``RemoteError`` for one that cannot be pickled; ``ProcessDied`` if the
        worker dies during the call; a ``pickle.PicklingError`` naming the
        argument at fault, before anything is sent.  Keyword arguments go
        through ``functools.partial``.

        Waits first come, first served for a free worker; *timeout* counts
        from the moment a worker starts the call.  On timeout
        (``ProcessTimeout``) or cancellation the worker is stopped (SIGTERM to
        its group, *grace*, SIGKILL) and reaped; another is started when a call
        needs it.  Whatever the function started and left running is killed
        when the call ends.
        """
        _wire.check_call(func, kwargs, "Pool.run")
        self._check_open()
        timeout = check_timeout(timeout)
        try:
            body, buffers = _wire.dumps_call(func, args)
        except Exception as exc:
            raise _wire.unpicklable_call(
                func,
                args,
                exc,
                to=f"a {self._method} pool worker",
                fix="; every call to a Pool's worker is pickled, whatever the start method",
            ) from exc
        parts = _wire.frame(None, body, buffers)
        del body, buffers
        await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled already: send nothing
        self._busy += 1
        try:
            while True:
                w = await self._acquire()
                try:  # (no context manager: this is every call's path)
                    return await self._call(w, func, parts, timeout)
                except _Unsent:
                    continue  # the worker had died idle: another one
        finally:
            self._busy -= 1
            self._check_quiet()

    async def _call(
        self, w: _Worker, func: Callable[..., T], parts: list[Any], limit: float | None
    ) -> T:
        inc = _wire.Incoming()
        hello = None if w.ready else _wire.Incoming()
        small = len(parts) == 2 and len(parts[0]) + len(parts[1]) <= _SMALL
        w.busy = True
        try:
            if limit is None and small:
                # The common case: no deadline, a request the empty pipe takes at
                # once, and the watcher wakes the wait if the worker dies.
                await self._exchange(
                    w, parts, small=small, hello=hello, inc=inc, limit=None, func=func
                )
            else:
                # The deadline runs from the moment the worker is ready (a new one
                # says so); the watcher cancels the scope if the worker dies.
                scope = anyio.CancelScope(
                    deadline=math.inf if limit is None or hello else anyio.current_time() + limit
                )
                w.scope = scope
                with scope:
                    await self._exchange(
                        w, parts, small=small, hello=hello, inc=inc, limit=limit, func=func
                    )
        except BaseException:
            w.scope, w.busy = None, False
            with anyio.CancelScope(shield=True):
                await self._stop(w)
            raise
        # From here on, no await until the call is done with the pipes (or stops the worker).
        w.scope, w.busy = None, False
        if not w.exited.is_set() and inc.complete:
            meta, w.clean = inc.meta()
            self._release(w)
            return _wire.result_of(func, w.pid, inc, None, meta)  # type: ignore[no-any-return]
        if not w.exited.is_set():  # the deadline passed
            with anyio.CancelScope(shield=True):
                done = await self._stop(w)
            raise ProcessTimeout(
                f"pool worker {w.pid} running {_wire.describe(func)} did not finish within "
                f"{limit:g} s; {done}",
                pid=w.pid,
                exitcode=w.exitcode,
                resource_usage=w.usage,
            )
        # The worker exited: what it wrote before is still in the pipe.
        with contextlib.suppress(OSError):
            if hello is not None and not hello.complete:
                hello.read_some(w.res_fd, math.inf)
            if hello is None or hello.complete:
                if hello is not None:
                    self._hello(w, hello, func)
                inc.read_some(w.res_fd, math.inf)
        self._forget(w)
        if w.unsent and hello is None and not w.stopped_by_pool:
            # An idle worker had died (killed from outside): the request never
            # reached it, so nothing ran, and the call goes to another worker.
            raise _Unsent
        if w.stopped_by_pool:
            raise PoolClosed(
                f"the pool closed (its `async with` block ended by an exception or a "
                f"cancellation) while pool worker {w.pid} ran {_wire.describe(func)}; the "
                "worker was stopped"
            )
        if inc.complete:
            meta, w.clean = inc.meta()
            return _wire.result_of(func, w.pid, inc, w.usage, meta)  # type: ignore[no-any-return]
        if w.exitcode is None:  # something else in the program reaped it
            raise ExitStatusLost(w.pid)
        raise _wire.died(
            func,
            w.pid,
            w.exitcode,
            w.usage,
            started=hello is None or hello.complete,
            method=self._method,
            what="pool worker",
        )

    async def _exchange(
        self,
        w: _Worker,
        parts: list[Any],
        *,
        small: bool,
        hello: _wire.Incoming | None,
        inc: _wire.Incoming,
        limit: float | None,
        func: Callable[..., object],
    ) -> None:
        """Send the request, read the answer (and first "ready"); return early if the
        worker exits."""
        try:
            written = 0
            if small:
                # An idle worker's pipe is empty: a small request goes in one call.
                with contextlib.suppress(BlockingIOError):
                    written = os.writev(w.req_fd, parts)
                if written < len(parts[0]) + len(parts[1]):  # pragma: no cover - defensive
                    await _wire.send(w.req_fd, [b"".join(parts)[written:]])
            else:
                await _wire.send(w.req_fd, parts)
        except BrokenPipeError:
            w.unsent = True
            await w.exited.wait()  # it died; its exit says the rest
            return
        if hello is not None:
            if not await self._read(w, hello):
                return
            self._hello(w, hello, func)
            if limit is not None and w.scope is not None:
                w.scope.deadline = anyio.current_time() + limit
        await self._read(w, inc)

    async def _read(self, w: _Worker, inc: _wire.Incoming) -> bool:
        """Read a frame from the worker: True once complete, False if it exited first."""
        if await w.reader.read(inc):
            return True
        if inc.eof:  # it exited (or is exiting): its watcher says when
            await w.exited.wait()
        return False

    def _hello(self, w: _Worker, hello: _wire.Incoming, func: Callable[..., object]) -> None:
        meta = hello.meta()
        if meta[0] == "ready":
            w.ready, w.clean = True, meta[1]
            return
        outcome = meta[1]  # "init-failed"
        cause = _wire.rebuilt_exception(
            hello.body(),
            hello.objects,
            name=outcome[1],
            message=outcome[2],
            text=outcome[3],
            usage=None,
        )
        self._forget_soon(w)
        raise InitializerError(
            f"the pool's initializer {_wire.describe(self._initializer or repr)} raised "
            f"{_wire.type_name(cause)} in new worker {w.pid}, so {_wire.describe(func)} "
            "could not run; the worker exited",
            pid=w.pid,
            exitcode=w.exitcode,
        ) from cause

    def _forget_soon(self, w: _Worker) -> None:
        """The worker is exiting on its own (its initializer failed)."""
        w.scope, w.busy = None, False
        self._slot_freed(w)
        if w.exited.is_set():
            self._forget(w)
        # else: its watcher forgets it once it has exited

    async def _stop(self, w: _Worker) -> str:
        """Stop a busy worker: SIGTERM to its group, grace, SIGKILL, a bounded wait."""
        w.scope, w.busy = None, False
        self._slot_freed(w)
        done = "it was found exited"
        if not w.exited.is_set():
            w.proc.terminate()
            done = "it was sent SIGTERM"
            with anyio.move_on_after(self._grace):
                await w.exited.wait()
        if not w.exited.is_set():
            w.proc.kill()
            done = f"it was sent SIGTERM, then SIGKILL after the {self._grace:g} s grace period,"
            with anyio.move_on_after(_run._KILL_WAIT):
                await w.exited.wait()
        if not w.exited.is_set():
            warnings.warn(
                f"pool worker {w.pid} is still alive {_run._KILL_WAIT:g} s after SIGKILL "
                "(stuck in the kernel, or stopped by a debugger); aioproc stopped waiting "
                "for it and will reap it when the pool closes",
                UnkillableProcessWarning,
                stacklevel=3,
            )
            return f"{done} and is still alive (see the UnkillableProcessWarning)"
        self._forget(w)
        if w.exitcode is None:
            return f"{done} and reaped by someone else"
        return f"{done} and reaped (exit code {w.exitcode})"

    # -- map ------------------------------------------------------------------------

    def map(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any] | AsyncIterable[Any],
        *,
        timeout: float | None = None,
        ordered: bool = True,
    ) -> AsyncIterator[T]:
        """``func(item)`` for every item, as an async iterator of the results.

        At most twice ``workers`` calls are in flight or waiting to be consumed,
        so *iterable* (or async iterable, as ``DaskPool.map`` takes) may be
        endless.  *ordered* (default): results in the order of the items; else
        as they come.  *timeout* applies to each call as in ``run``.  The first
        call that fails stops the others (their workers are stopped) and its
        exception is raised; leaving the loop early (``break``, an exception,
        closing the iterator) stops them too.  An iterable that raises ends the
        map as a ``for`` loop over it would: the results of the items it gave
        come first, then its exception.
        """
        _wire.check_call(func, {}, "Pool.map")
        self._check_open()
        timeout = check_timeout(timeout)
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, not {type(ordered).__name__}")
        items: Iterator[Any] | AsyncIterator[Any]
        if isinstance(iterable, AsyncIterable):
            items = aiter(iterable)
        else:
            try:
                items = iter(iterable)
            except TypeError:
                raise TypeError(
                    f"iterable must be an iterable or an async iterable, not "
                    f"{type(iterable).__name__}"
                ) from None
        return self._map(func, items, timeout, ordered)

    async def _map(
        self, func: Callable[[Any], T], items: Any, limit: float | None, ordered: bool
    ) -> AsyncIterator[T]:
        self._check_open()  # again: the first item is asked for later
        state: _MapState[T] = _MapState(2 * self._workers, ordered)
        assert self._tg is not None
        self._maps.add(state)
        self._tg.start_soon(self._task, self._map_driver, state, func, items, limit)
        try:
            while True:
                value = await state.next()
                if value is _END:
                    return
                yield value
        finally:
            state.scope.cancel()
            self._maps.discard(state)

    async def _map_driver(
        self,
        state: _MapState[T],
        func: Callable[[Any], T],
        items: Any,
        limit: float | None,
    ) -> None:
        cancelled = anyio.get_cancelled_exc_class()

        async def one(index: int, item: object) -> None:
            try:
                value = await self.run(func, item, timeout=limit)
            except (cancelled, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # the function's, whatever its type
                state.fail(exc)
            else:
                state.put(index, value)

        async def next_item() -> object:
            """The next item; _END once there is none."""
            if isinstance(items, AsyncIterator):
                try:
                    return await items.__anext__()
                except StopAsyncIteration:
                    return _END
            return next(items, _END)

        with state.scope:
            try:
                async with anyio.create_task_group() as tg:
                    index = 0
                    while True:
                        await state.room.acquire()
                        try:
                            item = await next_item()
                        except Exception as exc:
                            state.room.release()
                            state.end_error = exc  # after the results of what it gave
                            break
                        if item is _END:
                            state.room.release()
                            break
                        tg.start_soon(self._task, one, index, item)
                        index += 1
            finally:
                state.finish()


_END: Any = object()


class _MapState(Generic[T]):
    """Results of one ``map``, between its driver task and its consumer."""

    def __init__(self, bound: int, ordered: bool) -> None:
        self.scope = anyio.CancelScope()
        self.room = anyio.Semaphore(bound)
        self.ordered = ordered
        self.results: dict[int, T] = {}  # ordered: by index
        self.arrived: deque[T] = deque()  # unordered: as they come
        self.error: BaseException | None = None
        #: The iterable's exception: raised where the results end.
        self.end_error: BaseException | None = None
        self.done = False
        self.next_index = 0
        self._changed = anyio.Event()

    def put(self, index: int, value: T) -> None:
        if self.ordered:
            self.results[index] = value
        else:
            self.arrived.append(value)
        self._changed.set()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self.scope.cancel()  # the first error stops the rest
        self._changed.set()

    def finish(self) -> None:
        self.done = True
        self._changed.set()

    async def next(self) -> T:
        while True:
            if self.error is not None:
                raise self.error
            if self.ordered and self.next_index in self.results:
                value = self.results.pop(self.next_index)
                self.next_index += 1
                self.room.release()
                return value
            if self.arrived:
                value = self.arrived.popleft()
                self.room.release()
                return value
            if self.done and not self.results:
                if self.end_error is not None:
                    error, self.end_error = self.end_error, None
                    raise error
                return _END  # type: ignore[no-any-return]
            self._changed = anyio.Event()
            await self._changed.wait()


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, not {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value
