"""The figures of a greedy imitation run: the per-layer study and the kept neurons per layer."""

from __future__ import annotations

import math
from typing import Any

from prunelab.io import atomic_write


def plot_study(curves: list[dict[str, Any]], path: Any) -> None:
    """One panel per layer: discrepancy against neurons kept, local and global imitation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(curves))
    rows = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax, curve in zip(axes.flat, curves):
        for name, colour in (("local", "tab:blue"), ("global", "tab:orange")):
            points = [(n + 1, v) for n, v in enumerate(curve[name]) if v is not None and v > 0]
            if points:
                ax.plot(*zip(*points), color=colour, label=name)
        ax.set_yscale("log")
        ax.set_title(f"{curve['group']} ({curve['size']})", fontsize=8)
        ax.set_xlabel("neurons kept", fontsize=7)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_ylabel("CE to the dense model", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_layers(records: list[dict[str, Any]], path: Any) -> None:
    """Kept neurons per layer, coloured by the imitation that won."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(records)), 3.5))
    xs = range(len(records))
    colours = ["tab:blue" if r["method"] == "local" else "tab:orange" for r in records]
    ax.bar(xs, [r["size"] for r in records], color="lightgrey", label="width")
    ax.bar(xs, [len(r["keep"]) for r in records], color=colours)
    ax.set_xticks(list(xs), [r["group"] for r in records], rotation=90, fontsize=6)
    ax.set_ylabel("neurons kept (blue local, orange global)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
