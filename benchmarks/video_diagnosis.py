"""Why token reduction collapses on the video demo (issue 22): information against structure.

Each experiment evaluates the VideoMamba demo model off-the-shelf on validation clips of moving
Fashion-MNIST (made from Fashion-MNIST train[58000:], held out of training) with one variant of a
reduction, and appends one JSON line per (experiment, reduction) to --out; lines already there are
skipped, so a run can be stopped and resumed. The variants:

- keep_length: the same merges, but the blocks run on the full-length sequence, each group of merged
  tokens repeated in every member's slot (re-averaged after every block). The groups carry exactly
  what real merging keeps of the clip, while every token keeps its place in the frame-major scan:
  what is lost here is information, what real merging loses beyond it is structure.
- background / foreground: the leaving tokens are the lowest- / highest-variance patches of the clip
  (pixel standard deviation of the tubelet patch; black background has 0), spread evenly among ties.
- scope: destinations anywhere ("free"), only within the source's frame ("frame") or only at the
  source's (row, col) in another frame ("tube") — MaMe's and STM's `scope` option.
- balance: each frame loses its share of the tokens (MaMe's `balance="frame"`).
- start: the schedule's first step later in depth.

Run:   python benchmarks/video_diagnosis.py --group baseline --out outputs/video_diag.jsonl
       python benchmarks/video_diagnosis.py --table outputs/video_diag.jsonl
"""
import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.data import load_dataset
from mambamerge.merge.mame import MaMe
from mambamerge.merge.plan import MergePlan
from mambamerge.merge.reducer import TokenReducer
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats

REDUCTIONS = (0.2, 0.4, 0.6, 0.8)


class KeepLength(TokenReducer):
    """The reducer's merges, applied to groups of slots instead of the sequence: after every block the
    tokens of a group are replaced by the group's merged value, and a step merges groups. The blocks
    always see the embedded length, every token in its own slot."""

    def __init__(self, reducer: TokenReducer):
        super().__init__(reducer.method, reducer.schedule)
        self.groups: Optional[torch.Tensor] = None  # (B, G, L0) 1 where group g holds slot j
        self.inner: Optional[TokenState] = None  # the grouped state: size, pos, class token per group

    def wants_ssm(self, block: int) -> bool:
        return self.method.needs_ssm and self.removal_after(block) > 0

    def step(self, block: int, state: TokenState, ssm: Optional[SSMStats]) -> TokenState:
        if block == 0:
            self.groups, self.inner = None, None
        r = self.removal_after(block)
        if self.groups is None and r == 0:
            return state
        summed = state.hidden if state.residual is None else state.hidden + state.residual
        if self.groups is None:
            batch, length = summed.shape[:2]
            self.groups = torch.eye(length, dtype=summed.dtype).expand(batch, -1, -1).clone()
            self.inner = replace_streams(state, summed)
        counts = self.groups.sum(dim=2, keepdim=True)  # (B, G, 1)
        grouped = self.groups @ summed / counts  # (B, G, D) each group's mean over its slots
        inner = replace_streams(self.inner, grouped)
        if r:
            inner_ssm = None if ssm is None else SSMStats(*(group_mean(t, self.groups, counts) for t in ssm[:4]))
            plan: MergePlan = self.method.plan(inner, inner_ssm, r)
            self.groups = plan.add_up(self.groups)
            inner = inner.apply(plan)
        self.inner = inner
        expanded = self.groups.transpose(1, 2) @ inner.hidden  # (B, L0, D) every slot gets its group's value
        # the sum in `residual` and a zero `hidden`: what the next block (or the final norm) adds up
        return TokenState(hidden=torch.zeros_like(expanded), residual=expanded, size=state.size, pos=state.pos,
                          cls_index=state.cls_index, layout=state.layout)


class SizeScan(TokenReducer):
    """Real merging, with every mixer's step size Δ multiplied by the size of the token it scans
    (diagnosis only: it wraps MambaMixer._inputs). A merged token of k equal tokens then advances the
    state about as far as its k members did one after another (exp(k Δ A) decay, k Δ B u input):
    what the scan lost of the layout is the steps, not the order."""

    current = None  # (B, L) sizes of the tokens entering the next block, None for dense blocks

    def __init__(self, reducer: TokenReducer, depth: int):
        super().__init__(reducer.method, reducer.schedule)
        self.depth = depth

    def step(self, block, state, ssm):
        state = super().step(block, state, ssm)
        SizeScan.current = None if block == self.depth - 1 else state.size
        return state


def size_scaled_inputs(original):
    def inputs(self, x, suffix, reverse, mean_delta):
        u, delta, B, C, delta_mean = original(self, x, suffix, reverse, mean_delta)
        if SizeScan.current is not None:
            delta = delta * SizeScan.current[..., None].to(delta.dtype)
        return u, delta, B, C, delta_mean
    return inputs


class OnFullLength(TokenReducer):
    """Real merging, with one piece of every mixer run on the full-length sequence (diagnosis only; it
    wraps the mixer's convolution and scan): "conv" — the depthwise convolution sees each merged token
    repeated in its members' slots (the result averaged back per token), the scan the merged sequence;
    "scan" — the other way round. Which piece's layout the model needs."""

    groups = None  # (B, L', L0) 1 where token i holds slot j, None for dense blocks
    piece = None

    def __init__(self, reducer: TokenReducer, depth: int, piece: str):
        super().__init__(reducer.method, reducer.schedule)
        self.depth, self.piece = depth, piece

    def step(self, block, state, ssm):
        if block == 0:
            batch, length = state.size.shape
            self._groups = torch.eye(length).expand(batch, -1, -1)
        r = self.removal_after(block)
        if r:
            plan = self.method.plan(state, ssm, r)
            self._groups = plan.add_up(self._groups)
            state = state.apply(plan)
        OnFullLength.groups = None if block == self.depth - 1 else self._groups
        OnFullLength.piece = self.piece
        return state


def on_full_length(fn, tensors):
    """fn on the expanded sequence of every (B, L', C) tensor in `tensors`, its (B, L0, C) output averaged
    back per merged token."""
    groups = OnFullLength.groups
    expanded = [groups.transpose(1, 2).to(t.dtype) @ t for t in tensors]
    out = fn(*expanded)
    return (groups.to(out.dtype) @ out) / groups.sum(dim=2, keepdim=True).to(out.dtype)


def piecewise(blocks_module, mixer_cls):
    """Wrap the mixer's convolution and scan so that OnFullLength can run one of them at full length."""
    conv = blocks_module.depthwise_conv_along_sequence
    scan = mixer_cls._scan

    def conv_wrapped(x, weight, bias, reverse):
        if OnFullLength.groups is None or OnFullLength.piece != "conv" or x.shape[1] == OnFullLength.groups.shape[2]:
            return conv(x, weight, bias, reverse)
        return on_full_length(lambda t: conv(t, weight, bias, reverse), [x])

    def scan_wrapped(self, inputs, a_log, skip, reverse):
        if OnFullLength.groups is None or OnFullLength.piece != "scan" or inputs[0].shape[1] == OnFullLength.groups.shape[2]:
            return scan(self, inputs, a_log, skip, reverse)
        u, delta, B, C, mean = inputs
        return on_full_length(lambda u, d, b, c: scan(self, (u, d, b, c, mean), a_log, skip, reverse), [u, delta, B, C])

    blocks_module.depthwise_conv_along_sequence = conv_wrapped
    mixer_cls._scan = scan_wrapped


def replace_streams(state: TokenState, tokens: torch.Tensor) -> TokenState:
    return TokenState(hidden=tokens, residual=None, size=state.size, pos=state.pos, cls_index=state.cls_index,
                      layout=state.layout)


def group_mean(x: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, C, L0) per-slot statistic -> (B, C, G) its mean over each group's slots."""
    return (x @ groups.transpose(1, 2)) / counts.transpose(1, 2)


@dataclass
class ByVariance(MaMe):
    """MaMe with the leaving tokens chosen by the clip's patch variance (diagnosis only): `prefer`
    "background" (lowest standard deviation first) or "foreground" (highest first). `patch_std`
    (B, L0) is set for each batch before the forward; ties (the many all-black patches) are broken
    by an even spread over the sequence."""

    prefer: str = "background"
    name = "by_variance"
    patch_std = None

    def _sources(self, state, score, eligible, r):
        std = self.patch_std.gather(1, state.pos)  # (B, L) the std of the patch whose slot each token holds
        key = std if self.prefer == "background" else -std
        ties = torch.rand(std.shape, generator=torch.Generator().manual_seed(0)) * 1e-6  # random among equals
        return (key + ties).masked_fill(~eligible, float("inf")).topk(r, dim=1, largest=False).indices


def patch_std(clips: torch.Tensor, model) -> torch.Tensor:
    """(B, C, T, H, W) clips -> (B, L0) pixel std of each token's tubelet patch (the class token: +inf,
    it never leaves)."""
    cfg = model.cfg
    t, p, q = cfg.tubelet, cfg.patch_size[0], cfg.patch_size[1]
    b, c, frames, h, w = clips.shape
    x = clips.reshape(b, c, frames // t, t, h // p, p, w // q, q).permute(0, 2, 4, 6, 1, 3, 5, 7)
    std = x.reshape(b, (frames // t) * (h // p) * (w // q), -1).std(dim=2)
    return torch.cat((torch.full((b, 1), float("inf")), std), dim=1)


def evaluate(model, dataset, batch: int = 100) -> float:
    correct = 0
    reducer = model.token_reducer
    with torch.inference_mode():
        for start in range(0, len(dataset), batch):
            clips, labels = dataset.batch(range(start, min(start + batch, len(dataset))))
            if reducer is not None and isinstance(reducer.method, ByVariance):
                reducer.method.patch_std = patch_std(clips, model)
            correct += (model(clips).argmax(dim=1) == labels).sum().item()
    return correct / len(dataset)


# experiment name -> (method, options, schedule options, keep_length)
GROUPS = {
    "baseline": [("mame", {}, {}, False), ("stm", {}, {}, False)],
    "keep_length": [("mame", {}, {}, True), ("stm", {}, {}, True), ("mame", {"w_protect": 0}, {}, True),
                    ("mame", {"w_protect": 0}, {}, False), ("tome", {}, {}, True), ("random", {}, {}, False)],
    "window": [("mame", {"w_protect": w}, {}, False) for w in (0, 4, 8, 16, 32, 48)],
    "variance": [("by_variance", {"prefer": p, "w_protect": w}, {}, False) for p in ("background", "foreground")
                 for w in (0, 24)],
    "start": [("mame", {}, {"start": s}, False) for s in (2, 3, 4)],
    "size_scan": [("mame", {}, {}, "size_scan"), ("mame", {"w_protect": 0}, {}, "size_scan"),
                  ("tome", {}, {}, "size_scan"), ("stm", {}, {}, "size_scan")],
    "pieces": [(m, o, {}, piece) for piece in ("conv", "scan") for m, o in (("mame", {}), ("mame", {"w_protect": 0}),
                                                                          ("tome", {}))],
    "combo": [("mame", o, {}, False) for o in (
        {"match": "window", "window": 1}, {"match": "window", "window": 3}, {"scope": "tube", "w_protect": 16},
        {"scope": "tube", "match": "window", "window": 16}, {"scope": "tube", "w_protect": 32},
        {"scope": "tube", "sources": "spread"}, {"scope": "tube", "sources": "random"}, {"scope": "tube", "weight": "size"},
        {"scope": "tube", "cap": 1})] + [("mame", {"scope": "tube"}, {"every": 1}, False)],
    "scope": [("mame", {"scope": sc, "w_protect": w}, {}, False) for w in (0, 24) for sc in ("frame", "tube")],
    "balance": [("mame", {"balance": "frame", "scope": sc, "w_protect": w}, {}, k) for w in (0, 8, 24)
                for sc in ("free", "frame") for k in (False,)],
}


def key_of(name, method, options, schedule, keep, reduction):
    return json.dumps([name, method, options, schedule, keep, reduction], sort_keys=True)


def run(groups, reductions, limit, out: Path, split: str):
    from mambamerge.merge.registry import METHODS
    from mambamerge.models import blocks
    from mambamerge.models.blocks import MambaMixer
    piecewise(blocks, MambaMixer)
    METHODS.setdefault(ByVariance.name, ByVariance)
    MambaMixer._inputs = size_scaled_inputs(MambaMixer._inputs)  # a no-op unless a SizeScan reducer runs
    done = set()
    if out.is_file():
        done = {key_of(*(r[k] for k in ("group", "method", "options", "schedule", "keep_length", "reduction")))
                for r in map(json.loads, out.open())}
    model = mambamerge.load_checkpoint(demo_checkpoint("video"))
    dataset = load_dataset("moving-fashion-mnist", split, limit=limit)
    todo = [("dense", "none", {}, {}, False, 0.0)]
    todo += [(g, m, o, s, k, red) for g in groups for (m, o, s, k) in GROUPS[g] for red in reductions]
    for group, method, options, schedule, keep, reduction in todo:
        key = key_of(group, method, options, schedule, keep, reduction)
        if key in done:
            continue
        mambamerge.unpatch(model)
        row = dict(group=group, method=method, options=options, schedule=schedule, keep_length=keep,
                   reduction=reduction, split=split, clips=len(dataset))
        if method != "none":
            try:
                mambamerge.patch(model, method, reduction=reduction, **schedule, **options)
            except ValueError as err:
                row.update(error=str(err))
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                continue
            row["achieved"] = round(mambamerge.reduction_summary(model)["average_reduction"], 4)
            if keep in ("conv", "scan"):
                model.token_reducer = OnFullLength(model.token_reducer, len(model.layers), keep)
            elif keep == "size_scan":
                model.token_reducer = SizeScan(model.token_reducer, len(model.layers))
            elif keep:
                model.token_reducer = KeepLength(model.token_reducer)
        began = time.time()
        row["top1"] = evaluate(model, dataset)
        row["seconds"] = round(time.time() - began, 1)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def table(path: Path):
    rows = [json.loads(line) for line in path.open()]
    dense = {r["split"]: r["top1"] for r in rows if r["method"] == "none"}
    print("| group | method | options | schedule | keep length | reduction | top-1 | Δ (pp) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "none":
            continue
        top1 = f"{100 * r['top1']:.2f}%" if "top1" in r else "n/a"
        delta = f"{100 * (r['top1'] - dense[r['split']]):+.2f}" if "top1" in r else r.get("error", "")[:60]
        print(f"| {r['group']} | {r['method']} | {r['options'] or ''} | {r['schedule'] or ''} | "
              f"{ {True: 'keep length', False: ''}.get(r['keep_length'], r['keep_length'])} | {int(100 * r['reduction'])}% | {top1} | {delta} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--reductions", type=float, nargs="+", default=list(REDUCTIONS))
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--out", type=Path, default=Path("outputs/video_diag.jsonl"))
    p.add_argument("--table", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.table:
        table(args.table)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run(args.group, args.reductions, args.limit, args.out, args.split)


if __name__ == "__main__":
    main()
