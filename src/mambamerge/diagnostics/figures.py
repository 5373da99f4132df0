"""PNG figures of the diagnostics, drawn on matplotlib's Agg canvas (no pyplot, no global state).

Every function takes plain numbers (lists, tensors) and returns PNG bytes.
"""
import io
import math
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _wrap(title: str, fig: Figure, fontsize: float = 10) -> str:
    """`title` broken into lines that fit the figure's width (each of its own lines wrapped apart)."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in title.splitlines())


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def decay_png(kernels: Dict[str, List[List[float]]], title: str) -> bytes:
    """kernels: {"fwd": [K(k) per lag, one list per block], "bwd": ...}. Two panels, one line per block."""
    fig = _figure(12, 4.6)
    axes = fig.subplots(1, 2, sharey=True)
    cmap = colormaps["viridis"]
    for ax, direction in zip(axes, ("fwd", "bwd")):
        per_block = kernels[direction]
        for block, kernel in enumerate(per_block):
            ax.plot(range(len(kernel)), kernel, color=cmap(block / max(len(per_block) - 1, 1)), label=f"block {block}")
        ax.axhline(math.exp(-1), color="0.4", linestyle=":", linewidth=1)
        ax.annotate("1/e", (len(per_block[0]) - 1, math.exp(-1)), xytext=(-20, 4), textcoords="offset points",
                    fontsize=8, color="0.3")
        ax.set_yscale("log")
        ax.set_xlabel(f"lag k (tokens, in the {'forward' if direction == 'fwd' else 'backward'} scan's order)")
        ax.set_title(f"{direction} scan")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decay kernel K(k) = mean exp(A·ΣΔ over k steps)")
    axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.suptitle(title)
    return _png(fig)


def attention_png(maps: Dict[int, Dict[str, torch.Tensor]], cls_index: int, title: str) -> bytes:
    """maps: {block: {"fwd": (L, L), "bwd": (L, L)}} channel-averaged |alpha| of one image.
    One row per block: forward, backward and their sum, on a shared log colour scale."""
    blocks = sorted(maps)
    fig = _figure(13, 4.1 * len(blocks))
    axes = fig.subplots(len(blocks), 3, squeeze=False)
    for row, block in zip(axes, blocks):
        panels = {"forward": maps[block]["fwd"], "backward": maps[block]["bwd"],
                  "sum of both": maps[block]["fwd"] + maps[block]["bwd"]}
        positive = torch.cat([m[m > 0].flatten() for m in panels.values()])
        vmax = float(positive.max())
        norm = LogNorm(vmin=max(float(torch.quantile(positive.double()[:100000], 0.05)), vmax * 1e-6), vmax=vmax)
        for ax, (name, matrix) in zip(row, panels.items()):
            image = ax.imshow(matrix.clamp(min=norm.vmin).numpy(), cmap="magma", norm=norm, interpolation="nearest")
            ax.axhline(cls_index, color="cyan", linewidth=0.6)
            ax.axvline(cls_index, color="cyan", linewidth=0.6)
            ax.set_title(f"block {block}: {name}", fontsize=10)
            ax.set_xlabel("input token s")
            ax.set_ylabel("output token t")
        fig.colorbar(image, ax=row, shrink=0.8, label="mean over channels of |α(t, s)|")
    fig.suptitle(title + f"  (cyan: class token, index {cls_index})")
    return _png(fig)


def dependence_png(curves: Dict[str, Dict[str, torch.Tensor]], title: str) -> bytes:
    """curves: {label: {"distance": (n,), "change": (B, n)}}; mean over images, one line per label, log y."""
    fig = _figure(11, 4.8)
    ax = fig.subplots()
    for index, (label, curve) in enumerate(curves.items()):
        mean = curve["change"].mean(0)
        ax.plot(curve["distance"].numpy(), mean.clamp(min=1e-12).numpy(), color=f"C{index % 10}", label=label,
                linewidth=1.2)
    ax.axvline(0, color="0.4", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("signed distance t − cls of the nudged token (negative: left of the class token)")
    ax.set_ylabel("relative change of the class token's output")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def correlation_png(rows: List[dict], blocks: Sequence[int], title: str, label: str = "Spearman ρ") -> bytes:
    """rows: summarise() output ({"statistic", "by_block"}); a heatmap statistic x block, values written in."""
    names = [r["statistic"] for r in rows]
    values = torch.tensor([[r["by_block"][b] for b in blocks] for r in rows], dtype=torch.float64)
    fig = _figure(2.6 + 0.75 * len(blocks), 1.2 + 0.2 * len(names))
    ax = fig.subplots()
    bound = max(float(values.abs().nan_to_num().max()), 1e-6)
    image = ax.imshow(values.numpy(), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound), aspect="auto")
    for i in range(len(names)):
        for j in range(len(blocks)):
            ax.text(j, i, f"{float(values[i, j]):+.2f}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    ax.set_xticks(range(len(blocks)), labels=[f"before\nblock {b}" for b in blocks], fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.5, label=label)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _png(fig)


def prune_merge_png(result: dict, title: str) -> bytes:
    """result: prune_vs_merge() output; top-1 against reduction, solid merge, dashed prune, one colour per config."""
    fig = _figure(9, 5)
    ax = fig.subplots()
    configs = list(dict.fromkeys(row["config"] for row in result["rows"]))
    for index, config in enumerate(configs):
        rows = [row for row in result["rows"] if row["config"] == config]
        xs = [100 * row["reduction"] for row in rows]
        for mode, style in (("merge", "-"), ("prune", "--")):
            ax.plot(xs, [100 * row[mode]["top1"] for row in rows], style, marker="o", color=f"C{index % 10}",
                    label=f"{config}, {mode}d")
    ax.axhline(100 * result["dense"]["top1"], color="0.4", linestyle=":", linewidth=1, label="dense")
    ax.set_xlabel("target average token reduction (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    ax.set_title(title)
    return _png(fig)


def merge_groups_png(planes: torch.Tensor, axes: Sequence[str], steps: List[dict],
                     importance: Optional[torch.Tensor], title: str,
                     panels: Sequence[Tuple[int, str]] = ((0, ""),), colour: Optional[torch.Tensor] = None,
                     cls_mark: Optional[Tuple[int, float, float]] = None) -> bytes:
    """Per input: the input, its Δ importance map, then the token groups after each step.

    planes: (B, *extent) inputs along the grid axes (canvas.grid_planes); axes: the grid's axis names,
    the last two a picture's rows and columns (a "freq" row axis is drawn with low frequencies at the
    bottom); steps: [{"block": before which block, "tokens": tokens after it, "picture": (B, *extent, 3)
    RGB in [0, 1] (canvas.group_pictures)}]; importance: (B, *extent), NaN where no patch lies, or None;
    panels: the pictures along the axes before the last two (a clip's frames), (flat index, label)
    (canvas.leading_panels). With one panel an input is one row (input, Δ, steps); with several (a clip)
    it gets a row per kind (input, Δ, each step) and a column per panel. colour: (B, *extent, 3) the
    input in colour (canvas.colour_planes), drawn instead of the grey plane; cls_mark: (panel, row,
    column) where the class token sits in the scan (canvas.class_token_mark), a white triangle on the
    input and on every step."""
    batch, extent = planes.shape[0], tuple(planes.shape[1:])
    index = torch.tensor([flat for flat, _ in panels])

    def pick(x: torch.Tensor) -> torch.Tensor:  # (B, *extent, ...) -> (B, panels, rows, cols, ...)
        return x.reshape(batch, -1, *x.shape[len(extent) - 1:])[:, index]

    entries = [("input", pick(planes), "gray") if colour is None else ("input", pick(colour), None)]
    if importance is not None:
        entries.append(("Δ importance", pick(importance), "viridis"))
    entries += [(f"before block {s['block']}: {s['tokens']} tokens", pick(s["picture"]), None) for s in steps]
    across = len(panels) == 1
    rows, columns = (batch, len(entries)) if across else (batch * len(entries), len(panels))
    panel = 1.9 * min(2.5, max(0.6, extent[-1] / extent[-2]))
    fig = _figure(panel * columns + 0.6, 2.0 * rows + 0.6)
    grid = fig.subplots(rows, columns, squeeze=False)
    origin = "lower" if axes[-2] == "freq" else "upper"
    for b in range(batch):
        for e, (name, pictures, cmap) in enumerate(entries):
            limits = {} if cmap is None else {"vmin": float(pictures[b].nan_to_num(float("inf")).min()),
                                             "vmax": float(pictures[b].nan_to_num(float("-inf")).max())}
            for f, (_, label) in enumerate(panels):
                ax = grid[b, e] if across else grid[b * len(entries) + e, f]
                ax.imshow(pictures[b, f].numpy(), cmap=cmap, interpolation="nearest", origin=origin, aspect="auto",
                          **limits)
                ax.set_xticks([])
                ax.set_yticks([])
                if cls_mark is not None and cls_mark[0] == f and name != "Δ importance":
                    ax.plot(cls_mark[2], cls_mark[1], marker=">", color="white", markeredgecolor="black",
                            markersize=6, clip_on=False)
                if across and b == 0:
                    ax.set_title(name, fontsize=8)
                if not across and f == 0:
                    ax.set_ylabel(name.replace(": ", "\n"), fontsize=7)
                if not across and e == 0:
                    ax.set_title(label, fontsize=8)
        if across:
            grid[b, 0].set_xlabel(f"{axes[-1]} →", fontsize=7)
            grid[b, 0].set_ylabel(f"{axes[-2]} {'↑' if origin == 'lower' else '↓'}", fontsize=7)
    mark = "; white triangle: the class token's place in the scan, just before that patch" if cls_mark else ""
    fig.suptitle(_wrap(title + mark, fig), fontsize=10)
    return _png(fig)
