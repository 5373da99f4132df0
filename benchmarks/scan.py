"""Benchmarks of the selective scan on CPU: the implementations side by side, then the whole Vim-Ti
forward with the fast path (the whole-mixer kernel) at L=197 and L=98, with the per-step kernels, with
the reference scan, and on the per-step path with torch's softplus instead of the compiled one (the
softplus and the scan's share are measured on the per-step path, whose functions can be wrapped).

Run: .venv/bin/python benchmarks/scan.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

import mambamerge
import mambamerge.models.mixer as mixer_module
from mambamerge.ops import scan_backend, selective_scan
from mambamerge.timing import time_interleaved

SCAN_IMPLS = ("reference", "loop", "parallel", "compiled")
MODES = ("forward", "fwd+bwd")


def make_scan_inputs(batch=8, length=197, d=384, n_state=16, dtype=torch.float32, seed=0):
    """Random inputs shaped like one Vim-Ti scan: u, delta (batch, L, d); A (d, N); B, C (batch, L, N); D (d,)."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, length, d, generator=gen, dtype=dtype),
        torch.rand(batch, length, d, generator=gen, dtype=dtype),
        -torch.exp(torch.randn(d, n_state, generator=gen, dtype=dtype)),
        torch.randn(batch, length, n_state, generator=gen, dtype=dtype),
        torch.randn(batch, length, n_state, generator=gen, dtype=dtype),
        torch.randn(d, generator=gen, dtype=dtype),
    )


def _time_scan(impl, inputs, mode):
    """Seconds for one forward (no grad) or one forward + backward of all six inputs."""
    if mode == "forward":
        start = time.perf_counter()
        with torch.no_grad():
            selective_scan(*inputs, impl=impl)
        return time.perf_counter() - start
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    start = time.perf_counter()
    y = selective_scan(*leaves, impl=impl)
    torch.autograd.grad(y, leaves, torch.ones_like(y))
    return time.perf_counter() - start


def bench_scans(impls=SCAN_IMPLS, repeats=5, warmup=1, threads=2, **shape):
    """Median milliseconds per impl and mode, runs interleaved, warm-up rounds discarded.

    Returns {impl: {"forward": ms, "fwd+bwd": ms}}; shape keywords go to make_scan_inputs.
    """
    torch.set_num_threads(threads)
    inputs = make_scan_inputs(**shape)
    times = {impl: {mode: [] for mode in MODES} for impl in impls}
    for round_ in range(warmup + repeats):
        for impl in impls:
            for mode in MODES:
                elapsed = _time_scan(impl, inputs, mode)
                if round_ >= warmup:
                    times[impl][mode].append(elapsed)
    return {impl: {mode: 1e3 * statistics.median(ts) for mode, ts in modes.items()} for impl, modes in times.items()}


def format_scan_results(results, baseline="compiled"):
    """Table of ms and ratios to the baseline impl."""
    lines = [f"{'impl':<10} {'forward ms':>11} {'x':>7} {'fwd+bwd ms':>11} {'x':>7}"]
    for impl, modes in results.items():
        cells = []
        for mode in MODES:
            ratio = modes[mode] / results[baseline][mode] if baseline in results else float("nan")
            cells.append(f"{modes[mode]:>11.2f} {ratio:>7.1f}")
        lines.append(f"{impl:<10} {' '.join(cells)}")
    return "\n".join(lines)


def official_formulation_scan(u, delta, A, B, C, D, reverse=False, impl=None):
    """The scan as the official reference formulates it (mamba_ssm's selective_scan_ref semantics):
    channel-major (batch, d, L) layout, exp(delta A) and delta B u built as whole (batch, d, L, N)
    tensors, then a loop over L. Same arguments and result as mambamerge.ops.selective_scan; this is the
    "plain reference scan" that SCAN_NOTES.md measured at ~108 ms for one Vim-Ti scan."""
    if reverse:
        u, delta, B, C = (t.flip(1) for t in (u, delta, B, C))
    u, delta, B, C = (t.transpose(1, 2) for t in (u, delta, B, C))  # (batch, d | N, L)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = (torch.stack(ys, dim=2) + D[:, None] * u).transpose(1, 2)
    return y.flip(1) if reverse else y


def _timed_scan_share(model, run):
    """Fraction of one forward spent inside selective_scan (wrapped with a timer for this call only)."""
    acc = [0.0]
    original = mixer_module.selective_scan

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        acc[0] += time.perf_counter() - start
        return out

    mixer_module.selective_scan = timed
    try:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    finally:
        mixer_module.selective_scan = original
    return acc[0] / total


def bench_model(batch=8, runs=5):
    """Whole Vim-Ti forward, batch 8 at 224x224: fast vs reference scan at L=197, and L=197 vs L=98."""
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_tiny").eval()
    images = torch.randn(batch, 3, 224, 224)
    cls = model.cls_index
    keep = torch.arange(0, 196, 2)  # 98 tokens, the class token (index 98) among them at position 49
    assert (keep == cls).any()

    def logits_at(tokens, cls_index):
        hidden, residual = tokens, None
        for block in model.layers:
            hidden, residual = block(hidden, residual)
        return model.head(model.final_norm(hidden, residual)[:, cls_index])

    def forward(length_tokens):
        tokens = model.embed(images)
        if length_tokens == 98:
            return logits_at(tokens[:, keep], int((keep < cls).sum()))
        return logits_at(tokens, cls)

    def with_impl(impl, length_tokens):
        def run():
            model.set_scan_impl(impl)
            return forward(length_tokens)
        return run

    def with_official_formulation():
        model.set_scan_impl("compiled")  # the torch path, whose scan function is replaced
        original = mixer_module.selective_scan
        mixer_module.selective_scan = official_formulation_scan
        try:
            return forward(197)
        finally:
            mixer_module.selective_scan = original

    def with_torch_softplus():
        model.set_scan_impl("compiled")
        original = mixer_module.softplus
        mixer_module.softplus = F.softplus
        try:
            return forward(197)
        finally:
            mixer_module.softplus = original

    with torch.inference_mode():
        med = time_interleaved({
            "fast L=197": with_impl("auto", 197),
            "fast L=98": with_impl("auto", 98),
            "per-step L=197": with_impl("compiled", 197),
            "reference L=197": with_impl("reference", 197),
            "official-ref L=197": with_official_formulation,
        }, warmup=1, runs=runs)
        # apart from the memory-hungry official formulation, which slows whatever runs after it
        softplus = time_interleaved({"per-step L=197": with_impl("compiled", 197),
                                     "torch softplus L=197": with_torch_softplus}, warmup=1, runs=runs)
        model.set_scan_impl("compiled")
        share = _timed_scan_share(model, lambda: forward(197))
        model.set_scan_impl("auto")
    print(f"\nWhole Vim-Ti forward, batch {batch}, 224x224, {torch.get_num_threads()} threads, "
          f"scan backend: {scan_backend('cpu')} (median of {runs})")
    for name, sec in med.items():
        print(f"  {name:21s} {sec * 1e3:8.0f} ms")
    print(f"  ours-reference / fast (L=197):       {med['reference L=197'] / med['fast L=197']:.1f}x  "
          f"(mambamerge.ops reference loop)")
    print(f"  official-ref / fast (L=197):         {med['official-ref L=197'] / med['fast L=197']:.1f}x  "
          f"(official formulation, target >= 5x)")
    print(f"  per-step / whole-mixer (L=197):      {med['per-step L=197'] / med['fast L=197']:.2f}x")
    print(f"  torch softplus / compiled (L=197):   "
          f"{softplus['torch softplus L=197'] / softplus['per-step L=197']:.2f}x  (per-step path; torch's CPU "
          f"softplus computes log1p one value at a time)")
    print(f"  scan share of the per-step forward:  {share:.0%}  (target <= 33%)")
    print(f"  fast L=197 / fast L=98:              {med['fast L=197'] / med['fast L=98']:.2f}x  (target >= 1.8x)")
    return med, share


def main():
    print("selective scan, batch 8, L=197, d=384, N=16, float32, 2 threads")
    print(format_scan_results(bench_scans()))
    bench_model()


if __name__ == "__main__":
    main()
