"""How well KL to the dense model (tune's label-free score) ranks candidates against top-1: Spearman's ρ
between the two over the candidates of a `mambamerge tune --labels` run, per target and per number of
inputs scored on (the screen slice and the full calibration set).

Run: .venv/bin/python benchmarks/tune_rank.py DIR/tune.json
"""
import argparse
import json
import math
from collections import defaultdict
from typing import List, Sequence


def ranks(values: Sequence[float]) -> List[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of the tie-averaged ranks (nan when either side is constant)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tune_json", help="tune.json of a `mambamerge tune --labels` run")
    payload = json.loads(open(parser.parse_args().tune_json).read())
    for tune in payload["tunes"]:
        groups = defaultdict(dict)  # inputs -> distinct candidates (a rescored one counts once)
        for c in tune["candidates"]:
            if "top1" not in c:
                raise SystemExit("these candidates have no top-1: run mambamerge tune with --labels")
            key = json.dumps([c["method"], c["options"], c["removals"]], sort_keys=True)
            groups[c["inputs"]][key] = c
        for inputs, found in sorted(groups.items()):
            found = list(found.values())
            # low KL should mean high top-1: rho of KL against -top1, so +1 is a perfect ranking
            rho = spearman([c["kl"] for c in found], [-c["top1"] for c in found])
            target = (f"{tune['target_reduction']:.0%}" if "target_reduction" in tune
                      else f"{tune['target_gmacs']:g} GMACs")
            print(f"target {target}: {len(found)} candidates scored on {inputs} inputs, "
                  f"Spearman rho(KL rank, top-1 rank) = {rho:+.2f}")


if __name__ == "__main__":
    main()
