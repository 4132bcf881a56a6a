"""Review: interpreter exit, uvloop, watchers changed between start and join, DaskPool."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
import uvloop

import aioproc
from aioproc import AsyncProcess
from aioproc._watchers import pidfd

from . import targets
from .conftest import FORK_THREAD_WARNING

pytestmark = pytest.mark.timeout(60)
UVLOOP = {"loop_factory": uvloop.new_event_loop}


# -- a watcher chosen automatically at start(), joined after set_watcher() changed --


@FORK_THREAD_WARNING
@pytest.mark.parametrize("later", ["thread", "sentinel"])
def test_automatic_sigchld_joined_under_uvloop_after_set_watcher_moves_to_thread(
    monkeypatch: pytest.MonkeyPatch, later: str
) -> None:
    """README: "A sigchld watch chosen by a start() outside any loop and then joined
    under uvloop moves to a thread watch automatically" -- set_watcher() only
    concerns "processes started from now on"."""
    monkeypatch.setattr(pidfd, "supported", False)
    p = AsyncProcess(target=targets.sleep, args=(0.3,))
    p.start()  # no loop, automatic choice: sigchld
    try:
        assert p.watcher == "sigchld"
        aioproc.set_watcher(later)  # for processes started from now on

        async def main() -> int | None:
            with anyio.fail_after(20):
                return await p.join()

        assert anyio.run(main, backend="asyncio", backend_options=UVLOOP) == 0
        assert p.watcher == "thread"
    finally:
        aioproc.set_watcher(None)
        p.kill()
        anyio.run(p.join)
        p.close()


@FORK_THREAD_WARNING
def test_automatic_sigchld_joined_from_another_thread_after_set_watcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pidfd, "supported", False)
    p = AsyncProcess(target=targets.sleep, args=(0.3,))
    p.start()
    result: list[Any] = []
    try:
        assert p.watcher == "sigchld"
        aioproc.set_watcher("thread")

        def in_thread() -> None:
            async def main() -> int | None:
                with anyio.fail_after(20):
                    return await p.join()

            try:
                result.append(anyio.run(main))
            except BaseException as exc:  # noqa: BLE001 - reported below
                result.append(exc)

        t = threading.Thread(target=in_thread)
        t.start()
        t.join(30)
        assert result == [0]
    finally:
        aioproc.set_watcher(None)
        p.kill()
        anyio.run(p.join)
        p.close()
