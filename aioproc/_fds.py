"""The descriptors this process holds for its children, for a forked child to close.

A forked child inherits every descriptor the parent holds for its live
children (pidfds, the stdlib's pipe ends), and the kernel closes them all when
it exits, which delays its exit by as much as the parent has children.  So an
AsyncProcess child closes them first thing (``close_inherited``).

They are kept as a bitmap indexed by descriptor number, not as a set of
objects: after a fork, every page the child writes is copied, and iterating
objects writes their reference counts.  Reading the bitmap copies nothing.

The bookkeeping belongs to the process that holds the descriptors.  Every
forked child, however it was forked (``os.fork()`` by user code too), starts
with an empty map: the parent's is set aside for ``close_inherited`` and
otherwise dropped, so a child that closes its descriptors and opens new ones
under the same numbers never has them closed behind its back.

The objects that own these descriptors (Popen, handles) are inherited too; in
the child they must not use or close them again (they check their owner pid).
"""

from __future__ import annotations

import os

_held = bytearray()
#: In a forked child until ``close_inherited``: what the parent held.
_inherited = bytearray()


def hold(*fds: int) -> None:
    """Mark *fds* as held for a child of this process."""
    for fd in fds:
        if fd >= len(_held):
            _held.extend(bytes(fd + 1 - len(_held) + 256))
        _held[fd] = 1


def release(*fds: int) -> None:
    """Unmark *fds*: about to be closed, or closed."""
    for fd in fds:
        if 0 <= fd < len(_held):
            _held[fd] = 0


def close_inherited() -> None:
    """In a child forked by aioproc: close every descriptor the parent held for its children."""
    global _inherited
    inherited, _inherited = _inherited, bytearray()
    # One closerange() (close_range(2) on Linux) per run of held descriptors,
    # which are mostly consecutive: a system call per run, not per descriptor.
    fd = inherited.find(1)
    while fd >= 0:
        end = inherited.find(0, fd)
        if end < 0:
            end = len(inherited)
        os.closerange(fd, end)
        fd = inherited.find(1, end)


def _set_aside_in_child() -> None:
    # Rebinding only: no page of the parent's bitmap is written (or copied).
    global _held, _inherited
    _held, _inherited = bytearray(), _held


os.register_at_fork(after_in_child=_set_aside_in_child)
