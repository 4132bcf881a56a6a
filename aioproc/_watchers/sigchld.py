"""The ``sigchld`` watcher: one SIGCHLD handler, checking only our own children.

For POSIX systems without pidfd.  A Python-level SIGCHLD handler writes a byte
into a pipe per event loop ("hub"); in each loop one joining task (the leader)
waits for that pipe, and on every wake-up asks the kernel about each child being
joined in that loop with ``waitid(P_PID, pid, WNOHANG | WNOWAIT)``.  That never
reaps anything: a child started by ``os.fork``, ``subprocess`` or
``asyncio.create_subprocess_exec`` keeps its exit status for its owner, and our
own children are collected through their Popen afterwards.  Signals coalesce
(1000 children exiting in the same millisecond may raise a handful of
SIGCHLDs); since every wake-up checks every watched child, none is missed.

The handler is installed when the first child is watched and removed, with the
previous handler put back, when no child is watched any more.  If no signal
wake-up fd is set (asyncio without signal handlers; trio always has one), the
hub's pipe becomes it, so a SIGCHLD delivered to another thread (the kernel
prefers the thread that forked the child) still wakes the loop at once.

Where it cannot work: off the main thread (only it may install handlers), under
uvloop (libuv owns SIGCHLD and rejects a second handler), and for forkserver
children (they are the fork server's, so their SIGCHLD never reaches us).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import anyio
from anyio.lowlevel import EventLoopToken, current_token

from ._base import Place, Watch


class _Hub:
    """The pipe and the watched children of one event loop."""

    def __init__(self, token: EventLoopToken) -> None:
        self.token = token
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.watches: set[SigchldWatch] = set()
        self.leader: SigchldWatch | None = None
        # Trio always has a wake-up fd of its own; asyncio only with signal handlers.
        self.asyncio = isinstance(token.native_token, asyncio.AbstractEventLoop)
        #: Signals seen by the handler; read by tests and the benchmark.
        self.wakeups = 0

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 4096):
                pass
        except BlockingIOError:
            pass

    def wake_exited(self) -> None:
        for watch in self.watches:
            event = watch.wake
            if event is not None and not watch.running():
                event.set()

    def hand_over(self) -> None:
        """Let a waiting task take the leader's place."""
        for watch in self.watches:
            event = watch.wake
            if event is not None and not event.is_set():
                event.set()
                return

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


_hubs: dict[EventLoopToken, _Hub] = {}
_previous_handler: Any = None
_our_wakeup_fd = -1


def _on_sigchld(signum: int, frame: Any) -> None:
    for hub in list(_hubs.values()):
        hub.wakeups += 1
        try:
            os.write(hub.wfd, b"\0")
        except OSError:
            pass  # full pipe: a wake-up is pending anyway
    previous = _previous_handler
    if callable(previous):
        previous(signum, frame)


def _install() -> None:
    global _previous_handler
    _previous_handler = signal.signal(signal.SIGCHLD, _on_sigchld)


def _uninstall() -> None:
    global _previous_handler, _our_wakeup_fd
    signal.signal(
        signal.SIGCHLD,
        _previous_handler if _previous_handler is not None else signal.SIG_DFL,
    )
    _previous_handler = None
    if _our_wakeup_fd >= 0:
        current = signal.set_wakeup_fd(-1)
        if current not in (-1, _our_wakeup_fd):
            _restore_wakeup_fd(current)  # someone else's since: keep it
        _our_wakeup_fd = -1


def _hub_for_this_loop() -> _Hub:
    token = current_token()
    hub = _hubs.get(token)
    if hub is None:
        hub = _Hub(token)
        if not _hubs:
            _install()
        _hubs[token] = hub
        if _our_wakeup_fd < 0 and hub.asyncio:
            _wake_ups_to(hub)
    return hub


def _drop_hub(hub: _Hub) -> None:
    global _our_wakeup_fd
    del _hubs[hub.token]
    if hub.wfd == _our_wakeup_fd:
        signal.set_wakeup_fd(-1)
        _our_wakeup_fd = -1
        for other in _hubs.values():  # another asyncio loop still watches
            if other.asyncio:
                _wake_ups_to(other)
                break
    if not _hubs:
        _uninstall()
    hub.close()


def _wake_ups_to(hub: _Hub) -> None:
    """Make *hub*'s pipe the signal wake-up fd, unless someone else's is set.

    Python offers no way to read the wake-up fd without replacing it, and
    putting one back loses its ``warn_on_full_buffer`` flag; so this is only
    done under asyncio, whose own wake-up fd uses the default flag.
    """
    global _our_wakeup_fd
    previous = signal.set_wakeup_fd(hub.wfd, warn_on_full_buffer=False)
    if previous == -1:
        _our_wakeup_fd = hub.wfd
    else:
        _restore_wakeup_fd(previous)


def _restore_wakeup_fd(fd: int) -> None:
    # Python cannot tell whether the owner asked for warnings on a full buffer;
    # trio does not (its wake-up socket holds one byte, which a burst of SIGCHLD
    # overflows at once), and a missed byte only means a loop was awake anyway.
    signal.set_wakeup_fd(fd, warn_on_full_buffer=False)


def _after_fork_in_child() -> None:
    # The hubs' pipes are shared with the parent: a child's SIGCHLD must not
    # land in them.  Forget them and put the old handler back.
    if not _hubs:
        return
    for hub in _hubs.values():
        hub.close()
    _hubs.clear()
    try:
        _uninstall()
    except ValueError:  # pragma: no cover - fork from a non-main thread
        pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def watched_signal_count() -> int:
    """SIGCHLDs seen by the hub of the running loop (0 if none is installed)."""
    try:
        hub = _hubs.get(current_token())
    except Exception:
        return 0
    return hub.wakeups if hub is not None else 0


class SigchldWatch(Watch):
    name = "sigchld"
    wake: anyio.Event | None = None

    @classmethod
    def unavailable(cls, place: Place) -> str | None:
        if not hasattr(signal, "SIGCHLD"):  # pragma: no cover - Windows
            return "this platform has no SIGCHLD"
        if place.start_method == "forkserver":
            return (
                "a forkserver child belongs to the fork server, so its SIGCHLD "
                "never reaches this process; use the pidfd or sentinel watcher"
            )
        if not place.main_thread:
            return (
                "only the main thread may install a SIGCHLD handler; start and "
                "join from the main thread, or use the pidfd or thread watcher"
            )
        if place.uvloop:
            return (
                "uvloop's libuv owns SIGCHLD and refuses a second handler; use "
                "the pidfd or thread watcher under uvloop"
            )
        return None

    def running(self) -> bool:
        """Whether the child has not exited yet (asks the kernel, reaps nothing)."""
        if self.popen.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False  # already collected; Popen will say what happened
        return info is None

    async def wait_exited(self) -> None:
        hub = _hub_for_this_loop()
        hub.watches.add(self)
        try:
            while self.running():
                if hub.leader is None:
                    hub.leader = self
                    try:
                        await anyio.wait_readable(hub.rfd)
                        hub.drain()
                        hub.wake_exited()
                    finally:
                        hub.leader = None
                        hub.hand_over()
                else:
                    self.wake = anyio.Event()
                    try:
                        await self.wake.wait()
                    finally:
                        self.wake = None
        finally:
            hub.watches.discard(self)
            if not hub.watches:
                _drop_hub(hub)
            elif hub.leader is None:
                # The lead may have been handed to this task just as its child
                # exited (or it was cancelled): pass it on, or nobody reads the pipe.
                hub.hand_over()
