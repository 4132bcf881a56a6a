"""Scenario 6: how many sleeping children one event loop holds, and what start() costs.

Children that block on one barrier pile up; at each checkpoint (so many live
children) a few more are started three ways, each timed alone: a bare
``os.fork``, the stdlib's ``multiprocessing.Process.start()`` and aioproc's
``start()``.  The stdlib's start polls every live child first (its
``_cleanup()``), and aioproc's children are in the same registry (so that
``multiprocessing.active_children()`` sees them), which is exactly the
situation of a program mixing the two.  At the top the barrier opens and one
loop joins every child.
"""

from __future__ import annotations

import errno
import json
import mmap
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from aioproc import AsyncProcess

from ._children import Barrier, stamp_and_exit, wait_on_fifo
from ._system import (
    mem_available_bytes,
    mem_total_bytes,
    open_fds,
    private_bytes,
    raise_fd_limit,
    rss_bytes,
)

if TYPE_CHECKING:
    from ._progress import Progress

#: Children whose private memory is read at the top (smaps_rollup is not free).
_MEMORY_SAMPLE = 20
#: The ramp stops while the machine still has this much memory available
#: (other people's work runs here too: the OOM killer must stay asleep).
#: A tenth is 2.3 GiB on a 24 GiB machine, many times what the kernel keeps
#: free for itself (``vm.min_free_kbytes``, tens of MiB).
_MEMORY_FLOOR = 0.10


#: The three ways a checkpoint starts a child.
_HOWS = ("fork", "stdlib", "aioproc")


#: Pages in each of the new-page probe's four mappings (16 MiB).
_PROBE_PAGES = 4096


def _faults() -> int:
    """Page faults this thread has taken (each write to a page shared with a child is one)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def new_page_cost() -> float:
    """Seconds a first write to a page of fresh memory costs now (4 x 16 MiB, a median).

    A copy-on-write fault takes a fresh page too.  On a virtual machine whose
    host backs guest memory lazily (and takes back what the guest frees), that
    cost jumps once the guest's recently used free memory runs out: here from
    about 1.4 to 10 µs a page (both the start()s' faults and this probe feel it).
    """
    page = mmap.PAGESIZE
    held = [mmap.mmap(-1, _PROBE_PAGES * page) for _ in range(4)]  # none reuses another's
    costs = []
    try:
        for m in held:
            t = time.perf_counter()
            for offset in range(0, _PROBE_PAGES * page, page):
                m[offset] = 1
            costs.append((time.perf_counter() - t) / _PROBE_PAGES)
    finally:
        for m in held:
            m.close()
    return sorted(costs)[1]


class _OutOfRoom(Exception):
    """The machine's memory ran low before the asked number of children."""


@dataclass
class ScaleResult:
    asked: int
    method: str = "fork"
    reached: int = 0
    watcher: str | None = None
    stopped_by: str | None = None
    fd_limit: int = 0
    #: Why RLIMIT_NOFILE could not be raised as far as asked (None: it was).
    fd_limit_note: str | None = None
    #: One point per checkpoint: live children, and the seconds each start took.
    curve: list[dict[str, Any]] = field(default_factory=list)
    #: Private memory of sampled sleeping children: "fork", "stdlib", "aioproc".
    private_bytes: dict[str, list[int]] = field(default_factory=dict)
    #: What each aioproc child added while only they were being started.
    parent_fds_per_child: float = 0.0
    parent_rss_per_child: float = 0.0
    mem_available_per_child: float = 0.0
    #: MemAvailable with every child of the ramp alive (at the last checkpoint).
    mem_available_at_top: int = 0
    ramp_seconds: float = 0.0
    join_seconds: float = 0.0
    #: Which process ramped up: "this" (the benchmark's) or "lean" (one that only ramps).
    parent: str = "this"
    #: Its resident size when the ramp began.
    parent_rss: int = 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_room(live: int, floor: float, fd_limit: int, samples: int) -> None:
    # Stop short of RLIMIT_NOFILE: a forkserver start that runs out of
    # descriptors half-way crashes the stdlib's fork server with all its children.
    # Room for the next 100 children (3 descriptors each at most) and for the
    # checkpoint that follows (3 ways, up to 3 each, 20 starts): without the
    # latter a forkserver ramp ran out at 6,600 children and lost its server.
    if open_fds() + 3 * 100 + 9 * samples + 64 > fd_limit:
        raise _OutOfRoom(
            f"stopped at {live} live children: the descriptor limit ({fd_limit}, "
            "RLIMIT_NOFILE, not raisable here) allows no more at 3 per child"
        )
    available = mem_available_bytes()
    if available < floor:
        raise _OutOfRoom(
            f"stopped at {live} live children: {available / 2**30:.1f} GiB of memory "
            f"left, less than {_MEMORY_FLOOR:.0%} of the machine's"
        )


def _sleeper_args(barrier: Barrier) -> tuple[Any, ...]:
    return (None, 0, barrier.ends, 0.0)


class _Sleep:
    """What the ramp's children wait on, by start method.

    Fork children wait on the barrier pipe they inherit.  Forkserver children
    inherit nothing from us: they wait on a FIFO, whose end we hold open
    (read-write, so that their opens never block) until the release.
    """

    def __init__(self, method: str, barrier: Barrier) -> None:
        self.method = method
        self.barrier = barrier
        self.fd = -1
        if method == "fork":
            self.target: Any = stamp_and_exit
            self.args: tuple[Any, ...] = _sleeper_args(barrier)
            return
        self.dir = tempfile.mkdtemp(prefix="aioproc-bench-")
        path = os.path.join(self.dir, "release")
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR)
        self.target, self.args = wait_on_fifo, (path,)

    def release(self) -> None:
        self.barrier.release()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.release()
        if self.method != "fork":
            shutil.rmtree(self.dir, ignore_errors=True)


def run_scale(
    levels: list[int], samples: int, progress: Progress, method: str = "fork"
) -> ScaleResult:
    """Ramp up to ``max(levels)`` live children; see the module docstring.

    *method* is the start method of the stdlib's and aioproc's children
    (the bare forks are forks): "fork", or "forkserver", whose children are
    forked from the small fork server and so take less memory each.
    """
    top = max(levels)
    extra = 3 * samples * (len(levels) + 1)
    # Three descriptors per child: the two ends multiprocessing keeps, and the pidfd.
    limit, why = raise_fd_limit(3 * (top + extra) + 256)
    result = ScaleResult(asked=top, fd_limit=limit, method=method, parent_rss=rss_bytes())
    result.fd_limit_note = why
    result_box: list[ScaleResult] = [result]
    anyio.run(_scale, sorted(set(levels)), samples, method, result_box, progress, backend="asyncio")
    return result


def run_scale_lean(
    levels: list[int], samples: int, progress: Progress, method: str = "fork"
) -> dict[str, Any]:
    """``run_scale`` in a lean process of its own (``benchmarks._lean_scale``): its figures."""
    root = Path(__file__).resolve().parent.parent
    spec = ",".join(str(n) for n in levels)
    # Run with -c, not -m: a spawn or forkserver child imports the parent's
    # __main__ module again when it has a name or a path (multiprocessing's
    # spawn.prepare), and that module imports the ramp, anyio and aioproc: 9 MiB
    # more in every forkserver child, stdlib's and aioproc's alike.
    main = "import sys; from benchmarks._lean_scale import main; main(sys.argv[1:])"
    command = [sys.executable, "-c", main, method, str(samples), spec]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=root) as proc:
        if proc.stdout is None:
            raise RuntimeError("the lean parent's stdout is not a pipe")
        record: dict[str, Any] | None = None
        # Not until end-of-file: a fork server it started may hold stdout a moment longer.
        for line in proc.stdout:
            if line.startswith("+"):
                progress.advance(int(line[1:]))
            elif line.startswith("result "):
                record = json.loads(line.removeprefix("result "))
                break
    if record is None or proc.returncode != 0:
        raise RuntimeError(f"the lean parent of scenario 6 failed (exit code {proc.returncode})")
    return record


async def _scale(
    levels: list[int], samples: int, method: str, box: list[ScaleResult], progress: Progress
) -> None:
    result = box[0]
    ctx = multiprocessing.get_context(method)
    barrier = Barrier()
    sleep = _Sleep(method, barrier)
    pool: list[AsyncProcess] = []
    plain: list[multiprocessing.process.BaseProcess] = []
    forked: list[int] = []

    def live() -> int:
        return len(pool) + len(plain) + len(forked)

    sampled: list[int | None] = []  # aioproc children started beside the fork/stdlib ones
    ramped = 0
    added = [0, 0, 0]  # fds, rss, MemAvailable: while only aioproc children were started
    floor = _MEMORY_FLOOR * mem_total_bytes()
    began = time.perf_counter()

    def checkpoint() -> None:
        # Wall time, and this thread's CPU time (which the other processes of a
        # busy machine do not inflate: the kernel's fork is counted in it).
        point: dict[str, Any] = {"live": live()}
        for how in _HOWS:
            point[how], point[how + " cpu"] = [], []

            point[how + " faults"] = []

        def timed(how: str, t: float, c: float, f: int) -> None:
            point[how].append(time.perf_counter() - t)
            point[how + " cpu"].append(time.thread_time() - c)
            point[how + " faults"].append(_faults() - f)

        for _ in range(samples):
            t, c, f = time.perf_counter(), time.thread_time(), _faults()
            pid = os.fork()
            if pid == 0:
                stamp_and_exit(*_sleeper_args(barrier))
            timed("fork", t, c, f)
            forked.append(pid)
            q = ctx.Process(target=sleep.target, args=sleep.args)  # type: ignore[attr-defined]
            t, c, f = time.perf_counter(), time.thread_time(), _faults()
            q.start()
            timed("stdlib", t, c, f)
            plain.append(q)
            p = AsyncProcess(target=sleep.target, args=sleep.args, context=method)
            t, c, f = time.perf_counter(), time.thread_time(), _faults()
            p.start()
            timed("aioproc", t, c, f)
            pool.append(p)
            sampled.append(p.pid)
            progress.advance(3)
        # After the samples: the probe's pages, once freed, are cheap to take again.
        point["new page us"] = new_page_cost() * 1e6
        result.curve.append(point)

    try:
        for level in [0, *levels]:
            before = (open_fds(), rss_bytes(), mem_available_bytes(), len(pool))
            try:
                while live() < level:
                    if len(pool) % 100 == 0:
                        _check_room(live(), floor, result.fd_limit, samples)
                    p = AsyncProcess(target=sleep.target, args=sleep.args, context=method)
                    p.start()
                    pool.append(p)
                    progress.advance()
            except _OutOfRoom as exc:
                result.stopped_by = str(exc)
            ramped += len(pool) - before[3]
            added[0] += open_fds() - before[0]
            added[1] += rss_bytes() - before[1]
            added[2] += before[2] - mem_available_bytes()
            checkpoint()  # where the ramp stopped, too
            await anyio.lowlevel.checkpoint()
            if result.stopped_by is not None:
                break
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
            raise
        result.stopped_by = f"stopped at {live()} live children: {exc}"
    finally:
        result.ramp_seconds = time.perf_counter() - began
        result.reached = live()
        result.mem_available_at_top = mem_available_bytes()
        if pool:
            result.watcher = pool[0].watcher
        # Children of the same age (started together at the checkpoints): a
        # child's private memory grows as the parent writes to pages they share.
        pids: dict[str, list[int | None]] = {
            "fork": list(forked),
            "stdlib": [other.pid for other in plain],
            "aioproc": sampled,
            "aioproc, whole ramp": [p.pid for p in pool],
        }
        for kind, some in pids.items():
            step = max(len(some) // _MEMORY_SAMPLE, 1)
            sizes = [private_bytes(pid) for pid in some[::step][:_MEMORY_SAMPLE] if pid]
            result.private_bytes[kind] = [size for size in sizes if size is not None]
        if ramped:
            result.parent_fds_per_child = added[0] / ramped
            result.parent_rss_per_child = added[1] / ramped
            result.mem_available_per_child = added[2] / ramped
        sleep.release()
        t = time.perf_counter()

        async def join(p: AsyncProcess) -> None:
            await p.join()
            progress.advance()

        async with anyio.create_task_group() as tg:
            for p in pool:
                tg.start_soon(join, p)
        result.join_seconds = time.perf_counter() - t
        for plain_process in plain:
            plain_process.join()
        for pid in forked:  # released with the rest: exiting, if not gone already
            os.waitpid(pid, 0)  # noqa: ASYNC222
        sleep.close()
        barrier.close()
    codes = {p.exitcode for p in pool} | {other.exitcode for other in plain}
    if codes - {0}:
        raise RuntimeError(f"scale: children exited with {codes}")
    for p in pool:
        p.close()
    for other in plain:
        other.close()
