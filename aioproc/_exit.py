"""What happens to our children when the interpreter exits, and to stragglers.

multiprocessing's exit handler terminates daemonic children and then calls
``join()`` on every active child, synchronously.  Our ``join()`` is a
coroutine, so a finalizer of ours does that work first, for our children only,
without an event loop; by the time the stdlib's handler looks, they are gone
from ``active_children()``.  It is registered per process and runs after every
finalizer of higher priority, as the stdlib's own loop does.

- Daemonic children, and children a call owns (``run``'s, a pool's workers:
  ``_stop_at_exit``), are stopped: SIGTERM, their grace period, SIGKILL, a
  bounded wait.  (The stdlib sends SIGTERM and then waits forever.)
- Other children are waited for, as the stdlib does.  A Ctrl-C meanwhile stops
  them the same bounded way instead of leaving them behind, with SIGINT held
  off until that is done, so a second Ctrl-C cannot cut it short.
- Stragglers — children of ``run`` still alive long after SIGKILL (stuck in
  the kernel) — were moved out of multiprocessing's list so that nothing waits
  for them forever; the next ``run`` reaps those that exited, and exit waits
  for them a bounded time, then names them in a warning.

Every forked child, however it was forked, starts with no children of its
own: the parent's list is not inherited (else a plain ``os.fork()`` copy would
try to join or signal its parent's children at its exit).
"""

from __future__ import annotations

import contextlib
import multiprocessing.process as mp_process
import multiprocessing.util as mp_util
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ._exceptions import UnkillableProcessWarning

if TYPE_CHECKING:
    from ._process import AsyncProcess

#: Seconds between SIGTERM and SIGKILL, unless the process says otherwise.
DEFAULT_GRACE = 1.0
# Seconds to wait after SIGKILL before calling a child unkillable.  SIGKILL
# takes effect at once unless the child is stuck in the kernel; a child with
# a large address space can take a while to tear down, hence not less.
KILL_WAIT = 5.0

_registered_pid: int | None = None
# pid -> process.  Not in multiprocessing's list of children, so that neither
# its exit handler nor ours waits for them forever.
_stragglers: dict[int, AsyncProcess] = {}


def ensure_registered() -> None:
    """Make sure our exit handler runs in this process."""
    global _registered_pid
    if _registered_pid != os.getpid():
        mp_util.Finalize(None, _at_exit, exitpriority=0)
        _registered_pid = os.getpid()


def adopt(proc: AsyncProcess) -> None:
    """Take over a child that survived SIGKILL: reaped later, waited for a bounded time."""
    mp_process._children.discard(proc)  # type: ignore[attr-defined]
    if proc.pid is not None:
        _stragglers[proc.pid] = proc
    ensure_registered()


def reap_stragglers() -> None:
    """Reap the adopted children that have exited meanwhile."""
    for pid, proc in list(_stragglers.items()):
        child = proc._child
        if child is None or proc._parent_pid != os.getpid():
            del _stragglers[pid]
        elif not child.alive():
            del _stragglers[pid]
            proc.close()


def _ours() -> list[AsyncProcess]:
    from ._process import AsyncProcess  # noqa: PLC0415 - a cycle at import time

    return [
        p
        for p in list(mp_process._children)  # type: ignore[attr-defined]
        if isinstance(p, AsyncProcess) and p._child is not None
    ]


def stop_blocking(procs: list[AsyncProcess]) -> list[AsyncProcess]:
    """SIGTERM, grace, SIGKILL, a bounded wait, for all of *procs* at once.

    Returns those still alive after that (stuck in the kernel).
    """
    alive = [p for p in procs if p._child is not None and p._child.alive()]
    for p in alive:
        p._signal(signal.SIGTERM)
    alive = _wait_all(alive, lambda p: p._exit_grace)
    for p in alive:
        p._signal(signal.SIGKILL)
    return _wait_all(alive, lambda p: KILL_WAIT)


def _wait_all(
    procs: list[AsyncProcess], limit: Callable[[AsyncProcess], float]
) -> list[AsyncProcess]:
    """Wait for *procs*, each at most *limit* seconds from now; those still alive."""
    start = time.monotonic()
    still = []
    for p in procs:
        child = p._child
        remaining = max(0.0, start + limit(p) - time.monotonic())
        if child is not None and child.wait_blocking(remaining) is None and child.alive():
            still.append(p)
    return still


#: Rounds of children started by other threads while exit handles the previous
#: ones; those still appearing after that are stopped, so that exit stays bounded.
_EXIT_ROUNDS = 10


def _at_exit() -> None:
    left: list[AsyncProcess] = []
    # Other threads (daemon threads run on during exit) may start children
    # while this waits: they are handled too, or the stdlib's handler, which
    # runs next, would call join() on them and drop the coroutine.
    for rounds in range(_EXIT_ROUNDS + 1):
        ours = _ours()
        if not ours:
            break
        left += _handle_at_exit(ours, stop_all=rounds == _EXIT_ROUNDS)
    else:  # a thread still starting children: not waited for (nor joined by the stdlib)
        for p in _ours():
            mp_process._children.discard(p)  # type: ignore[attr-defined]
    with _sigint_held():
        _wait_for_stragglers()
    for p in left:
        warnings.warn(
            f"process {p.pid} is still alive at interpreter exit, long after SIGKILL "
            "(stuck in the kernel, or stopped by a debugger); leaving it to the init process",
            UnkillableProcessWarning,
            stacklevel=1,
        )


def _handle_at_exit(ours: list[AsyncProcess], *, stop_all: bool) -> list[AsyncProcess]:
    """Stop or wait for *ours*, and take them off multiprocessing's list; those left alive."""
    stop = [p for p in ours if stop_all or p.daemon or p._stop_at_exit]
    wait = [p for p in ours if p not in stop]
    left: list[AsyncProcess] = []
    with _sigint_held():
        left += stop_blocking(stop)
    try:
        for p in wait:
            child = p._child
            if child is not None:
                child.wait_blocking()
    except KeyboardInterrupt:
        with _sigint_held():
            left += stop_blocking(wait)
    for p in ours:
        mp_process._children.discard(p)  # type: ignore[attr-defined]
    return left


def _wait_for_stragglers() -> None:
    deadline = time.monotonic() + KILL_WAIT
    reap_stragglers()
    while _stragglers and time.monotonic() < deadline:
        time.sleep(0.01)
        reap_stragglers()
    for pid in _stragglers:
        warnings.warn(
            f"process {pid} is still alive at interpreter exit, long after SIGKILL; "
            "leaving it to the init process",
            UnkillableProcessWarning,
            stacklevel=1,
        )
    _stragglers.clear()


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT off in this thread (a Ctrl-C waits until the block is done)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (OSError, ValueError):  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        if signal.SIGINT not in old:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


#: In a forked child: the parent's sets of children, kept so that they are never freed.
_parents_children: list[object] = []


def _forget_in_child() -> None:
    # The parent's children are not this process's: rebinding, not clearing.
    # The old set is kept: freed, it would release every process object of
    # the parent, writing (so copying) one page per live sibling: 2.3 MiB
    # per child with 3000 of them.
    global _stragglers
    _parents_children.append(mp_process._children)  # type: ignore[attr-defined]
    mp_process._children = set()  # type: ignore[attr-defined]
    _parents_children.append(_stragglers)
    _stragglers = {}


os.register_at_fork(after_in_child=_forget_in_child)
