"""A search's Pareto front as a static PNG (matplotlib, Agg backend: no display needed).

Two objectives: every evaluated candidate (grey), the front (highlighted, joined by its staircase), the best
candidate, and the experts scored alone as reference points when they were evaluated. More objectives: one such
panel per pair of objectives.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from evomerge.errors import UserError

if TYPE_CHECKING:
    from evomerge.service.results import Summary


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("writing a PNG needs matplotlib (pip install matplotlib); write a .csv instead",
                        where="--output") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def front_png(summary: "Summary", points: Sequence[tuple[int, dict[str, float]]], out: Path) -> Path:
    """Plot ``summary``'s front over ``points`` (every evaluated candidate: (id, values)) into ``out``."""
    plt = _pyplot()
    names = summary.names
    pairs = list(combinations(range(len(names)), 2)) or [(0, 0)]
    cols = min(3, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs):
        x, y = names[i], names[j]
        ax.scatter([v.get(x) for _, v in points], [v.get(y) for _, v in points], s=10, c="0.75",
                   label="candidates")
        front = sorted(summary.front, key=lambda p: p.values[x])
        fx, fy = [p.values[x] for p in front], [p.values[y] for p in front]
        if len(names) == 2:
            # the edge of the dominated region: vertical first when x is maximized (see figures.front_figure)
            ax.step(fx, fy, where="pre" if summary.objectives[0].maximize else "post", c="tab:blue", lw=1)
        ax.scatter(fx, fy, s=28, c="tab:blue", label="front")
        if summary.best is not None:
            ax.scatter([summary.best.values[x]], [summary.best.values[y]], s=90, marker="*", c="tab:orange",
                       label=f"best (#{summary.best.index})", zorder=3)
        for ref in summary.references:
            values = ref.get("values") or {}
            if x in values and y in values:
                ax.scatter([values[x]], [values[y]], s=60, marker="D", c="tab:red", zorder=3)
                ax.annotate(f"expert {ref['name']}", (values[x], values[y]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8, color="tab:red")
        ax.set_xlabel(f"{x} ({summary.objectives[i].direction})")
        ax.set_ylabel(f"{y} ({summary.objectives[j].direction})")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"search {summary.search_id} ({summary.row.name}): {len(summary.front)} on the front, "
                 f"{len(points)} evaluated")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["front_png"]
