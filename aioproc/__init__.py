"""aioproc: start real OS processes and await them without blocking the event loop."""

from ._exceptions import ExitStatusLost as ExitStatusLost
from ._exceptions import WatcherUnavailable as WatcherUnavailable
from ._process import AsyncProcess as AsyncProcess
from ._watchers import get_watcher as get_watcher
from ._watchers import set_watcher as set_watcher

__all__ = [
    "AsyncProcess",
    "ExitStatusLost",
    "WatcherUnavailable",
    "get_watcher",
    "set_watcher",
]
