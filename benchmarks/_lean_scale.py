"""Scenario 6 from a lean parent: a process that only ramps up the children.

``python -m benchmarks._lean_scale METHOD SAMPLES N,N,...`` (run by
``--scale-parent lean``).  A fork child costs what its parent's address space
and descriptor table cost to copy, and the pages the parent dirties after the
fork are copied again for each child: in the benchmark's own process (which
has imported the peers of scenario 7, run five scenarios and kept their
figures) the parent's size would decide the result.  This process imports
only aioproc and the ramp.  It writes ``+N`` lines as the ramp advances and
one ``result JSON`` line at the end, on stdout.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from typing import TextIO

from ._progress import Progress
from ._scale import run_scale


class _LineProgress(Progress):
    """Progress told to the benchmark's process as ``+N`` lines, ten times a second."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(1, enabled=False)
        self.out = stream
        self.unsent = 0
        self.sent_at = time.monotonic()

    def advance(self, units: int = 1) -> None:
        self.unsent += units
        if time.monotonic() - self.sent_at >= 0.1:
            self.flush()

    def flush(self) -> None:
        if self.unsent:
            print(f"+{self.unsent}", file=self.out, flush=True)
        self.unsent = 0
        self.sent_at = time.monotonic()


def main(argv: list[str]) -> None:
    method, samples, levels = argv[0], int(argv[1]), [int(n) for n in argv[2].split(",")]
    if method == "forkserver":
        multiprocessing.set_forkserver_preload(["benchmarks._children", "aioproc"])
    progress = _LineProgress(sys.stdout)
    record = run_scale(levels, samples, progress, method).as_json()
    progress.flush()
    record["parent"] = "lean"
    print("result " + json.dumps(record, allow_nan=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
