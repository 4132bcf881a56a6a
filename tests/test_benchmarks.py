"""The README's main job, ``python -m benchmarks``, runs end to end.

A smoke run at the smallest sizes (``--quick``: 20 children, every scenario and
every kind of way), so that the benchmark cannot rot.  Nothing here asserts a
speed: the figures are only checked for their shape and for being real (a
latency per child, positive and finite; the children all reaped).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("latency", "hol", "throughput", "lag", "scale", "calls")
#: The semantics checks of scenario 7, one cell each per way.
CHECKS = ("timeout", "cancel", "crash", "exception", "grandchild")


def _run_benchmarks(out: Path, *args: str, timeout: float = 180) -> dict[str, Any]:
    """``python -m benchmarks ARGS`` with warnings as errors; its output and figures."""
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "benchmarks",
            *args,
            "--json",
            str(out / "figures.json"),
            "--plot",
            str(out / "latency.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return {
        "returncode": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "json": out / "figures.json",
        "png": out / "latency.png",
    }


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_benchmarks(tmp_path_factory.mktemp("bench"), "--quick")


def test_exits_cleanly(quick_run: dict[str, Any]) -> None:
    assert quick_run["returncode"] == 0, quick_run["stderr"]
    for bad in ("Traceback", "Exception ignored", "Warning"):
        assert bad not in quick_run["stderr"], quick_run["stderr"]


def test_raw_figures(quick_run: dict[str, Any]) -> None:
    results = json.loads(quick_run["json"].read_text())
    assert results["children_left"] == []
    assert results["preset"] == "quick"
    assert set(SECTIONS) <= set(results)
    assert {"date", "cpu", "cores", "kernel", "python", "versions"} <= set(results["machine"])

    ways = {run["way"] for run in results["latency"]["runs"]}
    assert {"raw", "sync", "thread", "poll", "aioproc pidfd/asyncio"} <= ways
    for section in ("latency", "hol", "lag"):
        for run in results[section]["runs"]:
            latencies = run["latencies"]
            assert len(latencies) == 20, (section, run["way"])
            assert all(0 < x < 60 for x in latencies), (section, run["way"])
            assert len(run["start_seconds"]) == run["n"]
            assert run["cpu_seconds"] > 0
    for run in results["lag"]["runs"]:
        assert run["lags"], run["way"]  # the heartbeat ran while the children were joined
    assert set(results["lag"]["idle"]) <= {"asyncio", "uvloop", "trio"}

    blocks = results["lag"]["start_blocks"]
    assert {(r["start_method"], r["call"]) for r in blocks} == {
        (method, call)
        for method in ("fork", "forkserver", "spawn")
        for call in ("start()", "start_async()")
    }
    for r in blocks:
        assert r["blocks"], r
        assert all(0 < x < 60 for x in r["blocks"]), r
        if r["call"] == "start_async()" and r["payload"]:
            assert min(r["yields"]) > 0, r  # the arguments went out while the loop ran

    methods = {run["start_method"] for run in results["throughput"]["runs"]}
    assert methods == {"fork", "forkserver", "spawn"}
    assert all(run["per_second"] > 0 for run in results["throughput"]["runs"])

    scale = results["scale"]
    assert scale["reached"] >= 40
    assert scale["curve"][0]["live"] == 0
    assert scale["stopped_by"] is None

    for target in results["targets"]:
        assert target["verdict"] in ("met", "**missed**", "n/a"), target
        assert all(not math.isnan(v) for v in target["values"].values()), target
        assert isinstance(target["noisy"], bool), target


def test_calls_figures(quick_run: dict[str, Any]) -> None:
    """Scenario 7 ran each peer of the smoke run, with speed figures and every semantics cell."""
    results = json.loads(quick_run["json"].read_text())
    calls = results["calls"]
    sizes = calls["sizes"]
    speed = {run["way"]: run for run in calls["speed"]}
    semantics = {run["way"]: run for run in calls["semantics"]}
    ways = {"aioproc.run", "ProcessPoolExecutor"}
    skipped = {s["way"] for s in results["skipped"] if s["scenario"] == "7"}
    # aioproc.Pool runs where it exists, and is listed as skipped where not.
    ways |= {"aioproc.Pool"} - skipped
    assert set(speed) == set(semantics) == ways
    for way, run in speed.items():
        assert "error" not in run, run
        assert len(run["latencies"]) == sizes["sequential"], way  # none is a Dask cluster
        assert all(0 < x < 60 for x in run["latencies"]), way
        assert run["per_second"] > 0, way
        assert run["cpu_per_call"] > 0, way
        assert run["cpu_bound_seconds"] > 0, way
        assert run["threads"] >= 0, way
        assert run["left_processes"] == [], way
    for way, run in semantics.items():
        for check in CHECKS:
            assert isinstance(run[check]["ok"], bool), (way, check)
            assert run[check]["text"].startswith("yes") == run[check]["ok"], (way, check)
        assert run["left_processes"] == [], way
    # aioproc.run keeps every promise the table checks (its own tests say how fast).
    assert {check for check in CHECKS if not semantics["aioproc.run"][check]["ok"]} <= {
        "timeout",
        "cancel",
    }
    # The stdlib's pool never kills a call that timed out, nor a grandchild.
    assert not semantics["ProcessPoolExecutor"]["grandchild"]["ok"]


def test_table(quick_run: dict[str, Any]) -> None:
    text = quick_run["stdout"]
    for title in (
        "### 1. Join latency",
        "### 2. Head-of-line",
        "### 3. Start+join throughput",
        "### 5. Event-loop lag",
        "### 6. Scale",
        "### 7. Calls",
        "### Targets",
    ):
        assert title in text
    assert "| 7: Pool p50 <= 0.8x the best peer's" in text
    # Fits a terminal: no line wider than 120 columns.
    wide = [line for line in text.splitlines() if len(line) > 120]
    assert not wide, wide
    assert text.rstrip().splitlines()[-1].startswith("The run took ")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    # A way run while other processes were busy carries a mark after its name.
    names = {row.split("|")[1].strip().removesuffix(" †") for row in rows}
    for way in ("raw", "waitid", "sync", "thread", "poll", "aioproc pidfd/asyncio", "aioproc.run"):
        assert way in names, way
    assert "| 1: pidfd p50 latency <= 1.5x raw" in text
    assert "`start()` against `start_async()`" in text
    assert f"Raw figures: {quick_run['json']}" in text


def test_plot(quick_run: dict[str, Any]) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in quick_run["stdout"]
        assert not quick_run["png"].exists()
    else:
        assert quick_run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scale_from_a_lean_parent(tmp_path: Path) -> None:
    """``--scale-parent lean``: scenario 6's ramp runs in a process of its own, reaped."""
    run = _run_benchmarks(
        tmp_path, "--quick", "--scenarios", "6", "--scale", "10,20", "--scale-parent", "lean"
    )
    assert run["returncode"] == 0, run["stderr"]
    results = json.loads(run["json"].read_text())
    scale = results["scale"]
    assert scale["parent"] == "lean"
    assert scale["parent_rss"] > 0
    assert scale["reached"] >= 20
    assert scale["curve"][0]["live"] == 0
    assert results["children_left"] == []
    assert "The ramp ran in a lean parent" in run["stdout"]
