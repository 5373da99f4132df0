"""The mixer's fused CUDA path (models/fused.py), run on CPU against stand-ins of the mamba_ssm and
causal-conv1d kernels (fake_kernels.py) that compute the documented semantics independently and enforce
the real kernels' contract: same outputs, SSMStats and gradients as the pure-PyTorch path."""
import re
import sys

import pytest
import torch

import fake_kernels
import mambamerge
from mambamerge import ops
from mambamerge.models import fused
from mambamerge.models.mixer import MambaMixer
from conftest import benchmark, perturb_
from test_families import small_aum, small_videomamba

FAMILIES = ["vim", "videomamba", "aum:Bi-Bi", "aum:Fo-Bi", "aum:Fo-Fo"]
VARIANTS = [("bi", True), ("bi", False), ("bi_shared", False), ("forward", True)]


def _clear_import_caches():
    ops._mamba_ssm_fn.cache_clear()
    ops._causal_conv1d_fn.cache_clear()


@pytest.fixture
def kernels(monkeypatch):
    """Stand-in kernels importable as mamba_ssm and causal_conv1d, which the fused path may run on the
    CPU; yields their KernelLog."""
    _clear_import_caches()
    log = fake_kernels.install(monkeypatch)
    monkeypatch.setattr(fused, "KERNEL_DEVICES", ("cuda", "cpu"))
    yield log
    _clear_import_caches()


def small(family, seed=0, depth=3, **vim_options):
    if family == "videomamba":
        return small_videomamba(seed, depth=depth)
    if family.startswith("aum:"):
        return small_aum(family.split(":")[1], seed, depth=depth)
    torch.manual_seed(seed)
    return perturb_(mambamerge.create_model("vim_pico", depth=depth, **vim_options), seed=seed).eval()


def inputs(model, batch=2, seed=0):
    return torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(seed))


def small_mixer(variant, divide_out, seed=0):
    torch.manual_seed(seed)
    return perturb_(MambaMixer(16, d_state=4, variant=variant, divide_out=divide_out), seed=seed)


def both_paths(model, fn):
    """fn() with the model's pure-PyTorch path, then with the fused one: (normal, fused)."""
    def set_impl(impl):
        for mixer in (m for m in model.modules() if isinstance(m, MambaMixer)):
            mixer.scan_impl = impl
    set_impl("auto")
    normal = fn()
    set_impl("fused")
    try:
        return normal, fn()
    finally:
        set_impl("auto")


def test_stand_ins_enforce_the_kernels_contract(kernels):
    scan = fake_kernels.make_selective_scan_fn(kernels)
    conv = fake_kernels.make_causal_conv1d_fn(kernels)
    u, B, A, D = torch.randn(2, 8, 5), torch.randn(2, 3, 5), -torch.rand(8, 3), torch.ones(8)
    assert scan(u, u.abs(), A, B, B, D, z=u, delta_bias=D, delta_softplus=True).shape == (2, 8, 5)
    assert conv(u, torch.randn(8, 4), torch.randn(8), activation="silu").shape == (2, 8, 5)
    bad_calls = {
        "A must be float32": lambda: scan(u, u, A.double(), B, B, D),
        "B must have shape": lambda: scan(u, u, A, B.mT, B, D),
        "delta must have u's dtype": lambda: scan(u, u.half(), A, B, B, D),
        "delta_bias must be float32": lambda: scan(u, u, A, B, B, D, delta_bias=D.half()),
        "z must have shape": lambda: scan(u, u, A, B, B, D, z=u.mT),
        "width between 2 and 4": lambda: conv(u, torch.randn(8, 5)),
        "bias must have weight's dtype": lambda: conv(u, torch.randn(8, 4), torch.randn(8).half()),
        "divisible by 8": lambda: conv(torch.randn(2, 5, 12).mT, torch.randn(12, 4)),
    }
    for message, call in bad_calls.items():
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(NotImplementedError, match="activation"):
        conv(u, torch.randn(8, 4), activation="relu")


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_logits_equal_the_pytorch_path(kernels, family):
    model = small(family)
    x = inputs(model)
    with torch.no_grad():
        normal, fused_logits = both_paths(model, lambda: model(x))
    torch.testing.assert_close(fused_logits, normal, rtol=1e-5, atol=1e-5)
    mixer = model.layers[0].mixer
    assert kernels.count("selective_scan_fn") == len(model.layers) * mixer.scans
    assert kernels.count("causal_conv1d_fn") == len(model.layers) * mixer.branches
    assert kernels.copies == []  # every input already in the layout the kernels read
    scan_flags = [flags for name, flags in kernels.calls if name == "selective_scan_fn"]
    assert all(flags == dict(delta_softplus=True, delta_bias=True, z=True) for flags in scan_flags)


@pytest.mark.parametrize("variant,divide_out", VARIANTS)
def test_mixer_reports_the_same_ssm_stats_and_gradients(kernels, variant, divide_out):
    mixer = small_mixer(variant, divide_out)
    hidden = torch.randn(2, 9, 16, requires_grad=True)

    def run():
        out, stats = mixer(hidden, return_ssm=True)
        loss = out.square().sum() + sum(s.sum() for s in stats)
        grads = torch.autograd.grad(loss, [hidden, *mixer.parameters()])
        return out.detach(), [s.detach() for s in stats], grads

    (out, stats, grads), (f_out, f_stats, f_grads) = both_paths(mixer, run)
    torch.testing.assert_close(f_out, out, rtol=1e-5, atol=1e-5)
    for expected, got in zip(stats, f_stats):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    names = ["hidden"] + [name for name, _ in mixer.named_parameters()]
    for name, expected, got in zip(names, grads, f_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    mixer.scan_impl = "fused"
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden), mixer(hidden, return_ssm=True)[0], rtol=0, atol=0)


def record_reductions(model):
    """Wrap model.token_reducer.step to keep the SSMStats each step received: {block: SSMStats or None}."""
    reducer, seen = model.token_reducer, {}
    step = reducer.step

    def recording(block, state, ssm):
        seen[block] = ssm
        return step(block, state, ssm)

    reducer.step = recording
    return seen


@pytest.mark.parametrize("method,reduction,img_size", [("mame", 0.5, 32), ("stm", 0.4, 48)])
def test_merged_model_equals_the_pytorch_path_and_computes_delta_only_where_merged(kernels, monkeypatch, method,
                                                                                   reduction, img_size):
    model = small("vim", depth=5, img_size=img_size)
    mambamerge.patch(model, method, reduction=reduction)
    seen = record_reductions(model)
    reported, original = [], fused.reported_stats

    def counting(branch, bias, flipped):
        reported.append(flipped)
        return original(branch, bias, flipped)

    monkeypatch.setattr(fused, "reported_stats", counting)
    x = inputs(model, batch=3)

    def run():
        seen.clear()
        logits = model(x)
        logits.square().sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        return logits.detach(), dict(seen), grads

    (logits, stats, grads), (f_logits, f_stats, f_grads) = both_paths(model, run)
    torch.testing.assert_close(f_logits, logits, rtol=1e-5, atol=1e-5)
    merging = [block for block, ssm in stats.items() if ssm is not None]
    assert 0 < len(merging) < len(model.layers)
    assert [block for block, ssm in f_stats.items() if ssm is not None] == merging
    for block in merging:
        for expected, got in zip(stats[block], f_stats[block]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert reported == [False, True] * len(merging)  # both branches of merging blocks only
    for name, expected in grads.items():
        torch.testing.assert_close(f_grads[name], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bfloat16_autocast_meets_the_kernels_dtype_contract(kernels):
    model = small("vim")
    x = inputs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        normal, fused_logits = both_paths(model, lambda: model(x))
    assert kernels.count("selective_scan_fn") > 0
    assert (fused_logits.float() - normal.float()).abs().max() <= 0.05 * normal.float().abs().max()


def test_auto_keeps_cpu_tensors_on_the_pytorch_path(kernels):
    model = small("vim")
    with torch.no_grad():
        model(inputs(model))
    assert kernels.calls == []
    assert ops.mixer_backend("cpu") == ops.scan_backend("cpu") and ops.mixer_backend("cuda") == "fused"


@pytest.mark.skipif(ops.fused_kernels() is not None, reason="mamba_ssm and causal-conv1d are installed")
def test_fused_without_the_packages_is_a_clear_error():
    model = small("vim").set_scan_impl("fused")
    with pytest.raises(RuntimeError, match="needs the mamba_ssm and causal-conv1d packages"):
        model(inputs(model))
    assert ops.mixer_backend("cuda") == ops.scan_backend("cuda")


def test_fused_refuses_what_the_kernels_cannot_run(kernels, monkeypatch):
    model = small("vim").set_scan_impl("fused")
    with monkeypatch.context() as patched, pytest.raises(ValueError, match="run on CUDA tensors, the input is on cpu"):
        patched.setattr(fused, "KERNEL_DEVICES", ("cuda",))
        model(inputs(model))
    model.double()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16.*float64"):
        model(inputs(model).double())
    mixer = MambaMixer(16, d_conv=5)
    mixer.scan_impl = "fused"
    with pytest.raises(ValueError, match="widths 2 to 4"):
        mixer(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="unknown scan impl 'cuda'"):
        model.set_scan_impl("cuda")


@pytest.mark.parametrize("reverse", [False, True])
def test_unfused_mamba_ssm_scan_matches_the_reference(kernels, reverse):
    gen = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 7, 6, generator=gen), torch.rand(2, 7, 6, generator=gen)
    A, B, C = -torch.rand(6, 3, generator=gen), torch.randn(2, 7, 3, generator=gen), torch.randn(2, 7, 3, generator=gen)
    D = torch.randn(6, generator=gen)
    got = ops.selective_scan(u, delta, A, B, C, D, reverse=reverse, impl="mamba_ssm")
    torch.testing.assert_close(got, ops.selective_scan_reference(u, delta, A, B, C, D, reverse=reverse))
    assert kernels.count("selective_scan_fn") == 1


def load_gpu_check(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts src/ and benchmarks/ first
    return benchmark("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_without_cuda_says_so_and_measures_nothing(monkeypatch, capsys):
    assert load_gpu_check(monkeypatch).main([]) == 2
    captured = capsys.readouterr()
    assert "no usable CUDA device" in captured.err and captured.out == ""


def test_gpu_check_cpu_smoke_runs_every_section(kernels, monkeypatch, capsys):
    """The device check's sections on the CPU with tiny models, the fused path through the stand-ins and the
    Triton one through the interpreter: what a GPU session runs, minus the CUDA graphs and the timings."""
    gpu_check = load_gpu_check(monkeypatch)
    expected_paths = ["triton", "fused", "pytorch"] if ops.triton_handles(torch.empty(0)) else ["fused", "pytorch"]
    assert list(gpu_check.gpu_paths(torch.device("cpu"))) == expected_paths
    assert gpu_check.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and "skipped" not in out
    for number in range(1, 6):
        assert f"\n== {number}. " in out
    parity = re.findall(r"max abs diff to the CPU: (.*)", out)
    assert len(parity) >= 3  # dense and at least two methods reach 30% on the smoke model
    for row in parity:
        diffs = dict(re.findall(r"(\w+) (\S+)(?:,|$)", row))
        assert list(diffs) == expected_paths and max(float(d) for d in diffs.values()) < 1e-4
    assert re.search(r"dense: top-1 agreement fused \S+%, pytorch \S+%", out)
    syncs = re.findall(r"^   (\w+)\s+\d+%: (.*)$", out, flags=re.M)
    assert {method for method, _ in syncs} == set(mambamerge.merge.METHODS)
    assert all(verdict == "OK, no host sync" for _, verdict in syncs)
    for path in ("fused", "pytorch"):
        assert re.search(rf"vim_pico\s+b2\s+{path}\s+eager\s+dense", out)
    assert re.search(r"vim_pico\s+b2\s+fused\s+eager\s+mame 30% .*ideal 1\.\d\dx", out)
    assert "unreachable" in out  # 80% on a 4-block model of 17 tokens
