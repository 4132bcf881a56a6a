"""Places a process of the test's own at a pid the kernel has just freed.

Run with ``sys.executable``; it talks on stdin and stdout, one line each way:

    place <pid>   ->  "placed <pid>"  or  "missed <pid it got instead, or 0>"

A placed process (a "stranger") is a child of this helper, not of the test,
so the test's ``waitid`` cannot mistake it for one of its own children.  It
leads a process group of its own (pgid = its pid), so that a group signal
sent to the freed number would reach it too.  It is forked with every
signal blocked, so whatever is sent to it stays pending, where the test reads
it from ``/proc/<pid>/status`` (SIGKILL, which cannot be blocked, kills it:
the test sees a zombie).  The next pid is chosen by writing to
``/proc/sys/kernel/ns_last_pid`` (root only), and put back right after the
fork, so that the rest of the machine goes on getting new pids.  At end of
input every stranger is killed and reaped.
"""

from __future__ import annotations

import os
import signal
import sys
import time

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
TRIES = 20


def place(pid: int, strangers: list[int]) -> int:
    """Fork a stranger at *pid*; its pid, or the wrong pid it got (0: none)."""
    with open(NS_LAST_PID) as f:
        cursor = f.read().strip()
    try:
        return _place(pid, strangers)
    finally:
        # The cursor goes back to where it was: left at *pid*, it would hand the
        # pids that other tests' children have just freed to new processes, and
        # their "that pid is gone" would see a stranger (pytest-xdist runs
        # other tests meanwhile).
        with open(NS_LAST_PID, "w") as f:
            f.write(cursor)


def _place(pid: int, strangers: list[int]) -> int:
    got = 0
    for _ in range(TRIES):
        if os.path.exists(f"/proc/{pid}"):
            return got  # someone else has it now
        with open(NS_LAST_PID, "w") as f:
            f.write(str(pid - 1))
        child = os.fork()
        if child == 0:
            try:
                os.setpgid(0, 0)
                while True:
                    time.sleep(3600)
            finally:
                os._exit(0)
        os.setpgid(child, child)  # before reporting: the group exists now
        if child == pid:
            strangers.append(child)
            return child
        got = child
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    return got


def main() -> None:
    # Inherited by every stranger at its fork: nothing it is sent is lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    strangers: list[int] = []
    print("ready", flush=True)
    for line in sys.stdin:
        command, arg = line.split()
        assert command == "place", command
        got = place(int(arg), strangers)
        print(f"placed {got}" if got == int(arg) else f"missed {got}", flush=True)
    for pid in strangers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
