"""A Ctrl-C taken by another thread while ``start_async()`` forks, under trio.

Run as ``python -m tests.scripts.ctrl_c_in_another_thread`` from the
repository's root by ``tests/test_interrupt_windows.py``.  A helper thread
stands for trio's guest-mode I/O thread or a ``to_thread`` worker: the SIGINT
is sent to it (SIGINT is blocked in the forking thread), and Python runs the
handler in the main thread at its next chance, which is right after
``os.fork()`` returns.  The script prints ``forked PID`` for the child, then
``interrupted`` when KeyboardInterrupt reaches it, then ``reaped`` once the
child it holds is gone, or ``lost`` if the start had lost it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import trio

from aioproc import AsyncProcess

from .. import targets

_real_fork = os.fork
_helper = threading.Event()
_helper_ident = 0  # the thread the SIGINT is sent to


def fork_then_ctrl_c_elsewhere() -> int:
    pid = _real_fork()
    if pid:
        print(f"forked {pid}", flush=True)
        signal.pthread_kill(_helper_ident, signal.SIGINT)
        time.sleep(0.1)  # the handler runs in this thread once the helper took it
    return pid


async def main() -> None:
    p = AsyncProcess(target=targets.sleep, args=(60,), context="fork")
    os.fork = fork_then_ctrl_c_elsewhere
    try:
        await p.start_async()
        await trio.sleep(30)  # a checkpoint: the deferred KeyboardInterrupt comes here
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        os.fork = _real_fork
    if p._child is None:
        print("lost", flush=True)
        return
    p.kill()
    with trio.fail_after(30):
        await p.join()
    p.close()
    print("reaped", flush=True)


if __name__ == "__main__":
    thread = threading.Thread(target=_helper.wait, daemon=True)
    thread.start()
    assert thread.ident is not None
    _helper_ident = thread.ident
    trio.run(main)
    _helper.set()
