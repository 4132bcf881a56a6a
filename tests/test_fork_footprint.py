"""A fork child writes nothing per live sibling (issue 14).

After a fork every page the child writes is copied, so a child that releases
the parent's objects for its siblings (the parent's set of children, the
stdlib's registry of finalizers, which its bootstrap clears) pays a page per
sibling, in memory and in time.  These tests check, through reference counts,
that an AsyncProcess child leaves those objects as the fork left them, and that
the descriptors they stand for are still closed in the parent, once.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from multiprocessing import util
from multiprocessing.connection import Connection

import pytest

from aioproc import AsyncProcess
from aioproc._popen import _Closer

from . import targets
from .conftest import FORK_THREAD_WARNING
from .helpers import handshake, open_fds


def _refcounts(objects: list[object]) -> list[int]:
    return [sys.getrefcount(o) for o in objects]


def _send_refcounts(conn: Connection, objects: list[object]) -> None:
    conn.send(_refcounts(objects))
    conn.close()


async def test_a_fork_child_releases_nothing_of_its_siblings() -> None:
    ours, theirs = multiprocessing.Pipe()
    siblings = [AsyncProcess(target=targets.sleep, args=(30,), context="fork") for _ in range(3)]
    for sibling in siblings:
        sibling.start()
    try:
        popens = [s._popen for s in siblings if s._popen is not None]
        finalizers = [q.finalizer for q in popens if q.finalizer is not None]  # pipes only
        watched: list[object] = [*siblings, *popens, *finalizers]
        p = AsyncProcess(target=_send_refcounts, args=(theirs, watched), context="fork")
        before = _refcounts(watched)
        p.start()
        theirs.close()
        assert await handshake(ours) == before
        assert await p.join() == 0
    finally:
        for sibling in siblings:
            sibling.kill()
            await sibling.join()


async def test_children_add_nothing_to_the_stdlib_finalizer_registry() -> None:
    # A first start may register what multiprocessing sets up once per process.
    first = AsyncProcess(target=targets.sleep, args=(0,), context="fork")
    first.start()
    await first.join()
    first.close()
    registered = len(util._finalizer_registry)  # type: ignore[attr-defined]
    p = AsyncProcess(target=targets.sleep, args=(30,), context="fork")
    p.start()
    try:
        assert len(util._finalizer_registry) == registered  # type: ignore[attr-defined]
    finally:
        p.kill()
        await p.join()
    p.close()


class _Owner:
    """Something a closer watches, as it watches a Popen."""


def _is_open(fd: int) -> bool:
    return fd in open_fds()


def test_a_closer_closes_once_when_called() -> None:
    r, w = os.pipe()
    owner = _Owner()
    closer = _Closer(owner, util.close_fds, (r, w))  # type: ignore[attr-defined]
    assert closer.still_active()
    closer()
    assert not _is_open(r)
    assert not _is_open(w)
    fd = os.open(os.devnull, os.O_RDONLY)  # may reuse r's number: must stay open
    try:
        closer()
        assert _is_open(fd)
        assert not closer.still_active()
    finally:
        os.close(fd)


@pytest.mark.parametrize("cycle", [False, True], ids=["freed", "collected"])
def test_a_closer_closes_when_its_owner_is_gone(cycle: bool) -> None:
    r, w = os.pipe()
    owner = _Owner()
    if cycle:
        owner.self = owner  # type: ignore[attr-defined]  # only the collector frees it
    _Closer(owner, util.close_fds, (r, w))  # type: ignore[attr-defined]
    del owner
    gc.collect()
    assert not _is_open(r)
    assert not _is_open(w)


@FORK_THREAD_WARNING
def test_a_closer_closes_nothing_in_a_forked_copy() -> None:
    r, w = os.pipe()
    owner = _Owner()
    closer = _Closer(owner, util.close_fds, (r, w))  # type: ignore[attr-defined]
    pid = os.fork()
    if pid == 0:
        closer()
        os._exit(0 if _is_open(r) and _is_open(w) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert closer.still_active()
    closer()
    assert not _is_open(r)
