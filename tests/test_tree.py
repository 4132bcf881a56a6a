"""Process trees (new_process_group) and children that die with their parent.

Grandchildren are not ours to reap: every test that makes them makes this
process the subreaper they are handed to, and reaps them at the end.  "Gone"
means exited: a pidfd turns readable.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess, _checks, _process, _tree
from aioproc._watchers import pidfd

from . import targets
from .conftest import BACKENDS, FORK_THREAD_WARNING
from .helpers import (
    DEADLINE,
    _set_subreaper,
    children_of_this_process,
    fork_server_and_helpers,
    killed_afterwards,
    reaping_orphans,
    state_of,
)

METHODS = ("fork", "forkserver", "spawn")
ROOT = Path(__file__).resolve().parent.parent
LINUX_ONLY = pytest.mark.skipif(
    not _checks.PDEATHSIG_SUPPORTED, reason="PR_SET_PDEATHSIG is Linux only"
)


def exited_within(pid: int, timeout: float = 10.0) -> bool:
    """Whether *pid* (not necessarily our child) exits within *timeout* seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def running(pid: int) -> bool:
    return state_of(pid) not in (None, "Z")


@contextlib.contextmanager
def adopting_grandchildren() -> Iterator[None]:
    """Be the subreaper of the grandchildren a test makes; reap them at the end.

    Unlike ``reaping_orphans``, it leaves alone the fork server and the resource
    tracker, which multiprocessing may start meanwhile and keeps.
    """
    before = children_of_this_process()
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)
        for pid in children_of_this_process() - before - fork_server_and_helpers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
def no_pidfd_group_signals() -> Iterator[None]:
    """Take the killpg path, as on a kernel before 6.9."""
    saved = _tree.pidfd_group_signals
    _tree.pidfd_group_signals = False
    yield
    _tree.pidfd_group_signals = saved


async def start_tree(
    method: str, *, ignore_sigterm: bool = False, start: str = "start"
) -> tuple[AsyncProcess, int]:
    """A child leading its own group, and the pid of the grandchild it started."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    p = AsyncProcess(
        target=targets.grandchild_then_sleep,
        args=(writer, ignore_sigterm),
        context=method,
        new_process_group=True,
    )
    if start == "start_async":
        await p.start_async()
    else:
        p.start()
    writer.close()
    with anyio.fail_after(DEADLINE):
        await anyio.wait_readable(reader.fileno())
    grandchild: int = reader.recv()
    reader.close()
    return p, grandchild


# -- options ----------------------------------------------------------------------


def test_options_are_off_by_default_and_shown() -> None:
    p = AsyncProcess(target=targets.noop)
    assert (p.new_process_group, p.die_with_parent) == (False, False)
    assert "new_process_group" not in repr(p)
    q = AsyncProcess(target=targets.noop, new_process_group=True, die_with_parent=True)
    assert (q.new_process_group, q.die_with_parent) == (True, True)
    assert repr(q).endswith("initial new_process_group die_with_parent>")


@pytest.mark.parametrize("option", ["new_process_group", "die_with_parent"])
def test_options_must_be_bools(option: str) -> None:
    with pytest.raises(TypeError, match=rf"^{option} must be True or False, not int 1$"):
        AsyncProcess(target=targets.noop, **{option: 1})  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["new_process_group", "die_with_parent"])
async def test_run_options_must_be_bools(option: str) -> None:
    rule = "True or False" if option == "new_process_group" else "True, False or None .*"
    with pytest.raises(TypeError, match=rf"^{option} must be {rule}, not str 'yes'$"):
        await aioproc.run(targets.noop, **{option: "yes"})  # type: ignore[arg-type]


def test_die_with_parent_needs_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_checks, "PDEATHSIG_SUPPORTED", False)
    with pytest.raises(NotImplementedError, match="die_with_parent=True needs Linux"):
        AsyncProcess(target=targets.noop, die_with_parent=True)
    assert not AsyncProcess(target=targets.noop, die_with_parent=False).die_with_parent


# -- process groups ---------------------------------------------------------------


@pytest.mark.parametrize("start", ["start", "start_async"])
@pytest.mark.parametrize("method", METHODS)
async def test_terminate_reaches_the_grandchildren(method: str, start: str) -> None:
    with adopting_grandchildren():
        p, grandchild = await start_tree(method, start=start)
        with killed_afterwards(grandchild):
            assert os.getpgid(p.pid or 0) == p.pid
            assert os.getpgid(grandchild) == p.pid
            p.terminate()
            with anyio.fail_after(DEADLINE):
                assert await p.join() == -signal.SIGTERM
            assert exited_within(grandchild)
        p.close()


@pytest.mark.parametrize("action", ["kill", "interrupt"])
async def test_kill_and_interrupt_reach_the_grandchildren(action: str) -> None:
    with adopting_grandchildren():
        p, grandchild = await start_tree("fork")
        with killed_afterwards(grandchild):
            getattr(p, action)()
            with anyio.fail_after(DEADLINE):
                code = await p.join()
            assert code == (-signal.SIGKILL if action == "kill" else 3)
            assert exited_within(grandchild)
        p.close()


@pytest.mark.usefixtures("no_pidfd_group_signals")
@pytest.mark.parametrize("method", ["fork", "spawn"])
async def test_killpg_path_reaches_the_grandchildren(method: str) -> None:
    with adopting_grandchildren():
        p, grandchild = await start_tree(method)
        with killed_afterwards(grandchild):
            p.kill()
            with anyio.fail_after(DEADLINE):
                assert await p.join() == -signal.SIGKILL
            assert exited_within(grandchild)
        p.close()


async def test_every_watcher_signals_the_group(watcher: str) -> None:
    # The handle holds a pidfd whatever the watcher: a forkserver child's group too.
    with adopting_grandchildren():
        p, grandchild = await start_tree("forkserver" if watcher == "sentinel" else "fork")
        with killed_afterwards(grandchild):
            p.terminate()
            with anyio.fail_after(DEADLINE):
                assert await p.join() == -signal.SIGTERM
            assert exited_within(grandchild)
        p.close()


async def test_a_forkserver_child_without_a_pidfd_is_signalled_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fork server reaps it, so its group id could name a stranger's group.
    monkeypatch.setattr(pidfd, "supported", False)
    with adopting_grandchildren():
        p, grandchild = await start_tree("forkserver")
        with killed_afterwards(grandchild):
            p.terminate()
            with anyio.fail_after(10):
                assert await p.join() == -signal.SIGTERM
            assert running(grandchild)
        p.close()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
async def test_a_signal_before_the_group_exists_reaches_the_child(method: str) -> None:
    # Signalled at once, the child has most likely not made its group yet: the
    # group signal finds no group and the child gets it alone.
    p = AsyncProcess(target=targets.sleep, args=(30,), context=method, new_process_group=True)
    p.start()
    p.terminate()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGTERM
    p.close()


async def test_without_a_group_of_its_own_the_grandchild_lives_on() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    with adopting_grandchildren():
        p = AsyncProcess(target=targets.grandchild_then_sleep, args=(writer, False))
        p.start()
        writer.close()
        with anyio.fail_after(DEADLINE):
            await anyio.wait_readable(reader.fileno())
        grandchild = reader.recv()
        reader.close()
        with killed_afterwards(grandchild):
            assert os.getpgid(grandchild) == os.getpgid(0)
            p.terminate()
            with anyio.fail_after(DEADLINE):
                assert await p.join() == -signal.SIGTERM
            assert running(grandchild)
        p.close()


# -- aioproc.run owns the tree ------------------------------------------------------


def grandchild_pid(path: Path) -> int:
    for _ in range(1000):
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.01)
    raise AssertionError(f"the child never wrote {path}")


# One backend: the timeout must outlast the slowest start, and each backend
# stops a run the same way (the cancellation test below runs on all three).
@pytest.mark.parametrize("anyio_backend", [BACKENDS["asyncio"]], ids=["asyncio"])
@pytest.mark.parametrize("method", METHODS)
async def test_run_timeout_kills_a_grandchild_that_ignores_sigterm(
    method: str, tmp_path: Path
) -> None:
    path = tmp_path / "grandchild"
    with adopting_grandchildren():
        with pytest.raises(aioproc.ProcessTimeout):
            await aioproc.run(
                targets.grandchild_to_file, str(path), True, 60, timeout=1, grace=0.1,
                context=method,
            )  # fmt: skip
        grandchild = grandchild_pid(path)
        with killed_afterwards(grandchild):
            assert exited_within(grandchild)


async def test_run_cancelled_kills_the_grandchildren(tmp_path: Path) -> None:
    path = tmp_path / "grandchild"
    with adopting_grandchildren():
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: aioproc.run(targets.grandchild_to_file, str(path), True, 60, grace=0.1)
            )
            with anyio.fail_after(DEADLINE):
                while not (path.exists() and path.read_text()):
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        grandchild = grandchild_pid(path)
        with killed_afterwards(grandchild):
            assert exited_within(grandchild)


@pytest.mark.usefixtures("no_pidfd_group_signals")
async def test_run_return_kills_what_is_left_of_the_group(tmp_path: Path) -> None:
    path = tmp_path / "grandchild"
    with adopting_grandchildren():
        grandchild = await aioproc.run(targets.grandchild_to_file, str(path), True, 0)
        with killed_afterwards(grandchild):
            assert exited_within(grandchild)


async def test_run_without_a_group_leaves_the_grandchild(tmp_path: Path) -> None:
    path = tmp_path / "grandchild"
    with adopting_grandchildren():
        grandchild = await aioproc.run(
            targets.grandchild_to_file, str(path), False, 0, new_process_group=False
        )
        with killed_afterwards(grandchild):
            assert running(grandchild)


# -- children that die with their parent ----------------------------------------------


def read_pids(out: subprocess.Popen[str], names: set[str]) -> dict[str, int]:
    pids: dict[str, int] = {}
    assert out.stdout is not None
    while set(pids) != names:
        line = out.stdout.readline()
        assert line, f"the parent exited early: {out.wait()}"
        name, pid = line.split()
        pids[name] = int(pid)
    return pids


@LINUX_ONLY
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_children_die_with_a_parent_killed_by_sigkill(method: str) -> None:
    with reaping_orphans():
        parent = subprocess.Popen(
            [sys.executable, "-m", "tests.scripts.orphan_parent", method, "both"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            pids = read_pids(parent, {"lives", "dies", "run"})
        finally:
            parent.kill()
            parent.wait()
            assert parent.stdout is not None
            parent.stdout.close()
        with killed_afterwards(pids["lives"]):
            assert exited_within(pids["dies"])
            assert exited_within(pids["run"])
            # Its sibling is dead, so the parent's death has been dealt with.
            assert running(pids["lives"])


@LINUX_ONLY
def test_a_parent_dead_before_the_death_signal_was_set() -> None:
    with reaping_orphans():
        parent = subprocess.Popen(
            [sys.executable, "-m", "tests.scripts.orphan_parent", "spawn", "at-once"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            pids = read_pids(parent, {"dies"})
        finally:
            assert parent.wait(10) == -signal.SIGKILL
            assert parent.stdout is not None
            parent.stdout.close()
        assert exited_within(pids["dies"])


@LINUX_ONLY
@pytest.mark.parametrize("start", ["start", "start_async"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
async def test_the_parent_check_kills_a_child_whose_parent_is_not_the_expected_one(
    method: str, start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the parent had died before the child set its death signal: the
    # child finds another parent than the one recorded, and kills itself.
    monkeypatch.setattr(_process, "expected_parent", lambda: 1)
    p = AsyncProcess(target=targets.noop, context=method, die_with_parent=True)
    if start == "start_async":
        await p.start_async()
    else:
        p.start()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGKILL
    p.close()


@LINUX_ONLY
async def test_forkserver_children_cannot_die_with_their_parent() -> None:
    with pytest.raises(NotImplementedError, match="does not work with the forkserver"):
        AsyncProcess(target=targets.noop, context="forkserver", die_with_parent=True)
    ctx = multiprocessing.get_context("forkserver")
    p = AsyncProcess(target=targets.noop, die_with_parent=True)
    p._ctx = ctx  # the default start method, as on Python 3.14
    with pytest.raises(NotImplementedError, match="use the fork or spawn start method"):
        p.start()
    with pytest.raises(NotImplementedError, match="does not work with the forkserver"):
        await aioproc.run(targets.noop, context="forkserver", die_with_parent=True)
    # run's default: wherever it works.
    assert await aioproc.run(targets.getpid, context="forkserver") > 0


@LINUX_ONLY
def test_a_child_dies_with_the_thread_that_started_it() -> None:
    # The kernel's rule, documented: the parent is the thread that forked.
    reader, writer = multiprocessing.Pipe(duplex=False)
    p = AsyncProcess(
        target=targets.ready_then_sleep, args=(writer, 30), context="spawn", die_with_parent=True
    )

    def start_and_wait_until_ready() -> None:
        p.start()
        reader.recv()  # the child has set its death signal

    thread = threading.Thread(target=start_and_wait_until_ready)
    thread.start()
    thread.join()
    writer.close()
    reader.close()
    assert anyio.run(p.join) == -signal.SIGKILL
    p.close()


@LINUX_ONLY
@FORK_THREAD_WARNING
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_child_started_from_a_thread_that_ends_at_once_dies_with_it(context: str) -> None:
    """The README's promise, for a thread that does nothing but start the child.

    "The parent is the thread that called start() ... a child started from a
    short-lived thread is killed when the thread ends."  Here the thread ends
    as soon as start() returns, typically before the child has set its death
    signal: the child must still end with it.
    """
    reader, writer = multiprocessing.Pipe(duplex=False)
    p = AsyncProcess(
        target=targets.ready_then_sleep, args=(writer, 60), context=context, die_with_parent=True
    )
    tids: list[int] = []

    def start() -> None:
        tids.append(threading.get_native_id())
        p.start()

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    writer.close()

    async def join() -> int | None:
        # The child sleeps 60 s unless it dies with the thread: as soon as it has
        # set its death signal (a spawn child, once its interpreter is up).
        with anyio.move_on_after(DEADLINE):
            return await p.join()
        p.kill()
        await p.join()
        return None

    code = anyio.run(join)
    p.close()
    reader.close()
    assert code is not None, "the child outlived the thread that started it"
    assert code == -signal.SIGKILL
