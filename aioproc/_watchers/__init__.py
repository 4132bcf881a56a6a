"""Choosing how ``join()`` learns that a child exited.

Automatic choice, best first:

1. ``pidfd`` wherever the kernel has ``pidfd_open`` (Linux >= 5.3), for every
   start method: no thread, no signal handler, no polling.
2. ``sentinel`` for forkserver children: they are the fork server's children,
   so the exit code can only arrive on the sentinel pipe.
3. ``sigchld`` for fork and spawn children, from the main thread, on a loop
   that is not uvloop, while SIGCHLD is not ignored.
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
    from .._popen import AioprocPopen

WATCHERS: dict[str, type[Watch]] = {
    cls.name: cls for cls in (PidfdWatch, SigchldWatch, SentinelWatch, ThreadWatch)
}
NAMES: tuple[str, ...] = get_args(WatcherName)

_ENV = "AIOPROC_WATCHER"
_UNSET = object()
_forced: object = _UNSET  # a name, None (automatic) or _UNSET (read the env)


def _check_name(
    name: object, where: str, automatic: str = "None for the automatic choice"
) -> WatcherName | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{where} must be a watcher name (str) or None, not {type(name).__name__}")
    if name not in WATCHERS:
        raise ValueError(
            f"{where} got unknown watcher {name!r}; use one of {', '.join(NAMES)}, or {automatic}"
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
        _forced = _check_name(
            os.environ.get(_ENV) or None, f"${_ENV}", f"unset {_ENV} for the automatic choice"
        )
    return _forced  # type: ignore[return-value]


_NO_PIDFD = (
    "the pidfd watcher needs os.pidfd_open (Linux >= 5.3) and a sandbox that "
    "allows it; use set_watcher(None) to let aioproc choose"
)


def choose(popen_class: type[AioprocPopen]) -> type[Watch]:
    """The watcher class for a *popen_class* child about to be started here."""
    forced = _forced if _forced is not _UNSET else get_watcher()
    if forced is not None:
        cls = WATCHERS[forced]  # type: ignore[index]
        if cls is PidfdWatch:
            # Works wherever pidfds do: no Place (see below) for the default.
            if not (pidfd.supported or pidfd.is_supported()):
                raise WatcherUnavailable(_NO_PIDFD)
            return cls
        reason = cls.unavailable(Place.here(popen_class))
        if reason is not None:
            raise WatcherUnavailable(f"the {forced} watcher cannot be used here: {reason}")
        return cls
    # Where pidfds work, nothing about the place matters: no Place is built
    # (every start runs this, and every object it touches is a page copied).
    if pidfd.supported or pidfd.is_supported():
        return PidfdWatch
    place = Place.here(popen_class)
    if not place.reaped_here:
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
    from .._popen import POPEN_CLASSES  # noqa: PLC0415 - a cycle at import time

    cls = WATCHERS[_check_name(name, "why_unavailable()") or "pidfd"]
    if cls is PidfdWatch and not pidfd.is_supported():
        return _NO_PIDFD
    place = Place(POPEN_CLASSES[start_method].reaped_here, main_thread=main_thread, uvloop=uvloop)
    return cls.unavailable(place)


def usable_at_join(watch: Watch, forced: bool) -> Watch:
    """The watch to wait with when joining here (this thread, this loop).

    A sigchld watch chosen at ``start()`` outside any loop may be joined under
    uvloop or from another thread: one chosen automatically then moves to a
    thread watch; one *forced* at ``start()`` raises ``WatcherUnavailable``.
    (What ``set_watcher()`` says now concerns processes started from now on,
    not this one.)  The other watchers work wherever they were chosen.
    """
    if not isinstance(watch, SigchldWatch):
        return watch
    reason = SigchldWatch.unavailable(Place.here(type(watch.popen)))
    if reason is None:
        return watch
    if forced:
        raise WatcherUnavailable(f"the {watch.name} watcher cannot be used here: {reason}")
    watch.close()
    return ThreadWatch(watch.popen, watch.pidfd)


__all__ = [
    "NAMES",
    "WATCHERS",
    "Place",
    "Watch",
    "WatcherName",
    "choose",
    "get_watcher",
    "set_watcher",
    "usable_at_join",
    "why_unavailable",
]
