"""``aioproc.run``: call a function in a fresh child process and await its result.

Theory of operation.  ``run`` is a thin layer over ``AsyncProcess``.

The child runs ``child_main``: it lets Ctrl-C pass (the parent decides), calls
the function and writes one message on a pipe: a 16-byte header with two
lengths, a small pickled *meta* tuple that says what happened (made of strings
only, so that the parent can always read it) and a *body*, the pickled value or
exception (empty when it could not be pickled).  Because the type's name and
the traceback text travel in the meta, a value or an exception that cannot be
pickled, or unpickled in the parent, still comes back with a name.

The parent reads the pipe without blocking, woken by ``anyio.wait_readable``,
in a task beside the one that joins the process.  Draining while joining is
what makes results of any size safe: a child blocked writing 100 MB into a full
pipe never exits, so a parent that joined first and read afterwards would wait
forever.  Once the child has exited, everything it wrote is in the pipe, and
one last non-blocking read collects it; the message is complete or it is not.
No end-of-file is needed, so a grandchild that inherited the write end cannot
hold ``run`` up.

Stopping a child (timeout, cancellation, an error) is shielded and bounded:
SIGTERM, ``grace`` seconds, SIGKILL, ``_KILL_WAIT`` seconds.  A child still
alive after that is stuck in the kernel.  It is named in an
``UnkillableProcessWarning`` and moved from ``multiprocessing``'s list of
children, whose exit handler would wait for it forever, to ours: the next
``run`` reaps it, and interpreter exit waits for it a bounded time only.

Ctrl-C sends SIGINT to every process in the terminal's foreground group.  A
child of ``run`` ignores it (a handler that does nothing, so that programs the
function executes get the default back); the parent sees KeyboardInterrupt or
its loop cancels the main task, and that cancellation stops the children.  For
fork and spawn children, the parent blocks SIGINT in its thread while it starts
the child, which inherits the blocked mask and unblocks it only once the
handler is in place: a Ctrl-C during start-up waits for the handler and prints
no traceback.  forkserver children are forked by the fork server, which restores
the default handler; they ignore SIGINT from the moment the wrapper runs.
The child is started with ``start_async()``: the mask is blocked only while the
child is created (the fork, the vfork + exec), not while its arguments are
written, when other tasks run and must not start children with a blocked mask.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import multiprocessing
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import anyio.lowlevel

from ._checks import (
    PDEATHSIG_SUPPORTED,
    check_die_with_parent,
    check_flag,
    check_grace,
    check_timeout,
    lifeline_problem,
    resolve_context,
)
from ._exceptions import (
    ExitStatusLost,
    ProcessDied,
    ProcessTimeout,
    RemoteError,
    RemoteTraceback,
    UnkillableProcessWarning,
)
from ._exit import DEFAULT_GRACE, KILL_WAIT, adopt, reap_stragglers
from ._popen import POPEN_CLASSES
from ._process import AsyncProcess
from ._runchild import HEADER, Call, child_main, describe, type_name
from ._usage import ResourceUsage

if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import TypeVarTuple, Unpack

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

#: Seconds to wait after SIGKILL before calling a child unkillable (see ``_exit``).
_KILL_WAIT = KILL_WAIT

_BIG = 1 << 20  # a result larger than this gets a larger pipe (Linux)...
_BIG_PIPE = 1 << 20  # ... this large: the default limit for unprivileged users


def _how_it_ended(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal has no name of its own
        name = f"signal {-code}"
    return f"died with {name} (exit code {code})"


# -- the parent's side ------------------------------------------------------------


class _Inbox:
    """The parent's end of the result pipe, read without blocking."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self._header = bytearray(HEADER.size)
        self._buf = self._header
        self._pos = 0
        self.meta_len = 0
        self.complete = False
        self.error: Exception | None = None

    def read_available(self) -> bool:
        """Read what the pipe holds; True once the message is complete or the pipe closed."""
        while not self.complete:
            with memoryview(self._buf) as view:
                try:
                    n = os.readv(self.fd, [view[self._pos :]])
                except BlockingIOError:
                    return False
            if n == 0:
                return True  # end of file: the child died before finishing
            self._pos += n
            if self._pos < len(self._buf):
                continue
            if self._buf is self._header:
                self.meta_len, body_len = HEADER.unpack(self._header)
                self._buf = bytearray(self.meta_len + body_len)
                self._pos = 0
                if body_len > _BIG:
                    self._grow_pipe()
            else:
                self.complete = True
        return True

    def _grow_pipe(self) -> None:
        # Fewer, larger reads for a big result (a third faster for 100 MB here).
        # Only then: a larger pipe counts against the user's pipe-buffer quota.
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, _BIG_PIPE)

    async def receive(self) -> None:
        """Read until the message is complete or the pipe closes; keep any error."""
        try:
            while not self.read_available():
                await anyio.wait_readable(self.fd)
        except Exception as exc:
            self.error = exc

    def message(self) -> tuple[tuple[Any, ...], memoryview]:
        view = memoryview(self._buf)
        meta: tuple[Any, ...] = pickle.loads(view[: self.meta_len])
        return meta, view[self.meta_len :]


@contextlib.contextmanager
def _sigint_blocked(method: str) -> Iterator[None]:
    """Block SIGINT in this thread while a fork or spawn child is started.

    The child inherits the blocked mask and unblocks it once its handler is in
    place.  A SIGINT for the parent meanwhile stays pending and is delivered
    when the mask is restored.  Not for forkserver: its children are the fork
    server's, and the server itself must not inherit a blocked SIGINT.
    """
    if not POPEN_CLASSES[method].inherits_signal_mask:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if signal.SIGINT not in old:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


async def _start(
    func: Callable[..., object],
    args: tuple[Any, ...],
    ctx: BaseContext,
    *,
    new_process_group: bool,
    die_with_parent: bool,
    grace: float,
) -> tuple[AsyncProcess, Connection]:
    method = ctx.get_start_method()
    reader, writer = multiprocessing.Pipe(duplex=False)
    try:
        call = Call(func, args, method)
        proc = AsyncProcess(
            target=child_main,
            args=(writer, call),
            context=ctx,
            new_process_group=new_process_group,
            die_with_parent=die_with_parent,
        )
        proc._kill_group_at_exit = True  # the whole tree ends with the call
        proc._stop_at_exit = True  # abandoned at interpreter exit: stopped, not awaited
        proc._exit_grace = grace
        # SIGINT is blocked only while the child is created, never across an
        # await: other tasks' children must not inherit the mask.
        await proc._start_async(functools.partial(_sigint_blocked, method))
    except BaseException:
        reader.close()
        raise
    finally:
        writer.close()
    return proc, reader


async def _join_and_drain(proc: AsyncProcess, inbox: _Inbox) -> int:
    error: Exception | None = None
    code = 0
    # Errors are kept out of the task group, which would wrap them in a group.
    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.receive)
        try:
            code = cast(int, await proc.join())
        except Exception as exc:
            error = exc
        tg.cancel_scope.cancel()
    if error is None:
        error = inbox.error
    if error is not None:
        raise error
    inbox.read_available()  # what the child wrote just before it exited
    return code


async def _stop(
    proc: AsyncProcess, inbox: _Inbox, grace: float
) -> tuple[int | None, str, ResourceUsage | None]:
    """Stop the child: SIGTERM, *grace*, SIGKILL, a bounded wait.  Shielded.

    Returns the exit code (None if the child survived SIGKILL: then it is
    adopted for later reaping and warned about), what was done to it, and
    its resource usage (None where unknown).
    """
    inbox.conn.close()  # a child blocked writing its result gets EPIPE
    done = "it was found exited"
    try:
        with anyio.CancelScope(shield=True):
            code = proc.exitcode
            if code is None and proc.is_alive():
                proc.terminate()
                done = "it was sent SIGTERM"
                code = await proc.join(grace)
            if code is None and proc.is_alive():
                proc.kill()
                done = f"it was sent SIGTERM, then SIGKILL after the {grace:g} s grace period,"
                code = await proc.join(_KILL_WAIT)
    except GeneratorExit:
        # The coroutine is being closed (a pending task garbage-collected), not
        # cancelled: it may not await any more.
        _stop_now(proc)
        raise
    except ExitStatusLost:
        code = None
    if code is not None:
        usage = proc.resource_usage
        proc.close()
        return code, f"{done} and reaped (exit code {code})", usage
    if not proc.is_alive():  # its exit status was taken by someone else
        proc.close()
        return None, f"{done} and reaped by someone else", None
    adopt(proc)
    warnings.warn(
        f"process {proc.pid} is still alive {_KILL_WAIT:g} s after SIGKILL (stuck in "
        "the kernel, or stopped by a debugger); aioproc stopped waiting for it and "
        "will reap it later, at the next aioproc.run() or at interpreter exit",
        UnkillableProcessWarning,
        stacklevel=2,
    )
    return None, f"{done} and is still alive (see the UnkillableProcessWarning)", None


def _stop_now(proc: AsyncProcess) -> None:
    """Stop the child without awaiting: SIGKILL, and reap it later if need be."""
    if proc.is_alive():
        proc.kill()
        adopt(proc)  # reaped by the next run() or at exit
    else:
        proc.close()


def _result(func: Callable[..., T], proc: AsyncProcess, code: int, inbox: _Inbox) -> T:
    pid = cast(int, proc.pid)
    if not inbox.complete:
        raise ProcessDied(
            f"process {pid} running {describe(func)} {_how_it_ended(code)} before returning "
            "a result"
            + (
                " (SIGKILL: the out-of-memory killer, or another process, killed it)"
                if code == -signal.SIGKILL
                else ""
            ),
            pid=pid,
            exitcode=code,
            resource_usage=proc.resource_usage,
        )
    meta, body = inbox.message()
    kind, name = meta[0], meta[1]
    if kind == "value":
        try:
            value: T = pickle.loads(body)
        except Exception as exc:
            raise pickle.UnpicklingError(
                f"the result of {describe(func)} (an object of type {name}) came "
                f"back from process {pid} but cannot be unpickled here "
                f"({type_name(exc)}: {exc}); return a type the parent can import"
            ) from exc
        return value
    if kind == "raised":
        raise _rebuilt_exception(
            body, name, message=meta[2], text=meta[3], usage=proc.resource_usage
        )
    error: pickle.PickleError
    if kind == "unpicklable":
        error = pickle.PicklingError(
            f"the result of {describe(func)} in process {pid} (an object of type "
            f"{name}) cannot be pickled to send it back ({meta[2]}); return a "
            "picklable value, for example the data needed to rebuild the object"
        )
    else:  # "unloadable"
        error = pickle.UnpicklingError(
            f"process {pid} could not unpickle {describe(func)} or its arguments "
            f"({name}: {meta[2]}); a spawn or forkserver child imports them by "
            "name, so define them in a module it can import (not in a script run "
            "with -c or an interactive session), or use context='fork'"
        )
    error.__cause__ = RemoteTraceback(meta[3], proc.resource_usage)
    raise error


def _rebuilt_exception(
    body: memoryview, type_name: str, message: str, text: str, usage: ResourceUsage | None
) -> BaseException:
    """The child's exception, or a RemoteError standing in for it; the traceback as cause."""
    rebuilt: object = None
    if body:
        with contextlib.suppress(Exception):
            rebuilt = pickle.loads(body)
    exc = rebuilt if isinstance(rebuilt, BaseException) else RemoteError(type_name, message, text)
    exc.__cause__ = RemoteTraceback(text, usage)
    return exc


async def run(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: Unpack[PosArgsT],
    timeout: float | None = None,  # noqa: ASYNC109 - the child's whole life, with cleanup
    context: str | BaseContext | None = None,
    grace: float = DEFAULT_GRACE,
    new_process_group: bool = True,
    die_with_parent: bool | None = None,
) -> T:
    """Call ``func(*args)`` in a new child process and return its result.

    Keyword arguments for *func* go through ``functools.partial``.  *context*
    is a start method name (``"fork"``, ``"forkserver"``, ``"spawn"``), a
    ``multiprocessing`` context, or None for the default.  Returns once the
    child has exited and been reaped.

    - An exception raised by *func* is raised here, same type, with the child's
      traceback as its ``__cause__`` (a ``RemoteTraceback``); one that cannot
      be pickled arrives as a ``RemoteError`` with its type name and message.
    - A child that dies without a result (a signal, ``os._exit()``,
      ``sys.exit()``) raises ``ProcessDied``, which names the signal.
    - After *timeout* seconds the child is sent SIGTERM, then SIGKILL *grace*
      seconds later, and reaped; then ``ProcessTimeout`` (a ``TimeoutError``)
      is raised.  Cancellation stops the child the same way, then propagates.
      A child that survives SIGKILL is not waited for forever: it is reported
      with an ``UnkillableProcessWarning`` and reaped later.
    - A function, argument or result that cannot be pickled is a
      ``pickle.PicklingError`` naming its type, raised before anything starts
      for the arguments.  (A fork child receives the function and arguments
      without pickling.)
    - The child ignores SIGINT: on Ctrl-C the parent decides, and its
      cancellation stops the child.
    - *new_process_group* (default True): the child leads a process group of
      its own, so that stopping it stops every process it started; and when
      it exits, for whatever reason, what is left of its group is killed
      (SIGKILL) before ``run`` returns or raises.
    - *die_with_parent*: the child is killed if this process dies, even by
      SIGKILL (Linux, fork and spawn).  None (the default) means yes wherever
      that works.
    """
    if not callable(func):
        raise TypeError(
            f"func must be a callable, not {type(func).__name__}; "
            "call run(func, *args) with the function first"
        )
    if inspect.iscoroutinefunction(func):
        raise TypeError(
            f"{describe(func)} is an async function; run() calls a plain function in "
            "the child. Pass a plain function that runs its own event loop, e.g. "
            "functools.partial(anyio.run, func)"
        )
    timeout = check_timeout(timeout)
    grace = check_grace(grace)
    new_process_group = check_flag("new_process_group", new_process_group)
    ctx = resolve_context(context) or multiprocessing.get_context()
    if die_with_parent is None:
        die_with_parent = PDEATHSIG_SUPPORTED and not lifeline_problem(ctx.get_start_method())
    elif not isinstance(die_with_parent, bool):
        raise TypeError(
            "die_with_parent must be True, False or None (on wherever it works), "
            f"not {type(die_with_parent).__name__} {die_with_parent!r}"
        )
    die_with_parent = check_die_with_parent(die_with_parent, ctx.get_start_method())
    reap_stragglers()
    await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled already: start nothing
    proc, reader = await _start(
        func,
        args,
        ctx,
        new_process_group=new_process_group,
        die_with_parent=die_with_parent,
        grace=grace,
    )
    pid = cast(int, proc.pid)
    inbox = _Inbox(reader)
    try:
        with anyio.move_on_after(timeout) as deadline:
            code = await _join_and_drain(proc, inbox)
    except BaseException:
        await _stop(proc, inbox, grace)
        raise
    if deadline.cancelled_caught:
        stopped_code, done, usage = await _stop(proc, inbox, grace)
        raise ProcessTimeout(
            f"process {pid} running {describe(func)} did not finish within {timeout:g} s; {done}",
            pid=pid,
            exitcode=stopped_code,
            resource_usage=usage,
        )
    reader.close()
    try:
        return _result(func, proc, code, inbox)
    finally:
        proc.close()
