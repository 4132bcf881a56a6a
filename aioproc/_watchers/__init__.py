"""Choosing how ``join()`` learns that a child exited.

Automatic choice, best first:

1. ``pidfd`` wherever the kernel has ``pidfd_open`` (Linux >= 5.3), for every
   start method: no thread, no signal handler, no polling.
2. ``sentinel`` for forkserver children: they are the fork server's children,
   so the exit code can only arrive on the sentinel pipe.
3. ``sigchld`` for fork and spawn children, from the main thread, on a loop
   that is not uvloop.
4. ``thread`` everywhere else.

``set_watcher(name)`` or ``AIOPROC_WATCHER=name`` forces one; a forced watcher
that cannot serve a child raises ``WatcherUnavailable`` before the child is
started, naming why.  Automatic choice never raises: it skips to the next.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, get_args

from .._exceptions import WatcherUnavailable
from . import pidfd
from ._base import Place, Watch, WatcherName
from .pidfd import PidfdWatch
from .sentinel import SentinelWatch
from .sigchld import SigchldWatch
from .thread import ThreadWatch

if TYPE_CHECKING:
    from multiprocessing.popen_fork import Popen

WATCHERS: dict[str, type[Watch]] = {
    cls.name: cls for cls in (PidfdWatch, SigchldWatch, SentinelWatch, ThreadWatch)
}
NAMES: tuple[str, ...] = get_args(WatcherName)

_ENV = "AIOPROC_WATCHER"
_UNSET = object()
_forced: object = _UNSET  # a name, None (automatic) or _UNSET (read the env)


def _check_name(name: object, where: str) -> WatcherName | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{where} must be a watcher name (str) or None, not {type(name).__name__}")
    if name not in WATCHERS:
        raise ValueError(
            f"{where} got unknown watcher {name!r}; use one of "
            f"{', '.join(NAMES)}, or None for the automatic choice"
        )
    return name  # type: ignore[return-value]


def set_watcher(name: WatcherName | None) -> None:
    """Force the watcher used by processes started from now on (None: automatic).

    Raises ``ValueError`` for an unknown name, and ``WatcherUnavailable`` when
    the watcher cannot work on this system at all (``pidfd`` on a kernel without
    ``pidfd_open``).  Whether it can serve a particular child (thread, event
    loop, start method) is checked by ``start()``.
    """
    global _forced
    checked = _check_name(name, "set_watcher()")
    if checked == "pidfd" and not pidfd.is_supported():
        raise WatcherUnavailable(_NO_PIDFD)
    _forced = checked


def get_watcher() -> WatcherName | None:
    """The forced watcher name, or None when aioproc chooses automatically."""
    global _forced
    if _forced is _UNSET:
        _forced = _check_name(os.environ.get(_ENV) or None, f"${_ENV}")
    return _forced  # type: ignore[return-value]


_NO_PIDFD = (
    "the pidfd watcher needs os.pidfd_open (Linux >= 5.3) and a sandbox that "
    "allows it; use set_watcher(None) to let aioproc choose"
)


def choose(place: Place) -> type[Watch]:
    """The watcher class for a child about to be started at *place*."""
    forced = get_watcher()
    if forced is not None:
        cls = WATCHERS[forced]
        if cls is PidfdWatch and not pidfd.is_supported():
            raise WatcherUnavailable(_NO_PIDFD)
        reason = cls.unavailable(place)
        if reason is not None:
            raise WatcherUnavailable(f"the {forced} watcher cannot be used here: {reason}")
        return cls
    if pidfd.is_supported():
        return PidfdWatch
    if place.start_method == "forkserver":
        return SentinelWatch
    if SigchldWatch.unavailable(place) is None:
        return SigchldWatch
    return ThreadWatch


def why_unavailable(
    name: str, start_method: str, *, uvloop: bool = False, main_thread: bool = True
) -> str | None:
    """Why watcher *name* cannot serve a *start_method* child (None: it can).

    For the benchmarks and tests, which ask about a place other than the
    current one: an event loop that is uvloop or not, the main thread or not.
    """
    cls = WATCHERS[_check_name(name, "why_unavailable()") or "pidfd"]
    if cls is PidfdWatch and not pidfd.is_supported():
        return _NO_PIDFD
    return cls.unavailable(Place(start_method, main_thread=main_thread, uvloop=uvloop))


def attach(cls: type[Watch], popen: Popen) -> Watch:
    """Create the watch for a child that was just started.

    Only the pidfd watch can fail here (``pidfd_open`` refused by a sandbox, or
    out of descriptors).  Under automatic choice a refusal falls back to the
    next watcher; anything else propagates for ``start()`` to clean up.
    """
    try:
        return cls(popen)
    except OSError as exc:
        if cls is not PidfdWatch or get_watcher() is not None:
            raise
        if exc.errno not in pidfd._UNSUPPORTED_ERRNOS:
            raise
        pidfd.supported = False
        place = Place.here(popen.method)
        return choose(place)(popen)


def usable_at_join(watch: Watch) -> Watch:
    """The watch to wait with when joining here (this thread, this loop).

    A sigchld watch chosen at ``start()`` outside any loop may be joined under
    uvloop or from another thread: automatic choice then moves to a thread
    watch; a forced sigchld raises ``WatcherUnavailable``.  The other watchers
    work wherever they were chosen.
    """
    if not isinstance(watch, SigchldWatch):
        return watch
    reason = SigchldWatch.unavailable(Place.here(watch.popen.method))
    if reason is None:
        return watch
    if get_watcher() is not None:
        raise WatcherUnavailable(f"the {watch.name} watcher cannot be used here: {reason}")
    return ThreadWatch(watch.popen)


__all__ = [
    "NAMES",
    "WATCHERS",
    "Place",
    "Watch",
    "WatcherName",
    "attach",
    "choose",
    "get_watcher",
    "set_watcher",
    "usable_at_join",
    "why_unavailable",
]
