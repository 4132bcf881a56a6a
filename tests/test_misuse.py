"""Misuse: every mistake of SPEC section 1 and of run()'s arguments is a clear error.

Each raises the documented type (``ValueError`` for a closed process and for
``close()`` while running, ``TypeError`` for a value of the wrong type,
``RuntimeError`` or ``ValueError`` for other lifecycle mistakes) with a message
that says what was wrong and what to do, also under ``python -O``, and starts
nothing.  Timeouts of a wrong type or value are in ``test_timeouts.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import anyio
import pytest

import aioproc
from aioproc import AsyncProcess

from . import targets
from .helpers import DEADLINE, SCRIPTS, children_of_this_process


def started(target: Any, *args: Any, **kwargs: Any) -> AsyncProcess:
    p = AsyncProcess(target=target, args=args, **kwargs)
    p.start()
    return p


# -- AsyncProcess ---------------------------------------------------------------


async def test_misuse_before_start() -> None:
    p = AsyncProcess(target=targets.noop)
    with pytest.raises(RuntimeError, match=r"call start\(\) first"):
        await p.join()
    for name in ("terminate", "kill", "interrupt"):
        with pytest.raises(RuntimeError, match=r"call start\(\) first"):
            getattr(p, name)()
    p.close()  # closing an unstarted process is allowed


async def test_misuse_start_twice_and_close_running() -> None:
    p = started(targets.sleep, 30)
    with pytest.raises(RuntimeError, match="cannot start a process twice"):
        p.start()
    with pytest.raises(ValueError, match="still running"):
        p.close()
    p.kill()
    with anyio.fail_after(DEADLINE):
        await p.join()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"group": "g"}, ValueError, "group must be None"),
        ({"target": 42}, TypeError, "target must be a callable"),
        ({"target": targets.noop, "args": 5}, TypeError, "args must be a tuple"),
        ({"target": targets.noop, "kwargs": [1]}, TypeError, "kwargs must be a dict"),
        ({"target": targets.noop, "name": 1}, TypeError, "name must be a str"),
        ({"target": targets.noop, "context": "nope"}, ValueError, "unknown start method"),
        ({"target": targets.noop, "context": 3}, TypeError, "context must be"),
    ],
)
def test_bad_constructor_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        AsyncProcess(**kwargs)


async def test_child_cannot_join_itself() -> None:
    p = started(targets.join_self)
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 3


def _join_sibling_in_child(sibling: AsyncProcess) -> None:
    async def main() -> None:
        await sibling.join()

    try:
        anyio.run(main)
    except RuntimeError as exc:
        os._exit(5 if "child of this process" in str(exc) else 1)
    os._exit(1)


async def test_only_the_parent_can_join() -> None:
    sibling = started(targets.sleep, 30)
    p = started(_join_sibling_in_child, sibling, context="fork")
    with anyio.fail_after(DEADLINE):
        assert await p.join() == 5
    sibling.kill()
    await sibling.join()


# -- aioproc.run ---------------------------------------------------------------


async def _coroutine_function() -> None:
    pass


def _not_callable() -> Any:
    return aioproc.run(42)  # type: ignore[arg-type]


def _str_timeout() -> Any:
    return aioproc.run(targets.noop, timeout="1")  # type: ignore[arg-type]


def _none_grace() -> Any:
    return aioproc.run(targets.noop, grace=None)  # type: ignore[arg-type]


def _keyword_argument() -> Any:
    return aioproc.run(targets.greet, "x", punctuation="!")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            _not_callable,
            TypeError,
            "^func must be a callable, not int; call run",
            id="not-callable",
        ),
        pytest.param(
            lambda: aioproc.run(_coroutine_function),
            TypeError,
            r"^_coroutine_function\(\) is an async function; run\(\) calls a plain function",
            id="async-function",
        ),
        pytest.param(
            lambda: aioproc.run(targets.noop, timeout=-1),
            ValueError,
            "timeout must be >= 0",
            id="negative-timeout",
        ),
        pytest.param(_str_timeout, TypeError, "timeout must be a real number", id="str-timeout"),
        pytest.param(
            lambda: aioproc.run(targets.noop, grace=-1),
            ValueError,
            "^grace must be a finite",
            id="negative-grace",
        ),
        pytest.param(
            lambda: aioproc.run(targets.noop, grace=float("inf")),
            ValueError,
            "grace must be",
            id="infinite-grace",
        ),
        pytest.param(_none_grace, TypeError, "^grace must be a real number", id="none-grace"),
        pytest.param(
            lambda: aioproc.run(targets.noop, context="nope"),
            ValueError,
            "unknown start method",
            id="unknown-context",
        ),
        pytest.param(
            _keyword_argument,
            TypeError,
            "punctuation",  # test_messages.py: and a hint at functools.partial
            id="keyword-argument",
        ),
    ],
)
async def test_run_misuse(call: Any, error: type[Exception], match: str) -> None:
    before = children_of_this_process()
    with pytest.raises(error, match=match):
        await call()
    assert children_of_this_process() == before


# -- all of them, under python -O -----------------------------------------------


#: Case -> (exception type, a fragment of its message); None: no error.
MISUSE: dict[str, Any] = {
    "join before start": ("RuntimeError", "cannot join a process that has not been started"),
    "terminate before start": ("RuntimeError", "call start() first"),
    "kill before start": ("RuntimeError", "call start() first"),
    "interrupt before start": ("RuntimeError", "call start() first"),
    "start twice": ("RuntimeError", "cannot start a process twice"),
    "join timeout -1": ("ValueError", "timeout must be >= 0 (0 polls, None waits forever), got -1"),
    "join timeout -inf": ("ValueError", "timeout must be >= 0"),
    "join timeout nan": ("ValueError", "not NaN"),
    "join timeout '1'": ("TypeError", "timeout must be a real number of seconds"),
    "join timeout True": ("TypeError", "not bool"),
    "join timeout 1j": ("TypeError", "not complex"),
    "daemon after start": ("RuntimeError", "set it before start()"),
    "start closed": ("ValueError", "process object is closed"),
    "is_alive closed": ("ValueError", "process object is closed"),
    "terminate closed": ("ValueError", "process object is closed"),
    "kill closed": ("ValueError", "process object is closed"),
    "interrupt closed": ("ValueError", "process object is closed"),
    "join closed": ("ValueError", "process object is closed"),
    "exitcode closed": ("ValueError", "process object is closed"),
    "pid closed": ("ValueError", "process object is closed"),
    "close running": ("ValueError", "cannot close a process that is still running"),
    "join-self exit code": 3,
    "join-sibling exit code": 3,
    "daemon-child exit code": 3,
    "join from a second loop": ("RuntimeError", "is already being joined in another event loop"),
    "group": ("ValueError", "group must be None"),
    "target not callable": ("TypeError", "target must be a callable or None, not int"),
    "args not iterable": ("TypeError", "args must be a tuple"),
    "kwargs not a mapping": ("TypeError", "kwargs must be a dict or None, not list"),
    "name not a str": ("TypeError", "name must be a str or None, not int"),
    "unknown context": ("ValueError", "unknown start method 'nope'"),
    "context of a wrong type": ("TypeError", "context must be a start method name"),
    "name set to an int": ("TypeError", "name must be a str, not int"),
    "unknown watcher": ("ValueError", "unknown watcher 'nope'"),
    "watcher of a wrong type": ("TypeError", "must be a watcher name (str) or None, not int"),
    "sigchld for a forkserver child": ("WatcherUnavailable", "belongs to the fork server"),
}

#: What the children report (on stdout) for the misuse they commit.
CHILD_MISUSE = {
    "join-self": "a process cannot join itself",
    "join-sibling": "can only join a child of this process",
    "daemon-child": "a daemonic process is not allowed to have children",
}


def test_every_misuse_raises_a_clear_error_under_python_O(tmp_path: Any) -> None:
    """SPEC section 1's misuse list, each with its type and message, asserts stripped."""
    script = SCRIPTS / "misuse.py"
    env = dict(os.environ)
    env.pop("AIOPROC_WATCHER", None)
    out = subprocess.run(
        [sys.executable, "-O", "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    *child_lines, last = out.stdout.strip().splitlines()
    seen = json.loads(last)
    assert set(seen) == set(MISUSE)
    for case, expected in MISUSE.items():
        if isinstance(expected, int):
            assert seen[case] == expected, case
            continue
        kind, fragment = expected
        assert seen[case] is not None, f"{case}: no error"
        assert seen[case][0] == kind, f"{case}: {seen[case]}"
        assert fragment in seen[case][1], f"{case}: {seen[case][1]!r}"
    children = dict(json.loads(line) for line in child_lines)
    assert set(children) == set(CHILD_MISUSE)
    for kind, fragment in CHILD_MISUSE.items():
        assert fragment in children[kind], children[kind]
