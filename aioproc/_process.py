"""AsyncProcess: ``multiprocessing.Process`` with an awaitable ``join()``."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.process as mp_process
import multiprocessing.util as mp_util
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping

from ._checks import (
    check_die_with_parent,
    check_flag,
    check_timeout,
    resolve_context,
    start_method_of,
)
from ._tree import (
    arm_lifeline,
    expected_parent,
    lead_own_group,
    set_group_from_parent,
    watch_parent,
)

# typing.TYPE_CHECKING, without importing typing: every spawn child imports
# this module to unpickle its process object, and typing takes 1.6 ms to
# import (mypy reads any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import contextvars
    from multiprocessing.process import BaseProcess
    from typing import Any

    from ._child import Child
    from ._popen import AioprocPopen
    from ._start import Around
    from ._usage import ResourceUsage
    from ._watchers import Watch, WatcherName

# The event-loop side (anyio, the watchers, the handle) is imported on first
# use by the parent, so that a spawn or forkserver child, which imports this
# module to unpickle its process object, does not pay for it (10-40 ms).  What
# start() needs of it is bound to these globals on the first start: an import
# statement in start() would resolve the package through importlib on every
# start, and after a fork each page the parent writes is copied for the child.
_parent_side_bound = False
_launch: Callable[[BaseProcess, str], AioprocPopen]
_Child: type[Child]
_choose: Callable[[type[AioprocPopen]], type[Watch]]
_ensure_registered: Callable[[], None]
_POPEN_CLASSES: dict[str, type[AioprocPopen]]
_unwatchable: Callable[[OSError], OSError]


def _bind_parent_side() -> None:
    global _parent_side_bound, _launch, _Child, _choose, _ensure_registered
    global _POPEN_CLASSES, _unwatchable
    from ._child import Child
    from ._exit import ensure_registered
    from ._popen import POPEN_CLASSES, unwatchable
    from ._start import launch
    from ._watchers import choose

    _launch, _Child, _choose, _ensure_registered = launch, Child, choose, ensure_registered
    _POPEN_CLASSES, _unwatchable = POPEN_CLASSES, unwatchable
    if not _clean_start_bound:
        _bind_clean_start()
    _parent_side_bound = True


#: Whether the start paths are registered with trio's KeyboardInterrupt protection.
_trio_protected = False


def _protect_from_trio_ki() -> None:
    global _trio_protected
    from ._popen import protect_from_trio_ki

    protect_from_trio_ki()
    _trio_protected = True


# What a forked child (fork, forkserver) needs to start clean, bound wherever
# children are forked: on import (so a fork server that preloads aioproc spares
# its children the imports), and by _bind_parent_side.  A spawn child is a new
# interpreter with nothing to clean: until it starts children itself, it does
# without them and their imports (1% of its start-up).
_clean_start_bound = False
_close_inherited: Callable[[], None]
_reset_loop_state: Callable[[], None]
_Context: type[contextvars.Context]
_unblock_sigint: Callable[[], None]


def _bind_clean_start() -> None:
    global _clean_start_bound, _close_inherited, _reset_loop_state, _Context, _unblock_sigint
    from contextvars import Context

    from ._fds import close_inherited
    from ._reset import reset_loop_state, unblock_sigint

    _close_inherited, _reset_loop_state, _Context = close_inherited, reset_loop_state, Context
    _unblock_sigint = unblock_sigint
    _clean_start_bound = True


if "--multiprocessing-fork" not in sys.orig_argv:  # spawn's mark on a child's command line
    _bind_clean_start()


#: In a child: the process objects that were current before its bootstrap.
_former_current: list[object] = []


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

    _ctx: multiprocessing.context.BaseContext | None = None
    #: Read by the stdlib's bootstrap: the child's default start method.
    _start_method: str | None = None
    _child: Child | None = None
    #: True while start_async() is starting the child.
    _starting = False
    _new_process_group = False
    _die_with_parent = False
    #: The pid that forks the child, as the child must find it (die_with_parent).
    _lifeline_parent: int | None = None
    #: The native id of the thread that starts the child: its death is the signal.
    _lifeline_thread: int | None = None
    #: ``aioproc.run`` sets this: SIGKILL what is left of the group at exit.
    _kill_group_at_exit = False
    #: A call owns this child (``run``, a pool): stopped, not awaited, at interpreter exit.
    _stop_at_exit = False
    #: Seconds between SIGTERM and SIGKILL when it is stopped at interpreter exit.
    _exit_grace = 1.0
    #: Set by the Popen: the child watches its parent through a pidfd of its own,
    #: not through an inherited pipe (one descriptor per child in the parent).
    _parent_by_pidfd = False
    #: Set by the fork Popen: SIGINT was blocked for the fork, and the child
    #: unblocks it once its handlers are reset.
    _unblock_sigint = False
    #: Set by the forkserver Popen: where a pidfd of the parent, sent with the
    #: request, is among the descriptors the fork server passes on
    #: (``forkserver.get_inherited_fds()``); the child watches it instead of
    #: the data pipe.  An int, not the stdlib's ``DupFd``: unpickling that
    #: imports popen_fork and popen_forkserver in every child, which cost
    #: forkserver start+join throughput 6-10%.
    _parent_pidfd_at: int | None = None

    if TYPE_CHECKING:  # BaseProcess's private attributes, which typeshed leaves out
        _popen: AioprocPopen | None
        _parent_pid: int
        _config: dict[str, Any]
        _closed: bool
        _name: str
        _target: Callable[..., object] | None
        _args: tuple[Any, ...]
        _kwargs: dict[str, Any]

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
        elif type(kwargs) is not dict and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict or None, not {type(kwargs).__name__}")
        if daemon is not None:
            check_flag("daemon", daemon)
        self._ctx = resolve_context(context)
        # (The checks are called only for values they may refuse: each Python
        # call a start makes touches its function's pages; see _start.)
        if new_process_group is not False:
            new_process_group = check_flag("new_process_group", new_process_group)
        method = None if self._ctx is None else self._ctx.get_start_method()
        if die_with_parent is not False:
            die_with_parent = check_die_with_parent(die_with_parent, method)
        super().__init__(None, target, name, args, kwargs, daemon=daemon)
        self._new_process_group = new_process_group
        self._die_with_parent = die_with_parent
        self._start_method = method

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the child, as ``multiprocessing.Process.start()``.

        A plain call that returns once the child exists: it blocks for as long
        as the start method needs (a fork, a spawn, or a round trip to the fork
        server), never longer.  Unlike the stdlib's, its cost does not grow
        with the number of live children.  ``start_async()`` waits for the
        child without blocking the event loop.
        """
        method, watch_cls = self._check_startable()
        self._started(_launch(self, method), watch_cls)

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
        self, around_launch: Around, unheld: list[AioprocPopen] | None = None
    ) -> None:
        """``start_async()``, entering *around_launch* while the child is created.

        Interrupted after a fork child exists and before its handle does, the
        start abandons it (SIGKILL), unless *unheld* is given: then its Popen
        goes there, for the caller to stop it as it stops a child it holds.
        """
        import anyio.lowlevel

        from ._start import launch_async

        method, watch_cls = self._check_startable()
        self._starting = True
        made: list[AioprocPopen] = []  # each Popen, from before its child exists
        try:
            # The checkpoint comes first: after a fork, every page the parent
            # touches is copied, so it yields before the fork, not after.
            await anyio.lowlevel.checkpoint()
            self._started(await launch_async(self, method, around_launch, made), watch_cls)
        except BaseException:
            # A KeyboardInterrupt (trio raises it wherever Python code runs) or
            # a failure between the child's creation and its handle: no orphan.
            if self._child is None:
                for popen in made:
                    if unheld is not None and popen.inherits_memory and popen.running_here():
                        unheld.append(popen)  # a fork child may run its target already
                    else:
                        popen.abandon()
            raise
        finally:
            self._starting = False

    def _check_startable(self) -> tuple[str, type[Watch]]:
        """Refuse a start that is misuse; the start method and watcher class to start with."""
        if self._closed:
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
        if mp_process._current_process._config.get("daemon"):  # type: ignore[attr-defined]
            raise RuntimeError(
                "a daemonic process is not allowed to have children; "
                "create the parent with daemon=False to start children from it"
            )
        if not _parent_side_bound:
            _bind_parent_side()
        if not _trio_protected and "trio.lowlevel" in sys.modules:
            _protect_from_trio_ki()
        method = start_method_of(self._ctx)
        if self._die_with_parent:
            check_die_with_parent(True, method)
            self._lifeline_parent = expected_parent()
            self._lifeline_thread = threading.get_native_id()
        watch_cls = _choose(_POPEN_CLASSES[method])
        _ensure_registered()
        return method, watch_cls

    def _started(self, popen: AioprocPopen, watch_cls: type[Watch]) -> None:
        """Take charge of the child that *popen* started, and record it as started."""
        if self._new_process_group and popen.group_from_parent:
            set_group_from_parent(popen.pid)
        try:
            # (No keywords: their names are objects too; see _start.)
            child = _Child(popen, watch_cls, self._new_process_group, self._kill_group_at_exit)
        except OSError as exc:
            popen.abandon()
            raise _unwatchable(exc) from exc
        except BaseException:
            if not self._starting:  # start(); start_async() decides for itself
                popen.abandon()
            raise
        self._child = child
        self._popen = popen
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
        the child keeps running and can be joined again.  If something else in
        the program collected the exit status, the first join raises
        ``ExitStatusLost``; later ones return None at once.
        """
        import anyio

        if timeout is not None:  # (a call fewer for the common case, as below)
            timeout = check_timeout(timeout)
        child = self._started_child("join")
        if timeout is None:
            code = await child.wait()
        else:
            await anyio.lowlevel.checkpoint()
            code = child.result()
            if code is None and timeout > 0 and not child.popen.status_lost:
                with anyio.move_on_after(timeout):
                    code = await child.wait()
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
        if self._child is None:
            return False
        if self._child.alive():
            return True
        mp_process._children.discard(self)  # type: ignore[attr-defined]
        return False

    def terminate(self) -> None:
        """Send SIGTERM to the child (nothing if it has already exited)."""
        self._started_child("terminate").send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the child (nothing if it has already exited)."""
        self._started_child("kill").send_signal(signal.SIGKILL)

    def interrupt(self) -> None:
        """Send SIGINT to the child (nothing if it has already exited)."""
        self._started_child("interrupt").send_signal(signal.SIGINT)

    def _signal(self, sig: int) -> None:
        if self._child is not None:
            self._child.send_signal(sig)

    def close(self) -> None:
        """Release the resources held for the child; it must have exited.

        Afterwards most methods and attributes raise ``ValueError``.
        """
        if self._starting:
            raise ValueError(
                "cannot close a process that start_async() is starting; await it, "
                "then join() the child before closing"
            )
        child = self._child
        if child is not None:
            if child.alive():
                raise ValueError(
                    "cannot close a process that is still running; "
                    "await join() or call terminate() first"
                )
            child.close()
            self._child = None
            self._popen = None
            mp_process._children.discard(self)  # type: ignore[attr-defined]
        self._closed = True

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(
                f"process object is closed ({self._name} was released by close()); "
                "create a new AsyncProcess to start another child"
            )

    def _started_child(self, action: str) -> Child:
        # Calls only to raise: every join and signal passes here.
        if self._closed:
            self._check_closed()
        if self is mp_process._current_process:  # type: ignore[attr-defined]
            raise RuntimeError(f"a process cannot {action} itself")
        if self._parent_pid != os.getpid():
            raise RuntimeError(
                f"can only {action} a child of this process; {self._name} "
                f"was created by pid {self._parent_pid}"
            )
        if self._child is None:
            raise RuntimeError(
                f"cannot {action} a process that has not been started; call start() first"
            )
        return self._child

    # -- attributes ----------------------------------------------------------

    @property
    def exitcode(self) -> int | None:
        """The exit code: None while running, negative signal number if killed.

        The first read after something else collected the exit status raises
        ``ExitStatusLost``; it is None (unknown) afterwards.
        """
        self._check_closed()
        if self._child is None:
            return None
        if self._parent_pid != os.getpid():  # a forked copy: the child is not ours to poll
            return self._child.returncode
        return self._child.result()

    @property
    def resource_usage(self) -> ResourceUsage | None:
        """The child's CPU time and peak memory, from the kernel when it was reaped.

        None until the child has exited and been collected (by ``join()``,
        ``is_alive()``, ``exitcode``...), and None for good where the kernel's
        accounting does not reach us: a forkserver child (the fork server reaps
        it), a child whose status someone else collected.  See ``ResourceUsage``.
        """
        self._check_closed()
        child = self._child
        if child is None or child.poll() is None:
            return None
        return child.resource_usage

    @property
    def sentinel(self) -> int:
        """A descriptor that turns readable when the child exits, as the stdlib's.

        It may also be waited for in the event loop (``anyio.wait_readable``,
        ``loop.add_reader``) while tasks join: it is a descriptor of its own
        (``Child.sentinel``), made when first asked for and closed by ``close()``.
        """
        self._check_closed()
        if self._child is None:
            raise ValueError("process not started: it has a sentinel once start() is called")
        return self._child.sentinel()

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
        self._config["daemon"] = check_flag("daemon", daemonic)

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
        return None if self._child is None else self._child.watcher_name

    def __repr__(self) -> str:
        info = [type(self).__name__, f"name={self._name!r}"]
        child = self._child
        if self is mp_process.current_process():
            info.append("current")
        elif self._closed:
            info.append("closed")
        elif child is None:
            info.append("initial")
        else:
            info.append(f"pid={child.pid}")
            code = child.poll() if self._parent_pid == os.getpid() else child.returncode
            if code is not None:
                info.append(f"exitcode={_exitcode_text(code)}")
            elif child.popen.status_lost:
                info.append("exit status lost")
            else:
                info.append("running")
        if self.daemon:
            info.append("daemon")
        if self._new_process_group:
            info.append("new_process_group")
        if self._die_with_parent:
            info.append("die_with_parent")
        return f"<{' '.join(info)}>"

    # -- in the child, and across the pickle to it ---------------------------

    def _bootstrap(self, parent_sentinel: int | None = None) -> int:
        if self._parent_by_pidfd:
            if parent_sentinel is not None:  # spawn's: the data pipe, at its end
                os.close(parent_sentinel)
            parent_sentinel = watch_parent(self._parent_pid)
        elif self._parent_pidfd_at is not None:
            # forkserver's is a duplicate of the data pipe, which reads as "gone"
            # once the parent has sent the data and closed its end.
            from multiprocessing import forkserver  # the fork server's: loaded

            inherited = forkserver.get_inherited_fds()
            if inherited is not None:  # always, in a child of the fork server
                if parent_sentinel is not None:
                    os.close(parent_sentinel)
                parent_sentinel = inherited[self._parent_pidfd_at]
            self._parent_pidfd_at = None
        # Before anything of the user's runs: it may start processes at once.
        if self._die_with_parent and self._lifeline_parent is not None:
            arm_lifeline(self._lifeline_parent, self._lifeline_thread)
        if self._new_process_group:
            lead_own_group()
        # The stdlib's bootstrap replaces the current process object and frees
        # the parent's; kept, it is not freed, which in a fork child would
        # write (copy) the pages of its dictionaries: 6 pages a child.
        _former_current.append(mp_process._current_process)  # type: ignore[attr-defined]
        bootstrap = super()._bootstrap  # type: ignore[misc]
        if _clean_start_bound:
            _close_inherited()  # forked from a parent that has children: their pipes
            _reset_loop_state()
            if self._unblock_sigint:  # blocked around the fork: see _popen
                _unblock_sigint()
            # A fresh context: no context variable of the parent's loop leaks in.
            code: int = _Context().run(bootstrap, parent_sentinel)
        else:  # a spawn child: a new interpreter, its context empty
            if self._unblock_sigint:  # blocked around the spawn: see _popen
                signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT,))
            code = bootstrap(parent_sentinel)
        return code

    if sys.version_info < (3, 14):  # the versions whose _after_fork does just this

        @staticmethod
        def _after_fork() -> None:
            # What the stdlib's bootstrap calls to forget the parent's finalizers
            # and run the after-fork hooks; the hooks only if there are any:
            # iterating the empty registry (a weak dictionary: a guard object, a
            # sort, two generators) writes pages that every fork child copies.
            mp_util._finalizer_registry.clear()  # type: ignore[attr-defined]
            if len(mp_util._afterfork_registry):  # type: ignore[attr-defined]
                mp_util._run_after_forkers()  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_ctx", None)
        state.pop("_child", None)
        state.pop("_starting", None)
        return state
