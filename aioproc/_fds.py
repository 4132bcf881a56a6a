"""The descriptors this process holds for its children, for a forked child to close.

A forked child inherits every descriptor the parent holds for its live
children (pidfds, the stdlib's pipe ends), and the kernel closes them all when
it exits, which delays its exit by as much as the parent has children.  So an
AsyncProcess child closes them first thing (``close_inherited``).

They are kept as a bitmap indexed by descriptor number, not as a set of
objects: after a fork, every page the child writes is copied, and iterating
objects writes their reference counts.  Reading the bitmap copies nothing.

The objects that own these descriptors (Popen, watches) are inherited too; in
the child they must not use or close them again: see ``Watch.owned_here``.
"""

from __future__ import annotations

import os

_held = bytearray()


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
    """In a forked child: close every descriptor the parent held for its children."""
    fd = _held.find(1)
    while fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
        fd = _held.find(1, fd + 1)
    _held.clear()
