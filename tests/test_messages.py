"""Messages that say what was wrong and what to do (issue 11, Part 2.9).

The house rule: lower-case, say the rule, show the value, give the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import DEADLINE, reaping_orphans

SCRIPTS = Path(__file__).resolve().parent / "scripts"
REPO = SCRIPTS.parent.parent


async def test_a_closed_process_says_what_to_do() -> None:
    p = AsyncProcess(target=targets.noop)
    p.start()
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 0
    p.close()
    messages = {}
    for name in ("is_alive", "terminate", "kill", "interrupt", "start"):
        with pytest.raises(ValueError, match="process object is closed") as info:
            getattr(p, name)()
        messages[name] = str(info.value)
    with pytest.raises(ValueError, match="process object is closed") as info:
        p.exitcode  # noqa: B018
    messages["exitcode"] = str(info.value)
    with pytest.raises(ValueError, match="process object is closed") as info:
        await p.join()
    messages["join"] = str(info.value)
    for name, message in messages.items():  # the stdlib's words are kept, and the fix added
        assert "create a new AsyncProcess" in message, (name, message)


def test_the_aioproc_watcher_error_does_not_offer_none() -> None:
    """None is for set_watcher(); in the environment the fix is to unset the variable."""
    env = {**os.environ, "AIOPROC_WATCHER": "bogus"}
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "watcher_error.py")],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert "AIOPROC_WATCHER" in message
    assert "'bogus'" in message
    assert "pidfd, sigchld, sentinel, thread" in message
    assert "None" not in message, message
    assert "unset" in message, message


async def test_run_with_keyword_arguments_hints_at_partial() -> None:
    with pytest.raises(TypeError, match=r"functools\.partial") as info:
        await aioproc.run(targets.greet, "susan", punctuation="!")  # type: ignore[arg-type]
    assert "punctuation" in str(info.value)


def test_a_spawn_child_without_a_main_guard_is_named_as_such() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with reaping_orphans():
        out = subprocess.run(
            [sys.executable, str(SCRIPTS / "no_main_guard.py")],
            capture_output=True,
            text=True,
            timeout=DEADLINE * 2,
            env=env,
            cwd=REPO,
        )
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert message != "42", "the child ran the function: nothing to explain"
    assert 'if __name__ == "__main__":' in message, message
