"""Hostile interleavings: a Hypothesis state machine over AsyncProcess.

The machine starts processes and, in any order, joins them (with and without
timeouts, in the step or in background tasks), cancels background joins,
terminates, kills and closes them, and lets time pass.  After every step it
checks, against the kernel (/proc), that ``is_alive()``, ``exitcode``, ``pid``
and the set of our live children agree, and that every finished join got the
child's one exit code.  It runs on every backend x watcher.

How it is driven.  The event loop runs where users run it, in the main thread
(the sigchld watcher only works there), for the whole test; the background
joins are tasks of one task group in it, so they are genuinely pending while
later steps run.  Hypothesis' ``RuleBasedStateMachine`` runs in a worker thread
(``anyio.to_thread``), and each step crosses into the loop with
``anyio.from_thread``; each check runs as one synchronous call in the loop, so
no task of the loop moves while it looks.  The worker thread makes ``fork()``
warn on Python >= 3.12; it is safe here, because that thread is blocked waiting
for the step (holding no lock) whenever the loop forks, so the warning is
ignored for this test only.  The alternatives were worse: a portal thread would
run the loop off the main thread (no sigchld), and a fresh ``anyio.run`` per
step could not keep a join pending across steps.

What a rule draws never depends on timing (whether a child has exited yet),
only on earlier draws, so that Hypothesis can replay and shrink a failure: a
rule may pick a process that a timing-dependent ``close()`` has closed, and
then checks the "closed" error instead.

Sizes: ``AIOPROC_STRESS_SCALE`` multiplies the examples per backend x watcher.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import aioproc
from aioproc import AsyncProcess
from aioproc._watchers import sigchld

from . import targets
from .conftest import FORK_THREAD_WARNING
from .helpers import DEADLINE, children_of_this_process, fork_server_and_helpers, open_fds, state_of

SCALE = float(os.environ.get("AIOPROC_STRESS_SCALE", "1"))
EXAMPLES = max(1, round(12 * SCALE))
STEPS = 30
MAX_SLOTS = 6  # processes started per example
LONG = 60.0  # a child that only ends when signalled

#: Totals over the run, for the report: machines (examples) and steps.
TOTALS = {"examples": 0, "steps": 0}


@dataclass(eq=False)
class Slot:
    """One started process and what the model knows about it."""

    proc: AsyncProcess
    pid: int
    lifetime: float
    #: Exit codes it may still end with: its own, or a signal sent to it.
    possible: set[int]
    final: int | None = None
    closed: bool = False

    def observe(self, code: int) -> None:
        if self.final is None:
            assert code in self.possible, f"pid {self.pid} exited {code}, not {self.possible}"
            self.final = code
        else:
            assert code == self.final, f"pid {self.pid} exited {self.final}, now says {code}"

    def ends_soon(self) -> bool:
        """Whether it has ended or will soon: by itself, or by a signal sent to it."""
        return self.final is not None or bool(self.possible)


@dataclass(eq=False)
class Joiner:
    """A background task joining one slot."""

    slot: Slot
    timeout: float | None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: bool = False
    result: int | None = None
    cancelled: bool = False
    #: The message of the ValueError a join of a closed process raises.
    error: str | None = None


def kernel_state(pid: int) -> str:
    """'running', 'zombie' or 'gone' (reaped), as the kernel sees our child."""
    if pid not in children_of_this_process():
        return "gone"
    return "zombie" if state_of(pid) == "Z" else "running"


class ProcessMachine(RuleBasedStateMachine):
    #: Set by the test, in a subclass: where background joins run, and the watcher.
    tg: anyio.abc.TaskGroup
    watcher: str

    def __init__(self) -> None:
        super().__init__()
        TOTALS["examples"] += 1
        self.slots: list[Slot] = []
        self.joiners: list[Joiner] = []
        # Objects of earlier tests may still close descriptors when collected:
        # what counts is that none is left open that was not open before.
        gc.collect()
        self.fds = anyio.from_thread.run_sync(open_fds)

    # -- helpers -------------------------------------------------------------

    def open_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.closed]

    def pick(self, i: int) -> Slot:
        # Any slot, closed ones too: what the rules may draw must not depend on
        # timing (whether a close succeeded), or Hypothesis could not replay them.
        return self.slots[i % len(self.slots)]

    def pending(self) -> list[Joiner]:
        return [j for j in self.joiners if not j.done]

    async def _run_joiner(self, joiner: Joiner) -> None:
        with joiner.scope:
            try:
                joiner.result = await joiner.slot.proc.join(joiner.timeout)
            except ValueError as exc:
                joiner.error = str(exc)
        joiner.cancelled = joiner.scope.cancelled_caught
        joiner.done = True

    async def _wait_done(self, joiners: list[Joiner]) -> None:
        with anyio.fail_after(DEADLINE):
            while not all(j.done for j in joiners):
                await anyio.sleep(0.001)

    # -- rules ---------------------------------------------------------------

    @precondition(lambda self: len(self.slots) < MAX_SLOTS)
    @rule(lifetime=st.sampled_from([0.0, 0.005, 0.05, LONG]), code=st.integers(0, 3))
    def start(self, lifetime: float, code: int) -> None:
        TOTALS["steps"] += 1
        p = AsyncProcess(target=targets.sleep_then_exit, args=(lifetime, code), context="fork")
        anyio.from_thread.run_sync(p.start)  # in the loop's thread, where users start
        assert p.pid is not None
        assert p.watcher == self.watcher
        natural = {code} if lifetime < LONG else set()
        self.slots.append(Slot(p, p.pid, lifetime, natural))

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, MAX_SLOTS), timeout=st.sampled_from([None, 0, 0.001, 0.02]))
    def join(self, i: int, timeout: float | None) -> None:
        TOTALS["steps"] += 1
        slot = self.pick(i)
        if slot.closed:
            with pytest.raises(ValueError, match="closed"):
                anyio.from_thread.run(slot.proc.join, timeout)
            return
        if timeout is None and not slot.ends_soon():
            timeout = 0.02

        async def join() -> int | None:
            with anyio.fail_after(DEADLINE):
                return await slot.proc.join(timeout)

        code = anyio.from_thread.run(join)
        if code is None:
            assert timeout is not None
        else:
            slot.observe(code)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, MAX_SLOTS), timeout=st.sampled_from([None, 0.005, 0.1]))
    def join_in_background(self, i: int, timeout: float | None) -> None:
        TOTALS["steps"] += 1
        # Created in the loop's thread: a cancel scope belongs to its event loop.
        joiner = anyio.from_thread.run_sync(Joiner, self.pick(i), timeout)
        self.joiners.append(joiner)
        anyio.from_thread.run_sync(self.tg.start_soon, self._run_joiner, joiner)

    @precondition(lambda self: self.slots)
    @rule(timeout=st.sampled_from([None, 0.02]))
    def join_each_in_background(self, timeout: float | None) -> None:
        """One more join per process, all at once: many tasks waiting together."""
        TOTALS["steps"] += 1
        for slot in self.slots:
            joiner = anyio.from_thread.run_sync(Joiner, slot, timeout)
            self.joiners.append(joiner)
            anyio.from_thread.run_sync(self.tg.start_soon, self._run_joiner, joiner)

    @precondition(lambda self: self.joiners)
    @rule(j=st.integers(0, 10))
    def cancel_background_join(self, j: int) -> None:
        TOTALS["steps"] += 1
        joiner = self.joiners[j % len(self.joiners)]  # maybe done: then a no-op
        anyio.from_thread.run_sync(joiner.scope.cancel)
        anyio.from_thread.run(self._wait_done, [joiner])

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, MAX_SLOTS), sig=st.sampled_from([signal.SIGTERM, signal.SIGKILL]))
    def send_signal(self, i: int, sig: signal.Signals) -> None:
        TOTALS["steps"] += 1
        slot = self.pick(i)
        method = slot.proc.terminate if sig == signal.SIGTERM else slot.proc.kill
        if slot.closed:
            with pytest.raises(ValueError, match="closed"):
                anyio.from_thread.run_sync(method)
            return
        anyio.from_thread.run_sync(method)
        if slot.final is None:
            slot.possible.add(-sig)

    @precondition(lambda self: self.slots)
    @rule(i=st.integers(0, MAX_SLOTS))
    def close(self, i: int) -> None:
        TOTALS["steps"] += 1
        slot = self.pick(i)
        if slot.closed:
            anyio.from_thread.run_sync(slot.proc.close)  # again: allowed, as in the stdlib
            return

        def close() -> tuple[int | None, str | None]:
            code = slot.proc.exitcode
            try:
                slot.proc.close()
            except ValueError as exc:
                return code, str(exc)
            return code, None

        code, error = anyio.from_thread.run_sync(close)
        if code is not None:
            slot.observe(code)
        if error is None:
            slot.closed = True
            # Joins still waiting on it are woken, and get its exit code.
            anyio.from_thread.run(self._wait_done, [j for j in self.joiners if j.slot is slot])
        else:
            assert code is None, f"close() refused an exited process: {error}"
            assert "still running" in error

    @rule(seconds=st.sampled_from([0, 0.001, 0.01, 0.05]))
    def let_time_pass(self, seconds: float) -> None:
        TOTALS["steps"] += 1
        anyio.from_thread.run(anyio.sleep, seconds)

    # -- the check after every step ------------------------------------------

    @invariant()
    def agrees_with_the_kernel(self) -> None:
        anyio.from_thread.run_sync(self._check)

    def _check(self) -> None:
        unreaped: set[int] = set()
        for slot in self.open_slots():
            p = slot.proc
            assert (p.pid, p.ident) == (slot.pid, slot.pid)
            before = kernel_state(slot.pid)
            alive = p.is_alive()
            code = p.exitcode
            if before != "running":
                assert not alive, f"pid {slot.pid} is {before} but is_alive() says True"
            if not alive:
                assert code is not None
            if code is None:
                unreaped.add(slot.pid)
                assert kernel_state(slot.pid) != "gone", f"pid {slot.pid} reaped behind our back"
            else:
                slot.observe(code)
        for slot in self.slots:
            if slot.closed:
                with pytest.raises(ValueError, match="closed"):
                    slot.proc.is_alive()
        assert children_of_this_process() - fork_server_and_helpers() == unreaped
        for joiner in self.joiners:
            if joiner.error is not None:
                assert joiner.slot.closed
                assert "closed" in joiner.error
            elif joiner.done and joiner.result is not None:
                joiner.slot.observe(joiner.result)
            elif joiner.done and not joiner.cancelled and joiner.timeout is None:
                raise AssertionError(f"a join without timeout returned None: {joiner}")
        if self.watcher == "sigchld" and not self.pending():
            assert sigchld._hubs == {}, "a sigchld hub outlived every join"

    def teardown(self) -> None:
        anyio.from_thread.run(self._teardown)

    async def _teardown(self) -> None:
        with anyio.fail_after(DEADLINE):
            for slot in self.open_slots():
                slot.proc.kill()
            for slot in self.open_slots():
                code = await slot.proc.join()
                assert code is not None
                if slot.final is None:
                    slot.possible.add(-signal.SIGKILL)
                slot.observe(code)
                slot.proc.close()
                slot.closed = True
        await self._wait_done(self.joiners)
        for joiner in self.joiners:
            if joiner.result is not None:
                joiner.slot.observe(joiner.result)
        assert children_of_this_process() - fork_server_and_helpers() == set()
        assert open_fds() - self.fds == set()
        assert sigchld._hubs == {}
        assert [t.name for t in threading.enumerate() if t.name.startswith("aioproc-")] == []


@pytest.mark.slow
@FORK_THREAD_WARNING
async def test_state_machine(watcher: str, record_property: Any) -> None:
    before = dict(TOTALS)

    def run(tg: anyio.abc.TaskGroup) -> None:
        class Machine(ProcessMachine):
            pass

        Machine.tg, Machine.watcher = tg, watcher
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )

    async with anyio.create_task_group() as tg:
        await anyio.to_thread.run_sync(run, tg)
    examples = TOTALS["examples"] - before["examples"]
    steps = TOTALS["steps"] - before["steps"]
    record_property("examples", examples)
    record_property("steps", steps)
    print(f"state machine on {watcher}: {examples} examples, {steps} steps")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@FORK_THREAD_WARNING
async def test_sigchld_lead_is_passed_on_when_its_successor_leaves() -> None:
    """Regression: the sigchld hub lost its leader, and joins hung.

    The leading join hands the lead to a waiting one when it stops waiting.  If
    that one left too (its child exited, or it was cancelled) before taking it,
    nobody read the hub's pipe and every other join of the loop hung; 1000
    children exiting at once hit it about every other run.  Here the leader
    and (half the time) its successor are cancelled together; the third join
    must still wake when its child exits.
    """
    aioproc.set_watcher("sigchld")
    for _ in range(20):
        await _leader_and_successor_leave()


async def _leader_and_successor_leave() -> None:
    pipes = [multiprocessing.Pipe() for _ in range(3)]
    procs = [
        AsyncProcess(target=targets.ready_then_crash, args=(theirs, "exit")) for _, theirs in pipes
    ]
    for p in procs:
        p.start()
    for ours, _ in pipes:
        with anyio.fail_after(DEADLINE):
            await anyio.wait_readable(ours.fileno())
        assert ours.recv() == "ready"
    scopes = [anyio.CancelScope() for _ in procs]
    results: dict[int, int | None] = {}

    async def join(i: int) -> None:
        with scopes[i]:
            results[i] = await procs[i].join()

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(join, i)
        await anyio.wait_all_tasks_blocked()
        hub = sigchld._hubs[anyio.lowlevel.current_token()]
        assert hub.leader is not None
        leader = next(i for i, p in enumerate(procs) if p.pid == hub.leader.popen.pid)
        second, third = (i for i in range(3) if i != leader)
        scopes[leader].cancel()
        scopes[second].cancel()
        await anyio.wait_all_tasks_blocked()
        pipes[third][0].send("go")
        with anyio.fail_after(DEADLINE):
            while third not in results:
                await anyio.sleep(0.001)
    assert results == {third: 99}
    for i in (leader, second):
        procs[i].kill()
    for p in procs:
        with anyio.fail_after(DEADLINE):
            await p.join()
        p.close()
    for ours, theirs in pipes:
        ours.close()
        theirs.close()
