"""The plots: a sweep's top-1 vs GMACs and vs measured speed-up, one curve per method; a tune's candidates.

Drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend change).
"""
import io
import statistics
from typing import Dict, List

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MARKERS = "osD^v<>Ph*X"


def method_style(method: str):
    """(colour, marker) of a method, the same in every plot whichever methods ran: its place among the
    registered methods (sorted), or, for a method registered by the user, a place after them."""
    from mambamerge.merge import METHODS

    known = sorted(METHODS)
    index = known.index(method) if method in known else len(known) + sum(map(ord, method)) % 10
    return f"C{index % 10}", MARKERS[index % len(MARKERS)]


def accuracy_png(rows: List[dict], title: str, throughput_label: str, kind: str = "images") -> bytes:
    """PNG bytes of two panels sharing the top-1 axis: accuracy vs GMACs (one direction, merge
    overhead included) and accuracy vs measured speed-up over the dense model. rows: result rows with
    status "ok" (method, target_reduction, top1, gmacs_total_one_direction, speedup); the "dense" row
    is drawn as a star with a dotted line at its accuracy, every other method as one curve through its
    reductions, in its own colour (method_style). The speed-up of each row is against the dense forward
    timed interleaved with it, so it survives the drift of a shared machine that absolute inputs/s
    measured minutes apart do not. The GMACs panel names the target reductions on a top axis, the
    speed-up panel (where noise moves points sideways) beside each point, labels moved apart where they
    would overlap. throughput_label: how the throughput was measured (batch, device), for the x axis;
    kind: what the model takes (images, clips, spectrograms)."""
    dense = next(row for row in rows if row["method"] == "dense")
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "dense"))
    fig = Figure(figsize=(13, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    panels = [(axes[0], "gmacs_total_one_direction",
               f"GMACs per {kind[:-1]}: lower is cheaper\n(the literature's GFLOPs: one scan direction, merge included)"),
              (axes[1], "speedup", f"measured speed-up over dense (x): higher is faster\n({throughput_label})")]
    labels = []
    for ax, key, xlabel in panels:
        for method in methods:
            colour, marker = method_style(method)
            points = sorted((row[key], 100 * row["top1"], row["target_reduction"]) for row in rows
                            if row["method"] == method)
            xs, ys, _ = zip(*points)
            ax.plot(xs, ys, marker=marker, color=colour, label=method, linewidth=1.5, markersize=6)
            if key == "speedup":  # on the GMACs panel the top axis names the reductions
                labels += [(x, y, f"{target:.0%}", colour) for x, y, target in points]
        ax.axhline(100 * dense["top1"], color="0.5", linestyle=":", linewidth=1)
        ax.plot(dense[key], 100 * dense["top1"], marker="*", color="black", markersize=16, linestyle="none",
                label="dense", zorder=5)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.08)
        ax.grid(alpha=0.3)
    _reduction_axis(axes[0], rows)
    axes[0].set_ylabel("top-1 accuracy (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", title="method")
    fig.suptitle(title)
    fig.canvas.draw()  # the layout is final: label positions can be computed in pixels
    _point_labels(axes[1], labels)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _point_labels(ax, labels, fontsize: float = 7) -> None:
    """Write each (x, y, text, colour) just above and right of its point, moved up (then down) in steps
    of a line until its box overlaps no label already written, nor leaves the axes."""
    to_pixels, scale = ax.transData.transform, ax.figure.dpi / 72
    height, placed = 1.2 * fontsize * scale, []
    inside = ax.bbox
    for x, y, text, colour in sorted(labels, key=lambda label: (label[1], label[0])):
        px, py = to_pixels((x, y))
        width = 0.62 * fontsize * scale * len(text)
        for step in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, 6):
            left, bottom = px + 4 * scale, py + 3 * scale + step * height
            box = (left, bottom, left + width, bottom + height)
            free = all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed)
            if free and inside.y0 <= bottom and bottom + height <= inside.y1:
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(left - px, bottom - py), textcoords="offset pixels", fontsize=fontsize,
                    color=colour, va="bottom", annotation_clip=False, in_layout=False)


def _reduction_axis(ax, rows: List[dict]) -> None:
    """A top axis on the GMACs panel with a tick per target reduction, at the median GMACs of the
    rows aiming at it (GMACs follow the token count, hardly the method)."""
    targets = sorted({row["target_reduction"] for row in rows})
    positions = [statistics.median(row["gmacs_total_one_direction"] for row in rows if row["target_reduction"] == t)
                 for t in targets]
    top = ax.secondary_xaxis("top")
    top.set_xticks(positions, labels=[f"{t:.0%}" for t in targets])
    top.set_xlabel("target average reduction", fontsize=9)


def tune_png(results: Dict[object, "TuneResult"], title: str) -> bytes:
    """PNG bytes of a tune: every scored candidate's KL to the dense model (log scale) against its GMACs,
    one colour per method, the chosen configuration of each target ringed and labelled with its budget
    (a GMACs budget also drawn as a dotted line). results: {target: TuneResult}; only candidates scored on
    all calibration inputs are drawn (screening scores are on a slice and are not comparable)."""
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = set()
    for result in results.values():
        full = max(c["inputs"] for c in result.candidates)
        for c in result.candidates:
            if c["inputs"] != full:
                continue
            colour, marker = method_style(c["method"])
            ax.scatter(c["gmacs"], max(c["kl"], 1e-6), color=colour, marker=marker, s=22, alpha=0.7,
                       label=None if c["method"] in drawn else c["method"])
            drawn.add(c["method"])
        chosen = result.config
        ax.scatter(chosen["gmacs"], max(chosen["score"]["kl"], 1e-6), s=160, facecolors="none", edgecolors="black",
                   linewidths=1.5, label=None if "chosen" in drawn else "chosen")
        budget = chosen["budget"]
        if "gmacs" in budget:
            ax.axvline(budget["gmacs"], color="grey", linestyle=":", linewidth=1,
                       label=None if "budget" in drawn else "GMACs budget")
            drawn.add("budget")
        note = (f"{chosen['reduction']:.0%}" if "reduction" in budget
                else f"{budget['gmacs']:g} GMACs budget ({chosen['reduction']:.0%})")
        ax.annotate(note, (chosen["gmacs"], max(chosen["score"]["kl"], 1e-6)), textcoords="offset points",
                    xytext=(8, 6), fontsize=8)
        drawn.add("chosen")
    ax.set_yscale("log")
    ax.set_xlabel("GMACs per input (one scan direction, merge included)")
    ax.set_ylabel("KL to the dense model (nats, lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
