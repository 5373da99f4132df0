"""Choosing MaMe's (and MTR's) defaults on validation images, never on a test split (issue 9).

Each configuration is evaluated off-the-shelf at each target reduction on a validation slice of a
training split: for the MNIST model, MNIST train images 55,000-59,999 (held out of its training);
for the Fashion-MNIST demo model, which was trained on all 60,000 training images, a slice of them
(the model has seen these images: a weaker check, which is why every choice is confirmed on MNIST).

Results are appended to a JSON-lines file (one line per model x configuration x reduction) and
configurations already there are skipped, so a run can be stopped and resumed.

Run: .venv/bin/python benchmarks/select_mame.py --model fmnist --group sources --out outputs/select.jsonl
     .venv/bin/python benchmarks/select_mame.py --table outputs/select.jsonl
"""
import argparse
import json
from pathlib import Path

import torch

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy
from mambamerge.merge.mame import PAPER_AS_READ, MaMe

MODELS = {  # name -> (checkpoint, data spec, first validation image of the train split)
    "fmnist": (None, "fashion-mnist", 50_000),
    "mnist": ("/work/runs/mnist2/model_last.safetensors", "mnist", 55_000),
    "mnist_stage1": ("/work/runs/mnist/model_last.safetensors", "mnist", 55_000),  # before its last epoch
}
PAPER = dict(PAPER_AS_READ)
SPREAD12 = {**PAPER, "sources": "spread", "w_protect": 12}
GROUPS = {
    # the paper as read, and which tokens leave (everything else as read)
    "sources": [("mame", PAPER)] + [("mame", {**PAPER, "sources": s}) for s in ("spread", "pairs", "random")],
    # a protected window around the class token, for the spread-out choices of sources
    "protect": [("mame", {**PAPER, "sources": s, "w_protect": w}) for s in ("spread", "pairs", "least_delta")
                for w in (4, 8, 12)],
    # on the best of "protect" (spread sources, 12 protected tokens each side): destinations, weights,
    # placement, statistic, and what the Δ ranking is still worth (random sources, same protection)
    "refine": [("mame", {**SPREAD12, **change}) for change in (
        {"sources": "random"}, {"cap": 1}, {"keep_top": 0.3}, {"weight": "plain"}, {"w_protect": 16},
        {"match": "window"}, {"importance": "delta_z"})],
    "mtr": [("mtr", {"keep_top": k}) for k in (0.1, 0.3, 0.5)],
    # the second model: the choices that mattered on the first, and the baselines
    "confirm": [("mame", PAPER), ("mame", SPREAD12), ("mame", {**PAPER, "w_protect": 12}),
                ("mame", {**SPREAD12, "sources": "random"}), ("tome", {}), ("stm", {}), ("random", {}),
                ("mame", {**SPREAD12, "importance": "delta_z"}), ("mame", {**PAPER, "sources": "pairs", "w_protect": 8}),
                ("mtr", {"keep_top": 0.1}), ("mtr", {"keep_top": 0.5})],
    # reported on the test split only: the baselines and the paper as read (fixed before the choice),
    # then the chosen defaults of MaMe and MTR
    # evenly spaced sources (no score) with the window: is Δ worth anything inside the runs?
    "uniform": [("mame", {**SPREAD12, "sources": "uniform"})],
    # the best of the above on both models, with a wider window, and diag's Δ statistic
    "final": [("mame", {**SPREAD12, "sources": "uniform", "w_protect": 16}), ("mame", {**SPREAD12, "w_protect": 16}),
              ("mame", {**SPREAD12, "sources": "uniform", "w_protect": 24}),
              ("mame", {**SPREAD12, "w_protect": 16, "importance": "delta_z"})],
    "claim_fixed": [("mame", PAPER), ("tome", {}), ("stm", {}), ("random", {})],
    "claim_new": [("mame", {}), ("mtr", {})],
    # why: the defaults without their window, and with random instead of evenly spaced sources
    "why": [("mame", {"w_protect": 0}), ("mame", {"sources": "random"})],
    "baselines": [("tome", {}), ("stm", {}), ("stm", {"w_protect": 8}), ("random", {})],
}


def key_of(model, method, options, reduction):
    return json.dumps([model, method, options, reduction], sort_keys=True)


def done_keys(out: Path):
    if not out.is_file():
        return set()
    return {key_of(r["model"], r["method"], r["options"], r["reduction"]) for r in map(json.loads, out.open())}


def run(model_name, group, reductions, limit, out, checkpoint=None, split="train"):
    default, data, start = MODELS[model_name]
    start = start if split == "train" else 0
    model = mambamerge.load_checkpoint(checkpoint or default or demo_checkpoint())
    dataset = load_dataset(data, split, img_size=model.cfg.img_size[0], start=start, limit=limit)
    done = done_keys(out)
    todo = [("dense", {}, 0.0)] + [(m, o, r) for m, o in GROUPS[group] for r in reductions]
    for method, options, reduction in todo:
        if key_of(model_name, method, options, reduction) in done:
            continue
        if method != "dense":
            mambamerge.patch(model, method, reduction=reduction, **options)
        row = {"model": model_name, "method": method, "options": options, "reduction": reduction,
               "images": f"{data} {split} {start}-{start + len(dataset) - 1}", "top1": accuracy(model, dataset),
               "average_reduction": mambamerge.reduction_summary(model)["average_reduction"]}
        mambamerge.unpatch(model)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{model_name} {method} {options} {reduction:.0%}: {row['top1']:.2%}", flush=True)


def table(out: Path):
    """One markdown row per configuration: top-1 per model and reduction; MaMe's options shown as their
    difference from the paper as read ("defaults": the method's defaults)."""
    rows = [json.loads(line) for line in out.open()]
    models = sorted({r["model"] for r in rows})
    reductions = sorted({r["reduction"] for r in rows if r["method"] != "dense"})
    cells, order = {}, []
    for r in rows:
        opts = r["options"]
        if r["method"] == "mame" and opts:
            full, paper = {**MaMe.options(), **opts}, {**MaMe.options(), **PAPER}
            opts = {k: v for k, v in full.items() if paper[k] != v} or {"paper as read": ""}
        opts = opts or {"defaults": ""}
        name = (r["method"], ", ".join(f"{k}={v}" if v != "" else k for k, v in opts.items()))
        if name not in cells:
            order.append(name)
        cells.setdefault(name, {})[(r["model"], r["reduction"])] = r["top1"]
    head = [f"{m} {x:.0%}" for m in models for x in reductions]
    lines = ["| method | options | " + " | ".join(head) + " |", "|" + "---|" * (2 + len(head))]
    for name in order:
        got = cells[name]
        if name[0] == "dense":
            vals = [got.get((m, 0.0)) for m in models for _ in reductions]
        else:
            vals = [got.get((m, x)) for m in models for x in reductions]
        lines.append(f"| {name[0]} | {name[1]} | " + " | ".join("" if v is None else f"{v:.1%}" for v in vals) + " |")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--checkpoint", help="instead of the model's default checkpoint")
    parser.add_argument("--group", choices=sorted(GROUPS))
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.6, 0.8])
    parser.add_argument("--limit", type=int, default=1000, help="validation images (default 1000)")
    parser.add_argument("--split", choices=["train", "test"], default="train",
                        help="train: the validation slice (default); test: the first --limit test images, for "
                             "reporting the chosen settings only")
    parser.add_argument("--out", type=Path, default=Path("outputs/select_mame.jsonl"))
    parser.add_argument("--table", type=Path, help="print the table of a results file and stop")
    args = parser.parse_args(argv)
    if args.table:
        return table(args.table)
    if not (args.model and args.group):
        parser.error("--model and --group are required (or --table FILE)")
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run(args.model, args.group, args.reductions, args.limit, args.out, args.checkpoint, args.split)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
