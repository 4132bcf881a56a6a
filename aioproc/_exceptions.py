"""Exceptions raised by aioproc."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._usage import ResourceUsage


class WatcherUnavailable(RuntimeError):
    """Raised when a watcher that was asked for by name cannot work here.

    The message says why (old kernel, not the main thread, uvloop owns SIGCHLD,
    a forkserver child, ...) and what to use instead.  A watcher chosen
    automatically never raises this: aioproc falls back to the next one.
    """


class ExitStatusLost(ChildProcessError):
    """Raised once, by ``join()`` or ``exitcode``, when the child's exit status is gone.

    That happens when another part of the program calls ``os.waitpid(-1, ...)``
    or ``os.wait()``, or sets ``SIGCHLD`` to ``SIG_IGN`` (the kernel then reaps
    every child itself): the kernel hands the exit status to whoever asks
    first, and it cannot be recovered afterwards.  For a forkserver child, the
    fork server may have died before reporting it.  The process object stays
    consistent: ``is_alive()`` is False, ``exitcode`` None (unknown), ``close()``
    works, and no signal is sent to the pid any more (it may be someone else's).
    """

    def __init__(self, pid: int, reason: str = "") -> None:
        reason = reason or (
            "consumed by someone else (os.waitpid(-1, ...) or os.wait() elsewhere in "
            "the program, or SIGCHLD set to SIG_IGN)"
        )
        super().__init__(
            f"the exit status of child pid {pid} was {reason}; aioproc cannot report "
            "its exit code, and the child has exited"
        )
        self.pid = pid
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pid, self.reason))


# -- aioproc.run ----------------------------------------------------------------


class ProcessError(Exception):
    """Base class: the child of ``aioproc.run`` ended without delivering a result.

    ``pid`` is the child's process id; ``exitcode`` is what ``join()`` returned
    (negative: the number of the signal that killed it), or None when the child
    could not be reaped (see ``UnkillableProcessWarning``).  ``resource_usage``
    is the child's CPU time and peak memory (a ``ResourceUsage``), or None
    where the kernel's accounting did not reach the parent (a forkserver child,
    or one that could not be reaped).
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int,
        exitcode: int | None,
        resource_usage: ResourceUsage | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.resource_usage = resource_usage

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_process_error,
            (type(self), str(self), self.pid, self.exitcode, self.resource_usage),
        )


def _rebuild_process_error(
    cls: type[ProcessError],
    message: str,
    pid: int,
    exitcode: int | None,
    resource_usage: ResourceUsage | None = None,
) -> ProcessError:
    return cls(message, pid=pid, exitcode=exitcode, resource_usage=resource_usage)


class ProcessDied(ProcessError):
    """Raised by ``aioproc.run`` when the child exits before sending a result.

    A signal (SIGKILL from the out-of-memory killer, SIGSEGV from a crash),
    ``os._exit()`` or ``sys.exit()`` in the function, or an interpreter that
    could not start the function.  The message names the signal:
    ``"process 1234 running crunch() died with SIGSEGV (exit code -11) before
    returning a result"``.
    """


class ProcessTimeout(ProcessError, TimeoutError):
    """Raised by ``aioproc.run`` when *timeout* passed before the child exited.

    By then the child has been stopped (SIGTERM, then SIGKILL after the grace
    period) and reaped; ``exitcode`` says how it ended.  It is a
    ``TimeoutError``, so ``except TimeoutError`` catches it.
    """


class RemoteError(Exception):
    """Stands in for an exception from the child that could not cross to the parent.

    Raised by ``aioproc.run`` when the function raised an exception that cannot
    be pickled in the child or unpickled in the parent.  It keeps what can be
    kept: ``type_name`` (``"module.QualName"``), ``message`` (``str(exc)``) and
    ``traceback_text``, which is also attached as ``__cause__``.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.traceback_text))


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception re-raised by ``aioproc.run``: the child's traceback.

    Never raised on its own; it exists so that a printed traceback shows where
    in the child the exception came from.  ``traceback_text`` holds the text;
    ``resource_usage`` what the child cost (a ``ResourceUsage``, None for a
    forkserver child).  The exception itself is the function's own and is
    left as it was raised: ``exc.__cause__.resource_usage`` is where to look.
    """

    def __init__(self, traceback_text: str, resource_usage: ResourceUsage | None = None) -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text
        self.resource_usage = resource_usage

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.traceback_text, self.resource_usage))

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback_text.rstrip()}\n"""'


class UnkillableProcessWarning(RuntimeWarning):
    """Warned by ``aioproc.run`` when a child is still alive a while after SIGKILL.

    A process stuck in the kernel (uninterruptible sleep, state D) or held by a
    debugger cannot die until the kernel lets it.  Rather than wait forever,
    ``run`` names the pid in this warning and lets the timeout or cancellation
    propagate.  The child is not forgotten: aioproc reaps it at the next
    ``aioproc.run()`` call, or waits a bounded time for it at interpreter exit.
    """


# -- aioproc.Pool -----------------------------------------------------------------


class InitializerError(ProcessError):
    """Raised by ``Pool.run`` when the pool's *initializer* raised in a new worker.

    The call that needed the worker fails with this error; its ``__cause__`` is
    the initializer's exception (same type, with the worker's traceback as its
    own ``__cause__``).  The worker has exited; the pool does not start another
    one until a call needs it, so a broken initializer never loops.
    """


class PoolClosed(RuntimeError):
    """Raised by ``Pool.run`` and ``Pool.map`` for a pool that is not open.

    Before ``async with``, after it, or while it closes; and for a call still
    running when the ``async with`` block ended by an exception or a
    cancellation (its worker was stopped).
    """
