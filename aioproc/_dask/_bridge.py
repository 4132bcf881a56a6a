"""Where the Dask client runs: on the caller's asyncio loop, or beside a trio one.

Dask's client is asyncio-only.  On asyncio (uvloop included) it runs on the
caller's own loop, and a call is an asyncio task there.  Under trio it runs on
an asyncio loop in one thread of its own, started with the pool and stopped
with it; a call is an asyncio task on that loop, and when the task is done its
done-callback hands the wake-up to the trio loop through trio's token
(``run_sync_soon``, which never blocks the asyncio loop).  One thread per
pool, none per call.

Either way a call's task does its own clean-up when it is cancelled (it stops
the child on the worker); the caller's side cancels it, waits for it shielded,
and lets its own cancellation go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import anyio
import sniffio

T = TypeVar("T")


class Handle(Generic[T]):
    """A call's task on the client loop, seen from the caller's loop.

    Its done-callbacks run on the caller's loop.
    """

    def __init__(self, cancel: Callable[[Handle[T]], None]) -> None:
        self.task: asyncio.Task[T] | None = None  # set on the client loop
        self._cancel = cancel
        self._event = anyio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._done = False

    def fire(self) -> None:
        """The task is done (called on the caller's loop)."""
        self._done = True
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        if self._done:
            callback()
        else:
            self._callbacks.append(callback)

    def is_done(self) -> bool:
        return self._done

    def failed(self) -> bool:
        """Done with an exception (other than a cancellation)."""
        task = self.task
        return (
            self._done
            and task is not None
            and not task.cancelled()
            and (task.exception() is not None)
        )

    async def wait(self) -> None:
        """Wait until the task is done, whatever its outcome."""
        await self._event.wait()

    async def result(self) -> T:
        """The task's result; cancelling this cancels the task and waits for its clean-up."""
        try:
            await self._event.wait()
        except BaseException:
            self.cancel()
            with anyio.CancelScope(shield=True):
                await self._event.wait()
            raise
        task = self.task
        if task is None:  # pragma: no cover - set before the task can finish
            raise RuntimeError("the call's task finished before it was recorded")
        return task.result()

    def cancel(self) -> None:
        """Cancel the task (it cleans up on its own); ``wait()`` waits for that."""
        if not self._done:
            self._cancel(self)


def _cancel_task(handle: Handle[Any]) -> None:
    if handle.task is not None:
        handle.task.cancel()


class ClientLoop:
    """The asyncio loop the Dask client lives on; ``spawn`` starts a coroutine there."""

    def __init__(self) -> None:
        self.library = sniffio.current_async_library()
        self._thread: threading.Thread | None = None
        if self.library == "asyncio":
            self.loop = asyncio.get_running_loop()
            return
        if self.library != "trio":
            raise RuntimeError(f"DaskPool runs on asyncio, uvloop or trio, not {self.library}")
        import trio

        self._token = trio.lowlevel.current_trio_token()
        started: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name="aioproc-dask-client", daemon=True
        )
        self._thread.start()
        self.loop = started.result()  # the thread's first step: microseconds

    @staticmethod
    def _serve(started: concurrent.futures.Future[asyncio.AbstractEventLoop]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        started.set_result(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def is_home(self) -> bool:
        """Whether the running loop is the one that created this."""
        try:
            if self._thread is None:
                return asyncio.get_running_loop() is self.loop
            import trio

            return trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def spawn(self, make: Callable[[], Coroutine[Any, Any, T]]) -> Handle[T]:
        """Start ``make()`` as a task on the client loop; call this on the caller's loop."""
        if self._thread is None:
            handle: Handle[T] = Handle(_cancel_task)
            handle.task = task = self.loop.create_task(make())
            task.add_done_callback(lambda _: handle.fire())
            return handle
        loop = self.loop
        token = self._token

        def cancel(h: Handle[T]) -> None:
            # Runs after create(): the loop runs threadsafe callbacks in order.
            loop.call_soon_threadsafe(_cancel_task, h)

        handle = Handle(cancel)

        def create() -> None:
            handle.task = task = loop.create_task(make())
            task.add_done_callback(lambda _: token.run_sync_soon(handle.fire))

        loop.call_soon_threadsafe(create)
        return handle

    async def call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make()`` on the client loop and return its result."""
        return await self.spawn(make).result()

    def close(self) -> None:
        """Stop the client loop's thread (under trio); call once the client is closed."""
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self._thread = None
