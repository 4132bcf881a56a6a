"""The PNG of the latency distributions (matplotlib, an optional extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

#: Baselines in warm colours and dash-dots; aioproc by watcher (colour) and loop (line).
_BASELINES = {
    "raw": "black",
    "sync": "tab:gray",
    "thread": "tab:red",
    "poll": "tab:orange",
    "aiomultiprocess": "tab:brown",
}
_WATCHERS = {
    "pidfd": "tab:blue",
    "sigchld": "tab:cyan",
    "sentinel": "tab:olive",
    "thread": "tab:pink",
}
_LOOPS = {"asyncio": "-", "uvloop": "--", "trio": ":"}
_PANELS = (
    ("latency", "1. join latency"),
    ("hol", "2. head-of-line: short children behind long ones"),
)


def missing() -> str | None:
    """Why no plot can be drawn here (None: matplotlib is installed)."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install aioproc[bench]); no plot written"
    return None


def _style(way: str) -> tuple[str, str, float]:
    """Colour, line style and width of *way*'s curve."""
    if way in _BASELINES:
        return _BASELINES[way], "-" if way == "raw" else "-.", 2.0 if way == "raw" else 1.3
    watcher, _, loop = way.removeprefix("aioproc ").partition("/")
    width = 2.2 if watcher == "pidfd" else 1.3
    return _WATCHERS.get(watcher, "tab:purple"), _LOOPS.get(loop, "-"), width


def plot(results: dict[str, Any], path: Path) -> bool:
    """Draw one CDF per way and scenario into *path*; False if there is nothing to draw."""
    panels = [(key, title) for key, title in _PANELS if results.get(key, {}).get("runs")]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=False):
        for run in results[key]["runs"]:
            values = sorted(max(x, 1e-6) * 1e3 for x in run["latencies"])
            if not values:
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            colour, style, width = _style(run["way"])
            ax.step(
                values, fractions, where="post", label=run["way"], color=colour, ls=style, lw=width
            )
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log): child's last instruction to join returning")
        ax.set_ylabel("fraction of children")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    machine = results["machine"]
    fig.suptitle(
        f"aioproc vs the ways of joining processes from async code "
        f"({machine['cores']} cores, Linux {machine['kernel']}, Python {machine['python']}, "
        f"{machine['date'][:10]})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
