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
"""

from __future__ import annotations

import signal
import sys

# typing.TYPE_CHECKING without importing typing, which a spawn child would pay for.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    #: One entry of a loop's per-thread state: a thread-local's dictionary, and
    #: a name in it (the class attribute behind it is the default).
    Entry = tuple[dict[str, Any], str]

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


def _loop_states() -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """This thread's dictionaries in which running loops keep their state, with
    the names to drop from each."""
    # The modules by their full names, without importing anything.
    modules = sys.modules
    states: list[tuple[dict[str, Any], tuple[str, ...]]] = []
    if not _ASYNCIO_RESETS_AT_FORK:
        events = modules.get("asyncio.events")
        if events is not None:
            local = getattr(getattr(events, "_event_loop_policy", None), "_local", None)
            state = getattr(local, "__dict__", None)
            if state is not None:
                states.append((state, ("_loop", "_set_called")))
    sniffio = modules.get("sniffio")
    if sniffio is not None:
        states.append((sniffio.thread_local.__dict__, ("name",)))
    eventloop = modules.get("anyio._core._eventloop")
    if eventloop is not None:
        states.append((eventloop.threadlocals.__dict__, ("current_token", "current_cancel_scope")))
    run_context = modules.get("trio._core._run_context")
    if run_context is not None:
        states.append((run_context.GLOBAL_RUN_CONTEXT.__dict__, ("runner", "task")))
    return states


def loop_entries() -> tuple[Entry, ...]:
    """In the parent, right before forking: what the child must drop of this thread's loop state.

    Looked up here, where it costs no copied page, so that the fork child
    writes only the dictionaries that hold something: looking them up in the
    child (modules, policies, thread-locals) copied about a dozen pages more
    in each child of a running loop.  Only the forking thread changes its own
    thread-local state, so nothing changes between this and the fork.
    """
    return tuple((state, key) for state, keys in _loop_states() for key in keys if key in state)


def reset_loop_state(entries: tuple[Entry, ...] | None = None) -> None:
    """Forget every event loop the parent was running, and its signal handlers.

    *entries*: what ``loop_entries()`` found in the parent before the fork;
    None to look here (a spawn or forkserver child: a fresh interpreter).
    """
    # Thread-locals are reset in place rather than replaced, by taking the
    # names out of their dictionaries (their class attributes are the
    # defaults; a setattr would look the name up in the class too).
    # asyncio's _set_running_loop(None) is left to asyncio: it copied 10
    # pages a child.
    if entries is None:
        entries = tuple((state, key) for state, keys in _loop_states() for key in keys)
    for state, key in entries:
        state.pop(key, None)

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
