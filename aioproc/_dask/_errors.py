"""Exceptions of ``aioproc.dask``."""

from __future__ import annotations

from typing import Any

from .._exceptions import ProcessError


class WorkerLost(ProcessError):
    """Raised by ``DaskPool.run`` when the Dask worker running the call was lost.

    The worker's process died or the scheduler stopped hearing from it while
    the call ran there.  The call is not run again elsewhere (it may have done
    part of its work), unless the pool was created with ``retries``.
    ``worker`` is the worker's address, ``key`` the call's Dask key; ``pid``
    is 0 and ``exitcode`` None: the child's fate on that machine is not
    known here (it dies with its worker where the platform allows it).
    """

    def __init__(
        self,
        message: str,
        *,
        worker: str,
        key: str,
        pid: int = 0,
        exitcode: int | None = None,
        resource_usage: Any = None,
    ) -> None:
        super().__init__(message, pid=pid, exitcode=exitcode, resource_usage=resource_usage)
        self.worker = worker
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (str(self), self.worker, self.key))


def _rebuild(message: str, worker: str, key: str) -> WorkerLost:
    return WorkerLost(message, worker=worker, key=key)


class DaemonicWorkers(RuntimeError):
    """Raised when a ``DaskPool`` connects to workers that cannot start processes.

    Dask's nanny starts its worker as a daemonic process by default, and a
    daemonic process may not have children.  The message names the workers
    and says how to start them (``dask worker --no-nanny``, or the setting
    ``distributed.worker.daemon: False``).
    """
