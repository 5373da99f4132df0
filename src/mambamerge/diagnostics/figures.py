"""PNG figures of the diagnostics, drawn on matplotlib's Agg canvas (no pyplot, no global state).

Every function takes plain numbers (lists, tensors) and returns PNG bytes.
"""
import io
import math
from typing import Dict, List, Optional, Sequence

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


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
    ax.set_title(title, fontsize=10)
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


def _group_colours(groups: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One random colour per group id. groups (n,) long, -1 for dropped -> (n, 3) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    palette = 0.15 + 0.85 * torch.rand(int(groups.max()) + 2, 3, generator=generator)
    colours = palette[groups.clamp(min=0)]
    return torch.where(groups[:, None] < 0, torch.zeros(3), colours)


def merge_groups_png(image: torch.Tensor, grid: Sequence[int], steps: List[dict],
                     importance: Optional[torch.Tensor], title: str) -> bytes:
    """One row per image: the input, the Δ importance map, then the token groups after each step.

    image: (B, C, H, W) in display range; grid: (rows, cols) of patches; steps: [{"block": before which
    block, "groups": (B, rows*cols) group id per patch, -1 where dropped, "tokens": tokens after it}];
    importance: (B, rows*cols) or None."""
    batch = image.shape[0]
    columns = 1 + (importance is not None) + len(steps)
    fig = _figure(1.9 * columns + 0.6, 2.0 * batch + 0.6)
    axes = fig.subplots(batch, columns, squeeze=False)
    rows, cols = grid
    for b in range(batch):
        grey = image[b].mean(0)
        grey = (grey - grey.min()) / (grey.max() - grey.min()).clamp(min=1e-12)
        panels = [("input", grey[..., None].expand(-1, -1, 3), None)]
        if importance is not None:
            panels.append(("Δ importance", importance[b].view(rows, cols), "viridis"))
        for step in steps:
            colours = _group_colours(step["groups"][b]).view(rows, cols, 3)
            patch_h, patch_w = grey.shape[0] // rows, grey.shape[1] // cols
            up = colours.repeat_interleave(patch_h, 0).repeat_interleave(patch_w, 1)
            shade = grey[:up.shape[0], :up.shape[1], None]
            panels.append((f"before block {step['block']}\n{step['tokens']} tokens", 0.55 * up + 0.45 * shade, None))
        for ax, (name, picture, cmap) in zip(axes[b], panels):
            ax.imshow(picture.numpy(), cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
