"""The child's side of ``aioproc.run``: call the function, send the outcome back.

See the theory of operation in ``_run`` and the frames in ``_wire``.
Everything here runs in the child, except the pickling of ``Call`` (in the
parent, while ``start()`` pickles the process object for a spawn or
forkserver child).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from . import _wire


class Call:
    """The function and its arguments, on their way to the child.

    A fork child inherits them as they are.  For spawn and forkserver they are
    pickled while multiprocessing pickles the process object (so descriptors
    travel the way multiprocessing passes them), which lets a failure name the
    argument at fault, but they do not travel with it: ``parts`` is a frame the
    parent writes on the call's own pipe once the child exists, large
    arguments out of band, as the pipe drains.  The child reads and unpickles
    it in the wrapper, which reports a failure to the parent instead of dying
    with it.
    """

    def __init__(
        self,
        func: Callable[..., object],
        args: tuple[Any, ...],
        method: str,
        conn: Connection | None = None,
    ) -> None:
        self._func: Callable[..., object] | None = func
        self._args = args
        self._method = method
        self._conn = conn
        #: The frame to write on the call's pipe (spawn, forkserver), once pickled.
        self.parts: list[Any] | None = None

    def unpack(self) -> tuple[Callable[..., object], tuple[Any, ...]]:
        if self._func is not None:
            return self._func, self._args
        if self._conn is None:  # pragma: no cover - defensive
            raise RuntimeError("internal error: a call without a function")
        inc = _wire.read_blocking(self._conn.fileno())
        self._conn.close()
        if inc is None:
            raise EOFError("the parent closed the pipe before sending the call")
        func, args = _wire.loads(inc.body(), inc.objects)
        return func, args

    def __reduce__(self) -> tuple[Any, ...]:
        if self._func is None or self._conn is None:  # pragma: no cover - pickled once
            raise RuntimeError("internal error: a call pickled twice, or without its pipe")
        try:
            body, buffers = _wire.dumps_call(self._func, self._args)
        except Exception as exc:
            raise _wire.unpicklable_call(
                self._func,
                self._args,
                exc,
                to=f"a {self._method} child",
                fix=", or use context='fork', which does not pickle them",
            ) from exc
        self.parts = _wire.frame(None, body, buffers)
        return (call_from_pipe, (self._conn,))


def call_from_pipe(conn: Connection) -> Call:
    call = Call.__new__(Call)
    call._func, call._args, call._method, call._conn, call.parts = None, (), "", conn, None
    return call


def _let_sigint_pass(signum: int, frame: object) -> None:
    """SIGINT handler of a child of ``run``: the parent decides what Ctrl-C means."""


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, _let_sigint_pass)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def exit_now(code: int = 0) -> None:
    """Exit at once, flushing the standard streams, without waiting for leftovers.

    The interpreter's own exit would wait for non-daemonic threads and for
    ``multiprocessing`` children the function left running (the parent kills
    what is left of the group once this process has gone).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)


def child_main(send: Connection, call: Call) -> None:
    """The target of every child of ``run``.

    It says "started" first, so that the parent can tell a child that died
    before calling the function (a spawn child stuck in the main module) from
    one that died in it.
    """
    ignore_sigint()
    fd = send.fileno()
    _wire.write_blocking(fd, _wire.frame(("started",)))
    try:
        func, args = call.unpack()
    except Exception as exc:
        outcome = _wire.unloadable_outcome(exc)
    else:
        del call
        me = os.getpid()
        outcome = _wire.outcome_of(func, args)
        del func, args
        if os.getpid() != me:  # a copy the function forked, returning: not ours to answer
            os._exit(0)
    try:
        _wire.write_blocking(fd, _wire.frame(*outcome))
    except BrokenPipeError:
        pass  # the parent stopped listening (cancelled): nobody wants the result
    del outcome
    exit_now(0)
