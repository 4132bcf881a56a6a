"""Watchers: the automatic choice, forcing one, and what each cannot do."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import anyio
import pytest
import uvloop

import aioproc
from aioproc import AsyncProcess, WatcherUnavailable, _popen
from aioproc._watchers import pidfd, sigchld

from . import targets
from .conftest import FORK_THREAD_WARNING
from .helpers import DEADLINE, handshake

pytestmark = pytest.mark.anyio
UVLOOP = ("asyncio", {"loop_factory": uvloop.new_event_loop})


@pytest.fixture
def no_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Play a kernel without pidfd_open (Linux < 5.3), as trio's tests do."""
    monkeypatch.setattr(pidfd, "supported", False)


async def _start_join(**kwargs: Any) -> AsyncProcess:
    p = AsyncProcess(target=targets.exit_with, args=(2,), **kwargs)
    p.start()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 2
    return p


# -- automatic choice ---------------------------------------------------------


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
async def test_automatic_choice_is_pidfd_when_supported(context: str) -> None:
    assert aioproc.get_watcher() is None
    p = await _start_join(context=context)
    assert p.watcher == "pidfd"


@FORK_THREAD_WARNING
@pytest.mark.usefixtures("no_pidfd")
@pytest.mark.parametrize(
    ("anyio_backend", "context", "expected"),
    [
        ("asyncio", "fork", "sigchld"),
        ("asyncio", "spawn", "sigchld"),
        ("asyncio", "forkserver", "sentinel"),
        (UVLOOP, "fork", "thread"),
        (UVLOOP, "spawn", "thread"),
        (UVLOOP, "forkserver", "sentinel"),
        ("trio", "fork", "sigchld"),
        ("trio", "forkserver", "sentinel"),
    ],
    ids=[
        "asyncio-fork",
        "asyncio-spawn",
        "asyncio-forkserver",
        "uvloop-fork",
        "uvloop-spawn",
        "uvloop-forkserver",
        "trio-fork",
        "trio-forkserver",
    ],
)
async def test_automatic_fallback_without_pidfd(context: str, expected: str) -> None:
    p = await _start_join(context=context)
    assert p.watcher == expected


@FORK_THREAD_WARNING
@pytest.mark.usefixtures("no_pidfd")
async def test_automatic_fallback_off_the_main_thread() -> None:
    """Off the main thread no SIGCHLD handler can be installed: thread watcher."""
    result: dict[str, Any] = {}

    def in_thread() -> None:
        async def main() -> None:
            p = await _start_join(context="fork")
            result["watcher"] = p.watcher

        anyio.run(main)

    t = threading.Thread(target=in_thread)
    t.start()
    await anyio.to_thread.run_sync(t.join)
    assert result == {"watcher": "thread"}


@FORK_THREAD_WARNING
@pytest.mark.usefixtures("no_pidfd")
def test_sigchld_chosen_outside_a_loop_moves_to_thread_under_uvloop() -> None:
    p = AsyncProcess(target=targets.sleep, args=(0.5,))
    p.start()  # no loop running: sigchld is chosen
    chosen = p.watcher
    assert chosen == "sigchld"

    async def main() -> int | None:
        return await p.join()

    assert anyio.run(main, backend="asyncio", backend_options=UVLOOP[1]) == 0
    assert p.watcher == "thread"


def test_pidfd_refused_by_a_sandbox_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """pidfd_open refused (seccomp: EPERM) after the probe said yes: next watcher."""
    real = os.pidfd_open

    def refuse(pid: int, flags: int = 0) -> int:
        if pid != os.getpid():
            raise PermissionError(1, "Operation not permitted")
        return real(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", refuse)
    monkeypatch.setattr(pidfd, "supported", None)
    monkeypatch.setattr(_popen, "child_pidfds_work", False)  # as in a fresh process

    async def main() -> AsyncProcess:
        return await _start_join(context="fork")

    p = anyio.run(main)
    assert p.watcher == "sigchld"
    assert pidfd.supported is False


# -- forcing one --------------------------------------------------------------


async def test_forced_watcher_is_used(watcher: str) -> None:
    assert aioproc.get_watcher() == watcher
    p = await _start_join()
    assert p.watcher == watcher


@pytest.mark.parametrize("anyio_backend", [UVLOOP], ids=["uvloop"])
async def test_sigchld_forced_under_uvloop_is_refused() -> None:
    aioproc.set_watcher("sigchld")
    p = AsyncProcess(target=targets.noop)
    with pytest.raises(WatcherUnavailable, match="uvloop's libuv owns SIGCHLD"):
        p.start()
    assert p.pid is None  # refused before anything was started
    assert not p.is_alive()


@pytest.mark.parametrize("context", ["forkserver"])
async def test_sigchld_forced_for_forkserver_is_refused(context: str) -> None:
    aioproc.set_watcher("sigchld")
    p = AsyncProcess(target=targets.noop, context=context)
    with pytest.raises(WatcherUnavailable, match="forkserver child belongs to the fork server"):
        p.start()
    assert p.pid is None


async def test_sigchld_forced_off_the_main_thread_is_refused() -> None:
    aioproc.set_watcher("sigchld")
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            AsyncProcess(target=targets.noop).start()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=in_thread)
    t.start()
    await anyio.to_thread.run_sync(t.join)
    assert len(errors) == 1
    assert isinstance(errors[0], WatcherUnavailable)
    assert "only the main thread" in str(errors[0])


@FORK_THREAD_WARNING
@pytest.mark.usefixtures("no_pidfd")
def test_forced_sigchld_joined_under_uvloop_is_refused_then_joinable_elsewhere() -> None:
    aioproc.set_watcher("sigchld")
    p = AsyncProcess(target=targets.sleep, args=(0.5,))
    p.start()

    async def main() -> int | None:
        return await p.join()

    with pytest.raises(WatcherUnavailable, match="uvloop"):
        anyio.run(main, backend="asyncio", backend_options=UVLOOP[1])
    assert anyio.run(main) == 0  # the child was not lost


@pytest.mark.usefixtures("no_pidfd")
def test_pidfd_forced_without_kernel_support_is_refused() -> None:
    with pytest.raises(WatcherUnavailable, match="pidfd_open"):
        aioproc.set_watcher("pidfd")
    assert aioproc.get_watcher() is None


def test_set_watcher_rejects_bad_names() -> None:
    with pytest.raises(ValueError, match="unknown watcher 'kqueue'"):
        aioproc.set_watcher("kqueue")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="watcher name"):
        aioproc.set_watcher(3)  # type: ignore[arg-type]
    assert aioproc.get_watcher() is None


@pytest.mark.parametrize("name", ["pidfd", "sigchld", "sentinel", "thread"])
def test_environment_variable_sets_the_default(name: str) -> None:
    script = (
        "import anyio, aioproc\n"
        "def f(): pass\n"
        "async def main():\n"
        "    p = aioproc.AsyncProcess(target=f); p.start(); await p.join()\n"
        "    print(aioproc.get_watcher(), p.watcher)\n"
        "if __name__ == '__main__': anyio.run(main)\n"
    )
    env = {**os.environ, "AIOPROC_WATCHER": name}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [name, name]


def test_environment_variable_with_a_bad_name_is_a_clear_error() -> None:
    script = "import aioproc; aioproc.AsyncProcess(target=print).start()"
    env = {**os.environ, "AIOPROC_WATCHER": "epoll"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "$AIOPROC_WATCHER got unknown watcher 'epoll'" in out.stderr


# -- sigchld: one handler, installed while needed, never reaping others --------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_sigchld_handler_installed_only_while_watching() -> None:
    aioproc.set_watcher("sigchld")
    calls: list[int] = []

    def user_handler(signum: int, frame: Any) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGCHLD, user_handler)
    try:
        ours, theirs = multiprocessing.Pipe()
        p = AsyncProcess(target=targets.ready_then_exit, args=(theirs, 0))
        p.start()
        theirs.close()
        assert await handshake(ours) == "ready"
        assert signal.getsignal(signal.SIGCHLD) is user_handler  # not before a join
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(p.join)
                await anyio.wait_all_tasks_blocked()
                assert signal.getsignal(signal.SIGCHLD) is sigchld._on_sigchld
                ours.send("go")
        ours.close()
        assert p.exitcode == 0
        assert signal.getsignal(signal.SIGCHLD) is user_handler  # put back
        assert calls  # and the user's handler saw the SIGCHLD too
        assert not sigchld._hubs
    finally:
        signal.signal(signal.SIGCHLD, previous)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_sigchld_many_children_few_signals() -> None:
    """Coalesced SIGCHLDs: 300 children released at once, all joined, none missed."""
    aioproc.set_watcher("sigchld")
    n = 300
    r, w = os.pipe()
    procs = [AsyncProcess(target=targets.wait_for_eof, args=(r, w)) for _ in range(n)]
    try:
        for p in procs:
            p.start()
    finally:
        os.close(r)
    signals_seen: list[int] = []

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for p in procs:
                tg.start_soon(p.join)
            await anyio.wait_all_tasks_blocked()  # every joiner is waiting
            signals_seen.append(sigchld.watched_signal_count())
            os.close(w)
            while any(p.exitcode is None for p in procs):
                signals_seen.append(sigchld.watched_signal_count())
                await anyio.sleep(0.01)
    assert [p.exitcode for p in procs] == [0] * n
    assert max(signals_seen) <= n


# -- thread: one thread per child at most -------------------------------------


@FORK_THREAD_WARNING
async def test_thread_watcher_uses_one_thread_per_child_however_often_cancelled() -> None:
    aioproc.set_watcher("thread")
    p = AsyncProcess(target=targets.sleep, args=(30,))
    p.start()
    for _ in range(5):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(p.join)
            await anyio.wait_all_tasks_blocked()  # every join waits
            tg.cancel_scope.cancel()
    waiting = [t for t in threading.enumerate() if t.name == f"aioproc-wait-{p.pid}"]
    assert len(waiting) == 1
    p.kill()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == -signal.SIGKILL
    assert not waiting[0].is_alive()
    # Counted by name: trio's guest mode (the anyio plugin's) runs an I/O thread of
    # its own while the loop waits, which comes and goes.
    assert [t.name for t in threading.enumerate() if t.name.startswith("aioproc")] == []


# -- sentinel: its limit ------------------------------------------------------


async def test_sentinel_for_forkserver_is_not_delayed_by_a_grandchild() -> None:
    """The fork server writes the exit code itself: no pipe for a grandchild to hold."""
    aioproc.set_watcher("sentinel")
    from .helpers import killed_afterwards, pid_exists

    ours, theirs = multiprocessing.Pipe()
    p = AsyncProcess(
        target=targets.fork_grandchild_then_exit, args=(theirs, 30), context="forkserver"
    )
    p.start()
    with anyio.fail_after(DEADLINE):
        await anyio.wait_readable(ours.fileno())
    grandchild = ours.recv()
    with killed_afterwards(grandchild):
        ours.send("exit")
        with anyio.fail_after(5):
            assert await p.join() == 0
        assert pid_exists(grandchild)
