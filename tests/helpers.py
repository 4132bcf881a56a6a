"""Helpers for tests: the kernel's view of our children and descriptors."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing import forkserver, resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

#: Seconds after which a wait that should end promptly is a hang (a guard, not a timing).
DEADLINE = 30


def children_of_this_process() -> set[int]:
    """Pids of every live or zombie child of this process, from /proc."""
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def fork_server_and_helpers() -> set[int]:
    """Long-lived children multiprocessing keeps on purpose."""
    pids = set()
    server_pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server_pid:
        pids.add(server_pid)
    tracker_pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    if tracker_pid:
        pids.add(tracker_pid)
    return pids


def open_fds() -> set[int]:
    """This process's open descriptors (not the one used to list them)."""
    listed = {int(fd) for fd in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.get_inheritable(fd)
    except OSError:
        return False
    return True


def fork_server_fd() -> set[int]:
    """What this process keeps once it has started a forkserver child: the pipe
    multiprocessing keeps to its fork server (renewed with the server), and the
    pidfd of this process that aioproc sends to every forkserver child."""
    from aioproc import _popen

    fds = {getattr(forkserver._forkserver, "_forkserver_alive_fd", None), _popen._own_pidfd}
    return {fd for fd in fds if fd is not None and fd >= 0}


def pid_exists(pid: int) -> bool:
    """Whether *pid* names a process that has not been reaped (zombies count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def state_of(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat (Z for a zombie), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def parent_of(pid: int) -> int | None:
    """The parent pid of *pid*, from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def killed_afterwards(pid: int) -> Iterator[None]:
    """Make sure a process that is not our child (a grandchild) is gone afterwards."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        fd = None
        with contextlib.suppress(ProcessLookupError):
            fd = os.pidfd_open(pid)
        if fd is not None:
            import select

            select.select([fd], [], [], 10)
            os.close(fd)


def skip_if_sig_ign_replaces_sigchld(watcher: str, freed_by: str) -> None:
    """The sigchld watcher cannot see SIG_IGN set while it waits: skip that case."""
    import pytest

    if freed_by == "sig_ign" and watcher == "sigchld":
        pytest.skip(
            "SIG_IGN set while the sigchld watcher's handler waits replaces that handler "
            "(test_sigchld_neighbours.py covers SIG_IGN with the sigchld watcher)"
        )


async def run_reporting_pid(fifos: Fifos, value: Any, context: str, outcome: list[Any]) -> None:
    """``aioproc.run`` a child that reports its pid on *fifos*, then returns *value*.

    Appends the value, or the ``ExitStatusLost`` raised instead, to *outcome*.
    """
    import aioproc

    from . import targets

    try:
        outcome.append(
            await aioproc.run(
                targets.report_pid_then_return,
                fifos.ready_path,
                fifos.go_path,
                value,
                context=context,
            )
        )
    except aioproc.ExitStatusLost as exc:
        outcome.append(exc)


# -- a child that survives SIGKILL, and orphans -------------------------------------

# A tracer that holds a process in its PTRACE_EVENT_EXIT stop: once SIGKILL
# arrives, the process is dying but not dead (not reaped, its pidfd not readable)
# for as long as the tracer wants, which is what a process stuck in the kernel
# looks like to its parent.  Stops before that (SIGTERM) are passed on.  It
# lets go when its stdin closes.

_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


@contextlib.contextmanager
def reaping_orphans(deadline: float = 30.0) -> Iterator[None]:
    """Adopt and reap the orphans of the scripts a test runs (their fork server...).

    PID 1 of some containers never reaps, so an orphan would stay a zombie
    for good.  Inside the block this process is a child subreaper; at the end it
    waits for every child that appeared meanwhile, killing it after *deadline*.
    """
    import time

    before = children_of_this_process()
    _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(False)
        end = time.monotonic() + deadline
        while left := children_of_this_process() - before:
            for pid in left:
                if time.monotonic() > end:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)


def rss_bytes() -> int:
    """This process's resident set size, from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def has_zombie_child() -> bool:
    """Whether some child of this process has exited and not been reaped."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


@contextlib.contextmanager
def only_free_fds(free: int) -> Iterator[list[int]]:
    """Leave exactly *free* descriptor numbers available to this process.

    Lowers the soft RLIMIT_NOFILE just above the highest open descriptor and
    fills every hole below it with /dev/null, then frees *free* of them.  The
    filler descriptors are yielded (a test may close more) and closed on exit;
    the limit is restored.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 1 + free, hard))
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        for _ in range(free):
            os.close(fillers.pop())
        yield fillers
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- strangers at freed pids ---------------------------------------------------------

SCRIPTS = Path(__file__).resolve().parent / "scripts"
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def why_pids_cannot_be_chosen() -> str | None:
    """Why this test run cannot choose the next pid (None: it can)."""
    if not os.path.exists(NS_LAST_PID):
        return f"{NS_LAST_PID} is missing (not Linux, or a kernel without it)"
    if not os.access(NS_LAST_PID, os.W_OK):
        return f"{NS_LAST_PID} is not writable here (it needs root in this pid namespace)"
    return None


def signals_pending(pid: int) -> set[signal.Signals]:
    """Signals sent to *pid* and not yet delivered (it blocks them), from /proc."""
    mask = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigPnd", "ShdPnd"):
                mask |= int(value, 16)
    return {signal.Signals(n) for n in range(1, 65) if mask >> (n - 1) & 1}


class Stranger:
    """A process of the test's own that holds a pid freed behind aioproc's back.

    Not a child of the test; it leads its own process group; it blocks every
    signal, so whatever reaches it shows as pending (see ``scripts/stranger_maker.py``).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def touched(self) -> str | None:
        """What reached this process, if anything (None: untouched and alive)."""
        state = state_of(self.pid)
        if state in (None, "Z", "X"):
            return f"the stranger at pid {self.pid} was killed (state {state})"
        pending = signals_pending(self.pid)
        if pending:
            names = ", ".join(sorted(s.name for s in pending))
            return f"the stranger at pid {self.pid} was sent {names}"
        return None


class StrangerMaker:
    """A helper process that forks a ``Stranger`` at a freed pid on request."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self._proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "stranger_maker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the stranger maker did not start: {line!r}")

    def place(self, pid: int) -> Stranger | None:
        """A stranger at *pid*, which must be free; None if another process took it."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(f"place {pid}\n")
        stdin.flush()
        answer, _ = stdout.readline().split()
        return Stranger(pid) if answer == "placed" else None

    def close(self) -> None:
        """Kill every stranger, and end and reap the helper."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.close()
        try:
            self._proc.wait(60)
        except Exception:
            self._proc.kill()
            self._proc.wait()
        stdout.close()


def wait_until_gone(pid: int, deadline: float = DEADLINE) -> None:
    """Block until *pid* names no process (it was reaped); a hang guard only."""
    import time

    end = time.monotonic() + deadline
    while pid_exists(pid):
        if time.monotonic() > end:
            raise TimeoutError(f"pid {pid} still exists after {deadline} s")
        time.sleep(0.0005)


def why_not_joined(p: Any) -> str:
    """What the kernel says about a child whose join did not return: its state and
    signal masks, and which process the handle's pidfd names (for the failure message)."""
    facts: list[str] = []
    pid = p.pid
    try:
        with open(f"/proc/{pid}/status") as f:
            wanted = ("State", "SigQ", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
            facts += [line.strip() for line in f if line.startswith(wanted)]
    except OSError as exc:
        facts.append(f"/proc/{pid}/status: {exc}")
    child = getattr(p, "_child", None)
    for name, fd in (("pidfd", getattr(child, "pidfd", -1)), ("sentinel", p.sentinel)):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                named = [line.strip() for line in f if line.startswith("Pid:")]
            facts.append(f"{name} {fd}: {named[0] if named else 'not a pidfd'}")
        except OSError as exc:
            facts.append(f"{name} {fd}: {exc}")
    return f"pid {pid}: " + "; ".join(facts)


async def joined(p: Any, deadline: float = DEADLINE) -> int | None:
    """``await p.join()``; a join that hangs fails with what the kernel says about the child."""
    import anyio

    with anyio.move_on_after(deadline):
        return await p.join()  # type: ignore[no-any-return]
    raise AssertionError(f"join() did not return within {deadline} s: {why_not_joined(p)}")


async def warmed_up(context: str) -> None:
    """Start and join one child with *context*, so that what a process sets up once
    for its children (the fork server, the resource tracker, and the pidfd that
    shows that children's pidfds work here) is not counted as a test's."""
    from aioproc import AsyncProcess

    from . import targets

    p = AsyncProcess(target=targets.noop, context=context)
    p.start()
    assert await joined(p) == 0
    p.close()


# -- handshakes --------------------------------------------------------------------


async def handshake(conn: Connection, deadline: float = DEADLINE) -> Any:
    """The next message from a child (its "ready", its pid), awaited without blocking the loop."""
    import anyio

    with anyio.fail_after(deadline):
        await anyio.wait_readable(conn.fileno())
    return conn.recv()


class Fifos:
    """Two named pipes for a child that cannot be handed a Connection (``aioproc.run``).

    The child writes a line into ``ready_path`` and waits for one on ``go_path``
    (see ``targets.report_pid_then_return``).  Both ends are opened here first,
    so that the child's opens never block.
    """

    def __init__(self, directory: Path) -> None:
        self.ready_path = str(directory / "ready")
        self.go_path = str(directory / "go")
        os.mkfifo(self.ready_path)
        os.mkfifo(self.go_path)
        self._ready = os.open(self.ready_path, os.O_RDONLY | os.O_NONBLOCK)
        self._go = os.open(self.go_path, os.O_RDWR)
        self._buffer = b""

    async def ready(self, deadline: float = DEADLINE) -> str:
        """The child's line (without the newline)."""
        import anyio

        with anyio.fail_after(deadline):
            while b"\n" not in self._buffer:
                await anyio.wait_readable(self._ready)
                try:
                    data = os.read(self._ready, 4096)
                except BlockingIOError:
                    continue
                if not data:  # no writer (yet, or any more): poll says readable
                    await anyio.sleep(0.01)
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def go(self) -> None:
        os.write(self._go, b"go\n")

    def close(self) -> None:
        os.close(self._ready)
        os.close(self._go)


# -- a child's status taken behind aioproc's back ----------------------------------


@contextlib.contextmanager
def sigchld_ignored(on: bool) -> Iterator[None]:
    """SIGCHLD set to SIG_IGN inside the block (if *on*): the kernel reaps our children."""
    if not on:
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def free_the_pid(pid: int, freed_by: str) -> None:
    """Block until the exited child's pid is free, taken as *freed_by* says."""
    if freed_by == "waitpid-any":
        assert os.waitpid(-1, 0)[0] == pid  # the only child that exits meanwhile
    elif freed_by == "waitpid":
        assert os.waitpid(pid, 0)[0] == pid
    else:  # the kernel (SIG_IGN) or the fork server reaps it
        wait_until_gone(pid)


# -- a child that survives SIGKILL ------------------------------------------------


class Tracer:
    """Holds a process in its exit stop: SIGKILL cannot finish it until released."""

    def __init__(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "tracer.py"), str(pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.readline()
        if first.startswith("error"):
            self.proc.wait()
            import pytest

            pytest.skip(f"ptrace is not permitted here ({first.strip()})")
        assert first == "seized\n"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        assert ready, "the tracer did not answer"
        return self.proc.stdout.readline()

    def release(self) -> None:
        self.proc.communicate(timeout=DEADLINE)  # closes its stdin: it lets go and exits


def stopped_by_sigterm(head: str, grace: float = 1.0) -> set[str]:
    """The messages of a timeout whose child ended by SIGTERM, after *head*.

    On a loaded machine its exit may be seen only after the grace period: then
    SIGKILL was sent too (to no effect), and the message says so.
    """
    return {
        f"{head}it was sent SIGTERM and reaped (exit code -15)",
        f"{head}it was sent SIGTERM, then SIGKILL after the {grace:g} s grace period, and "
        "reaped (exit code -15)",
    }
