"""The whole-mixer kernel (one call per block: residual add, RMSNorm, mixer) against the torch path
with the reference scan (the independent reference): outputs, new residual and SSMStats for every
mixer variant and shape, its bf16 products against that path on bf16-rounded projection inputs and
weights; and the block choosing it only for float32 CPU inference, outside autocast or under bf16's."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mambamerge
from mambamerge.models.blocks import Block
from mambamerge.models.mixer import MIXER_VARIANTS
from mambamerge.ops import cpu_kernels
from mambamerge.ops.cpu_kernels.build import _cpu_flags

from conftest import perturb_

pytestmark = pytest.mark.skipif(not cpu_kernels.mixer_available(),
                                reason=f"whole-mixer kernel unavailable: {cpu_kernels.unavailable_reason()}")


def block_outputs(block, hidden, residual, impl):
    """(hidden, residual, *SSMStats) of block: impl "auto" in inference (the kernel), or the torch path
    with scan_impl impl while autograd records (torch's convolution and gate)."""
    block.mixer.scan_impl = impl
    context = torch.no_grad() if impl == "auto" else torch.enable_grad()
    with context:
        out = block(hidden, residual, return_ssm=True)
    return [t.detach() for t in (*out[:2], *out[2])]


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(sorted(MIXER_VARIANTS)), divide_out=st.booleans(), batch=st.integers(1, 3),
       length=st.integers(1, 11), d_model=st.integers(4, 40), d_state=st.integers(1, 17),
       dt_rank=st.integers(1, 6), d_conv=st.integers(1, 5), first=st.booleans(), seed=st.integers(0, 10_000))
def test_kernel_matches_the_torch_path(variant, divide_out, batch, length, d_model, d_state, dt_rank, d_conv,
                                       first, seed):
    torch.manual_seed(seed)
    block = perturb_(Block(d_model, d_state=d_state, dt_rank=dt_rank, d_conv=d_conv, variant=variant,
                           divide_out=divide_out), seed).eval()
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, d_model, generator=gen)
    residual = None if first else torch.randn(batch, length, d_model, generator=gen)
    got = block_outputs(block, hidden, residual, "auto")
    want = block_outputs(block, hidden, residual, "reference")
    names = ["hidden", "residual", *mambamerge.tokens.SSMStats._fields]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_a_model_gives_the_same_logits_and_merges_alike_with_the_kernel_and_without():
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_pico", depth=4)).eval()
    mambamerge.patch(model, "mame", schedule=[0, 4, 4, 0])
    images = torch.randn(3, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model.set_scan_impl("auto")(images)
        per_step = model.set_scan_impl("compiled")(images)
    torch.testing.assert_close(fast, per_step, rtol=1e-5, atol=1e-5)


def test_the_kernel_runs_only_for_float32_cpu_inference(monkeypatch):
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_pico", depth=3, drop_path_rate=0.5).eval()  # rates 0, 0, 0.25
    images = torch.randn(2, *model.input_shape)
    calls = []
    kernel = cpu_kernels.mixer_forward
    # the kernel's third argument: the block's norm (the whole block), or None (the mixer alone)
    monkeypatch.setattr(cpu_kernels, "mixer_forward",
                        lambda *a: calls.append("mixer" if a[2] is None else "block") or kernel(*a))

    def kernel_calls(fn):
        calls.clear()
        fn()
        return calls.count("block") if calls.count("mixer") == 0 else calls

    with torch.no_grad():
        assert kernel_calls(lambda: model(images)) == 3  # one per block
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernel_calls(lambda: model(images)) == (3 if cpu_kernels.bf16_mixer_available() else 0)
        with torch.autocast("cpu", dtype=torch.float16):
            assert kernel_calls(lambda: model(images)) == 0
        assert kernel_calls(lambda: model.set_scan_impl("compiled")(images)) == 0
        model.set_scan_impl("auto").train()  # stochastic depth on in the last block: the torch path draws it
        assert kernel_calls(lambda: model(images)) == ["block", "block", "mixer"]  # and runs the mixer kernel
        model.eval()
        assert kernel_calls(lambda: model.double()(images.double())) == 0
    model.float()
    assert kernel_calls(lambda: model(images).sum().backward()) == 0  # autograd records: the torch path


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("batch, length", [(2, 37), (1, 5)])  # sgemm_'s projections; the few-rows kernel's
def test_threads_do_not_change_the_result(threads, batch, length, keep_torch_threads):
    torch.manual_seed(0)
    block = perturb_(Block(80, d_state=8)).eval()  # in_proj's 320 rows: five tasks of the few-rows kernel
    hidden, residual = torch.randn(batch, length, 80), torch.randn(batch, length, 80)
    torch.set_num_threads(1)
    one = block_outputs(block, hidden, residual, "auto")
    torch.set_num_threads(threads)
    for a, b in zip(block_outputs(block, hidden, residual, "auto"), one):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _rounded_products(block):
    """A copy of block whose in_proj, x_proj and out_proj take weights and inputs rounded to bf16, their
    products in float32: what the kernel's bf16 products compute, on the torch path."""
    block = copy.deepcopy(block)
    mixer = block.mixer
    for name, module in mixer.named_children():
        if name == "in_proj" or name == "out_proj" or name.startswith("x_proj"):
            module.weight.data = module.weight.data.bfloat16().float()
            module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    return block


_FLAGS = set(_cpu_flags().split())
needs_bf16 = pytest.mark.skipif(not cpu_kernels.bf16_mixer_available(), reason="torch exports no bf16 gemm")


@needs_bf16
@pytest.mark.parametrize("variant", sorted(MIXER_VARIANTS))
@pytest.mark.parametrize("first", [True, False])
def test_bf16_products_are_the_torch_paths_on_rounded_inputs(variant, first):
    torch.manual_seed(0)
    block = perturb_(Block(48, d_state=8, variant=variant)).eval()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 23, 48, generator=gen)  # 46 rows: past the few rows that stay float32
    residual = None if first else torch.randn(2, 23, 48, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block_outputs(block, hidden, residual, "auto")
    rounded = block_outputs(_rounded_products(block), hidden, residual, "reference")
    float32 = block_outputs(block, hidden, residual, "reference")
    assert all(t.dtype == torch.float32 for t in got)
    for name, g, r, f in zip(["hidden", "residual", *mambamerge.tokens.SSMStats._fields], got, rounded, float32):
        # an input the two round from float32 values a few ulp apart can land on neighbouring bf16 values:
        # the median difference tells the products apart, the largest bounds those rare flips
        scale = f.abs().max()
        assert (g - r).abs().median() <= 1e-5 * scale, name
        assert (g - r).abs().max() <= 3e-3 * scale, name
        if name == "hidden":
            assert (g - f).abs().median() > 10 * (g - r).abs().median(), "the products were not rounded"


@needs_bf16
@pytest.mark.skipif(not ("avx512f" in _FLAGS or {"avx2", "fma"} <= _FLAGS),
                    reason="the few-rows kernel is built with AVX-512 or AVX2 and FMA only")
def test_bf16_leaves_a_few_rows_in_float32():
    torch.manual_seed(0)
    block = perturb_(Block(48, d_state=8)).eval()
    hidden, residual = torch.randn(1, 3, 48), torch.randn(1, 3, 48)  # 3 rows: the few-rows kernel's, float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block_outputs(block, hidden, residual, "auto")
    for a, b in zip(got, block_outputs(block, hidden, residual, "auto")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
