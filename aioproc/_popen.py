"""One class per start method: how its child is created, who reaps it, where its
exit code comes from, and how to wait for it without an event loop.

``multiprocessing`` starts a child through one ``Popen`` class per start method;
so does aioproc, and each class also answers the questions the rest of the
package would otherwise ask of the start method's name:

- ``reaped_here``: fork and spawn children are ours to reap (``wait4``, which
  also returns the kernel's accounting); a forkserver child is the fork
  server's, which reaps it and writes its exit code on the sentinel pipe.
- ``exit_state()``: has the child exited, without collecting anything.  Fork
  and spawn ask the kernel (``waitid`` with ``WNOWAIT``); forkserver looks at the
  sentinel, because a pidfd turns readable before the server has written the code.
- ``wait_exited_blocking()``: the same, blocking (a watcher thread, exit time).
- ``poll()``: collect the status once, under a lock, so that threads polling
  ``is_alive()`` never race a join into a false "lost" verdict.  When someone
  else took the status (a foreign ``waitpid(-1)``, SIGCHLD set to SIG_IGN, a fork
  server that died), ``status_lost`` is set instead of making up an exit code.

Starting leaves nothing behind when it fails.  The stdlib's fork ``Popen``
loses its two pipes when ``os.fork()`` or the second ``os.pipe()`` fails
(CPython 3.10 to 3.14), and its forkserver client loses the first pipe when the
second one fails; here every step closes what the earlier ones opened.  A spawn
or forkserver start can be *deferred* (``start_async``): ``_launch`` stops once
the child exists, and ``finish()`` / ``finish_async()`` send its data (and, for
forkserver, read its pid), so the waits can happen in the event loop.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import io
import os
import select
import signal
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import (
    forkserver,
    popen_fork,
    popen_forkserver,
    popen_spawn_posix,
    process,
    reduction,
    resource_tracker,
    spawn,
    util,
)
from multiprocessing.context import set_spawning_popen
from typing import TYPE_CHECKING, Any, ClassVar

from . import _fds
from ._usage import ResourceUsage

if TYPE_CHECKING:
    import resource
    from multiprocessing.process import BaseProcess

#: Python 3.13 runs the child's atexit handlers in a forked child (gh-83856).
_ATEXIT_IN_FORK_CHILD = sys.version_info >= (3, 13)


class Exit(enum.Enum):
    """What the kernel (or the fork server) says about a child, collecting nothing."""

    RUNNING = "running"
    #: Exited and still ours to collect: its pid (a zombie's) is still in use.
    EXITED = "exited"
    #: Collected, by us (``returncode`` is set) or by someone else (``status_lost``).
    GONE = "gone"


def readable_now(fd: int) -> bool:
    """Whether *fd* is readable (or hung up) right now."""
    poller = select.poll()  # not select(): descriptors go past FD_SETSIZE here
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def readable_within(fd: int, timeout: float | None) -> bool:
    """Whether *fd* turns readable within *timeout* seconds (None: wait for it)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))


class _Closer(util.Finalize):
    """``util.Finalize(popen, util.close_fds, fds)``, but not in ``util._finalizer_registry``.

    It closes the Popen's descriptors once: when called (``close()``), or when
    the Popen is collected, in the process that made it only.  Every forked
    child of the stdlib's bootstrap clears that registry first thing, which
    releases every entry in it and so writes (copies) about one page per live
    sibling: 2.3 MiB per child with 3000 of them.  These stay reachable in a
    set of their own (so that their weak reference fires, as the registry's
    do), which no child touches.
    """

    # The stdlib's attributes that every closer of ours has alike (for repr).
    _kwargs: Mapping[str, Any] = types.MappingProxyType({})
    _key: tuple[int | None, int] = (None, 0)

    def __init__(
        self,
        obj: object,
        callback: Callable[..., object],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self._weakref = weakref.ref(obj, self)
        self._callback = callback
        self._args = args
        if kwargs:
            self._kwargs = kwargs
        self._pid = os.getpid()
        _closers.add(self)

    def __call__(self, wr: object = None, *_: object, **__: object) -> object:
        if self not in _closers:
            return None  # called already, or cancelled
        _closers.discard(self)
        args, self._args = self._args, ()
        if self._pid != os.getpid():
            return None  # a forked copy: the descriptors are not ours
        return self._callback(*args, **self._kwargs)

    def cancel(self) -> None:
        _closers.discard(self)
        self._args = ()

    def still_active(self) -> bool:
        return self in _closers


_closers: set[_Closer] = set()


class _AioprocPopen(popen_fork.Popen):
    """What every start method's Popen provides here (see the module docstring)."""

    @property
    def server_forked(self) -> bool:
        """Whether a fork server has reported the child (only forkserver has one)."""
        return False

    #: Whether this process reaps the child (its SIGCHLD reaches us, wait4 works).
    reaped_here: ClassVar[bool] = True
    #: The parent makes the child's process group too (the classic double setpgid).
    group_from_parent: ClassVar[bool] = False
    #: The child is created by this thread, and starts with its signal mask.
    inherits_signal_mask: ClassVar[bool] = True
    #: The child is a copy of this process: it gets the target, its arguments and
    #: the open descriptors as they are, nothing is pickled (fork only).
    inherits_memory: ClassVar[bool] = False
    #: Why ``die_with_parent`` cannot hold for this start method (None: it can).
    lifeline_problem: ClassVar[str | None] = None
    #: Descriptors passed to a spawn or forkserver child (the stdlib's list).
    _fds: list[int]
    #: What wait4 said the child cost, as the kernel gave it; None until
    #: reaped, and where the kernel's accounting does not reach us (forkserver).
    _rusage: resource.struct_rusage | None = None
    #: Someone else collected the exit status: it cannot be known any more.
    status_lost = False
    #: What happened to the status, for the error that reports it.
    lost_reason = ""
    #: The child's pidfd (its handle's), once opened; -1 without one.
    pidfd = -1
    #: Without a pidfd (Linux): the handle's ``/proc/PID`` directory; -1 if none.
    proc_dir = -1
    #: For a deferred start (``start_async``): the pickled data still to send.
    _data: memoryview | None = None
    _data_fd = -1

    _deferred = False

    def __init__(
        self,
        process_obj: BaseProcess,
        *,
        deferred: bool = False,
        made: list[_AioprocPopen] | None = None,
    ) -> None:
        # What the stdlib's chain of __init__ methods does (popen_spawn_posix's
        # or popen_forkserver's, then popen_fork's), in one call: after a fork
        # each function a start calls is a page or two copied (see _start).
        self._reap_lock = threading.Lock()
        self._owner = os.getpid()
        if deferred:
            self._deferred = True
        util._flush_std_streams()  # type: ignore[attr-defined]
        self.returncode = None
        self.finalizer = None
        if made is not None:
            # Known to the caller before the child exists: an interruption
            # anywhere from the fork on (trio's KeyboardInterrupt) finds it
            # there and abandons it (``start_async``).
            made.append(self)
        self._launch(process_obj)

    def _launch(self, process_obj: BaseProcess) -> None:
        """Create the child (the stdlib's name): one method per start method."""
        raise NotImplementedError

    _usage: ResourceUsage | None = None

    @property
    def resource_usage(self) -> ResourceUsage | None:
        """The child's CPU time and peak memory, once reaped here (made when first asked for)."""
        if self._usage is None and self._rusage is not None:
            self._usage = ResourceUsage.from_rusage(self._rusage)
        return self._usage

    # -- collecting the status ---------------------------------------------------

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        """Collect the exit status if the child has exited (once, whoever asks)."""
        if self.returncode is None and not self.status_lost:
            with self._reap_lock:
                if self.returncode is None and not self.status_lost:
                    self._collect(flag)
        return self.returncode

    def _collect(self, flag: int) -> None:
        raise NotImplementedError

    def _lost(self, reason: str) -> None:
        self.status_lost = True
        self.lost_reason = reason
        # The stdlib's active_children() must not list it forever.  (Found by
        # searching, not through a reference kept from the start: that would
        # be one more object for every start to make.)
        for proc in list(process._children):  # type: ignore[attr-defined]
            if proc._popen is self:
                process._children.discard(proc)  # type: ignore[attr-defined]

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit (at most *timeout* seconds) and collect the status."""
        if self.returncode is None and not self.status_lost:
            self.wait_exited_blocking(timeout)
        return self.poll()

    def exit_state(self) -> Exit:
        """Whether the child has exited, collecting nothing."""
        raise NotImplementedError

    def wait_exited_blocking(self, timeout: float | None = None, pidfd: int = -1) -> bool:
        """Block until the child has exited (True) or *timeout* passed (False)."""
        raise NotImplementedError

    def owned_here(self) -> bool:
        """False in a forked copy of the parent: the child is not ours there."""
        return self._owner == os.getpid()

    def running_here(self) -> bool:
        """Whether this started a child that runs still (not abandoned, not exited)."""
        if not getattr(self, "pid", None) or self._abandoned or not self.owned_here():
            return False
        return self.returncode is None and self.exit_state() is Exit.RUNNING

    # -- deferred starts -------------------------------------------------------------

    def _pickled(self, process_obj: BaseProcess) -> memoryview:
        """The preparation data and process object, as the stdlib sends them."""
        prep_data = spawn.get_preparation_data(process_obj._name)  # type: ignore[attr-defined]
        buf = io.BytesIO()
        set_spawning_popen(self)  # type: ignore[arg-type]
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        return buf.getbuffer()

    def _drop_data(self) -> None:
        data, self._data = self._data, None
        if data is not None:
            data.release()  # a view of a BytesIO, which must not outlive it

    def finish(self) -> None:
        """Send what a deferred start left to send, blocking."""

    async def finish_async(self) -> None:
        """Send what a deferred start left to send, waiting in the event loop."""

    #: ``abandon()`` has run: the child was killed and reaped, the descriptors closed.
    _abandoned = False

    def abandon(self) -> None:
        """Undo a start that failed half-way: kill the child if it exists, close all.

        Idempotent: every layer that sees the failure may call it.
        """
        self._abandoned = True
        self._drop_data()
        self.close()

    def close(self) -> None:
        super().close()
        self.pidfd = -1  # closed by the finalizer, with the sentinel it may be


def _still_there(proc_dir: int) -> bool:
    """Whether the process of the ``/proc/PID`` directory *proc_dir* is not reaped yet.

    The directory's entries vanish when the process is reaped, and stay gone
    when its pid is given to another process.
    """
    try:
        os.stat("stat", dir_fd=proc_dir)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return True


#: waitid() on a pidfd (Linux >= 5.4): asks about the very process, not its number.
_P_PIDFD: int | None = getattr(os, "P_PIDFD", None)
_PEEK = os.WEXITED | os.WNOHANG | os.WNOWAIT


class _ReapedHere(_AioprocPopen):
    """Fork and spawn: our own children, reaped with wait4.

    With a pidfd, the kernel is asked about the process itself
    (``waitid(P_PIDFD)``) before its pid is used: once someone else reaped it,
    the pid may be another child's, and ``wait4(pid)`` would take that one's
    status.  Without a pidfd, the child's ``/proc/PID`` directory, opened at
    start (Linux), tells whether the pid still names it; elsewhere the pid is
    all there is.
    """

    def _peek(self) -> os.waitid_result | None:
        """``waitid(..., WNOWAIT | WNOHANG)``: None while running; ChildProcessError if gone."""
        global _P_PIDFD
        if self.pidfd >= 0 and _P_PIDFD is not None:
            try:
                return os.waitid(_P_PIDFD, self.pidfd, _PEEK)
            except ChildProcessError:
                raise
            except OSError as exc:  # EINVAL: a kernel before 5.4
                if exc.errno != errno.EINVAL:
                    raise
                _P_PIDFD = None
        if self.proc_dir >= 0 and not _still_there(self.proc_dir):
            # Reaped by someone else: the pid may be another child's by now.
            raise ChildProcessError(errno.ECHILD, "the child was reaped by someone else")
        return os.waitid(os.P_PID, self.pid, _PEEK)

    def _collect(self, flag: int) -> None:
        try:
            if (
                (self.pidfd >= 0 or self.proc_dir >= 0)
                and self._peek() is None
                and flag == os.WNOHANG
            ):
                return
            pid, status, usage = os.wait4(self.pid, flag)
        except ChildProcessError:
            if self.owned_here():
                self._lost(
                    "consumed by someone else (os.waitpid(-1, ...) or os.wait() "
                    "elsewhere in the program, or SIGCHLD set to SIG_IGN)"
                )
            return
        if pid == self.pid:
            self._rusage = usage
            self.returncode = os.waitstatus_to_exitcode(status)

    def exit_state(self) -> Exit:
        if self.returncode is not None or self.status_lost:
            return Exit.GONE
        try:
            info = self._peek()
        except ChildProcessError:
            return Exit.GONE
        return Exit.RUNNING if info is None else Exit.EXITED

    def wait_exited_blocking(self, timeout: float | None = None, pidfd: int = -1) -> bool:
        if pidfd >= 0:
            return readable_within(pidfd, timeout)
        if timeout is None:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            return True
        # Without a pidfd, waitid has no timeout: the sentinel pipe has one.
        # Its far end may live on in a grandchild, so it only bounds the wait;
        # and it turns readable as the exiting child closes its descriptors, a
        # moment before the child can be waited for: then a few short naps.
        deadline = time.monotonic() + timeout
        readable_within(self.sentinel, timeout)
        nap = 0.001
        while self.exit_state() is Exit.RUNNING:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(nap, left))
            nap = min(nap * 2, 0.05)
        return True

    def _take_pidfd(self) -> int:
        """Open the new child's pidfd, its sentinel from now on; return it.

        Opened right after the child exists, and kept only if the child is still
        unreaped then (else the pid may be a stranger's): a child already reaped
        by someone else gets a sentinel that reads as "gone" instead.  Fails
        (EMFILE) after killing and reaping the child.  ``close()`` closes it,
        or ``__del__`` (a finalizer object would be one more object per start).
        """
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            fd = -1
        except OSError as exc:
            self.abandon()
            raise unwatchable(exc) from exc
        if fd >= 0:
            self.pidfd = self._own_sentinel = fd  # closed by abandon() from here on
            try:
                self._peek()  # None while it runs, a result once exited (unreaped)
            except ChildProcessError:  # reaped by someone else: the pid is not ours
                self.pidfd = self._own_sentinel = -1
                os.close(fd)
                fd = -1
        if fd < 0:
            try:
                fd, w = os.pipe()  # its write end closed: always readable
            except OSError:
                self.abandon()
                raise
            os.close(w)
        self.sentinel = self._own_sentinel = fd
        return fd

    #: The sentinel made by ``_take_pidfd``, for ``close()`` to close; -1 once closed.
    _own_sentinel = -1

    def close(self) -> None:
        fd, self._own_sentinel = self._own_sentinel, -1
        if fd >= 0 and self.owned_here():
            os.close(fd)
        super().close()

    def __del__(self) -> None:
        fd = self._own_sentinel
        if fd >= 0:
            with contextlib.suppress(Exception):  # late at interpreter exit too
                if self.owned_here():
                    os.close(fd)

    def abandon(self) -> None:
        pid = getattr(self, "pid", None)
        if (
            pid
            and not self._abandoned
            and self.returncode is None
            and self.exit_state() is not Exit.GONE
        ):
            # Unreaped: the pid is still the child's, so the signal cannot go astray.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        super().abandon()


class ForkPopen(_ReapedHere):
    """fork: ``os.fork()``; the child runs the process object directly.

    Where the kernel has pidfds, the child's pidfd is its sentinel and the
    child watches its parent through a pidfd of its own (``parent_by_pidfd``):
    one descriptor per child in the parent.  Elsewhere the stdlib's two pipes.
    """

    method = "fork"
    group_from_parent: ClassVar[bool] = True
    inherits_memory: ClassVar[bool] = True

    def _launch(self, process_obj: BaseProcess) -> None:
        if _pidfds_here():
            process_obj._parent_by_pidfd = True  # type: ignore[attr-defined]
            try:
                if _fork_with_sigint_blocked(self, process_obj) == 0:
                    _run_forked_child(process_obj, (), None)  # never returns
                self._take_pidfd()
            except BaseException:
                # A Ctrl-C during the fork is delivered as SIGINT is unblocked,
                # right after it (trio raises KeyboardInterrupt there): the
                # child exists, and nothing else knows its pid yet.
                self.abandon()
                raise
            return
        opened: list[int] = []
        try:
            parent_r, child_w = os.pipe()
            opened += (parent_r, child_w)
            child_r, parent_w = os.pipe()
            opened += (child_r, parent_w)
            _fork_with_sigint_blocked(self, process_obj)
        except BaseException:
            for fd in opened:
                os.close(fd)
            self.abandon()  # the child, if the interruption came after the fork
            raise
        if self.pid == 0:
            _run_forked_child(process_obj, (parent_r, parent_w), child_r)
        os.close(child_w)
        os.close(child_r)
        self.finalizer = _Closer(
            self,
            util.close_fds,  # type: ignore[attr-defined]
            (parent_r, parent_w),
        )
        self.sentinel = parent_r


try:
    # signal's own pthread_sigmask turns the old mask into enums: after a fork
    # every page that machinery touches is copied (32 faults a start).
    from _signal import pthread_sigmask as _sigmask  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - not CPython
    _sigmask = signal.pthread_sigmask
_SIGINT = (int(signal.SIGINT),)


def _fork_with_sigint_blocked(popen: _AioprocPopen, process_obj: BaseProcess) -> int:
    """``os.fork()`` with SIGINT blocked in this thread around it; sets ``popen.pid``.

    CPython drops the signals pending in a forked child before its first
    bytecode: a SIGINT sent right after ``start()`` (``interrupt()``, a Ctrl-C)
    was lost.  Blocked, it stays pending; the child unblocks it once its
    handlers are its own (``AsyncProcess._bootstrap``).  One meant for this
    process meanwhile is delivered when the mask is restored, where trio
    raises KeyboardInterrupt: the pid is kept before that, for the caller's
    clean-up.
    """
    unblock = _SIGINT[0] not in _sigmask(signal.SIG_BLOCK, _SIGINT)
    process_obj._unblock_sigint = unblock  # type: ignore[attr-defined]
    try:
        pid = popen.pid = os.fork()
    except BaseException:
        if unblock:
            _sigmask(signal.SIG_UNBLOCK, _SIGINT)
        raise
    if pid and unblock:
        _sigmask(signal.SIG_UNBLOCK, _SIGINT)
    return pid


def protect_from_trio_ki() -> None:
    """Once trio is imported: its KeyboardInterrupt waits while a child is created.

    SIGINT is blocked in the forking thread, but another thread (trio's guest
    mode I/O thread, a worker thread) may take it; Python then runs trio's
    handler in this thread at its next chance, which can be right after
    ``os.fork()`` returns, before the pid is kept.  trio delivers the
    KeyboardInterrupt at the task's next checkpoint instead when the frame
    running is protected.  (trio >= 0.28 records the code object and returns
    the function itself; before, it returns a wrapper, which takes its place.)
    """
    lowlevel = sys.modules["trio.lowlevel"]
    for cls in POPEN_CLASSES.values():
        cls._launch = lowlevel.enable_ki_protection(cls.__dict__["_launch"])  # type: ignore[method-assign]


def unwatchable(exc: OSError) -> OSError:
    """The error for a child that exists but cannot be watched (it has been killed and reaped)."""
    name = errno.errorcode.get(exc.errno or 0, "unknown error")
    return OSError(
        exc.errno,
        f"could not watch the new child: {(exc.strerror or name).lower()} ({name}); it was "
        "killed and reaped, nothing is left and start() may be called again; close file "
        "descriptors or raise RLIMIT_NOFILE",
    )


#: Whether a pidfd of a child of ours has been opened here: then the next
#: children get their pidfd as their only descriptor.  Until then a child is
#: started with the stdlib's pipes, in case a sandbox allows a pidfd of this
#: process (the probe) but refuses one of a child.
child_pidfds_work = False


ONE_DESCRIPTOR_PER_CHILD = True


#: ``_watchers.pidfd``, bound on first use (a cycle at import time); not
#: imported again by each start.
_pidfd_support: Any = None


def _pidfds_here() -> bool:
    """Whether a fork or spawn child started now gets its pidfd as its only descriptor."""
    global _pidfd_support
    if not (ONE_DESCRIPTOR_PER_CHILD and child_pidfds_work):
        return False
    if _pidfd_support is None:
        from ._watchers import pidfd  # noqa: PLC0415 - a cycle at import time

        _pidfd_support = pidfd
    return bool(_pidfd_support.supported or _pidfd_support.is_supported())


#: A pidfd of this process, passed to every forkserver child as its sign that
#: its parent lives (``ForkServerPopen``); -1 until opened.  A forked child
#: forgets it (it names the parent there) and, if an AsyncProcess, closes it
#: with the parent's other descriptors (``_fds``).
_own_pidfd = -1
_own_pidfd_lock = threading.Lock()  # threads starting children: one is opened


def own_pidfd() -> int:
    """A pidfd of this process, opened once; -1 where pidfds cannot be used here.

    Raises ``OSError`` when descriptors ran out.
    """
    global _own_pidfd
    from ._watchers import pidfd  # noqa: PLC0415 - a cycle at import time

    if not (ONE_DESCRIPTOR_PER_CHILD and pidfd.is_supported()):
        return -1
    with _own_pidfd_lock:
        if _own_pidfd < 0:
            try:
                fd = os.pidfd_open(os.getpid())
            except OSError as exc:
                if exc.errno not in pidfd.UNSUPPORTED_ERRNOS:
                    raise
                return -1
            _fds.hold(fd)
            _own_pidfd = fd
        return _own_pidfd


def _forget_own_pidfd() -> None:
    global _own_pidfd, _own_pidfd_lock
    _own_pidfd = -1
    _own_pidfd_lock = threading.Lock()  # another thread may have held it


os.register_at_fork(after_in_child=_forget_own_pidfd)


def _run_forked_child(
    process_obj: BaseProcess, unused: tuple[int, ...], sentinel: int | None
) -> None:
    """Run the process object in the forked child, as the stdlib's fork child does."""
    code = 1
    try:
        if _ATEXIT_IN_FORK_CHILD:
            import atexit  # noqa: PLC0415 - only in the child

            atexit._clear()
            atexit.register(util._exit_function)  # type: ignore[attr-defined]
        for fd in unused:
            os.close(fd)
        code = process_obj._bootstrap(parent_sentinel=sentinel)  # type: ignore[attr-defined]
    finally:
        if _ATEXIT_IN_FORK_CHILD:
            import atexit  # noqa: PLC0415

            atexit._run_exitfuncs()
        # The low byte, as exit(3) keeps it: sys.exit(2**40) must not make
        # os._exit raise OverflowError and the child run on in the parent's code.
        os._exit(code & 0xFF)


def _write_blocking(fd: int, data: memoryview) -> None:
    os.set_blocking(fd, True)
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


async def _write_async(fd: int, data: memoryview) -> None:
    """Write *data* to the pipe *fd*, waiting in the loop while the pipe is full."""
    import anyio  # noqa: PLC0415 - the parent's event-loop side

    os.set_blocking(fd, False)
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, data[done:])
        except BlockingIOError:
            await anyio.wait_writable(fd)


class SpawnPopen(_ReapedHere, popen_spawn_posix.Popen):
    """spawn: ``vfork()`` + ``exec()`` of a new interpreter, then its data on a pipe."""

    method = "spawn"

    def _launch(self, process_obj: BaseProcess) -> None:
        self._fds = []
        try:
            tracker_fd = resource_tracker.getfd()
            if tracker_fd is not None:
                self._fds.append(tracker_fd)
            by_pidfd = _pidfds_here()
            process_obj._parent_by_pidfd = by_pidfd  # type: ignore[attr-defined]
            # SIGINT is blocked around the vfork + exec (``_spawn``); the child
            # unblocks it unless it was blocked here already (run's children).
            process_obj._unblock_sigint = (  # type: ignore[attr-defined]
                _SIGINT[0] not in _sigmask(signal.SIG_BLOCK, ())
            )
            self._data = self._pickled(process_obj)
            if by_pidfd:
                self._launch_by_pidfd()
            else:
                self._launch_with_pipes()
            if not self._deferred:
                self.finish()
        except BaseException:
            self.abandon()
            raise

    def _spawn(self, child_r: int) -> None:
        cmd = spawn.get_command_line(tracker_fd=self._fds[0], pipe_handle=child_r)
        # With SIGINT blocked, as a fork is: a Ctrl-C during the vfork + exec
        # is delivered (trio raises KeyboardInterrupt) once the pid is kept,
        # not inside spawnv_passfds, where the new child would be lost.
        unblock = _SIGINT[0] not in _sigmask(signal.SIG_BLOCK, _SIGINT)
        try:
            self.pid = util.spawnv_passfds(
                spawn.get_executable(),  # type: ignore[arg-type]
                cmd,
                self._fds,
            )
        finally:
            if unblock:
                _sigmask(signal.SIG_UNBLOCK, _SIGINT)

    def _launch_by_pidfd(self) -> None:
        """One pipe for the data, closed once it is sent; the pidfd is the sentinel."""
        child_r, parent_w = os.pipe()
        try:
            self._fds.append(child_r)
            self._data_fd = parent_w
            self._spawn(child_r)
        finally:
            os.close(child_r)
        self._take_pidfd()

    def _launch_with_pipes(self) -> None:
        """The stdlib's way: a sentinel pipe, and the data pipe kept as the child's
        sign that its parent lives."""
        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            self._fds.extend([child_r, child_w])
            self._spawn(child_r)
            self.sentinel = parent_r
        finally:
            opened = [fd for fd in (parent_r, parent_w) if fd is not None]
            self.finalizer = _Closer(
                self,
                util.close_fds,  # type: ignore[attr-defined]
                opened,
            )
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)
        self._data_fd = -1 if parent_w is None else parent_w
        self._keep_data_fd = True

    #: With pipes, the data pipe stays open: the child's sign that its parent lives.
    _keep_data_fd = False

    def finish(self) -> None:
        if self._data is not None:
            try:
                _write_blocking(self._data_fd, self._data)
            finally:
                self._sent()

    async def finish_async(self) -> None:
        if self._data is not None:
            try:
                await _write_async(self._data_fd, self._data)
            except BaseException:
                self.abandon()
                raise
            finally:
                self._sent()

    def _sent(self) -> None:
        self._drop_data()
        fd, self._data_fd = self._data_fd, -1
        if fd >= 0 and not self._keep_data_fd:
            os.close(fd)

    def abandon(self) -> None:
        self._sent()
        super().abandon()


# The stdlib's forkserver client opens a socket and two pipes, and loses the
# first pipe when the second os.pipe() fails (CPython 3.10-3.14).  Checking that
# this many descriptors are free just before the request spares it that.
_FORKSERVER_CLIENT_FDS = 5


def _reserve_descriptors(count: int) -> None:
    """Raise EMFILE now, leaking nothing, unless *count* descriptors can be opened."""
    held: list[int] = []
    try:
        while len(held) < count - 1:
            held.extend(os.pipe())
        if len(held) < count:
            held.append(os.dup(held[0]) if held else os.open(os.devnull, os.O_RDONLY))
    finally:
        for fd in held:
            os.close(fd)


class ForkServerPopen(_AioprocPopen, popen_forkserver.Popen):
    """forkserver: the fork server forks the child and reaps it; we get its exit code.

    Two descriptors per child in the parent: the server's status pipe (the
    ``sentinel``, where the pid and then the exit code arrive) and the pidfd
    the handle opens.  The data pipe is closed once the data is sent: the
    child watches its parent through a pidfd of the parent (``own_pidfd``),
    sent with the request, instead of the stdlib's "parent lives" pipe, a
    duplicate of the data pipe kept open in the parent.  Without pidfds, the
    stdlib's way: the status pipe and that duplicate.
    """

    method = "forkserver"
    reaped_here: ClassVar[bool] = False
    inherits_signal_mask: ClassVar[bool] = False
    lifeline_problem: ClassVar[str | None] = (
        "the child's parent is the fork server, which outlives this process as long as "
        "any of its children lives (each holds the pipe that keeps it alive)"
    )
    _pid_read = False

    @property
    def server_forked(self) -> bool:
        """Whether the fork server has reported the child: it exists (or existed)."""
        return self._pid_read

    def _launch(self, process_obj: BaseProcess) -> None:
        self._fds = []
        try:
            lifeline = own_pidfd()
            # The child's sign that its parent lives, sent with the request
            # (SCM_RIGHTS) as the stdlib sends a pickled object's descriptors.
            process_obj._parent_pidfd_at = (  # type: ignore[attr-defined]
                None if lifeline < 0 else self.duplicate_for_child(lifeline)
            )
            self._data = self._pickled(process_obj)
            forkserver.ensure_running()
            _reserve_descriptors(_FORKSERVER_CLIENT_FDS)
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)
            kept: tuple[int, ...] = (self.sentinel,)
            if lifeline < 0:
                try:
                    # As the stdlib: a duplicate of the data pipe's write end stays
                    # open as the child's sign that its parent lives.
                    kept = (os.dup(w), self.sentinel)
                except BaseException:
                    os.close(w)
                    os.close(self.sentinel)
                    raise
            self._data_fd = w
            self.finalizer = _Closer(
                self,
                util.close_fds,  # type: ignore[attr-defined]
                kept,
            )
            if not self._deferred:
                self.finish()
        except BaseException:
            self.abandon()
            raise

    # The server writes the pid as soon as it has forked, before the child reads
    # anything: reading it first means a start that fails while the data is sent
    # can kill a child that has not run a line of the target yet.
    def finish(self) -> None:
        try:
            if not self._pid_read:
                self.pid = forkserver.read_signed(self.sentinel)
                self._pid_read = True
            if self._data is not None:
                _write_blocking(self._data_fd, self._data)
        except BaseException as exc:
            self._kill_unborn(kill=not isinstance(exc, BrokenPipeError))
            self.abandon()
            raise
        finally:
            self._drop_data()
            self._close_data_fd()

    async def finish_async(self) -> None:
        import anyio  # noqa: PLC0415 - the parent's event-loop side

        try:
            if not self._pid_read:
                await anyio.wait_readable(self.sentinel)
                self.pid = forkserver.read_signed(self.sentinel)
                self._pid_read = True
            if self._data is not None:
                await _write_async(self._data_fd, self._data)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._kill_unborn_async(kill=not isinstance(exc, BrokenPipeError))
            self.abandon()
            raise
        finally:
            self._drop_data()
            self._close_data_fd()

    def _close_data_fd(self) -> None:
        fd, self._data_fd = self._data_fd, -1
        if fd >= 0:
            os.close(fd)

    # A child whose data was not all sent cannot finish: it blocks reading it
    # while we hold the pipe.  Unless something else killed it, it is alive and
    # its pid its own (the server has not reported its exit on the sentinel).
    # EPIPE means the child closed its end: it is gone, and not signalled.
    def _kill_unborn(self, *, kill: bool) -> None:
        self._stopped = True
        with contextlib.suppress(OSError, EOFError):
            if not self._pid_read:
                if not readable_within(self.sentinel, _UNBORN_WAIT):
                    return
                self.pid = forkserver.read_signed(self.sentinel)
                self._pid_read = True
            if kill and not readable_now(self.sentinel):
                os.kill(self.pid, signal.SIGKILL)
            readable_within(self.sentinel, _UNBORN_WAIT)

    async def _kill_unborn_async(self, *, kill: bool) -> None:
        import anyio  # noqa: PLC0415

        self._stopped = True
        with anyio.move_on_after(_UNBORN_WAIT), contextlib.suppress(OSError, EOFError):
            if not self._pid_read:
                await anyio.wait_readable(self.sentinel)
                self.pid = forkserver.read_signed(self.sentinel)
                self._pid_read = True
            if kill and not readable_now(self.sentinel):
                os.kill(self.pid, signal.SIGKILL)
            await anyio.wait_readable(self.sentinel)

    #: ``_kill_unborn`` has run: the child was stopped, or found gone.
    _stopped = False

    def abandon(self) -> None:
        self._close_data_fd()
        if self._pid_read and not self._stopped and not self._abandoned:
            # Started, then given up on (its handle could not open its pidfd, or
            # the start was interrupted after the fork server's reply): it must
            # not run on unwatched while start() says that nothing is left.
            self._kill_unborn(kill=True)
        super().abandon()

    def _collect(self, flag: int) -> None:
        if not readable_within(self.sentinel, 0 if flag == os.WNOHANG else None):
            return
        try:
            self.returncode = forkserver.read_signed(self.sentinel)
        except (OSError, EOFError):
            self._lost(
                "never reported: the fork server closed the child's status pipe first "
                "(it died, was killed, or ran out of file descriptors)"
            )

    def exit_state(self) -> Exit:
        if self.returncode is not None or self.status_lost:
            return Exit.GONE
        return Exit.EXITED if readable_now(self.sentinel) else Exit.RUNNING

    def wait_exited_blocking(self, timeout: float | None = None, pidfd: int = -1) -> bool:
        # The code arrives on the sentinel after the pidfd turns readable.
        return readable_within(self.sentinel, timeout)


# How long a failed forkserver start waits for the pid of the child it must
# kill, and then for the server's report of its death.  The server forks at
# once; only a server that hangs makes this run out.
_UNBORN_WAIT = 5.0

POPEN_CLASSES: dict[str, type[_AioprocPopen]] = {
    "fork": ForkPopen,
    "spawn": SpawnPopen,
    "forkserver": ForkServerPopen,
}

AioprocPopen = _AioprocPopen

__all__ = [
    "POPEN_CLASSES",
    "AioprocPopen",
    "Exit",
    "ForkPopen",
    "ForkServerPopen",
    "SpawnPopen",
    "readable_now",
    "readable_within",
]
