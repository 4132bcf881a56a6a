"""Make fork() fail with EAGAIN for real, in a helper process, and report.

Run as ``python -m tests.scripts.fork_failure SCENARIO`` by ``test_faults.py``; prints
one JSON object.  How fork is made to fail: RLIMIT_NPROC is not enforced for
root (CAP_SYS_RESOURCE), so the helper (started as root) sets its *real* uid
to ``nobody`` and lowers the soft RLIMIT_NPROC to 0, which the kernel checks
against the real uid's process count in every fork and thread creation.  Its
saved uid stays root, so that it can take root back afterwards and show that
the same ``AsyncProcess`` starts once processes are available again.  While
it is ``nobody`` it cannot read the interpreter's files under /root, nor a
checkout that only root may read: so all it needs is imported before,
including every module of aioproc (some load on first use).

Scenarios: ``fork``, ``spawn``, ``forkserver-start`` (the fork server itself
cannot be started), ``forkserver-fork`` (the fork server, started with a
preloaded module that drops its privileges the same way, cannot fork the
child and dies), ``thread-watcher`` (the join's thread cannot be created).
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import multiprocessing.resource_tracker
import os
import pkgutil
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

import aioproc
from aioproc import AsyncProcess

from ..helpers import children_of_this_process, fork_server_fd, open_fds

NOBODY = 65534


def noop() -> None:
    pass


def sleep_briefly() -> None:
    time.sleep(0.3)


@contextmanager
def no_process_to_spare() -> Iterator[None]:
    """Real uid nobody, soft RLIMIT_NPROC 0: every fork and new thread fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    os.setresuid(NOBODY, NOBODY, 0)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, hard))
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))


def jail_fork_server(tmp: str) -> None:
    """Preload, in the fork server, a module that takes its processes away."""
    with open(os.path.join(tmp, "aioproc_nproc_jail.py"), "w") as f:
        f.write(
            "import os, resource\n"
            f"os.setresuid({NOBODY}, {NOBODY}, 0)\n"
            "hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NPROC, (0, hard))\n"
        )
    os.chdir(tmp)  # the fork server imports it from its working directory
    multiprocessing.get_context("forkserver").set_forkserver_preload(["aioproc_nproc_jail"])


async def start_fails(scenario: str, tmp: str) -> dict[str, Any]:
    method = scenario.partition("-")[0]
    multiprocessing.resource_tracker.ensure_running()  # as root, like any program would
    if scenario == "forkserver-fork":
        jail_fork_server(tmp)
    p = AsyncProcess(target=noop, context=method)
    fds, kids = open_fds() - fork_server_fd(), children_of_this_process()
    error: list[Any] = []
    if scenario == "forkserver-fork":
        try:
            p.start()
        except Exception as exc:
            error = [type(exc).__name__, getattr(exc, "errno", None), str(exc)]
        multiprocessing.get_context("forkserver").set_forkserver_preload([])
    else:
        with no_process_to_spare():
            try:
                p.start()
            except Exception as exc:
                error = [type(exc).__name__, getattr(exc, "errno", None), str(exc)]
    report: dict[str, Any] = {
        "error": error,
        "fds_left": sorted(open_fds() - fork_server_fd() - fds),
        "children_left": sorted(children_of_this_process() - kids - fork_server()),
        "after_failure": [p.pid, p.exitcode, p.is_alive(), repr(p)],
    }
    p.start()  # the same object, now that processes are available again
    with anyio.fail_after(60):
        report["exitcode_of_second_start"] = await p.join()
    p.close()
    return report


def fork_server() -> set[int]:
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return {pid} if pid else set()


async def join_fails() -> dict[str, Any]:
    aioproc.set_watcher("thread")
    p = AsyncProcess(target=sleep_briefly, context="fork")
    p.start()
    error: list[Any] = []
    with no_process_to_spare():
        try:
            await p.join()
        except Exception as exc:
            error = [type(exc).__name__, None, str(exc)]
        alive = p.is_alive()
    with anyio.fail_after(60):
        code = await p.join()
    p.close()
    return {"error": error, "alive_after_failure": alive, "exitcode_after": code}


def import_all_of_aioproc() -> None:
    """Load every module of aioproc now, while this process may still read them."""
    for module in pkgutil.walk_packages(aioproc.__path__, "aioproc."):
        importlib.import_module(module.name)


def main() -> None:
    scenario, tmp = sys.argv[1], sys.argv[2]
    import_all_of_aioproc()

    async def run() -> dict[str, Any]:
        if scenario == "thread-watcher":
            return await join_fails()
        return await start_fails(scenario, tmp)

    print(json.dumps(anyio.run(run)))


if __name__ == "__main__":
    main()
