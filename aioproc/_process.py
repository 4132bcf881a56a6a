"""AsyncProcess: ``multiprocessing.Process`` with an awaitable ``join()``."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.process as mp_process
import multiprocessing.util as mp_util
import numbers
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import _fds
from ._childstate import reset_loop_state
from ._popen import launch
from ._tree import (
    arm_lifeline,
    check_die_with_parent,
    check_flag,
    check_lifeline_method,
    expected_parent,
    lead_own_group,
    set_group_from_parent,
)

if TYPE_CHECKING:
    from multiprocessing.popen_fork import Popen

    from ._child import ChildState
    from ._usage import ResourceUsage
    from ._watchers import Watch, WatcherName

# The event-loop side (anyio, the watchers) is imported on first use by the
# parent, so that a spawn or forkserver child, which imports this module to
# unpickle its process object, does not pay for it.

# A timeout this long is "forever"; a larger one would overflow some loops' timers.
_FOREVER = 1e9


def _check_timeout(timeout: object) -> float | None:
    """The timeout as a float, None for "forever"; or a clear error.

    Any real number is accepted (int, float, Fraction, numpy scalars); one too
    large for a float (``10**400``) waits forever like ``inf``.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            "timeout must be a real number of seconds (an int or a float) or None, "
            f"not {type(timeout).__name__}"
        )
    try:
        seconds = float(timeout)
    except OverflowError:  # an int or a Fraction beyond any float
        seconds = -math.inf if timeout < 0 else math.inf
    if math.isnan(seconds):
        raise ValueError("timeout must be a number of seconds or None, not NaN")
    if seconds < 0:
        raise ValueError(f"timeout must be >= 0 (0 polls, None waits forever), got {timeout!r}")
    return None if seconds >= _FOREVER else seconds


def _resolve_context(context: object) -> multiprocessing.context.BaseContext | None:
    if context is None or isinstance(context, multiprocessing.context.BaseContext):
        return context
    if isinstance(context, str):
        methods = multiprocessing.get_all_start_methods()
        if context not in methods:
            raise ValueError(
                f"unknown start method {context!r}; use one of {', '.join(methods)} "
                "or a multiprocessing context"
            )
        return multiprocessing.get_context(context)
    raise TypeError(
        "context must be a start method name, a multiprocessing context or None, "
        f"not {type(context).__name__}"
    )


def _exitcode_text(code: int) -> str:
    if code < 0:
        try:
            return f"-{signal.Signals(-code).name}"
        except ValueError:
            pass
    return str(code)


class AsyncProcess(mp_process.BaseProcess):
    """A child process with the ``multiprocessing.Process`` API and an awaitable join.

    ``start()``, ``is_alive()``, ``terminate()``, ``kill()``, ``close()``,
    ``name``, ``daemon``, ``pid``, ``exitcode``, ``sentinel`` and ``authkey``
    behave as in ``multiprocessing.Process``; ``run()`` may be overridden in a
    subclass or assigned on an instance before ``start()``.  ``await join()``
    is woken by the kernel through the event loop (see ``watcher``), and works
    on asyncio, uvloop and trio.

    *context* is a start method name (``"fork"``, ``"forkserver"``,
    ``"spawn"``), a ``multiprocessing`` context, or None for the default start
    method of the running Python.

    *new_process_group*: the child leads a process group of its own, made
    before its target runs, so that ``terminate()``, ``kill()`` and
    ``interrupt()`` reach every process it starts (unless one leaves the group
    with ``setsid()``).  It no longer gets the signals a terminal sends to its
    foreground group (Ctrl-C, Ctrl-Z, Ctrl-\\).

    *die_with_parent* (Linux): the child is killed (SIGKILL) when this process
    dies, however it dies, even if that happens while the child is starting.
    The "parent" is the thread that calls ``start()`` (a kernel rule): start it
    from a thread that outlives the child.  Not with the forkserver start
    method (``NotImplementedError``).
    """

    _start_method: str | None = None
    _ctx: multiprocessing.context.BaseContext | None = None
    _state: ChildState | None = None
    #: True while start_async() is starting the child.
    _starting = False
    _new_process_group = False
    _die_with_parent = False
    #: The pid that forks the child, as the child must find it (die_with_parent).
    _lifeline_parent: int | None = None
    #: ``aioproc.run`` sets this: SIGKILL what is left of the group at exit.
    _kill_group_at_exit = False

    if TYPE_CHECKING:  # BaseProcess's private attributes, which typeshed leaves out
        _popen: Popen | None
        _parent_pid: int
        _config: dict[str, Any]
        _closed: bool
        _name: str
        _sentinel: int
        _target: Callable[..., object] | None
        _args: tuple[Any, ...]
        _kwargs: dict[str, Any]

        def _check_closed(self) -> None: ...

    def __init__(
        self,
        group: None = None,
        target: Callable[..., object] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
        context: str | multiprocessing.context.BaseContext | None = None,
        new_process_group: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        if group is not None:
            raise ValueError(
                f"group must be None (reserved, as in multiprocessing.Process), got {group!r}"
            )
        if target is not None and not callable(target):
            raise TypeError(f"target must be a callable or None, not {type(target).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        try:
            args = tuple(args)
        except TypeError:
            raise TypeError(
                f"args must be a tuple (or another iterable), not {type(args).__name__}"
            ) from None
        if kwargs is None:
            kwargs = {}
        elif not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict or None, not {type(kwargs).__name__}")
        self._ctx = _resolve_context(context)
        new_process_group = check_flag("new_process_group", new_process_group)
        die_with_parent = check_die_with_parent(die_with_parent)
        super().__init__(None, target, name, args, kwargs, daemon=daemon)
        self._new_process_group = new_process_group
        self._die_with_parent = die_with_parent
        if die_with_parent and self._ctx is not None:
            check_lifeline_method(self._ctx.get_start_method())
        if self._ctx is not None:
            self._start_method = self._ctx.get_start_method()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the child, as ``multiprocessing.Process.start()``.

        A plain call that returns once the child exists: it blocks for as long
        as the start method needs (a fork, a spawn, or a round trip to the fork
        server), never longer.  Unlike the stdlib's, its cost does not grow
        with the number of live children.  ``start_async()`` waits for the
        child without blocking the event loop.
        """
        ctx, watch_cls = self._check_startable()
        self._started(launch(self, ctx), watch_cls)

    async def start_async(self) -> None:
        """Start the child like ``start()``, handing every wait to the event loop.

        For spawn, the data the child needs is written as the pipe drains
        (the child reads it once its interpreter is up); for forkserver, the
        fork server's reply is awaited.  What remains in the loop's thread is
        the start method's own system calls: ``fork()`` for fork (all of
        that start), ``vfork()`` + ``exec()`` for spawn, a connect and a
        ``sendmsg()`` to the fork server.  Misuse raises as ``start()`` does.

        Cancelled, or failing, it leaves nothing behind: no child (one that
        exists is killed and reaped), no descriptor; the process stays
        unstarted and may be started again.  Once it returns, the child is
        started, even if the task was cancelled meanwhile.
        """
        await self._start_async(contextlib.nullcontext)

    async def _start_async(
        self, around_launch: Callable[[], contextlib.AbstractContextManager[object]]
    ) -> None:
        """``start_async()``, entering *around_launch* while the child is created."""
        import anyio.lowlevel

        from ._startasync import launch_async

        ctx, watch_cls = self._check_startable()
        self._starting = True
        try:
            # The checkpoint comes first: after a fork, every page the parent
            # touches is copied, so it yields before the fork, not after.
            await anyio.lowlevel.checkpoint()
            popen = await launch_async(self, ctx, around_launch)
        finally:
            self._starting = False
        self._started(popen, watch_cls)

    def _check_startable(self) -> tuple[multiprocessing.context.BaseContext, type[Watch]]:
        """Refuse a start that is misuse; the context and watcher class to start with."""
        self._check_closed()
        if self._starting:
            raise RuntimeError(
                f"start_async() of {self!r} is in progress in another task; "
                "await that one instead of starting the process again"
            )
        if self._popen is not None:
            raise RuntimeError(
                f"cannot start a process twice ({self!r}); create a new AsyncProcess"
            )
        if self._parent_pid != os.getpid():
            raise RuntimeError("can only start a process object created by the current process")
        if mp_process.current_process()._config.get("daemon"):  # type: ignore[attr-defined]
            raise RuntimeError(
                "a daemonic process is not allowed to have children; "
                "create the parent with daemon=False to start children from it"
            )
        from ._watchers import Place, choose

        ctx = self._ctx if self._ctx is not None else multiprocessing.get_context()
        method = ctx.get_start_method()
        watch_cls = choose(Place.here(method))
        _ensure_exit_handler()
        if self._die_with_parent:
            check_lifeline_method(method)
            self._lifeline_parent = expected_parent()
        return ctx, watch_cls

    def _started(self, popen: Popen, watch_cls: type[Watch]) -> None:
        """Watch the child that *popen* started, and record it as started."""
        from ._child import ChildState
        from ._watchers import attach

        if self._new_process_group and popen.method == "fork":
            set_group_from_parent(popen.pid)
        try:
            watch = attach(watch_cls, popen)
        except BaseException as exc:
            _kill_and_reap(popen)
            if isinstance(exc, OSError):
                raise OSError(
                    exc.errno,
                    f"could not watch the new child: {_strerror(exc)}; it was killed "
                    "and reaped, nothing is left and start() may be called again; "
                    "close file descriptors or raise RLIMIT_NOFILE",
                ) from exc
            raise
        self._state = ChildState(
            popen,
            watch,
            group=self._new_process_group,
            kill_group_at_exit=self._kill_group_at_exit,
        )
        self._popen = popen
        self._sentinel = popen.sentinel
        # As the stdlib does: no reference cycle through the target (bpo-30775).
        del self._target, self._args, self._kwargs
        mp_process._children.add(self)  # type: ignore[attr-defined]

    async def join(  # type: ignore[override]
        self,
        timeout: float | None = None,
    ) -> int | None:
        """Wait until the child exits; return its exit code.

        Returns None if *timeout* seconds pass first (the child keeps running).
        ``timeout=0`` polls.  Any number of tasks may join at once; all of them
        wake when the child exits.  Cancelling a join cancels only the wait:
        the child keeps running and can be joined again.
        """
        import anyio.lowlevel

        timeout = _check_timeout(timeout)
        state = self._started_child("join")
        if timeout is None:
            code: int | None = await state.wait()
        else:
            await anyio.lowlevel.checkpoint()
            code = state.poll()
            if code is None and timeout > 0:
                with anyio.move_on_after(timeout):
                    code = await state.wait()
        if code is not None:
            mp_process._children.discard(self)  # type: ignore[attr-defined]
        return code

    def is_alive(self) -> bool:
        """Whether the child has been started and has not exited yet."""
        self._check_closed()
        if self is mp_process.current_process():
            return True
        if self._parent_pid != os.getpid():
            raise RuntimeError("can only test a child process of this process")
        if self._state is None:
            return False
        if self._state.poll() is None:
            return True
        mp_process._children.discard(self)  # type: ignore[attr-defined]
        return False

    def terminate(self) -> None:
        """Send SIGTERM to the child (nothing if it has already exited)."""
        self._started_child("terminate", parent_only=False).send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the child (nothing if it has already exited)."""
        self._started_child("kill", parent_only=False).send_signal(signal.SIGKILL)

    def interrupt(self) -> None:
        """Send SIGINT to the child (nothing if it has already exited)."""
        self._started_child("interrupt", parent_only=False).send_signal(signal.SIGINT)

    def close(self) -> None:
        """Release the resources held for the child; it must have exited.

        Afterwards most methods and attributes raise ``ValueError``.
        """
        if self._starting:
            raise ValueError(
                "cannot close a process that start_async() is starting; await it, "
                "then join() the child before closing"
            )
        state = self._state
        if state is not None:
            if state.poll() is None:
                raise ValueError(
                    "cannot close a process that is still running; "
                    "await join() or call terminate() first"
                )
            state.close()
            self._state = None
            self._popen = None
            del self._sentinel
            mp_process._children.discard(self)  # type: ignore[attr-defined]
        self._closed = True

    def _started_child(self, action: str, *, parent_only: bool = True) -> ChildState:
        self._check_closed()
        if parent_only:
            if self is mp_process.current_process():
                raise RuntimeError(f"a process cannot {action} itself")
            if self._parent_pid != os.getpid():
                raise RuntimeError(
                    f"can only {action} a child of this process; {self._name} "
                    f"was created by pid {self._parent_pid}"
                )
        if self._state is None:
            raise RuntimeError(
                f"cannot {action} a process that has not been started; call start() first"
            )
        return self._state

    # -- attributes ----------------------------------------------------------

    @property
    def exitcode(self) -> int | None:
        """The exit code: None while running, negative signal number if killed."""
        self._check_closed()
        return None if self._state is None else self._state.poll()

    @property
    def resource_usage(self) -> ResourceUsage | None:
        """The child's CPU time and peak memory, from the kernel when it was reaped.

        None until the child has exited and been collected (by ``join()``,
        ``is_alive()``, ``exitcode``...), and None for good where the kernel's
        accounting does not reach us: a forkserver child (the fork server reaps
        it), a start method of someone else's making.  See ``ResourceUsage``.
        """
        self._check_closed()
        state = self._state
        if state is None or state.poll() is None:
            return None
        return state.resource_usage

    @property
    def daemon(self) -> bool:
        """Whether the child is terminated when the parent exits."""
        return bool(self._config.get("daemon", False))

    @daemon.setter
    def daemon(self, daemonic: bool) -> None:
        self._check_closed()
        if self._popen is not None or self._starting:
            raise RuntimeError(
                "cannot set daemon on a process that has been started; set it before start()"
            )
        self._config["daemon"] = daemonic

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        self._name = name

    @property
    def new_process_group(self) -> bool:
        """Whether the child leads a process group of its own (signals reach it all)."""
        return self._new_process_group

    @property
    def die_with_parent(self) -> bool:
        """Whether the child is killed when this process dies (Linux)."""
        return self._die_with_parent

    @property
    def watcher(self) -> WatcherName | None:
        """The watcher that tells ``join()`` about this child (None before start)."""
        return None if self._state is None else self._state.watcher_name

    def __repr__(self) -> str:
        info = [type(self).__name__, f"name={self._name!r}"]
        state = self._state
        if self is mp_process.current_process():
            info.append("current")
        elif self._closed:
            info.append("closed")
        elif state is None:
            info.append("initial")
        else:
            info.append(f"pid={state.pid}")
            code = state.poll() if self._parent_pid == os.getpid() else state.returncode
            info.append("running" if code is None else f"exitcode={_exitcode_text(code)}")
        if self.daemon:
            info.append("daemon")
        if self._new_process_group:
            info.append("new_process_group")
        if self._die_with_parent:
            info.append("die_with_parent")
        return f"<{' '.join(info)}>"

    # -- in the child, and across the pickle to it ---------------------------

    def _bootstrap(self, parent_sentinel: int | None = None) -> int:
        # Before anything of the user's runs: it may start processes at once.
        if self._die_with_parent and self._lifeline_parent is not None:
            arm_lifeline(self._lifeline_parent)
        if self._new_process_group:
            lead_own_group()
        _fds.close_inherited()  # forked from a parent that has children: their pipes
        reset_loop_state()
        # A fresh context: no context variable of the parent's loop leaks in.
        bootstrap = super()._bootstrap  # type: ignore[misc]
        code: int = contextvars.Context().run(bootstrap, parent_sentinel)
        return code

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_ctx", None)
        state.pop("_state", None)
        state.pop("_starting", None)
        return state


def _strerror(exc: OSError) -> str:
    """'too many open files (EMFILE)': the error, and the name to look it up by."""
    name = errno.errorcode.get(exc.errno or 0, "unknown error")
    return f"{(exc.strerror or name).lower()} ({name})"


def _kill_and_reap(popen: Popen) -> None:
    try:
        os.kill(popen.pid, signal.SIGKILL)
    except OSError:
        pass
    popen.wait()
    popen.close()


# -- interpreter exit ---------------------------------------------------------
#
# multiprocessing's exit handler terminates daemonic children and then calls
# join() on every active child, synchronously.  Our join() is a coroutine, so
# a finalizer of ours does that work first, for our children only, without an
# event loop; by the time the stdlib's handler looks, they are gone from
# active_children().  It is registered per process (the registry is cleared in
# every child) and runs after every finalizer of higher priority, as the
# stdlib's own loop does.

_exit_handler_pid: int | None = None


def _ensure_exit_handler() -> None:
    global _exit_handler_pid
    if _exit_handler_pid != os.getpid():
        mp_util.Finalize(None, _join_children_at_exit, exitpriority=0)
        _exit_handler_pid = os.getpid()


def _join_children_at_exit() -> None:
    ours = [
        p
        for p in list(mp_process._children)  # type: ignore[attr-defined]
        if isinstance(p, AsyncProcess) and p._state is not None
    ]
    for p in ours:
        if p.daemon and p._state is not None and p._state.returncode is None:
            p._state.send_signal(signal.SIGTERM)
    for p in ours:
        if p._state is not None:
            p._state.wait_blocking()
        mp_process._children.discard(p)  # type: ignore[attr-defined]
