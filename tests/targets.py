"""Functions that run in child processes (module level, so spawn can pickle them)."""

from __future__ import annotations

import ctypes
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any


def noop() -> None:
    pass


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def exit_with(code: int) -> None:
    sys.exit(code)


def hard_exit(code: int) -> None:
    os._exit(code)


def raise_error() -> None:
    raise RuntimeError("boom from the child")


def segfault() -> None:
    faulthandler.disable()  # pytest enables it; a real crash needs no traceback
    ctypes.string_at(0)


def kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(10)


def ready_then_sleep(conn: Connection, seconds: float) -> None:
    conn.send("ready")
    conn.close()
    time.sleep(seconds)


def sleep_interruptibly(seconds: float) -> None:
    """Sleep in short steps, so that a KeyboardInterrupt is raised within one step.

    A SIGINT that arrives after the interpreter last checked for signals and
    before ``time.sleep`` entered the kernel only raises once that sleep ends:
    CPython does not look for pending signals before it sleeps.  A child that
    is preempted right after its "ready" (the parent it woke takes the CPU,
    as on a busy machine) meets exactly that window: with one long sleep, 1 in
    500 such children stayed asleep for the whole sleep (measured here with a
    niced child on one CPU).
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)


def ready_then_wait_for_sigint(conn: Connection) -> None:
    """Exit 42 if SIGINT raises KeyboardInterrupt, as in a fresh interpreter."""
    try:
        conn.send("ready")
        sleep_interruptibly(60)  # longer than the test's deadline: alive if a hang is examined
    except KeyboardInterrupt:
        os._exit(42)
    os._exit(1)


def ignore_sigterm_then_sleep(conn: Connection, seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send("ready")
    time.sleep(seconds)


def fork_grandchild_then_exit(conn: Connection, seconds: float) -> None:
    """Fork a grandchild that inherits every fd and outlives us; report its pid.

    Exits when told to, so that the parent can be joining already.
    """
    pid = os.fork()
    if pid == 0:
        time.sleep(seconds)
        os._exit(0)
    conn.send(pid)
    conn.recv()


def send_name(conn: Connection) -> None:
    import multiprocessing

    conn.send(multiprocessing.current_process().name)


def start_nested_and_send_names(conn: Connection) -> None:
    import anyio

    from aioproc import AsyncProcess

    async def main() -> None:
        p = AsyncProcess(target=noop)
        p.start()
        code = await p.join()
        conn.send((p.name, code))

    anyio.run(main)


def send_value(conn: Connection, value: object) -> None:
    conn.send(value)


def run_asyncio_loop() -> None:
    import asyncio

    async def main() -> int:
        await asyncio.sleep(0)
        return 7

    sys.exit(asyncio.run(main()))


def run_anyio_loop(backend: str) -> None:
    import anyio

    async def main() -> int:
        await anyio.lowlevel.checkpoint()
        return 8

    sys.exit(anyio.run(main, backend=backend))


def run_trio_loop() -> None:
    import trio

    async def main() -> int:
        await trio.lowlevel.checkpoint()
        return 9

    sys.exit(trio.run(main))


def join_self() -> None:
    """Exit 3 if joining the current process raises RuntimeError."""
    import multiprocessing

    import anyio

    me = multiprocessing.current_process()

    async def main() -> None:
        await me.join()  # type: ignore[func-returns-value,misc]

    try:
        anyio.run(main)
    except RuntimeError:
        os._exit(3)
    os._exit(1)


def start_child_from_daemon() -> None:
    """Exit 4 if a daemonic process is refused a child of its own."""
    from aioproc import AsyncProcess

    try:
        AsyncProcess(target=noop).start()
    except RuntimeError:
        os._exit(4)
    os._exit(1)


def wait_for_eof(read_fd: int, write_fd: int) -> None:
    """Let go of the barrier's write end, then wait until the parent releases it."""
    os.close(write_fd)
    os.read(read_fd, 1)


# -- for aioproc.run -------------------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


def describe(*objects: object) -> str:
    return repr(objects)


def greet(name: str, *, punctuation: str = ".") -> str:
    return f"hello {name}{punctuation}"


def getpid() -> int:
    return os.getpid()


def sleep_and_return(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def send_pid_then_sleep(conn: Connection, seconds: float) -> None:
    conn.send(os.getpid())
    time.sleep(seconds)


def ignore_sigterm_send_pid_then_sleep(conn: Connection, seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send(os.getpid())
    time.sleep(seconds)


def pattern(size: int) -> bytes:
    """*size* bytes that are not all alike, so that a shifted copy would not compare equal."""
    block = bytes(range(256)) * 4096  # 1 MiB
    return (block * (size // len(block) + 1))[:size]


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_chained() -> None:
    table: dict[str, int] = {}
    try:
        table["missing"]
    except KeyError as exc:
        raise RuntimeError("lookup failed") from exc


class CarriesData(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def raise_with_data() -> None:
    err = CarriesData("with data", 42)
    if sys.version_info >= (3, 11):
        err.add_note("a note from the child")
    raise err


class HoldsALock(Exception):
    """Cannot be pickled: it carries a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        import threading

        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise HoldsALock("locked in")


def _refuse_to_rebuild(message: str) -> Exception:
    raise TypeError(f"cannot rebuild {message!r} here")


class NeedsTwoArguments(Exception):
    """Pickles, but cannot be unpickled: rebuilding it raises.

    (Not by leaving out a constructor argument: importing ``distributed``
    installs tblib's exception pickling, which would rebuild that one.)
    """

    def __init__(self, message: str, extra: int) -> None:
        super().__init__(message)
        self.extra = extra

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_refuse_to_rebuild, (str(self),))


def raise_unloadable() -> None:
    raise NeedsTwoArguments("half of it", 2)


def return_lock() -> object:
    import threading

    return threading.Lock()


def exit_via_sys_exit(code: int) -> None:
    sys.exit(code)


def _refuse_to_load() -> None:
    raise ImportError("this object cannot be rebuilt in the child")


class LoadsOnlyInTheParent:
    """Pickles in the parent; unpickling it (in the child) raises."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_refuse_to_load, ())


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _limit_address_space(headroom: int) -> None:
    import resource

    limit = _vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def allocate_beyond_rlimit_as() -> int:
    """Under RLIMIT_AS, ask for 1 GiB more than allowed: MemoryError."""
    _limit_address_space(64 << 20)
    data = bytearray(1 << 30)
    return len(data)


def run_out_of_memory_then_wait(conn: Connection) -> None:
    """Exhaust RLIMIT_AS, keep what was allocated, report, and wait to be killed.

    What the out-of-memory killer meets: a process that has taken all the
    memory it may have.  The test then plays the killer's part (SIGKILL).
    """
    _limit_address_space(64 << 20)
    hoard = []
    try:
        while True:
            hoard.append(bytearray(1 << 20))
    except MemoryError:
        hoard.pop()  # room to report
        conn.send((os.getpid(), len(hoard)))
    time.sleep(60)


def _rebuild_only_in_a_child() -> object:
    import multiprocessing

    if multiprocessing.parent_process() is None:
        raise ImportError("this object cannot be rebuilt in the parent")
    return object()


class LoadsOnlyInAChild:
    """Pickles anywhere; unpickling it in the top-level process raises."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_rebuild_only_in_a_child, ())


def return_loads_only_in_a_child() -> LoadsOnlyInAChild:
    return LoadsOnlyInAChild()


def sleep_then_exit(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)


def churn_code(i: int) -> int:
    """The exit code child *i* of a churn ends with (negative: killed by that signal)."""
    if i % 97 == 0:
        return -signal.SIGKILL
    return i % 200


def churn(i: int) -> None:
    """Exit as churn_code(i) says, through each way a child can end."""
    code = churn_code(i)
    if code < 0:
        os.kill(os.getpid(), -code)
    if i % 2:
        os._exit(code)
    sys.exit(code)


def exit_after_barrier(read_fd: int, write_fd: int, code: int) -> None:
    """Let go of the barrier's write end, wait until every holder has, then exit."""
    os.close(write_fd)
    os.read(read_fd, 1)
    os._exit(code)


def ready_then_crash(conn: Connection, how: str) -> None:
    """Report ready, wait for the word, then die as *how* says."""
    conn.send("ready")
    conn.recv()
    if how == "segfault":
        segfault()
    elif how == "abort":
        faulthandler.disable()
        os.abort()
    os._exit(99)


def describe_fd(fd: int) -> str:
    """What *fd* refers to: 'pipe:[123]', or 'pidfd of 456' (the process it names)."""
    what = os.readlink(f"/proc/self/fd/{fd}")
    if what == "anon_inode:[pidfd]":
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return f"pidfd of {line.split()[1]}"
    return what


def send_open_descriptors(conn: Connection) -> None:
    """Send what each open descriptor refers to (see ``describe_fd``)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = describe_fd(int(name))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    conn.send(fds)
    conn.close()


def allocate_and_burn(mib: int, cpu_seconds: float) -> None:
    """Make *mib* MiB resident, then spin until *cpu_seconds* of user CPU are spent."""
    block = b"\x01" * (mib << 20)  # written, hence resident
    while os.times().user < cpu_seconds:
        pass
    del block


def exit_with_length(data: bytes) -> None:
    """Exit with the payload's length in MiB: proof that all of it arrived."""
    sys.exit(len(data) >> 20)


# -- process trees ---------------------------------------------------------------


def start_grandchild(ignore_sigterm: bool = False) -> int:
    """Start ``sleep 1000`` in the background (ignoring SIGTERM if asked); its pid."""
    import subprocess

    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited through exec
    return subprocess.Popen(["sleep", "1000"]).pid


def grandchild_then_sleep(conn: Connection, ignore_sigterm: bool) -> None:
    """Start a grandchild, send its pid, and sleep; SIGINT exits at once."""
    try:
        conn.send(start_grandchild(ignore_sigterm))
        conn.close()
        sleep_interruptibly(60)
    except KeyboardInterrupt:
        os._exit(3)


def grandchild_to_file(path: str, ignore_sigterm: bool, then_sleep: float) -> int:
    """Start a grandchild, write its pid to *path*, sleep; return its pid."""
    pid = start_grandchild(ignore_sigterm)
    with open(path, "w") as f:
        f.write(str(pid))
    time.sleep(then_sleep)
    return pid


def print_pid_then_sleep(tag: str, seconds: float) -> None:
    print(tag, os.getpid(), flush=True)
    time.sleep(seconds)


def reuse_and_drop_siblings(conn: Connection, siblings: list[Any]) -> None:
    """In a fork child: reuse the parent's closed descriptors, then drop the siblings.

    The siblings are dropped as the garbage collector would, and signalling
    one is refused (only the parent knows its pid is still its).  Sends
    whether every descriptor opened here survived.
    """
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(3 * len(siblings) + 8)]
    for p in siblings:
        child = p._child
        child._close_watch()  # what their __del__ would do
        child.__del__()
    try:
        siblings[0].terminate()
    except RuntimeError as exc:
        if "child of this process" not in str(exc):
            raise
    alive = []
    for fd in opened:
        try:
            os.fstat(fd)
        except OSError:
            alive.append(False)
        else:
            alive.append(True)
    conn.send(all(alive))
    conn.close()


def ready_then_exit(conn: Connection, code: int) -> None:
    """Report ready, wait for the word, then exit with *code*."""
    conn.send("ready")
    conn.recv()
    os._exit(code)


def report_pid_then_return(ready_path: str, go_path: str, value: object) -> object:
    """Write our pid into the fifo *ready_path*, wait for a line on *go_path*, return *value*."""
    with open(ready_path, "w") as ready:
        ready.write(f"{os.getpid()}\n")
    with open(go_path) as go:
        go.readline()
    return value


def send_dispositions(conn: Connection, signums: list[int]) -> None:
    """Send what each signal's disposition is here: 'default', 'ignore' or 'handler'."""
    names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignore"}
    conn.send({n: names.get(signal.getsignal(n), "handler") for n in signums})  # type: ignore[call-overload]
    conn.close()


def report_parent(conn: Connection, after_go: bool = False) -> None:
    """Send what ``parent_process()`` says, and whether its sentinel is readable now
    (*after_go*: once the parent has said "go")."""
    if after_go:
        conn.recv()
    parent = multiprocessing.parent_process()
    assert parent is not None
    waiting = multiprocessing.connection.wait([parent.sentinel], timeout=0)
    conn.send((parent.pid, bool(waiting), parent.is_alive()))
    conn.close()


def outlive_parent(conn: Connection, context: str) -> None:
    """Start a grandchild that reports when this process has died; then sleep."""
    from aioproc import AsyncProcess

    g = AsyncProcess(target=_report_parent_death, args=(conn,), context=context)
    g.start()
    conn.send(("started", g.pid))
    time.sleep(60)


def _report_parent_death(conn: Connection) -> None:
    parent = multiprocessing.parent_process()
    assert parent is not None
    conn.send(("waiting", parent.pid))
    gone = multiprocessing.connection.wait([parent.sentinel], timeout=30)
    conn.send(("parent gone", bool(gone), parent.is_alive()))


class AfterForkProbe:
    """Registered by a test's parent with ``multiprocessing.util.register_after_fork``."""

    hooked_in: int | None = None

    def hook(self) -> None:
        self.hooked_in = os.getpid()


def parents_finalizer() -> None:
    """A finalizer a test's parent registers (and cancels): it must not run in a child."""


def send_after_fork_state(conn: Connection, probe: AfterForkProbe) -> None:
    """Send whether the parent's after-fork hook ran on *probe* here, and the finalizers
    registered here."""
    conn.send(
        {
            "hooked here": probe.hooked_in == os.getpid(),
            "finalizers": sorted(
                getattr(f._callback, "__name__", "?")
                for f in multiprocessing.util._finalizer_registry.values()  # type: ignore[attr-defined]
            ),
        }
    )
    conn.close()


def send_loop_state(conn: Connection) -> None:
    """Send what this child can see of an event loop, from plain synchronous code."""
    import asyncio

    import anyio.from_thread
    import sniffio
    import trio

    seen: dict[str, object] = {}
    try:
        seen["sniffio"] = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        seen["sniffio"] = None
    # The policy's loop (what get_event_loop() would hand out), without making one.
    local = asyncio.get_event_loop_policy()._local  # type: ignore[attr-defined]
    seen["policy loop"] = local.__dict__.get("_loop")
    try:
        seen["trio task"] = repr(trio.lowlevel.current_task())
    except RuntimeError:
        seen["trio task"] = None
    try:
        anyio.from_thread.check_cancelled()  # needs a worker thread's token
    except RuntimeError:
        seen["anyio token"] = None
    else:
        seen["anyio token"] = "the parent's"
    conn.send({key: None if value is None else repr(value) for key, value in seen.items()})
    conn.close()


def send_loaded(conn: Connection, names: list[str]) -> None:
    """Send which of the modules *names* this process has imported."""
    conn.send(sorted(set(names) & sys.modules.keys()))
    conn.close()


def _a_handler(signum: int, frame: object) -> None:
    pass


def send_dispositions_of_a_fork_child(conn: Connection, signums: list[int]) -> None:
    """Handle *signums* here, then start a fork child that sends its dispositions."""
    import asyncio

    from aioproc import AsyncProcess

    for signum in signums:
        signal.signal(signum, _a_handler)

    async def start_and_join() -> int | None:
        p = AsyncProcess(target=send_dispositions, args=(conn, signums), context="fork")
        p.start()
        code = await p.join()
        p.close()
        return code

    sys.exit(asyncio.run(start_and_join()))


def say_sigterm_on_fifo(path: str) -> None:
    """Say ``ready`` on the FIFO at *path*, then ``sigterm`` and exit 0 when one comes."""
    fd = os.open(path, os.O_WRONLY)

    def on_sigterm(signum: int, frame: object) -> None:
        os.write(fd, b"sigterm\n")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    os.write(fd, b"ready\n")
    time.sleep(60)


def close_every_descriptor_then_sleep(conn: Connection, seconds: float) -> None:
    """Close every inherited descriptor but *conn*'s, say ``ready``, close *conn*, sleep."""
    keep = conn.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)
    conn.send("ready")
    conn.close()
    time.sleep(seconds)
