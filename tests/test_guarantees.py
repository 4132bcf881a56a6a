"""What aioproc promises beyond the API: no threads, no zombies, no leaked fds,
no foreign child reaped, a clean interpreter exit."""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aioproc import AsyncProcess, _popen
from aioproc._watchers import pidfd

from . import targets
from .helpers import DEADLINE, SCRIPTS, children_of_this_process, open_fds, warmed_up

SLOW_DEADLINE = 2 * DEADLINE  # many children at once; longer is a hang


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_no_thread_and_no_fork_warning_with_1000_children(backend: str, tmp_path: Any) -> None:
    """The default (pidfd) path creates no thread, so os.fork() never warns.

    Runs in a fresh interpreter, with its own loop: anyio's pytest plugin runs
    trio in guest mode, whose I/O thread would make the count meaningless, and
    earlier tests leave cached worker threads (trio's, anyio's) behind.
    """
    script = SCRIPTS / "no_thread.py"
    out = subprocess.run(
        [sys.executable, str(script), backend],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["codes_all_zero"]
    assert report["watchers"] == ["pidfd"]
    assert report["threads_before"] == 1
    assert report["threads_while_joining"] == 1
    assert report["threads_after"] == 1
    assert report["fork_warnings"] == []


async def test_no_fd_leaked_across_200_processes(watcher: str) -> None:
    gc.collect()
    before = open_fds()
    for _ in range(4):
        batch = [AsyncProcess(target=targets.noop) for _ in range(50)]
        for p in batch:
            p.start()
        with anyio.fail_after(SLOW_DEADLINE):
            for p in batch[::2]:
                assert await p.join() == 0
                p.close()  # explicitly released
            for p in batch[1::2]:
                assert await p.join() == 0  # released by the garbage collector
        del batch, p
    # The loop may hold the last resumed task's outcome (trio keeps the
    # Cancelled of a finished sleep, whose traceback holds a join's frames and
    # so a process) until it runs another step.
    await anyio.lowlevel.checkpoint()
    gc.collect()
    assert open_fds() - before == set()


@contextlib.asynccontextmanager
async def sleeping_siblings() -> AsyncIterator[list[AsyncProcess]]:
    """Three running fork children, each watched (killed and joined at the end)."""
    await warmed_up("fork")  # a process's first child gets the stdlib's pipes too
    siblings = [AsyncProcess(target=targets.sleep, args=(30,), context="fork") for _ in range(3)]
    try:
        for p in siblings:
            p.start()
        async with anyio.create_task_group() as tg:  # the thread watcher opens its pipe on a join
            tg.start_soon(siblings[0].join)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        yield siblings
    finally:
        for p in siblings:
            if p.pid is not None:
                p.kill()
        with anyio.fail_after(SLOW_DEADLINE):
            for p in siblings:
                if p.pid is not None:
                    await p.join()


async def run_fork_child(target: Callable[..., None], *args: object) -> object:
    """Start a fork child that sends one object; return it once the child exited with 0."""
    parent_end, child_end = multiprocessing.Pipe(duplex=False)
    with parent_end:
        child = AsyncProcess(target=target, args=(child_end, *args), context="fork")
        child.start()
        child_end.close()
        with anyio.fail_after(SLOW_DEADLINE):
            await anyio.wait_readable(parent_end.fileno())
            sent: object = parent_end.recv()
            assert await child.join() == 0
    return sent


async def test_a_forked_child_holds_nothing_of_its_siblings(watcher: str) -> None:
    """A fork child does not inherit the parent's pidfds and pipes for its siblings.

    Holding them would make its exit (the kernel closes them) slower the more
    siblings it has, and keep their pipes open after the parent is gone.
    """
    async with sleeping_siblings() as siblings:
        held = {fd: targets.describe_fd(fd) for fd in _descriptors_of(siblings)}
        inherited = await run_fork_child(targets.send_open_descriptors)
    assert isinstance(inherited, dict)
    # One descriptor per fork child where the kernel has pidfds (the pidfd is the
    # sentinel), the stdlib's two pipe ends elsewhere.
    per_child = 1 if _popen.ONE_DESCRIPTOR_PER_CHILD else 3 if pidfd.is_supported() else 2
    assert len(held) == per_child * len(siblings)
    assert set(held.values()).isdisjoint(inherited.values()), (held, inherited)


async def test_a_forked_child_does_not_use_its_siblings_closed_descriptors(watcher: str) -> None:
    """In a fork child, dropping an inherited sibling closes nothing of the child's
    own (the numbers were closed and may be reused), and signalling it is refused."""
    async with sleeping_siblings() as siblings:
        assert await run_fork_child(targets.reuse_and_drop_siblings, siblings) is True
        assert siblings[0].is_alive()  # the child's terminate() sent nothing
        siblings[0].terminate()
        with anyio.fail_after(SLOW_DEADLINE):
            assert await siblings[0].join() == -signal.SIGTERM


def _descriptors_of(processes: list[AsyncProcess]) -> set[int]:
    """What the parent holds for these children: pipe ends, pidfds."""
    fds: set[int] = set()
    for p in processes:
        child = p._child
        assert child is not None
        fds.add(child.popen.sentinel)
        if child.popen.finalizer is not None:  # the pipes; a pidfd sentinel has none
            fds.update(child.popen.finalizer._args)  # type: ignore[attr-defined]
        if child.pidfd >= 0:
            fds.add(child.pidfd)
    return fds


def test_no_zombie_afterwards() -> None:
    """In a fresh interpreter: after the joins, the kernel has no child of ours left."""
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "no_zombie.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ECHILD"


async def test_foreign_children_keep_their_exit_status(watcher: str) -> None:
    """aioproc never reaps a child it did not start, whatever the watcher."""
    forked = os.fork()
    if forked == 0:
        os._exit(5)
    plain = multiprocessing.Process(target=targets.exit_with, args=(6,))
    plain.start()
    with anyio.fail_after(SLOW_DEADLINE):
        sub = await anyio.open_process([sys.executable, "-c", "raise SystemExit(4)"])
    try:
        ours = [AsyncProcess(target=targets.sleep, args=(0.05 * i,)) for i in range(10)]
        for p in ours:
            p.start()
        with anyio.fail_after(SLOW_DEADLINE):
            assert [await p.join() for p in ours] == [0] * 10
            assert await sub.wait() == 4
    finally:
        await sub.aclose()
    plain.join(SLOW_DEADLINE)
    assert plain.exitcode == 6
    pid, status = os.waitpid(forked, 0)
    assert pid == forked
    assert os.waitstatus_to_exitcode(status) == 5


def test_children_helper_sees_real_children() -> None:
    """The leak check of conftest works: it sees a child, then does not."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert pid in children_of_this_process()
    os.waitpid(pid, 0)
    assert pid not in children_of_this_process()


def test_public_names_are_exported_once() -> None:
    import aioproc

    assert len(aioproc.__all__) == len(set(aioproc.__all__))
    for name in aioproc.__all__:
        assert getattr(aioproc, name).__name__ == name
    assert set(dir(aioproc)) >= set(aioproc.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = aioproc.nope  # type: ignore[attr-defined]


LOOP_MACHINERY = ("anyio", "asyncio", "trio", "aioproc._run", "aioproc._watchers")


def modules_after(statement: str, names: Iterable[str]) -> set[str]:
    """Which of *names* a fresh interpreter has loaded after running *statement*."""
    script = f"import sys\n{statement}\nprint(*sorted(sys.modules), sep='\\n')\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split()) & set(names)


def test_a_child_unpickling_its_process_does_not_import_the_loop_machinery() -> None:
    """spawn/forkserver children import aioproc._process; anyio stays out."""
    assert modules_after("import aioproc._process", LOOP_MACHINERY) == set()


def test_preloading_aioproc_spares_each_forkserver_child_its_imports() -> None:
    """``set_forkserver_preload(["aioproc"])`` loads what a child needs to unpickle its
    process object, and not the loop machinery; the children it forks import nothing."""
    needed = {"aioproc._process", "aioproc._checks", "aioproc._reset", "aioproc._tree"}
    assert modules_after("import aioproc", needed) == needed
    assert modules_after("import aioproc", (*LOOP_MACHINERY, "dataclasses")) == set()
