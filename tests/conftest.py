"""Test matrix: every async test runs on asyncio, asyncio+uvloop and trio.

Tests that take the ``watcher`` argument run over backend x watcher, for every
combination that can work; the ones that cannot are asserted to raise in
``test_watchers.py``.  After every test, no child of ours may be left, alive
or zombie.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

import aioproc
from aioproc._watchers import pidfd

from .helpers import children_of_this_process, fork_server_and_helpers, state_of

pytest_plugins = ["tests.dask_fixtures"]  # the Dask tests' cluster

# Threads make os.fork() warn on Python >= 3.12.  Two kinds exist in these tests by
# design: the thread watcher's, and the I/O thread of trio's guest mode, which
# anyio's pytest plugin uses.  Only there is the warning ignored; the test that
# proves aioproc itself creates no thread runs its own loop without the plugin.
FORK_THREAD_WARNING = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)

BACKENDS: dict[str, Any] = {
    "asyncio": ("asyncio", {"debug": True}),
    "uvloop": ("asyncio", {"loop_factory": uvloop.new_event_loop}),
    "trio": ("trio", {}),
}
WATCHERS = ("pidfd", "sigchld", "sentinel", "thread")


def combination_works(backend: str, watcher: str) -> bool:
    """Whether *watcher* can serve fork children on *backend* (main thread)."""
    if watcher == "pidfd" and not pidfd.is_supported():
        return False
    return not (watcher == "sigchld" and backend == "uvloop")


def _marks(backend: str, watcher: str | None) -> list[pytest.MarkDecorator]:
    return [FORK_THREAD_WARNING] if backend == "trio" or watcher == "thread" else []


@pytest.fixture(
    params=[pytest.param(BACKENDS[name], id=name, marks=_marks(name, None)) for name in BACKENDS]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "watcher" in metafunc.fixturenames:
        metafunc.parametrize(
            ("anyio_backend", "watcher"),
            [
                pytest.param(BACKENDS[b], w, id=f"{b}-{w}", marks=_marks(b, w))
                for b in BACKENDS
                for w in WATCHERS
                if combination_works(b, w)
            ],
        )


@pytest.fixture(autouse=True)
def _force_watcher(request: pytest.FixtureRequest) -> Iterator[None]:
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("watcher") if callspec is not None else None
    aioproc.set_watcher(name)
    yield
    aioproc.set_watcher(None)


@pytest.fixture(autouse=True)
def _no_child_left_behind() -> Iterator[None]:
    yield
    from .dask_fixtures import CLUSTER_PIDS  # loaded as a plugin, after this file

    allowed = fork_server_and_helpers() | CLUSTER_PIDS
    left = children_of_this_process() - allowed
    if left:
        states = {pid: state_of(pid) for pid in sorted(left)}  # Z: exited, not reaped
        for pid in left:  # do not let one test's leak fail the next ones
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except OSError:
                pass
        pytest.fail(f"test left child processes behind (pid: state): {states}")
    try:
        exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return  # no child at all
    if exited is not None:
        pytest.fail(f"test left a zombie behind: pid {exited.si_pid}")


def pytest_report_header() -> list[str]:
    return [
        f"aioproc watchers: pidfd {'supported' if pidfd.is_supported() else 'unsupported'}; "
        f"python {sys.version.split()[0]}"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop sigchld x forkserver: it cannot work, and test_watchers.py asserts the error."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        impossible = params.get("watcher") == "sigchld" and params.get("context") == "forkserver"
        (drop if impossible else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
