"""Where a sleeping fork child's private memory comes from: its own writes, its parent's.

``python -m benchmarks.fork_pages [--children N] [--warm N] [--kinds fork,stdlib,aioproc]``

Needs root: the page frame numbers in ``/proc/PID/pagemap`` and
``/proc/kpagecount``.  For each kind of child (a bare ``os.fork()``, a
``multiprocessing.Process``, an ``AsyncProcess``; the fork start method), a
small parent (``python -m benchmarks.fork_pages --parent``: aioproc, anyio
and scenario 6's ramp imported, an asyncio loop running, as
``--scale-parent lean``) starts ``--warm`` sleeping children, then
``--children`` measured ones, then a few more.  At each measured fork the
parent stops itself (``SIGSTOP`` from an at-fork hook) and this process
records the parent's page frames; the child runs until its target begins
(it writes to a pipe), and its frames are recorded; then the parent goes on.
Once every child sleeps, each measured child's pages mapped only once are
counted, and split by who wrote them: the child before its target began (its
frame differs from the parent's at the fork), or the parent after the fork
(the child kept the original frame).  A page copies once whoever writes it
first, so what a child costs is the union of both.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_PAGE = 4096
_MSG = struct.Struct("ii")
#: Children started after the last measured one (the parent writes after each fork).
_TAIL = 3


def _frames(pid: int) -> dict[int, int]:
    """Page index -> frame number, for the present pages of *pid*'s writable private mappings."""
    frames: dict[int, int] = {}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if fields[1][1] != "w" or fields[1][3] != "p":
                continue
            lo, hi = (int(x, 16) // _PAGE for x in fields[0].split("-"))
            pagemap.seek(lo * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("Q", pagemap.read((hi - lo) * 8))):
                if entry >> 63:  # present
                    frames[lo + i] = entry & ((1 << 55) - 1)
    return frames


def _mapcounts(frames: set[int]) -> dict[int, int]:
    counts = {}
    with open("/proc/kpagecount", "rb", buffering=0) as f:
        for frame in frames:
            f.seek(frame * 8)
            counts[frame] = struct.unpack("Q", f.read(8))[0]
    return counts


def measure(kind: str, warm: int, children: int) -> dict[str, float]:
    """Pages per measured child of *kind*: private, written by the child, by the parent."""
    r, w = os.pipe()
    command = [sys.executable, "-m", "benchmarks.fork_pages", "--parent", kind, str(warm)]
    command += [str(children), str(w)]
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONHASHSEED="0")  # the same layout run after run
    parent = subprocess.Popen(command, pass_fds=[w], stdin=subprocess.PIPE, cwd=root, env=env)
    os.close(w)
    ready: dict[int, int] = {}

    def until_ready(index: int) -> None:
        while index not in ready:
            got = os.read(r, _MSG.size)
            assert len(got) == _MSG.size
            i, pid = _MSG.unpack(got)
            ready[i] = pid

    try:
        at_fork, booted = {}, {}
        for k in range(warm, warm + children + 1):
            _, status = os.waitpid(parent.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                raise RuntimeError(f"the {kind} parent exited early: status {status}")
            at_fork[k] = _frames(parent.pid)
            until_ready(k)
            booted[k] = _frames(ready[k])
            os.kill(parent.pid, signal.SIGCONT)
        until_ready(-1)
        final = {k: _frames(ready[k]) for k in range(warm, warm + children)}
        counts = _mapcounts({f for frames in final.values() for f in frames.values()})
    finally:
        assert parent.stdin is not None
        parent.stdin.close()  # the parent releases its children and exits
        parent.wait()
        os.close(r)
    total: Counter[str] = Counter()
    for k in range(warm, warm + children):
        fork, boot, after = at_fork[k], booted[k], at_fork[k + 1]
        by_child = {v for v, f in boot.items() if fork.get(v) != f}
        by_parent = {v for v, f in fork.items() if after.get(v) != f}
        private = {v for v, f in final[k].items() if counts[f] == 1}
        total["private"] += len(private)
        total["by child"] += len(private & by_child)
        total["by parent"] += len(private - by_child)
        total["parent writes"] += len(by_parent)
    return {key: value / children for key, value in total.items()}


def _parent(kind: str, warm: int, children: int, report_fd: int) -> None:
    """The measured parent: see the module docstring."""
    stop = [False]

    def stop_here() -> None:
        if stop[0]:
            os.kill(os.getpid(), signal.SIGSTOP)

    os.register_at_fork(after_in_parent=stop_here)  # first: before any other hook

    import anyio

    from aioproc import AsyncProcess

    from . import _scale  # noqa: F401 - the lean parent's imports
    from ._children import Barrier, stamp_and_exit

    def ready_then_sleep(index: int, ends: tuple[int, int]) -> None:
        os.write(report_fd, _MSG.pack(index, os.getpid()))
        stamp_and_exit(None, 0, ends, 0.0)

    async def main() -> None:
        barrier = Barrier()
        fork = multiprocessing.get_context("fork")
        started: list[Any] = []
        pids: list[int] = []
        for i in range(warm + children + _TAIL):
            stop[0] = warm <= i <= warm + children
            args = (i, barrier.ends)
            if kind == "fork":
                pid = os.fork()
                if pid == 0:
                    ready_then_sleep(*args)
                pids.append(pid)
            elif kind == "stdlib":
                q = fork.Process(target=ready_then_sleep, args=args)
                q.start()
                started.append(q)
            else:
                p = AsyncProcess(target=ready_then_sleep, args=args, context="fork")
                p.start()
                started.append(p)
        stop[0] = False
        os.write(report_fd, _MSG.pack(-1, os.getpid()))
        await anyio.wait_readable(0)  # end-of-file: the measurer is done
        os.read(0, 1)
        barrier.release()
        for p in started:
            if isinstance(p, AsyncProcess):
                await p.join()
            else:
                p.join()
        for pid in pids:
            os.waitpid(pid, 0)  # noqa: ASYNC222 - released: exiting now
        barrier.close()

    anyio.run(main, backend="asyncio")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--parent":
        _parent(args[1], int(args[2]), int(args[3]), int(args[4]))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fork_pages", description=__doc__)
    parser.add_argument("--children", type=int, default=20, help="measured children per kind")
    parser.add_argument("--warm", type=int, default=30, help="children started before them")
    parser.add_argument("--kinds", default="fork,stdlib,aioproc")
    options = parser.parse_args(args)
    if os.geteuid() != 0:
        parser.error("needs root: page frame numbers and /proc/kpagecount")
    print("| child   | private pages (MiB) | by the child | by the parent | parent writes/start |")
    print("|---------|--------------------:|-------------:|--------------:|--------------------:|")
    for kind in options.kinds.split(","):
        got = measure(kind, options.warm, options.children)
        mib = got["private"] * _PAGE / 2**20
        print(
            f"| {kind:7s} | {got['private']:12.0f} ({mib:.2f}) | {got['by child']:12.0f} "
            f"| {got['by parent']:13.0f} | {got['parent writes']:19.0f} |"
        )


if __name__ == "__main__":
    main()
