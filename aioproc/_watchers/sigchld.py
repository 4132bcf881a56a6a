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

Living next to other SIGCHLD handlers:

- The handler is installed when the first child is watched and chains to the
  one it replaced.  When no child is watched any more, that one is put back —
  only if ours is still installed: a handler someone installed meanwhile stays.
- Someone may replace ours while a join waits (asyncio's
  ``loop.add_signal_handler(SIGCHLD, ...)`` does, and chains to nothing).  The
  leader checks every ``_RECHECK`` seconds that ours is still installed and, if
  not, installs it again on top, chaining to the newcomer, then looks at every
  child: a wake-up missed meanwhile costs at most that long.  (asyncio still
  runs its callback: its wake-up fd is written by the C-level handler,
  whichever Python handler is installed.)
- A C library (libuv, libev, glib, an extension) installs its disposition with
  ``sigaction()``, which Python's ``signal`` module does not see:
  ``signal.getsignal`` keeps returning what Python last installed.  So the
  kernel's own SIGCHLD action is read too (``_os_handler``): one installed from
  C is chained to, put back and never overwritten like a Python handler, as a
  ``_CAction``; SIG_IGN set from C is SIG_IGN.
- With SIGCHLD set to SIG_IGN the kernel reaps every child at once and sends
  no signal; installing a handler would turn the program's other children into
  zombies.  So the watcher is refused there (automatic choice moves on).

If no signal wake-up fd is set (asyncio without signal handlers; trio always has
one), the hub's pipe becomes it, so a SIGCHLD delivered to another thread (the
kernel prefers the thread that forked the child) still wakes the loop at once.

Where it cannot work: off the main thread (only it may install handlers), under
uvloop (libuv owns SIGCHLD and rejects a second handler), for forkserver
children (they are the fork server's, so their SIGCHLD never reaches us), and
where SIGCHLD is ignored.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import anyio
from anyio.lowlevel import EventLoopToken, current_token

from .._popen import Exit
from ._base import Place, Watch

#: Seconds between the leader's checks that our handler is still installed.
_RECHECK = 0.25

# -- the kernel's SIGCHLD action, which C code may have set behind Python's back ----

_SIGACTION_SIZE = 512  # more than any libc's struct sigaction; sa_handler comes first
_libc: Any = None


def _sigaction(new: Any) -> Any:
    """``sigaction(SIGCHLD, new, old)``: the old action as an opaque buffer (None: unknown)."""
    global _libc
    if _libc is False:
        return None
    if _libc is None and os.uname().machine.startswith("mips"):
        _libc = False  # glibc's struct sigaction puts sa_flags first there
        return None
    try:
        import ctypes  # noqa: PLC0415 - only where sigchld is used

        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        old = ctypes.create_string_buffer(_SIGACTION_SIZE)
        if _libc.sigaction(signal.SIGCHLD, new, old) != 0:
            return None
    except (ImportError, OSError, AttributeError):  # pragma: no cover - no ctypes, no libc
        _libc = False
        return None
    return old


def _handler_of(action: Any) -> int:
    import ctypes  # noqa: PLC0415

    return ctypes.c_void_p.from_buffer(action).value or 0  # SIG_DFL is 0


def _os_handler() -> int | None:
    """The handler the kernel runs for SIGCHLD (0 SIG_DFL, 1 SIG_IGN); None: unknown."""
    action = _sigaction(None)
    return None if action is None else _handler_of(action)


#: The address of CPython's C-level handler, which runs every Python handler.
_trampoline: int | None = None


class _CAction:
    """A SIGCHLD action installed from C, which ours replaced: chained to, put back."""

    def __init__(self, action: Any, python: Any = None) -> None:
        import ctypes  # noqa: PLC0415

        self.action = action
        #: What Python's signal module had for SIGCHLD: the C handler may chain
        #: to it (through CPython's C-level handler), so it is kept and put back.
        self.python = python
        self.handler = _handler_of(action)
        # Called as sa_sigaction(signum, info, context): a plain sa_handler
        # ignores the extra arguments (the C calling convention allows it).
        self._call = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(
            self.handler
        )
        self._info = ctypes.create_string_buffer(128)  # a siginfo_t: si_signo first
        ctypes.c_int.from_buffer(self._info).value = signal.SIGCHLD

    def __call__(self, signum: int, frame: Any) -> None:
        if self.handler > 1:  # not SIG_DFL / SIG_IGN
            self._call(signum, self._info, None)

    def restore(self) -> None:
        """Put this action back, and Python's handler below it."""
        python = self.python if self.python is not None else signal.SIG_DFL
        signal.signal(signal.SIGCHLD, python)
        _sigaction(self.action)


def _install_ours() -> Any:
    """Install ``_on_sigchld``; the action it replaced (a Python handler or a ``_CAction``)."""
    global _trampoline
    before = _sigaction(None)
    previous = signal.signal(signal.SIGCHLD, _on_sigchld)
    if before is not None:
        _trampoline = _os_handler()
        handler = _handler_of(before)
        if handler not in (0, _trampoline):  # set from C, not through Python
            return _CAction(before, previous)
        if handler == 0:
            return signal.SIG_DFL
    return previous


def _ours_on_top() -> bool:
    """Whether the kernel runs our handler for SIGCHLD now."""
    if signal.getsignal(signal.SIGCHLD) is not _on_sigchld:
        return False
    return _trampoline is None or _os_handler() in (None, _trampoline)


def _put_back(handler: Any) -> None:
    if isinstance(handler, _CAction):
        handler.restore()
    else:
        signal.signal(signal.SIGCHLD, handler if handler is not None else signal.SIG_DFL)


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
        self.closed = False

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
        if not self.closed:
            self.closed = True
            os.close(self.rfd)
            os.close(self.wfd)


_hubs: dict[EventLoopToken, _Hub] = {}
#: The handler ours chains to: the one it replaced, or one that replaced ours
#: and that ours went back on top of (``_still_installed``).
_previous_handler: Any = None
#: The program's handler that ours first replaced: where a handler that chains
#: back to ours goes on to, and what ours chains to once uninstalled (a handler
#: installed over ours may still call it).
_original_handler: Any = None
#: Uninstalled while a handler installed over ours was on top: that one may
#: still call ours, which then goes on to ``_original_handler``.
_chained_below = False
_our_wakeup_fd = -1
#: 0 outside the handler, 1 inside, 2 inside a chain that came back to it.
_in_handler = 0


def _on_sigchld(signum: int, frame: Any) -> None:
    global _in_handler
    if _in_handler:
        # A handler that chains back to ours (ours went back on top of it):
        # on to the program's own, once.
        if _in_handler == 1:
            original = _original_handler
            below = getattr(_previous_handler, "python", None)
            if callable(below) and below is not _on_sigchld:
                original = below  # a C handler chained to the Python one it replaced
            if callable(original) and original is not _previous_handler:
                _in_handler = 2
                try:
                    original(signum, frame)
                finally:
                    _in_handler = 1
        return
    _in_handler = 1
    try:
        for hub in list(_hubs.values()):
            hub.wakeups += 1
            try:
                os.write(hub.wfd, b"\0")
            except OSError:
                pass  # full pipe: a wake-up is pending anyway
        previous = _previous_handler
        if callable(previous):
            previous(signum, frame)
    finally:
        _in_handler = 0


def ignored() -> bool:
    """Whether the program set SIGCHLD to SIG_IGN (the kernel then reaps every child),
    through Python or from C."""
    return signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN or _os_handler() == 1


def _install() -> None:
    global _previous_handler, _original_handler
    _previous_handler = _install_ours()
    if not _chained_below:
        _original_handler = _previous_handler


def _still_installed() -> bool:
    """Put our handler back on top if someone replaced it; False if they did."""
    global _previous_handler
    if _ours_on_top():
        return True
    if not ignored():
        _previous_handler = _install_ours()
    return False


def _uninstall() -> None:
    global _previous_handler, _our_wakeup_fd, _chained_below
    if _ours_on_top():
        _put_back(_previous_handler)
        # Put back what ours chained to; if that was one installed over ours, it
        # may still call ours, which goes on to the program's own.
        _chained_below = _previous_handler is not _original_handler
    else:
        _chained_below = True
    _previous_handler = _original_handler
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
    if _hubs.get(hub.token) is not hub:
        return  # dropped already
    del _hubs[hub.token]
    if hub.wfd == _our_wakeup_fd:
        current = signal.set_wakeup_fd(-1)
        _our_wakeup_fd = -1
        if current not in (-1, hub.wfd):
            _restore_wakeup_fd(current)  # the loop's own since (add_signal_handler): keep it
        else:
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
    global _previous_handler, _our_wakeup_fd
    if not _hubs:
        return
    for hub in _hubs.values():
        hub.close()
    _hubs.clear()
    try:
        _uninstall()
    except ValueError:  # pragma: no cover - fork from a non-main thread
        _previous_handler = None
        _our_wakeup_fd = -1


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
    _hub: _Hub | None = None

    @classmethod
    def unavailable(cls, place: Place) -> str | None:
        if not hasattr(signal, "SIGCHLD"):  # pragma: no cover - Windows
            return "this platform has no SIGCHLD"
        if not place.reaped_here:
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
        if ignored():
            return (
                "SIGCHLD is set to SIG_IGN: the kernel reaps every child at once and "
                "sends no signal, and a handler would make the program's other "
                "children zombies; use the pidfd or thread watcher"
            )
        return None

    def running(self) -> bool:
        """Whether the child has not exited yet (asks the kernel, reaps nothing)."""
        return self.popen.exit_state() is Exit.RUNNING

    async def wait_exited(self) -> None:
        hub = self._hub = _hub_for_this_loop()
        hub.watches.add(self)
        try:
            while self.running():
                if hub.leader is None:
                    hub.leader = self
                    try:
                        with anyio.move_on_after(_RECHECK):
                            await self.wait_readable(hub.rfd)
                        if hub.closed:  # this watch was closed meanwhile
                            return
                        hub.drain()
                        if not _still_installed():
                            for watch in hub.watches:
                                if watch.wake is not None:
                                    watch.wake.set()
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
                    if hub.closed:
                        return
        finally:
            self._leave(hub)

    def _leave(self, hub: _Hub) -> None:
        self._hub = None
        hub.watches.discard(self)
        if not hub.watches:
            _drop_hub(hub)
        elif hub.leader is None:
            # The lead may have been handed to this task just as its child
            # exited (or it was cancelled): pass it on, or nobody reads the pipe.
            hub.hand_over()

    def forget_loop(self, token: EventLoopToken) -> None:
        super().forget_loop(token)
        hub = self._hub
        if hub is not None and hub.token == token:
            self._leave(hub)

    def close(self) -> None:
        super().close()
        hub = self._hub
        if hub is not None:
            self._leave(hub)
