"""Every diagnostic of one checkpoint on a few inputs: the numbers (JSON-ready), the figures and a text summary."""
import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from mambamerge.diagnostics import figures
from mambamerge.diagnostics.attention import implicit_attention
from mambamerge.diagnostics.decay import decay_summary
from mambamerge.diagnostics.dependence import order_effect, perturbation_curve, side_summary
from mambamerge.diagnostics.importance import importance_study, summarise
from mambamerge.diagnostics.probe import DIRECTIONS, block_scans, class_index, trace
from mambamerge.diagnostics.prune_vs_merge import prune_vs_merge

PARTS = ("decay", "attention", "dependence", "order", "importance", "prune_vs_merge")
# MaMe's selections compared: its default, the Δ ranking both ways and chance, and ToMe's for contrast
PRUNE_CONFIGS = {"mame (default)": {"method": "mame"},
                 "mame (least Δ leave)": {"method": "mame", "sources": "least_delta"},
                 "mame (most Δ leave)": {"method": "mame", "sources": "most_delta"},
                 "mame (random leave)": {"method": "mame", "sources": "random"},
                 "tome (ordered)": {"method": "tome"}}
KEY_STATISTICS = ("delta:mean:sum:this", "delta:mean:sum:next", "write:sum:sum:this", "cls_proximity")


@dataclass
class Settings:
    """What to run. Blocks are 0-based; None picks defaults from the depth."""

    parts: Sequence[str] = PARTS
    loo_blocks: Optional[Sequence[int]] = None  # default: every second block from 1
    attention_blocks: Optional[Sequence[int]] = None  # default: first, middle, last
    loo_images: int = 16
    curve_images: int = 4
    max_lag: int = 98
    reductions: Sequence[float] = (0.2, 0.4, 0.6)
    prune_configs: Dict[str, dict] = field(default_factory=lambda: dict(PRUNE_CONFIGS))

    def resolve(self, depth: int) -> "Settings":
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown diagnostic(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
        loo = list(self.loo_blocks) if self.loo_blocks is not None else list(range(1, depth, 2))
        attention = (list(self.attention_blocks) if self.attention_blocks is not None
                     else sorted({0, depth // 2, depth - 1}))
        for name, blocks, low in (("leave-one-out", loo, 1), ("attention", attention, 0)):
            bad = [b for b in blocks if not low <= b < depth]
            if bad:
                raise ValueError(f"{name} blocks must be in [{low}, {depth - 1}] for a {depth}-block model, got {bad}")
        return Settings(self.parts, loo, attention, self.loo_images, self.curve_images, self.max_lag,
                        self.reductions, self.prune_configs)


@dataclass
class Report:
    numbers: Dict[str, object]
    figures: Dict[str, bytes]
    summary: List[str]


def _decay(model, images, settings, report: Report, title: str) -> None:
    kernels: Dict[str, List[List[float]]] = {d: [] for d in DIRECTIONS}
    per_block = []
    with torch.inference_mode():
        tr = trace(model, images)
        max_lag = min(settings.max_lag, tr.hidden[0].shape[1] - 1)
        for block in range(len(model.layers)):
            scans = block_scans(model, tr, block)
            entry = {"block": block}
            for direction in DIRECTIONS:
                summary = decay_summary(scans[direction], max_lag)
                kernels[direction].append(summary["kernel"])
                entry[direction] = summary
            per_block.append(entry)
    report.numbers["decay"] = {"max_lag": max_lag, "blocks": per_block}
    report.figures["decay.png"] = figures.decay_png(kernels, f"{title}: decay kernel per block")
    report.summary.append(f"decay (1/e length of the mean kernel; median over channel-states, lags up to {max_lag}):")
    for entry in per_block:
        cells = [f"{d} {_length(entry[d]['kernel_length'])} / {_length(entry[d]['length_quartiles'][1])}"
                 for d in DIRECTIONS]
        report.summary.append(f"  block {entry['block']:2d}: " + ", ".join(cells))


def _length(value: float) -> str:
    return ">max" if math.isinf(value) else f"{value:.0f}"


def _cell(value: Optional[float], spec: str) -> str:
    """A number of the summary, or n/a where there is none (no token at that distance or on that side of
    the class token, e.g. left of a class token at the head)."""
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def _attention(model, images, settings, report: Report, title: str) -> None:
    maps = {}
    wide = copy.deepcopy(model).double()  # the maps in float64, on a copy: `model` keeps its dtype
    with torch.inference_mode():
        tr = trace(wide, images[:1].double())
        for block in settings.attention_blocks:
            scans = block_scans(wide, tr, block)
            maps[block] = {d: implicit_attention(scans[d])[0].abs().mean(0).float() for d in DIRECTIONS}
    cls = class_index(model)
    report.numbers["attention"] = {
        str(block): {d: {"class_row_share_within_8": _share_near(m[d][cls], cls, 8)} for d in DIRECTIONS}
        for block, m in maps.items()}
    report.figures["attention.png"] = figures.attention_png(maps, cls, f"{title}: implicit attention (one input)")
    report.summary.append("attention: share of the class token's |α| row within 8 tokens of it (fwd, bwd):")
    for block, entry in report.numbers["attention"].items():
        report.summary.append(f"  block {block}: " + ", ".join(
            _cell(entry[d]["class_row_share_within_8"], ".2f") for d in DIRECTIONS))


def _share_near(row: torch.Tensor, cls: int, k: int) -> float:
    """Fraction of a row's mass within k tokens of the class token (the class token itself excluded);
    NaN when the row holds nothing else (the forward row of a class token at the head)."""
    near = (torch.arange(row.numel()) - cls).abs()
    mass = row.double().clone()
    mass[cls] = 0
    total = float(mass.sum())
    return float(mass[(near <= k) & (near > 0)].sum()) / total if total > 0 else float("nan")


def _dependence(model, images, settings, report: Report, title: str) -> None:
    imgs = images[:settings.curve_images]
    curves = {"whole model (nudge before block 0)": perturbation_curve(model, imgs, block=0, scope="model")}
    for block in settings.attention_blocks:
        curves[f"block {block} alone"] = perturbation_curve(model, imgs, block=block, scope="block")
    report.numbers["dependence"] = {label: {"distance": c["distance"].tolist(), "mean_change": c["change"].mean(0).tolist(),
                                            "at": side_summary(c["distance"], c["change"])}
                                    for label, c in curves.items()}
    report.figures["dependence.png"] = figures.dependence_png(
        curves, f"{title}: how far the class token feels one nudged token (nudge 10% of its norm)")
    report.summary.append("dependence (relative change of the class output; |distance| 1 / 8 / 64, left | right):")
    for label, entry in report.numbers["dependence"].items():
        at = entry["at"]
        cells = [" / ".join(_cell(at[side].get(k), ".2g") for k in (1, 8, 64)) for side in ("left", "right")]
        report.summary.append(f"  {label}: {cells[0]} | {cells[1]}")


def _order(model, images, labels, settings, report: Report) -> None:
    blocks = sorted({0, len(model.layers) // 2})
    report.numbers["order"] = {str(b): order_effect(model, images, labels, block=b) for b in blocks}
    report.summary.append("token order (no merging): top-1 / agreement with dense / mean KL, reordered before block:")
    for block, table in report.numbers["order"].items():
        for name, r in table.items():
            report.summary.append(f"  {block:>2} {name:9s} {r['top1']:.2%} / {r['agreement']:.2%} / {r['kl']:.3g}")


def _importance(model, images, labels, settings, report: Report, title: str) -> None:
    blocks = list(settings.loo_blocks)
    study = importance_study(model, images[:settings.loo_images], labels[:settings.loo_images], blocks)
    tables = {target: summarise(study, target) for target in ("kl", "logit_drop", "low_cost")}
    cls = class_index(model)
    spread = {}
    for block in blocks:
        rho = study[block]["rho"]
        spread[str(block)] = {name: {key: {"mean": float(v.nanmean()), "sd": float(v[~v.isnan()].std())}
                                     for key, v in entry.items()} for name, entry in rho.items()}
    kl = {str(b): study[b]["loo"].kl for b in blocks}
    report.numbers["importance"] = {
        "images": min(settings.loo_images, images.shape[0]), "blocks": blocks, "tables": tables, "per_block": spread,
        "mean_kl_by_distance": {b: _by_distance(v, cls) for b, v in kl.items()}}
    report.figures["correlation.png"] = figures.correlation_png(
        tables["kl"], blocks, f"{title}: Spearman ρ(statistic, leave-one-out KL), mean over images\n"
                              "(> 0: tokens with a high statistic are the costly ones to remove)")
    report.summary.append(f"importance: Spearman ρ with leave-one-out KL, mean over {report.numbers['importance']['images']} "
                          "images, per block " + str(blocks) + ":")
    rows = {r["statistic"]: r for r in tables["kl"]}
    shown = list(dict.fromkeys([r["statistic"] for r in tables["kl"][:5]] + list(KEY_STATISTICS)))
    for name in shown:
        r = rows[name]
        cells = " ".join(f"{r['by_block'][b]:+.2f}" for b in blocks)
        report.summary.append(f"  {name:24s} {cells}  (range {r['min']:+.2f}..{r['max']:+.2f})")


def _by_distance(kl: torch.Tensor, cls: int) -> Dict[str, float]:
    """Mean leave-one-out KL per signed distance to the class token. kl (B, L) -> {distance: value}."""
    mean = kl.nanmean(0)
    return {str(t - cls): float(mean[t]) for t in range(kl.shape[1]) if t != cls}


def _prune_vs_merge(model, images, labels, settings, report: Report, title: str) -> None:
    result = prune_vs_merge(model, images, labels, settings.prune_configs, settings.reductions)
    report.numbers["prune_vs_merge"] = result
    report.figures["prune_vs_merge.png"] = figures.prune_merge_png(
        result, f"{title}: merging vs dropping the same tokens ({images.shape[0]} images)")
    report.summary.append(f"prune vs merge ({images.shape[0]} images, dense {result['dense']['top1']:.2%}): "
                          "top-1 merged / pruned")
    for row in result["rows"]:
        report.summary.append(f"  {row['config']:22s} {row['reduction']:.0%}: {row['merge']['top1']:.2%} / "
                              f"{row['prune']['top1']:.2%}")


def diagnose(model, images: torch.Tensor, labels: torch.Tensor, settings: Settings = Settings(),
             title: str = "model") -> Report:
    """Run the chosen diagnostics on images (N, C, H, W) with labels (N,). The leave-one-out study uses
    the first settings.loo_images images, the perturbation curves the first settings.curve_images, the
    decay kernels the first 8, the attention maps the first; token order and prune-vs-merge all of them.
    Runs on a copy of `model` in eval mode: the caller's model (mode, dtype, token reducer) is left as it is."""
    settings = settings.resolve(len(model.layers))
    model = copy.deepcopy(model).eval()
    report = Report({"images": images.shape[0], "settings": {k: v for k, v in vars(settings).items()}}, {}, [])
    if "decay" in settings.parts:
        _decay(model, images[:8], settings, report, title)
    if "attention" in settings.parts:
        _attention(model, images, settings, report, title)
    if "dependence" in settings.parts:
        _dependence(model, images, settings, report, title)
    if "order" in settings.parts:
        _order(model, images, labels, settings, report)
    if "importance" in settings.parts:
        _importance(model, images, labels, settings, report, title)
    if "prune_vs_merge" in settings.parts:
        _prune_vs_merge(model, images, labels, settings, report, title)
    return report
