"""aioproc.run (and Pool where it applies) under hostile conditions: issue 11, points 6-9."""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

import aioproc
from aioproc import ProcessDied

from . import targets
from .helpers import children_of_this_process, only_free_fds, open_fds, pid_exists, reaping_orphans

pytestmark = pytest.mark.anyio

DEADLINE = 30  # seconds; anything slower is a hang
REPO = Path(__file__).resolve().parent.parent


def leave_a_thread_and_return(value: int) -> int:
    """Return at once, leaving a non-daemonic thread that sleeps a minute."""
    threading.Thread(target=time.sleep, args=(60,), daemon=False).start()
    return value


def leave_a_child_and_return(value: int) -> tuple[int, int]:
    """Return at once, leaving an unjoined multiprocessing child that sleeps a minute."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    return value, child.pid  # type: ignore[return-value]


# -- 7: the value comes back at once, whatever the function left -----------------------


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_leftover_thread_does_not_hold_the_value(context: str) -> None:
    start = time.monotonic()
    with anyio.fail_after(DEADLINE):
        assert await aioproc.run(leave_a_thread_and_return, 7, context=context) == 7
    assert time.monotonic() - start < DEADLINE  # not the thread's 60 s


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_leftover_child_does_not_hold_the_value_and_is_killed(context: str) -> None:
    with anyio.fail_after(DEADLINE):
        value, grandchild = await aioproc.run(leave_a_child_and_return, 8, context=context)
    assert value == 8
    with anyio.fail_after(DEADLINE):
        while pid_exists(grandchild):
            await anyio.sleep(0.01)


# -- 8: running out of descriptors is explained -----------------------------------------


@pytest.mark.parametrize("context", ["fork", "spawn"])
async def test_run_with_few_descriptors_left(context: str) -> None:
    """Whatever runs out first (run's pipes, the start, the watcher), the error says
    what to do, and nothing is left open or running."""
    await aioproc.run(targets.noop, context=context)  # the resource tracker, imports
    gc.collect()
    before = open_fds()
    children = children_of_this_process()
    messages = set()
    for free in range(8):
        with only_free_fds(free):
            try:
                with anyio.fail_after(DEADLINE):
                    assert await aioproc.run(targets.add, 1, 2, context=context) == 3
            except OSError as exc:
                messages.add(str(exc))
        gc.collect()
        assert open_fds() == before, f"{free} free descriptors"
        assert children_of_this_process() == children
    assert all("RLIMIT_NOFILE" in message for message in messages), messages
    assert any(
        m.startswith("[Errno 24] run() could not create a pipe to its child") for m in messages
    )


async def test_pool_with_no_descriptor_left() -> None:
    async with aioproc.Pool(1) as pool:
        with only_free_fds(1), pytest.raises(OSError, match=r"^\[Errno 24\] Pool could not"):
            await pool.run(targets.noop)
        assert await pool.run(targets.add, 1, 2) == 3


# -- 6 and 9: Ctrl-C under trio, a spawn child without the __main__ guard ---------------

CTRL_C_SCRIPT = """
import multiprocessing, os, sys
import anyio
import aioproc
from tests import test_run_more

pid = None

async def main(context, how):
    if how == "run":
        await aioproc.run(test_run_more.interrupt_parent_then_sleep, 60, context=context)
    else:
        async with aioproc.Pool(1, context=context) as pool:
            await pool.run(test_run_more.interrupt_parent_then_sleep, 60)

if __name__ == "__main__":
    backend, context, how = sys.argv[1:]
    try:
        anyio.run(main, context, how, backend=backend)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    except BaseException as exc:
        print("other:", repr(exc), flush=True)
    print("children:", len(multiprocessing.active_children()))
"""


def interrupt_parent_then_sleep(seconds: float) -> None:
    """Ctrl-C for the parent, from a child that runs: the handshake is the signal."""
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(seconds)


@pytest.mark.parametrize("how", ["run", "pool"])
@pytest.mark.parametrize(
    ("backend", "context"), [("trio", "fork"), ("trio", "spawn"), ("asyncio", "fork")]
)
def test_ctrl_c_during_run_is_a_plain_keyboard_interrupt(
    backend: str, context: str, how: str, tmp_path: Path
) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    with reaping_orphans():
        out = subprocess.run(
            [sys.executable, str(script), backend, context, how],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=DEADLINE,
        )
    if backend == "asyncio" and sys.version_info < (3, 11):
        pytest.skip("Python 3.10's asyncio ends the main task with CancelledError on Ctrl-C")
    assert out.stdout.split("\n")[:2] == ["KeyboardInterrupt", "children: 0"], out.stderr


NO_GUARD_SCRIPT = """
import anyio
import aioproc
from tests import targets

async def main():
    try:
        await {call}
    except aioproc.ProcessDied as exc:
        print("ProcessDied:", exc, flush=True)
    else:
        print("no error", flush=True)

anyio.run(main)
"""


@pytest.mark.parametrize(
    "call",
    [
        "aioproc.run(targets.add, 1, 2, context='spawn')",
        "aioproc.Pool(1, context='spawn').__aenter__()",
    ],
    ids=["run", "Pool"],
)
def test_spawn_child_of_a_script_without_main_guard_is_named(call: str, tmp_path: Path) -> None:
    if "Pool" in call:
        call = "pool_call()"
        script = NO_GUARD_SCRIPT.replace(
            "async def main():",
            "async def pool_call():\n"
            "    async with aioproc.Pool(1, context='spawn') as pool:\n"
            "        return await pool.run(targets.add, 1, 2)\n\n"
            "async def main():",
        )
    else:
        script = NO_GUARD_SCRIPT
    path = tmp_path / "no_guard.py"
    path.write_text(script.format(call=call))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with reaping_orphans():
        out = subprocess.run(
            [sys.executable, str(path)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=DEADLINE,
        )
    line = out.stdout.strip().splitlines()[0] if out.stdout.strip() else out.stderr
    assert line.startswith("ProcessDied: "), out.stderr
    assert "exited with code 1 before it started running add()" in line
    assert 'no `if __name__ == "__main__":` guard' in line
    assert "RuntimeError" in out.stderr  # the child's own error, on its stderr


async def test_died_before_starting_is_not_the_functions_fault() -> None:
    """A child that ran the function says so: its death is reported as during the call."""
    with anyio.fail_after(DEADLINE), pytest.raises(ProcessDied) as info:
        await aioproc.run(targets.hard_exit, 5, context="spawn")
    assert "running hard_exit() exited with code 5 before returning a result" in str(info.value)


# -- payloads: out of band, both ways ---------------------------------------------------


def same(value: object) -> object:
    return value


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
async def test_big_payloads_both_ways(context: str) -> None:
    size = 100 << 20
    data = targets.pattern(size)
    with anyio.fail_after(DEADLINE):
        assert await aioproc.run(len, data, context=context) == size
        back = await aioproc.run(bytearray, memoryview(data), context=context)
        assert type(back) is bytearray
        assert back == data
        del back
        view = memoryview(bytearray(data[: 1 << 20])).cast("I")
        echoed = await aioproc.run(same, view, context=context)
        assert isinstance(echoed, memoryview)
        assert (echoed.format, echoed.tobytes()) == ("I", view.tobytes())


# -- Pool workers die with the parent ---------------------------------------------------


def kill_parent_then_sleep(seconds: float) -> None:
    """Print our pid, SIGKILL our parent (the pool's process), then sleep: a busy worker."""
    print(os.getpid(), flush=True)
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(seconds)


ORPHAN_POOL_SCRIPT = """
import sys
import anyio
import aioproc
from tests import test_run_more

async def main(context):
    async with aioproc.Pool(2, context=context) as pool:
        await pool.run(test_run_more.kill_parent_then_sleep, 60)

if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_pool_workers_die_with_the_parent(context: str, tmp_path: Path) -> None:
    script = tmp_path / "orphan_pool.py"
    script.write_text(ORPHAN_POOL_SCRIPT)
    with reaping_orphans():
        out = subprocess.run(
            [sys.executable, str(script), context],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=DEADLINE,
        )
        assert out.returncode == -9, out.stderr
        pid = int(out.stdout.split()[0])
        fd = None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            pass
        if fd is not None:
            try:
                assert select.select([fd], [], [], DEADLINE)[0], f"worker {pid} outlived its parent"
            finally:
                os.close(fd)


def fork_and_return() -> int:
    return os.fork()


async def test_a_forked_copy_of_the_child_does_not_answer() -> None:
    with anyio.fail_after(DEADLINE):
        for _ in range(3):
            assert await aioproc.run(fork_and_return, context="fork") > 0
