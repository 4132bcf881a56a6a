"""aioproc: start real OS processes and await them without blocking the event loop.

A spawn or forkserver child unpickles its ``AsyncProcess`` by importing
``aioproc._process``, which runs this file first: so ``AsyncProcess`` is
loaded here (a fork server that preloads ``aioproc`` then spares every child
that import), and the other public names, the event-loop machinery a child
never uses, on first use.
"""

from __future__ import annotations

import importlib

from ._process import AsyncProcess as AsyncProcess

# typing.TYPE_CHECKING without importing typing, as in _process.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._exceptions import ExitStatusLost as ExitStatusLost
    from ._exceptions import InitializerError as InitializerError
    from ._exceptions import PoolClosed as PoolClosed
    from ._exceptions import ProcessDied as ProcessDied
    from ._exceptions import ProcessError as ProcessError
    from ._exceptions import ProcessTimeout as ProcessTimeout
    from ._exceptions import RemoteError as RemoteError
    from ._exceptions import RemoteTraceback as RemoteTraceback
    from ._exceptions import UnkillableProcessWarning as UnkillableProcessWarning
    from ._exceptions import WatcherUnavailable as WatcherUnavailable
    from ._pool import Pool as Pool
    from ._run import run as run
    from ._usage import ResourceUsage as ResourceUsage
    from ._watchers import get_watcher as get_watcher
    from ._watchers import set_watcher as set_watcher

_WHERE = {
    "ExitStatusLost": "._exceptions",
    "InitializerError": "._exceptions",
    "Pool": "._pool",
    "PoolClosed": "._exceptions",
    "ProcessDied": "._exceptions",
    "ProcessError": "._exceptions",
    "ProcessTimeout": "._exceptions",
    "RemoteError": "._exceptions",
    "RemoteTraceback": "._exceptions",
    "ResourceUsage": "._usage",
    "UnkillableProcessWarning": "._exceptions",
    "WatcherUnavailable": "._exceptions",
    "get_watcher": "._watchers",
    "run": "._run",
    "set_watcher": "._watchers",
}

__all__ = [
    "AsyncProcess",
    "ExitStatusLost",
    "InitializerError",
    "Pool",
    "PoolClosed",
    "ProcessDied",
    "ProcessError",
    "ProcessTimeout",
    "RemoteError",
    "RemoteTraceback",
    "ResourceUsage",
    "UnkillableProcessWarning",
    "WatcherUnavailable",
    "get_watcher",
    "run",
    "set_watcher",
]


if not TYPE_CHECKING:  # type checkers see the imports above, and typos stay errors

    def __getattr__(name: str) -> Any:
        try:
            module = _WHERE[name]
        except KeyError:
            raise AttributeError(f"module 'aioproc' has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
