"""The PNG of the latency distributions (matplotlib, an optional extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

#: Baselines: grey and warm colours, thin dash-dot lines, named by what they do.
_BASELINES = {
    "raw": ("black", "raw: bare os.fork + waitpid (the floor)"),
    "waitid": ("tab:gray", "waitid: AsyncProcess children, blocking waitid"),
    "sync": ("silver", "sync: multiprocessing, blocking join()"),
    "thread": ("tab:red", "thread: multiprocessing + asyncio.to_thread(join)"),
    "poll": ("tab:orange", "poll: multiprocessing + is_alive() every 5 ms"),
    "aiomultiprocess": ("tab:brown", "aiomultiprocess.Process (polls every 5 ms)"),
}
#: aioproc: solid lines, a colour family per event loop, a shade per watcher
#: (pidfd, the default, darkest and thickest).
_LOOPS = {"asyncio": "Blues", "uvloop": "Greens", "trio": "Purples"}
_WATCHERS = {
    "pidfd": (0.95, "-"),
    "sigchld": (0.75, "--"),
    "sentinel": (0.6, ":"),
    "thread": (0.45, "-."),
}
_PANELS = (
    ("latency", "1. join latency"),
    ("hol", "2. head-of-line: short children behind long ones"),
)


def missing() -> str | None:
    """Why no plot can be drawn here (None: matplotlib is installed)."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install aioproc[bench]); no plot written"
    return None


def _style(way: str) -> tuple[Any, str, float, str]:
    """Colour, line style, width and legend label of *way*'s curve."""
    if way in _BASELINES:
        name, label = _BASELINES[way]
        return name, "-" if way == "raw" else "-.", 1.6 if way == "raw" else 1.1, label
    import matplotlib

    watcher, _, loop = way.removeprefix("aioproc ").partition("/")
    shade, style = _WATCHERS.get(watcher, (0.8, "-"))
    colour = matplotlib.colormaps[_LOOPS.get(loop, "Greys")](shade)
    label = f"aioproc on {loop}, {watcher} watcher" + (" (default)" if watcher == "pidfd" else "")
    return colour, style, 2.4 if watcher == "pidfd" else 1.5, label


def plot(results: dict[str, Any], path: Path) -> bool:
    """Draw one CDF per way and scenario into *path*; False if there is nothing to draw."""
    panels = [(key, title) for key, title in _PANELS if results.get(key, {}).get("runs")]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6.2), squeeze=False)
    legend: dict[str, Any] = {}  # one entry per way, for the legend the panels share
    for ax, (key, title) in zip(axes[0], panels, strict=False):
        for run in results[key]["runs"]:
            if run["way"].startswith("wake/"):
                continue  # a floor for the targets table; the curves are the ways people use
            values = sorted(max(x, 1e-6) * 1e3 for x in run["latencies"])
            if not values:
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            colour, style, width, label = _style(run["way"])
            (line,) = ax.step(
                values, fractions, where="post", label=label, color=colour, ls=style, lw=width
            )
            legend.setdefault(label, line)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ms from a child's last instruction to its join returning (log scale)")
        ax.set_ylabel("fraction of children joined within that time")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    machine = results["machine"]
    fig.suptitle(
        f"aioproc vs the ways of joining processes from async code "
        f"({machine['cores']} cores, Linux {machine['kernel']}, Python {machine['python']}, "
        f"{machine['date'][:10]}): the further left a curve, the sooner its children were joined",
        fontsize=10,
    )
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
        title="Baselines: thin, dash-dotted.  aioproc: one colour per event loop; its default "
        "watcher (pidfd) thick and solid, the others lighter and dashed or dotted",
        title_fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
