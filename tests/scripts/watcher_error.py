"""Prints what ``start()`` says when ``$AIOPROC_WATCHER`` names no watcher.

Run by ``tests/test_messages.py`` with ``AIOPROC_WATCHER`` set: the variable is
read once per process, so a fresh interpreter is needed.
"""

from __future__ import annotations

from aioproc import AsyncProcess

if __name__ == "__main__":
    try:
        AsyncProcess(target=print).start()
    except ValueError as exc:
        print(exc)
    else:
        print("started")
