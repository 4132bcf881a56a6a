"""aioproc: start real OS processes and await them without blocking the event loop."""

from ._exceptions import ExitStatusLost as ExitStatusLost
from ._exceptions import ProcessDied as ProcessDied
from ._exceptions import ProcessError as ProcessError
from ._exceptions import ProcessTimeout as ProcessTimeout
from ._exceptions import RemoteError as RemoteError
from ._exceptions import RemoteTraceback as RemoteTraceback
from ._exceptions import UnkillableProcessWarning as UnkillableProcessWarning
from ._exceptions import WatcherUnavailable as WatcherUnavailable
from ._process import AsyncProcess as AsyncProcess
from ._run import run as run
from ._watchers import get_watcher as get_watcher
from ._watchers import set_watcher as set_watcher

__all__ = [
    "AsyncProcess",
    "ExitStatusLost",
    "ProcessDied",
    "ProcessError",
    "ProcessTimeout",
    "RemoteError",
    "RemoteTraceback",
    "UnkillableProcessWarning",
    "WatcherUnavailable",
    "get_watcher",
    "run",
    "set_watcher",
]
