"""What the benchmark's children run.  Standard library only: spawn and
forkserver children import this module, and nothing here may slow them down.

A latency child waits for the barrier, sleeps its delay, writes
``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process of the
machine) into its slot of a shared ``mmap`` and calls ``os._exit(0)`` at once:
the stamp is its last instruction, so the latency the parent measures is the
kernel's exit plus the parent's wake-up and reaping, and nothing else.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import NoReturn

#: Exit code of a child whose own code failed (so a broken run cannot pass).
CHILD_FAILED = 70


def wait_for_release(barrier: tuple[int, int]) -> None:
    """Block until the parent closes the barrier's write end (every copy of it).

    A forked child inherits both ends; it must let go of the write end first,
    or the read would never see end-of-file.
    """
    read_end, write_end = barrier
    os.close(write_end)
    os.read(read_end, 1)
    os.close(read_end)


def stamp_and_exit(
    stamps: mmap.mmap | None, index: int, barrier: tuple[int, int] | None, delay: float
) -> NoReturn:
    """Wait for the barrier, sleep *delay*, stamp slot *index*, ``os._exit(0)``."""
    try:
        if barrier is not None:
            wait_for_release(barrier)
        if delay > 0:
            time.sleep(delay)
        if stamps is not None:
            struct.pack_into("d", stamps, 8 * index, time.monotonic())
    except BaseException:
        os._exit(CHILD_FAILED)
    os._exit(0)


def note_and_exit(note: int, barrier: tuple[int, int], delay: float) -> NoReturn:
    """Wait for the barrier, sleep *delay*, write a byte to *note*, ``os._exit(0)``.

    The byte wakes the parent's event loop as the child ends, as a join would
    be woken, with nothing joined (scenario 5's floor for any way of joining).
    """
    try:
        wait_for_release(barrier)
        time.sleep(delay)
        os.write(note, b".")
    except BaseException:
        os._exit(CHILD_FAILED)
    os._exit(0)


async def stamp_and_exit_async(
    stamps: mmap.mmap | None, index: int, barrier: tuple[int, int] | None, delay: float
) -> None:
    """The same, as a coroutine function (aiomultiprocess wants one)."""
    stamp_and_exit(stamps, index, barrier, delay)


def wait_on_fifo(path: str) -> NoReturn:
    """Block until the parent lets go of its end of the FIFO at *path*, then exit.

    For children that inherit nothing from the parent (forkserver).  Opening
    without blocking and then reading means that a child which comes late,
    after the parent has let go, finds end-of-file at once instead of
    waiting for a writer that will never come.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        os.read(fd, 1)
    except BaseException:
        os._exit(CHILD_FAILED)
    os._exit(0)


def noop() -> None:
    """Return at once, through the normal ``multiprocessing`` exit path."""


async def noop_async() -> None:
    """The same, as a coroutine function."""


class Barrier:
    """A pipe every child blocks on until the parent closes the write end."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()

    @property
    def ends(self) -> tuple[int, int]:
        return self.read_end, self.write_end

    def release(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def close(self) -> None:
        self.release()
        if self.read_end >= 0:
            os.close(self.read_end)
            self.read_end = -1


def take(data: bytes) -> None:
    """A child that only receives its argument (scenario 5's start blocking)."""
    if not data:
        os._exit(CHILD_FAILED)


def print_pid_then_sleep(tag: str, seconds: float) -> None:
    """Print ``TAG PID`` on stdout, then sleep (the pdeathsig benchmark's children)."""
    print(tag, os.getpid(), flush=True)
    time.sleep(seconds)
