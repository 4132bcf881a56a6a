"""Exceptions raised by aioproc."""

from __future__ import annotations


class WatcherUnavailable(RuntimeError):
    """Raised when a watcher that was asked for by name cannot work here.

    The message says why (old kernel, not the main thread, uvloop owns SIGCHLD,
    a forkserver child, ...) and what to use instead.  A watcher chosen
    automatically never raises this: aioproc falls back to the next one.
    """


class ExitStatusLost(ChildProcessError):
    """Raised by ``join()`` when something other than aioproc reaped the child.

    That happens when another part of the program calls ``os.waitpid(-1, ...)``
    or sets ``SIGCHLD`` to ``SIG_IGN``: the kernel hands the exit status to
    whoever asks first, and it cannot be recovered afterwards.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(
            f"the exit status of child pid {pid} was consumed by someone else "
            "(os.waitpid(-1, ...) elsewhere in the program, or SIGCHLD set to "
            "SIG_IGN); aioproc cannot report its exit code"
        )
        self.pid = pid
