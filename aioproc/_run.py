"""``aioproc.run``: call a function in a fresh child process and await its result.

Theory of operation.  ``run`` is a thin layer over ``AsyncProcess``.

The child runs ``child_main``: it lets Ctrl-C pass (the parent decides), says
"started", calls the function and writes its outcome, as two frames on a pipe
(see ``_wire``: a small pickled *meta* that says what happened, made of strings
only so that the parent can always read it, and a *body*, the pickled value or
exception, its large buffers out of band).  Because the type's name and the
traceback text travel in the meta, a value or an exception that cannot be
pickled, or unpickled in the parent, still comes back with a name.  A child
that dies before "started" never ran the function (a spawn child that failed
in the main module, say), and the error says so.  Then the child exits at once,
without waiting for threads or processes the function left behind (its group
is killed as it exits).  A fork child inherits the function and its arguments;
a spawn or forkserver child reads them as a frame on a pipe of its own, which
the parent writes once the child exists, as the pipe drains.

The parent reads the pipe without blocking, woken by ``anyio.wait_readable``,
in a task beside the one that joins the process.  Draining while joining is
what makes results of any size safe: a child blocked writing 100 MB into a full
pipe never exits, so a parent that joined first and read afterwards would wait
forever.  Once the child has exited, everything it wrote is in the pipe, and
one last non-blocking read collects it; the message is complete or it is not.
No end-of-file is needed, so a grandchild that inherited the write end cannot
hold ``run`` up.  The task group of the two never wraps what it raises: a
KeyboardInterrupt that trio delivers there leaves ``run`` as it is.

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
import functools
import math
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import anyio
import anyio.lowlevel

from . import _wire
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
    ProcessTimeout,
    UnkillableProcessWarning,
)
from ._exit import DEFAULT_GRACE, KILL_WAIT, adopt, reap_stragglers
from ._popen import POPEN_CLASSES, AioprocPopen, Exit
from ._process import AsyncProcess
from ._runchild import Call, child_main
from ._usage import ResourceUsage

if sys.version_info >= (3, 11):
    from typing import Never, TypeVarTuple, Unpack
else:  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]
    from typing_extensions import Never, TypeVarTuple, Unpack

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

#: Seconds to wait after SIGKILL before calling a child unkillable (see ``_exit``).
_KILL_WAIT = KILL_WAIT


# -- the parent's side ------------------------------------------------------------


class _Inbox:
    """The parent's ends of the child's pipes: the call to send, the frames to read.

    The child sends two frames: "started", then the outcome.  ``receive`` runs
    beside the join; once the child has exited, ``read_available`` collects
    whatever the child wrote just before.
    """

    def __init__(self, conn: Connection, call: Call, call_conn: Connection | None) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.call_conn = call_conn
        self.call = call  # its frame is made as the process object is pickled
        self.hello = _wire.Incoming()
        self.outcome = _wire.Incoming()
        self.error: Exception | None = None

    @property
    def started(self) -> bool:
        return self.hello.complete

    @property
    def complete(self) -> bool:
        return self.outcome.complete

    def read_available(self) -> None:
        """Read what the pipe holds, without waiting."""
        if not self.hello.complete and not self.hello.read_some(self.fd, math.inf):
            return
        self.outcome.read_some(self.fd, math.inf)

    async def _send_call(self) -> None:
        conn, parts = self.call_conn, self.call.parts
        self.call.parts = None
        if conn is None:
            return
        try:
            if parts is not None:
                os.set_blocking(conn.fileno(), False)
                await _wire.send(conn.fileno(), parts)
        except BrokenPipeError:
            pass  # the child is gone before reading it: its exit says the rest
        finally:
            self.call_conn = None
            conn.close()

    async def receive(self) -> None:
        """Send the call (spawn, forkserver), then read both frames; keep any error."""
        try:
            await self._send_call()
            if await _wire.receive(self.fd, self.hello):
                await _wire.receive(self.fd, self.outcome)
        except Exception as exc:
            self.error = exc

    def close(self) -> None:
        self.conn.close()
        if self.call_conn is not None:
            self.call_conn.close()
            self.call_conn = None


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


def _prepare(
    func: Callable[..., object],
    args: tuple[Any, ...],
    ctx: BaseContext,
    *,
    new_process_group: bool,
    die_with_parent: bool,
    grace: float,
) -> tuple[AsyncProcess, _Inbox, list[Connection]]:
    """The child's process object, the parent's inbox and the child's pipe ends.

    Nothing is started yet; the caller closes the child's ends once it is.
    """
    reader, writer = _wire.pipe("run()")
    ends = [reader, writer]
    try:
        call_reader = call_writer = None
        if not POPEN_CLASSES[ctx.get_start_method()].inherits_memory:
            # The call travels on a pipe of its own, as it drains (see Call).
            call_reader, call_writer = _wire.pipe("run()")
            ends += [call_reader, call_writer]
        call = Call(func, args, ctx.get_start_method(), call_reader)
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
        inbox = _Inbox(reader, call, call_writer)
    except BaseException:
        for end in ends:
            end.close()
        raise
    return proc, inbox, [writer] if call_reader is None else [writer, call_reader]


async def _join_and_drain(proc: AsyncProcess, inbox: _Inbox) -> int:
    error: Exception | None = None
    code = 0
    # Errors are kept out of the task group, which would wrap them in a group;
    # so is a KeyboardInterrupt trio delivers here (a group is unwrapped).
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbox.receive)
            try:
                code = cast(int, await proc.join())
            except Exception as exc:
                error = exc
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_alone(group)
    if isinstance(error, ExitStatusLost):
        # Someone else took the exit status; a result that arrived whole is
        # still the call's result (the child sent it, then exited).
        inbox.read_available()
        if inbox.complete:
            return 0
    if error is None:
        error = inbox.error
    if error is not None:
        raise error
    inbox.read_available()  # what the child wrote just before it exited
    return code


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _raise_alone(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one exception of *group* (a task group's wrapping) as it is."""
    leaves = _leaves(group)
    if len(leaves) != 1:
        raise group
    exc = leaves[0]
    try:
        raise exc
    finally:
        del exc, leaves, group


async def _stop(
    proc: AsyncProcess, inbox: _Inbox, grace: float
) -> tuple[int | None, str, ResourceUsage | None]:
    """Stop the child: SIGTERM, *grace*, SIGKILL, a bounded wait.  Shielded.

    Returns the exit code (None if the child survived SIGKILL: then it is
    adopted for later reaping and warned about), what was done to it, and
    its resource usage (None where unknown).
    """
    inbox.close()  # a child blocked writing its result gets EPIPE
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


async def _stop_unheld(popen: AioprocPopen, grace: float, group: bool) -> None:
    """Stop a fork child whose start was interrupted before its handle was made.

    It may run the function already, so it gets what a held child gets:
    SIGTERM, at most *grace* seconds, then SIGKILL (``abandon``), reaped; and
    with *group*, its process group too (what the function started), while
    the leader is unreaped (so the group id cannot be a stranger's).
    """

    def signal_tree(sig: int) -> None:
        if (
            not popen.owned_here()
            or popen.returncode is not None
            or popen.exit_state() is Exit.GONE
        ):
            return
        # Unreaped, so the pid (and a group of that id) is still the child's.
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, sig)  # no group yet: ESRCH
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, sig)

    with anyio.CancelScope(shield=True):
        if popen.running_here():
            signal_tree(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await anyio.wait_readable(popen.sentinel)
            signal_tree(signal.SIGKILL)
            with anyio.move_on_after(_KILL_WAIT):  # abandon() then reaps without waiting long
                await anyio.wait_readable(popen.sentinel)
    popen.abandon()


def _stop_now(proc: AsyncProcess) -> None:
    """Stop the child without awaiting: SIGKILL, and reap it later if need be."""
    if proc.is_alive():
        proc.kill()
        adopt(proc)  # reaped by the next run() or at exit
    else:
        proc.close()


def _result(func: Callable[..., T], proc: AsyncProcess, code: int, inbox: _Inbox, method: str) -> T:
    pid = cast(int, proc.pid)
    usage = proc.resource_usage
    if not inbox.complete:
        raise _wire.died(func, pid, code, usage, started=inbox.started, method=method)
    value: T = _wire.result_of(func, pid, inbox.outcome, usage)
    return value


async def run(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: Unpack[PosArgsT],
    timeout: float | None = None,  # noqa: ASYNC109 - the child's whole life, with cleanup
    context: str | BaseContext | None = None,
    grace: float = DEFAULT_GRACE,
    new_process_group: bool = True,
    die_with_parent: bool | None = None,
    **kwargs: Never,
) -> T:
    """Call ``func(*args)`` in a new child process and return its result.

    Keyword arguments for *func* go through ``functools.partial`` (any other
    keyword is a ``TypeError`` that says so).  *context*
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
    _wire.check_call(func, kwargs, "run")
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
    proc, inbox, child_ends = _prepare(
        func,
        args,
        ctx,
        new_process_group=new_process_group,
        die_with_parent=die_with_parent,
        grace=grace,
    )
    unheld: list[AioprocPopen] = []
    try:
        try:
            # SIGINT is blocked only while the child is created, never across
            # an await: other tasks' children must not inherit the mask.
            around = functools.partial(_sigint_blocked, ctx.get_start_method())
            await proc._start_async(around, unheld)
        finally:
            for end in child_ends:
                end.close()
        pid = cast(int, proc.pid)
        with anyio.move_on_after(timeout) as deadline:
            code = await _join_and_drain(proc, inbox)
    except BaseException:
        # Once the child exists it is stopped as a cancellation stops it, also
        # when trio's KeyboardInterrupt landed right after it was created.
        if proc._child is not None:
            await _stop(proc, inbox, grace)
        else:
            inbox.close()
            for popen in unheld:
                await _stop_unheld(popen, grace, new_process_group)
        raise
    if deadline.cancelled_caught:
        stopped_code, done, usage = await _stop(proc, inbox, grace)
        raise ProcessTimeout(
            f"process {pid} running {_wire.describe(func)} did not finish within "
            f"{timeout:g} s; {done}",
            pid=pid,
            exitcode=stopped_code,
            resource_usage=usage,
        )
    inbox.close()
    try:
        return _result(func, proc, code, inbox, ctx.get_start_method())
    finally:
        proc.close()
