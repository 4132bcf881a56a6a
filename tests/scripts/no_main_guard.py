"""A script that forgot ``if __name__ == "__main__":``, run with the spawn start method.

A spawn child imports the main module again, so this module's top-level code
runs again in the child, where starting a process is refused while the
child is still bootstrapping: the child dies before it runs the function.
The parent prints what ``aioproc.run`` said about it.  Run by
``tests/test_messages.py`` (as a file, as a user would).
"""

from __future__ import annotations

import anyio

import aioproc


def answer() -> int:
    return 42


async def main() -> None:
    try:
        print(await aioproc.run(answer, context="spawn"))
    except aioproc.ProcessError as exc:  # the parent; in the child the start fails
        print(exc)


anyio.run(main)
