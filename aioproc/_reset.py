"""Giving a child a fresh start: nothing of the parent's loop or signal handling.

A child forked from inside a running loop is a copy of a thread that was in the
middle of that loop.  Unless reset, it would believe the loop is still running
(``asyncio.run`` and ``anyio.run`` refuse to start) and it would share the
parent's wake-up fd.  And every Python signal handler of the parent would run in
the child: a web server's SIGTERM handler would make ``terminate()`` a no-op,
a loop's SIGINT handler would swallow Ctrl-C.  A fresh interpreter (what exec
gives a spawn child) has none of them: each handler goes back to its default
(SIGINT to ``KeyboardInterrupt``), while a signal the parent ignores stays
ignored, as exec keeps it.  This runs first thing in every forked AsyncProcess
child (fork, forkserver).  A spawn child is a new interpreter with none of this
state: it neither runs nor imports this module (see ``_process``).

The child looks the state up itself.  Found by the parent just before the
fork instead, it cost each child about 20 fewer copied pages but the parent
about 40 more a start (every object the parent touches after a fork is a page
shared with its live children), and start+join throughput 2% (1,000 fork
children, 6 interleaved runs).
"""

from __future__ import annotations

import signal
import sys

try:
    # The C module behind ``signal``, which wraps numbers and handlers in enums:
    # ``signal.signal()`` even builds a ValueError with the repr of the old
    # handler when that is a function.  In a freshly forked child every page
    # touched is a copy-on-write fault, and that machinery cost each child
    # 0.5 ms of CPU, 40% of a bare fork child's (the benchmark's start+join
    # throughput found it).  ``_signal`` deals in plain ints and handlers.
    import _signal  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - not CPython
    _signal = signal

_KEPT = (_signal.SIG_DFL, _signal.SIG_IGN, _signal.default_int_handler, None)
#: Made once: ``valid_signals()`` builds a new set each time.
_SIGNALS = tuple(sorted(_signal.valid_signals()))
#: asyncio resets its running loop, its policy's loop and the wake-up fd in
#: every fork child itself (an at-fork hook, Python 3.12+).  Before, only the
#: running loop was safe: ``get_running_loop()`` checks the pid it was set in.
_ASYNCIO_RESETS_AT_FORK = sys.version_info >= (3, 12)


def reset_loop_state() -> None:
    """Forget every event loop the parent was running, and its signal handlers."""
    # Each object touched here is a page copied in every fork child (10 for
    # asyncio's _set_running_loop(None), which is why it is left to asyncio):
    # the modules are looked up by their full names, without the packages,
    # and the thread-locals are reset in place rather than replaced, by
    # taking the names out of their dictionaries (their class attributes are
    # the defaults; a setattr would look the name up in the class too).
    # Measured in fork children of an asyncio loop (Python 3.11, faults and
    # time per child): asyncio's policy 11-13 -> 9-11 and 24-27 -> 19-23 us,
    # sniffio's thread-local 4-6 -> 1-2 and 9-10 -> 5-6 us.
    modules = sys.modules
    if not _ASYNCIO_RESETS_AT_FORK:
        events = modules.get("asyncio.events")
        if events is not None:
            local = getattr(getattr(events, "_event_loop_policy", None), "_local", None)
            state = getattr(local, "__dict__", None)
            if state is not None:
                state.pop("_loop", None)
                state.pop("_set_called", None)

    sniffio = modules.get("sniffio")
    if sniffio is not None:
        sniffio.thread_local.__dict__.pop("name", None)

    anyio_eventloop = modules.get("anyio._core._eventloop")
    if anyio_eventloop is not None:
        state = anyio_eventloop.threadlocals.__dict__
        state.pop("current_token", None)
        state.pop("current_cancel_scope", None)

    trio_run_context = modules.get("trio._core._run_context")
    if trio_run_context is not None:
        state = trio_run_context.GLOBAL_RUN_CONTEXT.__dict__
        state.pop("runner", None)
        state.pop("task", None)

    try:
        _signal.set_wakeup_fd(-1)
    except ValueError:  # pragma: no cover - not the main thread
        return
    for signum in _SIGNALS:
        try:
            handler = _signal.getsignal(signum)
        except (OSError, ValueError):  # pragma: no cover
            continue
        if handler in _KEPT:
            continue
        default = _signal.default_int_handler if signum == _signal.SIGINT else _signal.SIG_DFL
        _signal.signal(signum, default)


def unblock_sigint() -> None:
    """Unblock SIGINT, which the parent blocked around the fork (``_popen``)."""
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, (_signal.SIGINT,))
