"""The parent's handle on one started child: start → watch → reap → result.

Theory of operation.  A ``Child`` owns everything the parent holds for one
child process: its Popen (one class per start method, see ``_popen``), its pidfd
where the kernel has them (opened for every watcher), whether its exit status
is still ours to collect, its watch, and the tasks joining it.

- **Reaping.**  The status is consumed exactly once, through the Popen
  (``poll()``, under the Popen's lock), which is also what ``is_alive()``,
  ``exitcode`` and ``multiprocessing.active_children()`` use, so they all agree.
  A watch (``_watchers``) only says *when* to poll.  If someone else took the
  status, the Popen says so (``status_lost``) and the first ``join()`` or
  ``exitcode`` raises ``ExitStatusLost``; afterwards the child counts as gone
  with an unknown exit code (None).

- **Signals** go through ``send_signal`` and nowhere else, which sends one only
  while the pid cannot name a stranger: through the pidfd (it names the very
  process, even after someone else reaped it: then the kernel says ESRCH), or,
  without one, while the child is known to be unreaped — fork and spawn
  children: ``waitid(WNOWAIT)`` says it has not been collected, and SIGCHLD is
  not ignored; forkserver children: the fork server has not reported the exit.
  Never after ``ExitStatusLost``, never from a process that is not the parent.

- **Joiners.**  Many tasks may join one child.  Those of one event loop queue
  on one lock: the task holding it waits on the watch, the others find the
  exit code collected when they get it; cancelling the holder releases the
  lock and the next task takes over the wait, so a cancelled join never loses
  a wake-up.  One event loop at a time joins a child: a join from a second loop
  while the first still has joiners is refused (``RuntimeError``), atomically,
  unless the first loop has been closed, in which case its abandoned joiners
  are forgotten and the new loop takes over.

- **Process groups** (``new_process_group``): signals go to the group; ``run``
  also asks for what is left of the group to be killed when the child exits
  (``kill_group_at_exit``), between the exit and the collection, while the
  unreaped child still holds the group's id (or at any time through the pidfd).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken, current_token

from . import _fds, _popen
from ._exceptions import ExitStatusLost
from ._popen import Exit, readable_now
from ._tree import PIDFD_SIGNAL_PROCESS_GROUP, pidfd_group_signals_work
from ._watchers import choose, get_watcher, usable_at_join
from ._watchers import pidfd as pidfd_support
from ._watchers._base import token_here
from ._watchers.pidfd import PidfdWatch
from ._watchers.sigchld import SigchldWatch
from ._watchers.sigchld import ignored as sigchld_ignored

if TYPE_CHECKING:
    from ._popen import AioprocPopen
    from ._usage import ResourceUsage
    from ._watchers import Watch, WatcherName


def _loop_finished(token: EventLoopToken) -> bool:
    """Whether the event loop behind *token* can never run a task again."""
    native: Any = token.native_token
    is_closed = getattr(native, "is_closed", None)
    if is_closed is not None:  # asyncio (and uvloop)
        return bool(is_closed())
    try:  # trio: a finished run refuses callbacks
        native.run_sync_soon(lambda: None)
    except Exception:
        return True
    return False


class _Joiners:
    """The tasks of one event loop joining one child."""

    def __init__(self, token: EventLoopToken) -> None:
        self.token = token
        self.thread = threading.get_ident()
        # No yield when nobody else holds it: the wait itself is the checkpoint.
        self.lock = anyio.Lock(fast_acquire=True)
        self.count = 0


class Child:
    """Everything the parent holds for one started child (see the module docstring)."""

    pidfd = -1
    #: Whether the handle closes the pidfd (not when it is the Popen's sentinel).
    _own_pidfd = True
    _fds: tuple[int, ...] = ()
    # Defaults here rather than in each instance's dictionary: a start that
    # writes fewer attributes allocates less (see _start on why it counts).
    group = False
    kill_group_at_exit = False
    _group_killed = False
    _joiners: _Joiners | None = None
    _lost_reported = False
    #: The duplicate of the Popen's sentinel given out as ``sentinel``; -1 until asked for.
    _given_sentinel = -1
    #: The watch, made when a join first waits (``_wait_exited``): a child
    #: that has exited by its first join never needs one, and a start that
    #: allocates less writes fewer pages (see _start on why that counts).
    _watch: Watch | None = None
    #: The watcher was forced (``set_watcher``) when the child was started.
    _watch_forced = False

    def __init__(
        self,
        popen: AioprocPopen,
        watch_cls: type[Watch],
        group: bool = False,
        kill_group_at_exit: bool = False,
    ) -> None:
        self.popen = popen
        self.pid: int = popen.pid
        if group:
            #: The child leads its own process group: signals go to the group.
            self.group = True
            #: SIGKILL what is left of the group once the child has exited (``run``).
            self.kill_group_at_exit = kill_group_at_exit
        self._parent_pid = popen._owner  # os.getpid(), without making another int
        self._lock = threading.Lock()
        if popen.pidfd >= 0:  # the Popen's own, its sentinel and only descriptor
            self.pidfd = popen.pidfd
            self._own_pidfd = False
            _fds.hold(popen.pidfd)
        else:
            self._open_pidfd()
            finalizer = popen.finalizer  # the stdlib's: it closes the pipe ends
            self._fds = (popen.sentinel, *(finalizer._args if finalizer is not None else ()))  # type: ignore[attr-defined]
            _fds.hold(*self._fds)
            if self.pidfd < 0 and popen.reaped_here:
                self._open_proc_dir()
        if not pidfd_support.supported and watch_cls is PidfdWatch:
            # pidfd_open was refused just now (a sandbox): the next watcher,
            # or WatcherUnavailable if pidfd was forced.
            watch_cls = choose(type(popen))
        self._watch_cls = watch_cls
        if watch_cls is SigchldWatch and get_watcher() is not None:
            self._watch_forced = True  # (only sigchld's may not serve a join elsewhere)

    def _open_pidfd(self) -> None:
        """Open the child's pidfd, if the kernel has them and it still names the child.

        Raises ``OSError`` when descriptors ran out (the caller cleans up).
        """
        if self.popen.pidfd >= 0:  # the Popen's own, its sentinel: it closes it
            self.pidfd = self.popen.pidfd
            self._own_pidfd = False
            return
        if not pidfd_support.is_supported():
            return
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return  # already reaped, by someone else or the fork server: nothing to open
        except OSError as exc:
            if exc.errno not in pidfd_support.UNSUPPORTED_ERRNOS:
                raise
            pidfd_support.supported = False
            return
        # The pidfd names whatever has the pid now.  It is our child if the pid
        # is still held: unreaped (fork, spawn), or not reported exited by the
        # fork server; otherwise it may be a stranger's, and is not kept.
        try:
            state = self.popen.exit_state()
        except BaseException:  # trio's KeyboardInterrupt: the pidfd is not kept yet
            os.close(fd)
            raise
        if not (state is Exit.RUNNING or (state is Exit.EXITED and self.popen.reaped_here)):
            os.close(fd)
            return
        self.pidfd = self.popen.pidfd = fd
        _fds.hold(fd)
        _popen.child_pidfds_work = True

    def _open_proc_dir(self) -> None:
        """Open ``/proc/PID`` (Linux) while the pid surely names the child, unreaped.

        Raises ``OSError`` when descriptors ran out (the caller cleans up).
        """
        if self.popen.exit_state() is Exit.GONE:
            return  # reaped by someone else already: the pid may name anyone
        try:
            fd = os.open(f"/proc/{self.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The caller abandons the Popen, which closes these; unmarked
                # now, not when this half-made handle is collected.
                self._release_fds()
                raise
            return  # no /proc here
        self.popen.proc_dir = fd  # the Popen asks it; this handle closes it
        _fds.hold(fd)

    # -- state -------------------------------------------------------------------

    def _done(self) -> bool:
        return self.popen.returncode is not None or self.popen.status_lost

    def poll(self) -> int | None:
        """The exit code if the child has exited (collecting it); None otherwise.

        None also once the status was lost (``result()`` reports that).
        """
        popen = self.popen
        if popen.returncode is None and not popen.status_lost:
            if self.kill_group_at_exit and not self._group_killed:
                if popen.exit_state() is Exit.RUNNING:
                    return None
                self._kill_group_remnants()
            popen.poll()
            if self._watch is not None and self._done():
                self._release_watch()
        return popen.returncode

    def _release_watch(self) -> None:
        """Let the watch go once the status is known and no task waits on it."""
        with self._lock:
            if self._joiners is not None and self._joiners.count:
                return
        self._close_watch()

    def _close_watch(self) -> None:
        watch = self._watch
        if watch is not None:
            watch.close()

    def result(self) -> int | None:
        """``poll()``, raising ``ExitStatusLost`` the first time the status is found lost."""
        code = self.poll()
        if code is None and self.popen.status_lost and not self._lost_reported:
            self._lost_reported = True
            raise ExitStatusLost(self.pid, self.popen.lost_reason)
        return code

    def alive(self) -> bool:
        """Whether the child is still running (as far as anyone can tell)."""
        return self.poll() is None and not self.popen.status_lost

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    @property
    def resource_usage(self) -> ResourceUsage | None:
        return self.popen.resource_usage

    @property
    def watcher_name(self) -> WatcherName:
        return (self._watch or self._watch_cls).name

    def sentinel(self) -> int:
        """What ``AsyncProcess.sentinel`` gives out: readable once the child has exited.

        A duplicate of the Popen's sentinel, made when first asked for.  An
        event loop takes one waiter per descriptor (anyio and trio refuse a
        second; asyncio's ``add_reader`` replaces the first, which then never
        wakes), and a join waits on the Popen's (the pidfd, where it is the
        sentinel; the fork server's status pipe; the pipe, for the sentinel
        watcher).  So code written for multiprocessing that waits for the
        sentinel in its event loop never takes a join's wait, nor a join its.
        A child nobody asks about costs no descriptor more.
        """
        if self._given_sentinel < 0 and os.getpid() == self._parent_pid:
            with self._lock:
                if self._given_sentinel < 0:
                    try:
                        fd = os.dup(self.popen.sentinel)
                    except OSError as exc:
                        name = errno.errorcode.get(exc.errno or 0, "unknown error")
                        raise OSError(
                            exc.errno,
                            f"could not give out the sentinel of pid {self.pid}: "
                            f"{(exc.strerror or name).lower()} ({name}); it is a descriptor "
                            "of its own, so that it can be waited for in an event loop while "
                            "join() waits; close file descriptors or raise RLIMIT_NOFILE",
                        ) from exc
                    _fds.hold(fd)
                    self._given_sentinel = fd
        # In a forked copy: the number, as the stdlib's copy would give it.
        return self._given_sentinel if self._given_sentinel >= 0 else self.popen.sentinel

    # -- joining -----------------------------------------------------------------

    async def wait(self) -> int | None:
        """Wait for the child to exit; its exit code (``result()``)."""
        if self.poll() is not None or self.popen.status_lost:
            await anyio.lowlevel.checkpoint()
            return self.result()
        joiners = self._join_begin()
        try:
            async with joiners.lock:
                if not self._done():
                    await self._wait_exited()
                return self.result()
        finally:
            self._join_end(joiners)

    def _join_begin(self) -> _Joiners:
        token = current_token()
        with self._lock:
            joiners = self._joiners
            if joiners is None or joiners.token != token:
                if joiners is not None and joiners.count:
                    if not _loop_finished(joiners.token):
                        raise RuntimeError(
                            f"pid {self.pid} is already being joined in another event loop; "
                            "join a process from one event loop at a time"
                        )
                    if self._watch is not None:  # its tasks will never run again
                        self._watch.forget_loop(joiners.token)
                joiners = self._joiners = _Joiners(token)
            joiners.count += 1
            return joiners

    def _join_end(self, joiners: _Joiners) -> None:
        with self._lock:
            joiners.count -= 1
            if joiners.count or self._joiners is not joiners:
                return
            self._joiners = None
        if self._done():
            self._close_watch()

    async def _wait_exited(self) -> None:
        watch = self._watch = usable_at_join(
            self._watch or self._watch_cls(self.popen, self.pidfd), self._watch_forced
        )
        try:
            await watch.wait_exited()
        except anyio.ClosedResourceError:
            return  # close() released the watch: the child had already been collected
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            raise OSError(
                exc.errno,
                f"join() could not set up the {watch.name} watcher: too many open files "
                f"({errno.errorcode[exc.errno]}); the child is unaffected and can be joined "
                "again; close file descriptors or raise RLIMIT_NOFILE",
            ) from exc
        delay = 0.0001
        while self.poll() is None and not self.popen.status_lost:
            if not self.popen.reaped_here:
                # Exited, but the fork server has not written the exit code yet.
                await watch.wait_readable(self.popen.sentinel)
            else:  # pragma: no cover - every watch returns once the kernel says exited
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)

    def wait_blocking(self, timeout: float | None = None) -> int | None:
        """Wait for the child without an event loop (interpreter exit); None if not yet."""
        if not self._done():
            self.popen.wait_exited_blocking(timeout, self.pidfd)
        return self.poll()

    # -- signals -----------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send *sig* to the child, or its group; nothing once it may not be ours."""
        if os.getpid() != self._parent_pid:
            raise RuntimeError(
                f"only the parent of pid {self.pid} can signal it safely (it alone knows "
                "whether the pid is still the child's); signal it from the parent"
            )
        if self._done():
            return
        # Under the Popen's lock: no thread of ours reaps the child meanwhile.
        with self.popen._reap_lock:
            if self.group and self._signal_group(sig):
                return
            if self.pidfd >= 0:
                self._pidfd_signal(sig, 0)
            elif self._pid_held():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def _pid_held(self, *, exited: bool = False) -> bool:
        """Without a pidfd: whether the pid (and group id) still names the child.

        Fork and spawn: the kernel says it is our unreaped child, SIGCHLD is not
        ignored, and its ``/proc/PID`` directory (Linux) is still there — or,
        without one and unless *exited*, the child still holds its end of the
        sentinel pipe (if someone else reaped it and the pid went to another
        child of ours, the kernel's answer would be about that one).
        Forkserver: the fork server has not reported its exit.
        """
        popen = self.popen
        state = popen.exit_state()
        if not popen.reaped_here:  # the fork server reaps it, and then reports it
            return state is Exit.RUNNING
        if state is Exit.GONE or sigchld_ignored():
            return False
        # With its /proc/PID, exit_state() has checked that the pid is still the
        # child's; elsewhere its end of the sentinel pipe, held until it dies, tells.
        return exited or popen.proc_dir >= 0 or not readable_now(popen.sentinel)

    def _signal_group(self, sig: int, *, exited: bool = False) -> bool:
        """Signal the child's group; False if there is none (yet), or it is not safe."""
        if self.pidfd >= 0 and pidfd_group_signals_work():
            return self._pidfd_signal(sig, PIDFD_SIGNAL_PROCESS_GROUP)
        # killpg only while the leader is our unreaped child: its pid (a zombie's
        # too) and so its group id cannot be handed to anyone else meanwhile.
        if not self.popen.reaped_here or not self._pid_held(exited=exited):
            return False
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _pidfd_signal(self, sig: int, flags: int) -> bool:
        """Signal through the pidfd; False if there is no such process (or group)."""
        try:
            signal.pidfd_send_signal(self.pidfd, sig, None, flags)
        except ProcessLookupError:
            return False
        return True

    def _kill_group_remnants(self) -> None:
        """SIGKILL what is left of the group; the child itself has exited."""
        self._group_killed = True
        with self.popen._reap_lock:
            self._signal_group(signal.SIGKILL, exited=True)

    # -- the end -----------------------------------------------------------------

    def close(self) -> None:
        """Release everything; the child must have exited and been collected (or lost)."""
        if os.getpid() != self._parent_pid:
            # A forked copy: the numbers may name this process's own files by now.
            self.pidfd = self._given_sentinel = self.popen.proc_dir = -1
            self._fds, self._watch = (), None
            self.popen.close()  # its closers check their owner too
            return
        with self._lock:
            joiners = self._joiners
        if joiners is not None and joiners.count:
            if joiners.thread != threading.get_ident() and not _loop_finished(joiners.token):
                raise ValueError(
                    "cannot close a process while join() waits for it in an event loop of "
                    "another thread; await that join first"
                )
            if joiners.token != token_here() and self._watch is not None:
                self._watch.forget_loop(joiners.token)
        self._close_watch()
        self._release_fds()
        pidfd, self.pidfd = self.pidfd, -1
        if pidfd >= 0 and self._own_pidfd:
            os.close(pidfd)
        given, self._given_sentinel = self._given_sentinel, -1
        if given >= 0:
            os.close(given)
        proc_dir, self.popen.proc_dir = self.popen.proc_dir, -1
        if proc_dir >= 0:
            os.close(proc_dir)
        self.popen.close()

    def _release_fds(self) -> None:
        fds, self._fds = self._fds, ()
        if os.getpid() == self._parent_pid:
            _fds.release(*fds, self.pidfd, self._given_sentinel, self.popen.proc_dir)

    def __del__(self) -> None:
        proc_dir = self.popen.proc_dir
        if self.pidfd < 0 and self._given_sentinel < 0 and proc_dir < 0 and not self._fds:
            return  # closed
        if os.getpid() != self._parent_pid:
            return  # a forked copy: the descriptors are not ours
        self._release_fds()
        pidfd, self.pidfd = self.pidfd, -1
        given, self._given_sentinel = self._given_sentinel, -1
        self.popen.proc_dir = -1
        for fd in (pidfd if self._own_pidfd else -1, given, proc_dir):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


__all__ = ["Child"]
