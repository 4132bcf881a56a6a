"""Sizes and the ways each scenario compares: quick, default and full presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._calls import CallSizes
from ._peers import PEERS, CallPeer
from ._ways import (
    AIOMULTIPROCESS,
    BACKENDS,
    POLL,
    RAW,
    SYNC,
    THREAD,
    WAITID,
    Way,
    aioproc_way,
)

SCENARIOS: dict[int, str] = {
    1: "join latency",
    2: "head-of-line blocking",
    3: "start+join throughput",
    4: "threads and parent CPU",
    5: "event-loop lag",
    6: "scale",
    7: "calls",
}
#: Scenario 4 reads scenario 1's runs; 5 reads start() times from 3's.
NEEDS: dict[int, int] = {4: 1, 5: 3}
WATCHER_NAMES = ("pidfd", "sigchld", "sentinel", "thread")
START_METHODS = ("fork", "forkserver", "spawn")


@dataclass
class Settings:
    preset: str = "default"
    scenarios: list[int] = field(default_factory=lambda: sorted(SCENARIOS))
    seed: int = 5
    #: Scenario 1: children, exits per second (scenarios 2 and 5 use the rate too).
    n: int = 1000
    rate: float = 500.0
    #: Scenario 1: rounds of every way, each of `n` children, every other one in
    #: reverse order, so that no way always runs first (when the process is
    #: smallest: its children are the cheapest to fork and to end).
    latency_rounds: int = 2
    #: Scenario 5: children joined while the heartbeat runs, in `lag_rounds`
    #: rounds of every way (as scenario 1's): the target is a p99, which
    #: 2 rounds (about 1500 heartbeats a way) left 0.2-0.5 ms apart run to run.
    lag_n: int = 500
    lag_rounds: int = 4
    #: Scenario 2: long children (exit after long_seconds), then short ones at `rate`.
    hol_long: int = 6
    hol_long_seconds: float = 1.5
    hol_short: int = 500
    #: Scenario 3: children per start method, started and joined `batch` at a time.
    throughput: dict[str, int] = field(
        default_factory=lambda: {"fork": 200, "forkserver": 100, "spawn": 40}
    )
    batch: int = 50
    repeat: int = 5
    #: Scenario 5: seconds of heartbeat on an idle loop, per backend.
    idle_seconds: float = 0.3
    #: Scenario 5: starts timed per start method, with start() and start_async(),
    #: with no arguments and (forkserver, spawn) with `start_payload` bytes of them.
    start_blocks: dict[str, int] = field(
        default_factory=lambda: {"fork": 50, "forkserver": 30, "spawn": 15}
    )
    start_payload: int = 1 << 20
    #: Scenario 6: live-children checkpoints, starts timed at each.
    scale: list[int] = field(default_factory=lambda: [1000, 2000])
    scale_samples: int = 20
    #: Start method of the ramp's children: forkserver children are forked
    #: from the small fork server, not from this big process, and so are small.
    scale_method: str = "fork"
    #: Who ramps up: "this" process, or a "lean" one that does nothing else.
    scale_parent: str = "this"
    #: "default" compares the headline ways; "full" every watcher on every loop.
    matrix: str = "default"
    #: Loops on which scenario 1 also runs the sigchld, sentinel and thread
    #: watchers (pidfd runs on every loop, everywhere).
    watchers_on: tuple[str, ...] = ()
    #: aiomultiprocess's own Process makes round trips to a manager process on
    #: every start (tens of ms each): the default run leaves it out.  `poll`
    #: is its way of joining, and is measured in every run.
    aiomultiprocess: bool = False
    #: Scenario 7: sizes, and the peers run (labels; empty: every peer).
    calls: CallSizes = field(default_factory=CallSizes)
    call_peers: list[str] = field(default_factory=list)
    #: Run only the ways one of these names (see Way.matches; empty: all).
    only: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    # -- which ways each scenario runs --------------------------------------

    def _aioproc(self, *, all_watchers_on: tuple[str, ...]) -> list[Way]:
        ways = []
        for backend in BACKENDS:
            for watcher in WATCHER_NAMES:
                if watcher == "pidfd" or self.matrix == "full" or backend in all_watchers_on:
                    ways.append(aioproc_way(watcher, backend))
        return ways

    def latency_ways(self) -> list[Way]:
        extra = [AIOMULTIPROCESS] if self.aiomultiprocess else []
        return [
            RAW,
            WAITID,
            *(Way("wake", backend) for backend in BACKENDS),
            SYNC,
            THREAD,
            POLL,
            *extra,
            *self._aioproc(all_watchers_on=self.watchers_on),
        ]

    def hol_ways(self) -> list[Way]:
        baselines = [RAW, SYNC, THREAD, POLL] if self.matrix == "full" else [RAW, THREAD]
        return [*baselines, *self._aioproc(all_watchers_on=())]

    def throughput_ways(self, start_method: str) -> list[Way]:
        if start_method == "fork":
            ways = [RAW, SYNC, *(Way("stdwake", backend) for backend in BACKENDS)]
            if self.matrix == "full":
                ways += [THREAD, POLL]
            ways += [aioproc_way("pidfd", b) for b in BACKENDS]
            if self.matrix == "full":
                ways += [aioproc_way(w) for w in WATCHER_NAMES if w != "pidfd"]
            return ways
        ways = [SYNC, aioproc_way("pidfd")]
        if start_method == "forkserver":
            ways.append(aioproc_way("sentinel"))
        if self.matrix == "full":
            ways += [THREAD, POLL, *(aioproc_way(w) for w in ("sigchld", "thread"))]
        return ways

    def lag_ways(self) -> list[Way]:
        return [
            *(Way("wake", backend) for backend in BACKENDS),
            THREAD,
            POLL,
            *self._aioproc(all_watchers_on=()),
        ]

    def peers(self) -> list[CallPeer]:
        if not self.call_peers:
            return list(PEERS)
        return [peer for peer in PEERS if peer.label in self.call_peers]


def preset(name: str) -> Settings:
    """The settings of a preset: ``quick`` (smoke test), ``default``, ``full``."""
    if name == "default":
        return Settings()
    if name == "full":
        return Settings(
            preset="full",
            matrix="full",
            aiomultiprocess=True,
            lag_n=1000,
            throughput={"fork": 400, "forkserver": 150, "spawn": 30},
            scale=[1000, 2000, 5000],
        )
    if name == "quick":
        return Settings(
            preset="quick",
            aiomultiprocess=True,
            watchers_on=("asyncio",),
            n=20,
            latency_rounds=1,
            lag_n=20,
            lag_rounds=1,
            hol_long=2,
            hol_long_seconds=0.2,
            hol_short=20,
            throughput={"fork": 20, "forkserver": 6, "spawn": 4},
            batch=10,
            repeat=1,
            idle_seconds=0.1,
            start_blocks={"fork": 3, "forkserver": 2, "spawn": 2},
            scale=[20, 40],
            scale_samples=3,
            calls=CallSizes(
                sequential=20,
                concurrent=100,
                concurrent_slow=10,
                sequential_slow=10,
                cpu_calls=4,
                cpu_seconds=0.02,
                hold=1.0,
            ),
            # The smoke run compares the two aioproc ways with the stdlib's pool.
            call_peers=["aioproc.Pool", "aioproc.run", "ProcessPoolExecutor"],
        )
    raise ValueError(f"unknown preset {name!r}; use quick, default or full")
