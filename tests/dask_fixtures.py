"""The Dask tests' cluster: a real LocalCluster on 127.0.0.1, started by the tests.

It runs in a process of its own (``tests/dask_cluster.py``); that process is
the one child of the test process the suite's check for leftovers allows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parent.parent
#: Pids of the cluster processes the tests started and have not yet stopped.
CLUSTER_PIDS: set[int] = set()


class Cluster:
    """A LocalCluster in a process of its own; ``address``, ``worker_pids`` once up."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.dask_cluster", *args],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        CLUSTER_PIDS.add(self.proc.pid)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the cluster says it is up
        if not line:
            self.close()
            raise RuntimeError("the test cluster did not start (see its stderr above)")
        info: dict[str, Any] = json.loads(line)
        self.address: str = info["address"]
        self.worker_pids: dict[str, int] = info["pids"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()
            CLUSTER_PIDS.discard(self.proc.pid)


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Cluster]:
    """LocalCluster(n_workers=2, threads_per_worker=1, processes=True), non-daemonic.

    One per test module, not per session: other modules count this process's
    children, and the cluster must be gone before they run.
    """
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.close()
