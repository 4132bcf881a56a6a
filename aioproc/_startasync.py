"""``start_async()``: starting a child with every wait handed to the event loop.

Where a synchronous ``start()`` spends its time, per start method:

- fork: two pipes and ``os.fork()``.  All of it is the fork itself, which
  cannot leave the loop's thread without a thread of its own (which aioproc
  does not create): ``start_async()`` forks as ``start()`` does.
- spawn: ``vfork()`` + ``exec()`` of a new interpreter (the parent is
  suspended only until the exec), then the pickled preparation data and
  process object are written to the child, which reads them once its
  interpreter has started, tens of milliseconds later.  Whatever does not fit
  in the pipe's buffer (64 KiB) waits for that: here the write waits in the
  loop (``anyio.wait_writable``) instead.
- forkserver: a request to the fork server (``connect_to_new_process``: a
  connect and a ``sendmsg``, and the first time, starting the server), then the
  data, then the child's pid, which arrives once the server has forked (the
  first time, once it has also imported its preloaded modules).  Here the pid
  is awaited with ``anyio.wait_readable``, and the data written as for spawn.

The steps that do not wait are the stdlib's own (``spawn``, ``reduction``,
``util.spawnv_passfds``, ``forkserver.connect_to_new_process``, ``util.Finalize``),
called in the same order as the stdlib's ``Popen._launch``.  The one change
of order: the forkserver pid is read before the data is written.  The server
writes the pid as soon as it has forked, before the child reads anything, so
a start cancelled after that point can kill a child that is still blocked
reading its data: it never runs a line of the target.

As with ``start()``, a start that fails or is cancelled leaves nothing open
or running: the pipes are closed, a spawn child is killed and reaped, a
forkserver child is killed and its exit awaited (its parent, the fork server,
reaps it).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager
from multiprocessing import forkserver, popen_fork, reduction, resource_tracker, spawn, util
from multiprocessing.context import set_spawning_popen
from typing import TYPE_CHECKING

import anyio

from ._popen import (
    ForkServerPopen,
    SpawnPopen,
    clean_up_failed_launch,
    fork_server_died,
    fork_server_exited,
    launch,
    start_error,
)
from ._watchers.pidfd import _readable_now

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

_Around = Callable[[], AbstractContextManager[object]]

# How long a cancelled forkserver start waits for the pid of the child it must
# kill, and then for the server's report of its death.  The server forks at
# once; only a server that hangs makes this run out.
_CLEANUP_WAIT = 5.0


def _pickled(popen: SpawnPopen | ForkServerPopen, process_obj: BaseProcess) -> memoryview:
    """The preparation data and process object, as the stdlib sends them."""
    prep_data = spawn.get_preparation_data(process_obj._name)  # type: ignore[attr-defined]
    buf = io.BytesIO()
    set_spawning_popen(popen)
    try:
        reduction.dump(prep_data, buf)
        reduction.dump(process_obj, buf)
    finally:
        set_spawning_popen(None)
    return buf.getbuffer()


def _drop_data(popen: _SpawnWithoutData | _ForkServerWithoutData) -> None:
    """Let go of the pickled data (a view of a BytesIO, which must not outlive it)."""
    data = popen.__dict__.pop("data", None)
    if data is not None:
        data.release()


class _SpawnWithoutData(SpawnPopen):
    """The spawn Popen's ``_launch`` up to the child's existence; the data is left to send."""

    data: memoryview
    data_fd: int

    def _launch(self, process_obj: BaseProcess) -> None:
        try:
            tracker_fd = resource_tracker.getfd()
            self._fds.append(tracker_fd)  # type: ignore[attr-defined]
            self.data = _pickled(self, process_obj)
            parent_r = child_w = child_r = parent_w = None
            try:
                parent_r, child_w = os.pipe()
                child_r, parent_w = os.pipe()
                cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
                self._fds.extend([child_r, child_w])  # type: ignore[attr-defined]
                self.pid = util.spawnv_passfds(
                    spawn.get_executable(),  # type: ignore[arg-type]
                    cmd,
                    self._fds,  # type: ignore[attr-defined]
                )
                self.sentinel = parent_r
                self.data_fd = parent_w
            finally:
                opened = [fd for fd in (parent_r, parent_w) if fd is not None]
                self.finalizer = util.Finalize(
                    self,
                    util.close_fds,  # type: ignore[attr-defined]
                    opened,
                )
                for fd in (child_r, child_w):
                    if fd is not None:
                        os.close(fd)
        except BaseException:
            clean_up_failed_launch(self)
            _drop_data(self)
            raise


class _ForkServerWithoutData(ForkServerPopen):
    """The forkserver Popen's ``_launch`` up to the request; pid and data are left."""

    data: memoryview
    data_fd: int = -1

    def _launch(self, process_obj: BaseProcess) -> None:
        try:
            self.data = _pickled(self, process_obj)
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
            try:
                # As the stdlib: a duplicate of the data pipe's write end stays
                # open as the child's sign that its parent lives.
                parent_w = os.dup(w)
            except BaseException:
                os.close(w)
                os.close(self.sentinel)
                raise
            self.data_fd = w
            self.finalizer = util.Finalize(
                self,
                util.close_fds,  # type: ignore[attr-defined]
                (parent_w, self.sentinel),
            )
        except BaseException:
            clean_up_failed_launch(self)
            _drop_data(self)
            raise

    def close_data_fd(self) -> None:
        fd, self.data_fd = self.data_fd, -1
        if fd >= 0:
            os.close(fd)


async def launch_async(
    process_obj: BaseProcess,
    ctx: BaseContext,
    around_launch: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> popen_fork.Popen:
    """Start *process_obj*'s child as ``launch()`` does, waiting only in the event loop.

    Fails, and is cancelled, leaving nothing open or running.  *around_launch*
    is entered around the synchronous part that creates the child (the fork,
    the vfork + exec, the request to the fork server), never across an await.
    """
    method = ctx.get_start_method()
    try:
        if method == "spawn":
            return await _spawn(process_obj, around_launch)
        if method == "forkserver":
            return await _through_fork_server(process_obj, around_launch)
    except OSError as exc:
        error = start_error(exc)
        if error is exc:
            raise
        raise error from exc
    # fork, and a start method of someone else's making: one call, nothing to await.
    with around_launch():
        return launch(process_obj, ctx)


async def _write_all(fd: int, data: memoryview) -> None:
    """Write *data* to the pipe *fd*, waiting in the loop while the pipe is full."""
    os.set_blocking(fd, False)
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, data[done:])
        except BlockingIOError:
            await anyio.wait_writable(fd)


async def _spawn(process_obj: BaseProcess, around_launch: _Around) -> popen_fork.Popen:
    with around_launch():
        popen = _SpawnWithoutData(process_obj)
    try:
        await _write_all(popen.data_fd, popen.data)
    except BaseException:
        clean_up_failed_launch(popen)  # kills and reaps the child
        raise
    finally:
        _drop_data(popen)
    return popen


async def _through_fork_server(
    process_obj: BaseProcess, around_launch: _Around
) -> popen_fork.Popen:
    """Ask the fork server for the child, once more if it was going away (as ``launch``)."""
    try:
        return await _fork_server_once(process_obj, around_launch)
    except (ConnectionError, EOFError):
        await _until_fork_server_exited()
    try:
        return await _fork_server_once(process_obj, around_launch)
    except EOFError as exc:
        await _until_fork_server_exited()
        raise fork_server_died() from exc


async def _until_fork_server_exited() -> None:
    """``_wait_until_fork_server_exited``, sleeping in the loop."""
    with anyio.move_on_after(5.0):
        while not fork_server_exited():  # noqa: ASYNC110 - no event to wait for: a zombie
            await anyio.sleep(0.001)


async def _fork_server_once(process_obj: BaseProcess, around_launch: _Around) -> popen_fork.Popen:
    with around_launch():
        popen = _ForkServerWithoutData(process_obj)
    try:
        await anyio.wait_readable(popen.sentinel)
        popen.pid = forkserver.read_signed(popen.sentinel)
        await _write_all(popen.data_fd, popen.data)
    except BaseException as exc:
        # EPIPE: the child closed its end, so it is gone (its pid may be free).
        kill = not isinstance(exc, BrokenPipeError)
        with anyio.CancelScope(shield=True):
            await _kill_unborn_fork_server_child(popen, kill=kill)
        popen.close_data_fd()
        clean_up_failed_launch(popen)
        raise
    finally:
        _drop_data(popen)
    popen.close_data_fd()
    return popen


async def _kill_unborn_fork_server_child(popen: _ForkServerWithoutData, *, kill: bool) -> None:
    """Kill the child of a start that failed before its data was all sent.

    The child reads its data before anything else and cannot finish while we
    hold the pipe open, so unless something else killed it, it is alive and
    its pid its own: the fork server has not reported its exit on the
    sentinel.  Once it is killed, the server reaps it and writes its exit
    code there, which is awaited so that the child is gone on return.
    """
    with anyio.move_on_after(_CLEANUP_WAIT):
        try:
            if getattr(popen, "pid", None) is None:
                await anyio.wait_readable(popen.sentinel)
                popen.pid = forkserver.read_signed(popen.sentinel)
            if kill and not _readable_now(popen.sentinel):
                os.kill(popen.pid, signal.SIGKILL)
            await anyio.wait_readable(popen.sentinel)
        except (OSError, EOFError):
            pass  # the server died: it took its children with it, or never forked
