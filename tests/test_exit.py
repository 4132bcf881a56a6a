"""Interpreter exit: bounded, whatever the user does meanwhile.

SPEC §8, "no hang": a second Ctrl-C while ``aioproc.run`` is stopping its
child (SIGTERM sent, grace period running) must not leave the program waiting
for that child at interpreter exit: it exits within the grace period, the
kill wait and a margin, and the child is gone.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import DEADLINE, reaping_orphans, state_of

REPO = Path(__file__).resolve().parent.parent
GRACE = 1.0
#: How long run waits after SIGKILL before calling a child unkillable (``aioproc._run``).
KILL_WAIT = 5.0


def read_line(proc: subprocess.Popen[str], deadline: float = DEADLINE) -> str:
    """The program's next line of output, or a failure after *deadline* seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(deadline):
            pytest.fail(f"the program said nothing for {deadline} s")
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_a_second_ctrl_c_while_run_stops_its_child_does_not_hang_the_exit(backend: str) -> None:
    bound = GRACE + KILL_WAIT + 10
    with reaping_orphans():
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.scripts.ctrl_c_twice", backend, str(GRACE)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        child = 0
        try:
            said, _, pid = read_line(proc).partition(" ")
            assert said == "child", said
            child = int(pid)
            proc.send_signal(signal.SIGINT)
            assert read_line(proc) == "sigterm"  # run is stopping it: the grace period runs
            proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            try:
                proc.wait(bound)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"the program was still running {bound:g} s after the second Ctrl-C "
                    f"(grace {GRACE:g} s + kill wait {KILL_WAIT:g} s + 10 s)"
                )
            took = time.monotonic() - start
            assert state_of(child) in (None, "Z"), f"the child (pid {child}) outlived the program"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if child:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert proc.stdout is not None
            assert proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
    assert took < bound
