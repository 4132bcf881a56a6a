"""Scenario 5's start blocking: how long one start holds the event loop.

``start()`` holds it for the whole call.  ``start_async()`` holds it in
steps, between its awaits; a step timer drives the coroutine one step at a
time and times each (the time the task ran before handing the loop back),
so the figure is the longest step of each start, on the same clock as
``start()``'s.  Each start is joined before the next, so no child competes
with the next start for a core.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Generator
from dataclasses import asdict, dataclass
from typing import Any

import anyio

import aioproc

from ._children import noop, take


class StepTimer:
    """Await a coroutine, timing every step it runs between two suspensions."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.steps: list[float] = []

    def __await__(self) -> Generator[Any, Any, Any]:
        it = self.coro.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            t = time.perf_counter()
            try:
                yielded = it.send(sent) if thrown is None else it.throw(thrown)
            except StopIteration as stop:
                self.steps.append(time.perf_counter() - t)
                return stop.value
            except BaseException:
                self.steps.append(time.perf_counter() - t)
                raise
            self.steps.append(time.perf_counter() - t)
            sent, thrown = None, None
            try:
                sent = yield yielded
            except GeneratorExit:
                it.close()
                raise
            except BaseException as exc:  # a cancellation, delivered into the coroutine
                thrown = exc


@dataclass
class StartBlocks:
    start_method: str
    payload: int
    call: str
    #: Per start: the longest time it held the loop in one go, in seconds.
    blocks: list[float]
    #: Per start: how many times start_async() handed the loop back.
    yields: list[int]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def start_blocks(start_method: str, payload: int, n: int, warm_up: int) -> list[StartBlocks]:
    """Start and join *n* children with ``start()``, then *n* with ``start_async()``."""
    args: tuple[Any, ...] = (b"x" * payload,) if payload else ()
    target = take if payload else noop
    out = []
    for call in ("start()", "start_async()"):
        blocks: list[float] = []
        yields: list[int] = []
        for i in range(warm_up + n):
            p = aioproc.AsyncProcess(target=target, args=args, context=start_method)
            if call == "start()":
                t = time.perf_counter()
                p.start()
                block, steps = time.perf_counter() - t, 1
            else:
                timer = StepTimer(p.start_async())
                await timer
                block, steps = max(timer.steps), len(timer.steps)
            code = await p.join()
            p.close()
            if code != 0:
                raise RuntimeError(f"{start_method} child exited with {code}")
            if i >= warm_up:
                blocks.append(block)
                yields.append(steps - 1)
        out.append(StartBlocks(start_method, payload, call, blocks, yields))
    return out


def measure(start_method: str, payload: int, n: int) -> list[dict[str, Any]]:
    """``start_blocks`` in a fresh asyncio loop, as JSON records."""
    warm_up = 3 if n >= 10 else 1  # imports, the fork server, first-use caches
    records: list[StartBlocks] = anyio.run(start_blocks, start_method, payload, n, warm_up)
    return [r.as_json() for r in records]
