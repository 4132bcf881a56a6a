"""Run a coroutine function in a fresh event loop of a given kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import anyio

Backend = Literal["none", "asyncio", "uvloop", "trio"]


def run_on(backend: Backend, fn: Callable[..., Any], *args: Any) -> Any:
    """Run the coroutine function *fn* in a fresh event loop of *backend*."""
    if backend == "trio":
        return anyio.run(fn, *args, backend="trio")
    options: dict[str, Any] = {}
    if backend == "uvloop":
        import uvloop

        options["loop_factory"] = uvloop.new_event_loop
    return anyio.run(fn, *args, backend="asyncio", backend_options=options)
