"""The accuracy plot of a sweep: top-1 vs GFLOPs and vs measured speed-up, one curve per method.

Drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend change).
"""
import io
import statistics
from typing import List

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MARKERS = "osD^v<>Ph"


def accuracy_png(rows: List[dict], title: str, throughput_label: str) -> bytes:
    """PNG bytes of two panels sharing the top-1 axis: accuracy vs GFLOPs (one direction, merge
    overhead included) and accuracy vs measured speed-up over the dense model. rows: result rows with
    status "ok" (method, target_reduction, top1, gflops_total_one_direction, speedup); the "dense" row
    is drawn as a star with a dotted line at its accuracy, every other method as one curve through its
    reductions. The speed-up of each row is against the dense forward timed interleaved with it, so
    it survives the drift of a shared machine that absolute images/s measured minutes apart do not.
    The GFLOPs panel names the target reductions on a top axis, the speed-up panel (where noise moves
    points sideways) beside each point.
    throughput_label: how the throughput was measured (batch, device), for the x axis."""
    dense = next(row for row in rows if row["method"] == "dense")
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "dense"))
    fig = Figure(figsize=(13, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    panels = [(axes[0], "gflops_total_one_direction",
               "GFLOPs per image (GMACs, one scan direction, incl. merge): lower is cheaper"),
              (axes[1], "speedup", f"measured speed-up over dense (x; {throughput_label}): higher is faster")]
    for ax, key, xlabel in panels:
        for index, method in enumerate(methods):
            colour, marker = f"C{index % 10}", MARKERS[index % len(MARKERS)]
            points = sorted((row[key], 100 * row["top1"], row["target_reduction"]) for row in rows
                            if row["method"] == method)
            xs, ys, _ = zip(*points)
            ax.plot(xs, ys, marker=marker, color=colour, label=method, linewidth=1.5, markersize=6)
            if key == "speedup":  # on the GFLOPs panel the top axis names the reductions
                for x, y, target in points:
                    ax.annotate(f"{target:.0%}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7,
                                color=colour)
        ax.axhline(100 * dense["top1"], color="0.5", linestyle=":", linewidth=1)
        ax.plot(dense[key], 100 * dense["top1"], marker="*", color="black", markersize=16, linestyle="none",
                label="dense", zorder=5)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.08)
        ax.grid(alpha=0.3)
    _reduction_axis(axes[0], rows)
    axes[0].set_ylabel("top-1 accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title="method")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _reduction_axis(ax, rows: List[dict]) -> None:
    """A top axis on the GFLOPs panel with a tick per target reduction, at the median GFLOPs of the
    rows aiming at it (GFLOPs follow the token count, hardly the method)."""
    targets = sorted({row["target_reduction"] for row in rows})
    positions = [statistics.median(row["gflops_total_one_direction"] for row in rows if row["target_reduction"] == t)
                 for t in targets]
    top = ax.secondary_xaxis("top")
    top.set_xticks(positions, labels=[f"{t:.0%}" for t in targets])
    top.set_xlabel("target average reduction", fontsize=9)
