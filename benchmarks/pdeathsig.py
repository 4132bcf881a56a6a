"""How soon children with ``die_with_parent`` are gone after their parent's SIGKILL.

``python -m benchmarks.pdeathsig [--rounds 10]`` (Linux; run from the repository)

Each round starts ``benchmarks/_orphan_parent.py``, a parent that starts an
``AsyncProcess(die_with_parent=True)``, a sibling without the option and an
``aioproc.run`` child, and reports their pids.  This process opens a pidfd on
each, SIGKILLs the parent, and times how long each child takes to exit (its
pidfd turns readable).  It is the subreaper meanwhile, and reaps them all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ._system import adopting_orphans

ROOT = Path(__file__).resolve().parent.parent


def one_round(method: str) -> list[float]:
    """Milliseconds from the parent's SIGKILL to each dying child's exit."""
    with adopting_orphans(grace=30.0):
        parent = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._orphan_parent", method],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        if parent.stdout is None:
            raise RuntimeError("the parent's stdout is not a pipe")
        pids: dict[str, int] = {}
        while len(pids) < 3:
            name, pid = parent.stdout.readline().split()
            pids[name] = int(pid)
        fds = [os.pidfd_open(pids[name]) for name in ("dies", "run")]
        start = time.monotonic()
        parent.kill()
        took = []
        for fd in fds:
            if not select.select([fd], [], [], 10)[0]:
                raise RuntimeError("a child with die_with_parent outlived its parent by 10 s")
            took.append((time.monotonic() - start) * 1000)
            os.close(fd)
        parent.wait()
        parent.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids["lives"], signal.SIGKILL)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    for method in ("fork", "spawn"):
        took = sorted(t for _ in range(args.rounds) for t in one_round(method))
        print(
            f"{method:5}: gone {statistics.median(took):.2f} ms after the parent's SIGKILL "
            f"at the median, {took[-1]:.2f} ms at most ({len(took)} children)"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
