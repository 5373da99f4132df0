"""CPU threads and OpenMP waiting under load: the demo model's forward and a plain torch matmul + SiLU
loop at each setting, each in a fresh process (OpenMP reads its environment when torch loads), while
one core is kept busy by a spinning process (--busy, the default; --idle to measure without it).

    python benchmarks/threads.py [--idle] [--runs 20] [--rounds 3] [--spincounts 10000 100000]

Prints images/s (demo model, batch 8) and seconds per 200 matmul + SiLU steps per setting, and the
ratios against 1 thread. The settings: 1 thread; 2 threads with torch's default waiting; 2 threads
with OMP_WAIT_POLICY=PASSIVE; 2 threads with each bounded spin count; and the commands' default
thread count (mambamerge.threads.default_threads(): the cores free when the command starts). The
settings run in turn, --rounds times over, and each ratio is the median over rounds of the ratio
within a round, so that a slow spell of a shared machine falls on every setting alike.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

_CHILD = r"""
import json, statistics, sys, time
import torch
threads = int(sys.argv[1]) if sys.argv[1] != "auto" else None
from mambamerge.threads import default_threads
torch.set_num_threads(threads or default_threads())
import mambamerge
from mambamerge.cli.demo import demo_checkpoint
runs = int(sys.argv[2])
model = mambamerge.load_checkpoint(demo_checkpoint())
x = torch.randn(8, 1, 56, 56)
a, w = torch.randn(64, 192), torch.randn(192, 192)

def loop():
    h = a
    for _ in range(200):
        h = torch.nn.functional.silu(h @ w) * 0.1
    return h

with torch.inference_mode():
    forward, matmul = [], []
    model(x), loop()
    for _ in range(runs):
        start = time.perf_counter(); model(x); forward.append(time.perf_counter() - start)
        start = time.perf_counter(); loop(); matmul.append(time.perf_counter() - start)
print(json.dumps({"threads": torch.get_num_threads(), "images_per_s": 8 / statistics.median(forward),
                  "matmul_s": statistics.median(matmul)}))
"""


def settings(spincounts):
    return ([("1 thread", "1", {}), ("2 threads, torch's default", "2", {}),
             ("2 threads, OMP_WAIT_POLICY=PASSIVE", "2", {"OMP_WAIT_POLICY": "PASSIVE"})]
            + [(f"2 threads, GOMP_SPINCOUNT={n}", "2", {"GOMP_SPINCOUNT": str(n)}) for n in spincounts]
            + [("commands' default (free cores)", "auto", {})])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", action="store_true", help="no deliberately busy core")
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per process")
    parser.add_argument("--rounds", type=int, default=3, help="times every setting is run, in turn")
    parser.add_argument("--spincounts", type=int, nargs="*", default=[10000, 100000],
                        help="bounded OpenMP spin counts to compare (libgomp's default is 300000)")
    args = parser.parse_args()
    src = str(Path(__file__).resolve().parents[1] / "src")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base["PYTHONPATH"] = src + os.pathsep + base.get("PYTHONPATH", "")
    busy = None
    if not args.idle:  # one core kept busy, as another user's job would
        busy = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {1}); exec('while True: pass')"])
    chosen = settings(args.spincounts)
    ratios = {name: ([], []) for name, _, _ in chosen[1:]}
    try:
        for round_ in range(args.rounds):
            rows = []
            for name, threads, env in chosen:
                out = subprocess.run([sys.executable, "-c", _CHILD, threads, str(args.runs)], env={**base, **env},
                                     capture_output=True, text=True, check=True).stdout
                rows.append((name, json.loads(out.splitlines()[-1])))
                print(f"round {round_ + 1}: {name:52s} threads {rows[-1][1]['threads']}: "
                      f"{rows[-1][1]['images_per_s']:7.1f} images/s, matmul+SiLU {rows[-1][1]['matmul_s']:.3f} s",
                      flush=True)
            one = rows[0][1]
            for name, row in rows[1:]:
                ratios[name][0].append(row["images_per_s"] / one["images_per_s"])
                ratios[name][1].append(one["matmul_s"] / row["matmul_s"])
    finally:
        if busy is not None:
            busy.kill()
    print(f"\n{'busy core' if busy else 'idle'}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"against 1 thread, median of {args.rounds} rounds:")
    for name, (forward, matmul) in ratios.items():
        print(f"  {name:52s} forward {statistics.median(forward):.2f}x, matmul {statistics.median(matmul):.2f}x")


if __name__ == "__main__":
    main()
