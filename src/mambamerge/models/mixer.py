"""The Mamba mixer shared by all model families: its variants (one table, MIXER_VARIANTS) and its one
forward, which runs the variant's branches and scans through a path of steps: PyTorch's (TorchPath,
here), the fused CUDA kernels' (FusedPath, models/fused.py) or the Triton kernels' (TritonPath, there).

The PyTorch path runs sequence-major, channels last: (batch, L, channels). A backward scan runs in
reverse instead of flipping the sequence twice, so its per-token quantities come out already in
sequence order.
"""
import math
from typing import Callable, List, NamedTuple, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mambamerge.dtypes import at_least_float32, cast
from mambamerge.models.fused import FusedPath, TritonPath, triton_unsupported_reason, unsupported_reason
from mambamerge.ops import cpu_kernels, fused_kernels, selective_scan, softplus, softplus_with_row_mean, triton_kernels
from mambamerge.tokens import SSMStats


def _kernels_take(t: torch.Tensor) -> bool:
    """Inference on a tensor the CPU kernels take: the convolution and the gate run as one kernel pass
    each; where autograd records, the differentiable torch operations."""
    return cpu_kernels.handles(t) and not torch.is_grad_enabled()


def depthwise_conv_along_sequence(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  reverse: bool) -> torch.Tensor:
    """Depthwise 1-D convolution over L, causal in scan direction.

    x: (batch, L, d); weight: (d, 1, K) as stored by nn.Conv1d; bias: (d,).
    Forward (reverse=False): out_t = bias + sum_k w[k] x[t - (K-1) + k], zeros before the start.
    Reverse: the same filter applied to the flipped sequence, i.e. out_t = bias + sum_k w[k] x[t + (K-1) - k].
    Returns (batch, L, d).
    """
    length, k_size = x.shape[1], weight.shape[-1]
    w = weight[:, 0, :]  # (d, K)
    pad = (0, 0, k_size - 1, 0) if not reverse else (0, 0, 0, k_size - 1)
    xp = F.pad(x, pad)
    out = bias.to(x.dtype).expand_as(x).clone()
    for k in range(k_size):
        start = k if not reverse else k_size - 1 - k
        out.addcmul_(xp[:, start:start + length], w[:, k].to(x.dtype))
    return out


class Branch(NamedTuple):
    """One convolution + projection branch of a mixer variant: parameters conv1d, x_proj, dt_proj and D
    with `suffix`; reverse: its convolution is causal in backward order (the sequence read last to first)."""

    suffix: str
    reverse: bool


class Scan(NamedTuple):
    """One selective scan of a mixer variant: the branch it reads (an index into the variant's branches),
    the name of its A parameter (D is its branch's) and its direction."""

    branch: int
    a_log: str
    reverse: bool


class MixerVariant(NamedTuple):
    """A mixer's branches and scans, in order; the scans' outputs are summed."""

    branches: Tuple[Branch, ...]
    scans: Tuple[Scan, ...]


_FORWARD_BRANCH, _BACKWARD_BRANCH = Branch("", reverse=False), Branch("_b", reverse=True)
_FORWARD_SCAN = Scan(0, "A_log", reverse=False)
MIXER_VARIANTS = {
    # a separate backward branch (Vim's "bimamba v2", VideoMamba, AuM's Bi-Bi)
    "bi": MixerVariant((_FORWARD_BRANCH, _BACKWARD_BRANCH), (_FORWARD_SCAN, Scan(1, "A_b_log", reverse=True))),
    # one convolution and projection in forward order, scanned both ways (AuM's Fo-Bi, "bimamba v1")
    "bi_shared": MixerVariant((_FORWARD_BRANCH,), (_FORWARD_SCAN, Scan(0, "A_b_log", reverse=True))),
    # one direction (AuM's Fo-Fo)
    "forward": MixerVariant((_FORWARD_BRANCH,), (_FORWARD_SCAN,)),
}


class ScanInputs(NamedTuple):
    """What one selective scan takes, in sequence order (shapes as mambamerge.ops.selective_scan).

    u, delta: (B, L, d_inner); A: (d_inner, N); B, C: (B, L, N); D: (d_inner,); reverse: scan direction.
    """

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    reverse: bool


class BranchInputs(NamedTuple):
    """A branch's share of the scans' inputs, sequence order, in the scan dtype: u, delta (B, L, d_inner),
    B, C (B, L, N), and delta's mean over channels (B, L) when asked for (else None)."""

    u: torch.Tensor
    delta: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    delta_mean: Optional[torch.Tensor]


class TorchPath:
    """The mixer's steps in PyTorch, sequence-major (batch, L, channels): a backward branch convolves in
    reverse and a backward scan runs in reverse, so nothing is flipped. `scan` runs each selective scan
    (ScanInputs -> (batch, L, d_inner)); None: mambamerge.ops.selective_scan with the mixer's scan_impl."""

    def __init__(self, mixer: "MambaMixer", scan: Optional[Callable[[ScanInputs], torch.Tensor]] = None):
        self.mixer = mixer
        self.scan_fn = scan

    def project(self, hidden: torch.Tensor):
        """hidden (batch, L, d_model) -> x, z (batch, L, d_inner)."""
        return self.mixer.in_proj(hidden).chunk(2, dim=-1)

    def branch(self, x: torch.Tensor, branch: Branch, mean_delta: bool) -> BranchInputs:
        mixer = self.mixer
        conv = getattr(mixer, "conv1d" + branch.suffix)
        if _kernels_take(x):
            u = cpu_kernels.conv_silu(x, conv.weight, conv.bias, branch.reverse)
        else:
            u = F.silu(depthwise_conv_along_sequence(x, conv.weight, conv.bias, branch.reverse))
        dt, B, C = torch.split(getattr(mixer, "x_proj" + branch.suffix)(u),
                               [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        scan_dtype = at_least_float32(u.dtype)
        dt_proj = getattr(mixer, "dt_proj" + branch.suffix)
        dt = cast(F.linear(dt, dt_proj.weight, cast(dt_proj.bias, dt.dtype)), scan_dtype)
        delta, delta_mean = softplus_with_row_mean(dt) if mean_delta else (softplus(dt), None)
        return BranchInputs(*(cast(t, scan_dtype) for t in (u, delta, B, C)), delta_mean)

    def scan(self, inputs: BranchInputs, branch: Branch, scan: Scan, z: torch.Tensor) -> torch.Tensor:
        """One direction, ungated: (batch, L, d_inner) in the scan dtype."""
        u = inputs.u
        A = -torch.exp(cast(getattr(self.mixer, scan.a_log), u.dtype))
        D = cast(getattr(self.mixer, "D" + branch.suffix), u.dtype)
        args = ScanInputs(u, inputs.delta, A, inputs.B, inputs.C, D, scan.reverse)
        if self.scan_fn is not None:
            return self.scan_fn(args)
        return selective_scan(*args, impl=self.mixer.scan_impl)

    def output(self, parts: List[torch.Tensor], z: torch.Tensor, halve: bool) -> torch.Tensor:
        """The summed scans (one or two) gated by SiLU(z) (and halved), through out_proj: (batch, L, d_model)."""
        if _kernels_take(z) and all(p.dtype == z.dtype for p in parts):  # a mixer has one or two scans
            y = cpu_kernels.gate(parts[0], parts[1] if len(parts) == 2 else None, z, halve)
        else:
            y = sum(parts[1:], parts[0]).to(z.dtype) * F.silu(z)
            y = y * 0.5 if halve else y
        return self.mixer.out_proj(y)

    def stats(self, inputs: BranchInputs, branch: Branch):
        """A branch's part of SSMStats: delta (batch, d_inner, L), B (batch, N, L), delta's mean (batch, L)."""
        return inputs.delta.transpose(1, 2), inputs.B.transpose(1, 2), inputs.delta_mean


# per variant, what a whole-mixer kernel call says of it besides its weights: its branches' directions,
# its scans' branches and its scans' directions
_KERNEL_LAYOUT = {name: ([b.reverse for b in v.branches], [s.branch for s in v.scans], [s.reverse for s in v.scans])
                  for name, v in MIXER_VARIANTS.items()}

# the kernel paths, in the order "auto" tries them: (path, its kernels or None, why they cannot run a call)
_KERNEL_PATHS = {"fused": (FusedPath, fused_kernels, unsupported_reason),
                 "triton": (TritonPath, triton_kernels, triton_unsupported_reason)}


class MambaMixer(nn.Module):
    """Mamba mixer in one of the MIXER_VARIANTS, with the official parameter names and shapes: in_proj,
    out_proj, then per branch conv1d, x_proj, dt_proj, D (suffix "_b" for the backward branch) and per
    scan its A parameter (A_log, A_b_log).

    divide_out: halve the sum of the two directions (Vim, AuM Bi-Bi) instead of summing them
    (VideoMamba, AuM Fo-Bi); ignored by the one-direction variant.

    scan_impl: one of mambamerge.ops.MIXER_IMPLS. "fused" runs the whole mixer through the kernels of
    causal-conv1d and mamba_ssm (models/fused.py), "triton" through torch's convolution and the Triton
    scan; "auto" takes the first of the two whose packages import and whose kernels support the mixer
    and the input, a CUDA tensor (models/fused.unsupported_reason, triton_unsupported_reason); on CPU
    "auto" runs float32 inference as one call of the whole-mixer kernel (cpu_kernels.mixer_forward); any
    other value, and "auto" otherwise, runs the PyTorch path (TorchPath) with that selective scan
    ("compiled": the per-step CPU kernels between torch's projections).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, divide_out: bool = True, variant: str = "bi",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        if variant not in MIXER_VARIANTS:
            raise ValueError(f"mixer variant must be one of {', '.join(MIXER_VARIANTS)}, got {variant!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.divide_out = divide_out
        self.variant = variant
        self.scan_impl = "auto"

        d_inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for suffix in (branch.suffix for branch in self.spec.branches):
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
            self._init_dt_proj(dt_proj, dt_min, dt_max, dt_init_floor)
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(d_inner)))
        for scan in self.spec.scans:
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
            self.register_parameter(scan.a_log, nn.Parameter(a_log))

    @property
    def spec(self) -> MixerVariant:
        """The branches and scans of this mixer's variant."""
        return MIXER_VARIANTS[self.variant]

    @property
    def scans(self) -> int:
        """Scan directions run per call (1 or 2)."""
        return len(self.spec.scans)

    @property
    def branches(self) -> int:
        """Convolution + projection branches run per call (2 for "bi", else 1)."""
        return len(self.spec.branches)

    def no_weight_decay(self) -> Set[str]:
        """Names of the SSM parameters kept out of weight decay: every A_log and D (as mamba_ssm does)."""
        return {scan.a_log for scan in self.spec.scans} | {"D" + branch.suffix for branch in self.spec.branches}

    def _init_dt_proj(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _path(self, hidden: torch.Tensor, scan: Optional[Callable[[ScanInputs], torch.Tensor]]):
        """The steps this call runs: the fused or Triton kernels' (see scan_impl) unless `scan` is given, else
        PyTorch's."""
        if scan is not None or self.scan_impl not in ("auto", *_KERNEL_PATHS):
            return TorchPath(self, scan)
        if self.scan_impl == "auto":
            if hidden.is_cuda:
                for path, kernels_of, reason_of in _KERNEL_PATHS.values():
                    kernels = kernels_of()
                    if kernels is not None and reason_of(self, hidden) is None:
                        return path(self, kernels)
            return TorchPath(self)
        path, kernels_of, reason_of = _KERNEL_PATHS[self.scan_impl]
        kernels = kernels_of()
        if kernels is None:
            needs = ("the mamba_ssm and causal-conv1d packages, and at least one of them cannot be imported; "
                     "install both (they need CUDA)" if self.scan_impl == "fused" else
                     "the triton package, which cannot be imported; install the one matching your torch")
            raise RuntimeError(f"scan_impl={self.scan_impl!r} needs {needs} or use scan_impl='auto'")
        reason = reason_of(self, hidden)
        if reason is not None:
            raise ValueError(f"scan_impl={self.scan_impl!r}: {reason}; use scan_impl='auto'")
        return path(self, kernels)

    def forward(self, hidden: torch.Tensor, return_ssm: bool = False,
                scan: Optional[Callable[[ScanInputs], torch.Tensor]] = None):
        """hidden: (batch, L, d_model) -> (batch, L, d_model), plus SSMStats when return_ssm.

        scan: run in place of each selective scan, ScanInputs -> (batch, L, d_inner) (the diagnostics read
        the scans' inputs or replace the scans with it); it takes the PyTorch path."""
        if scan is None and self.kernel_takes(hidden):
            return self.kernel_forward(hidden, return_ssm)
        path = self._path(hidden, scan)
        spec = self.spec
        x, z = path.project(hidden)
        branches = [path.branch(x, branch, mean_delta=return_ssm) for branch in spec.branches]
        parts = [path.scan(branches[s.branch], spec.branches[s.branch], s, z) for s in spec.scans]
        out = path.output(parts, z, halve=self.divide_out and len(spec.scans) == 2)
        if not return_ssm:
            return out
        first, last = spec.scans[0].branch, spec.scans[-1].branch
        fwd = path.stats(branches[first], spec.branches[first])
        bwd = fwd if last == first else path.stats(branches[last], spec.branches[last])
        return out, SSMStats(fwd[0], bwd[0], fwd[1], bwd[1], fwd[2], bwd[2])

    def kernel_takes(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None) -> bool:
        """The call runs as one call of the whole-mixer CPU kernel (scan_impl "auto"; float32 inference on CPU,
        the residual, if any, float32 too; outside autocast, or under bf16 autocast where torch exports
        MKL's bf16 gemm, which then takes the input in bf16 too and the projections)."""
        # cheapest first, and the registry read directly (nn.Module's __getattr__ costs ~0.8 us a name)
        if (self.scan_impl != "auto" or torch.is_grad_enabled() or not hidden.is_cpu
                or not (residual is None or residual.dtype == torch.float32)
                or self._modules["in_proj"]._parameters["weight"].dtype != torch.float32):
            return False
        if not torch.is_autocast_enabled("cpu"):
            return hidden.dtype == torch.float32 and cpu_kernels.mixer_available()
        return (hidden.dtype in (torch.float32, torch.bfloat16) and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and cpu_kernels.bf16_mixer_available())

    def kernel_forward(self, hidden: torch.Tensor, return_ssm: bool, residual: Optional[torch.Tensor] = None,
                       norm: Optional[nn.Module] = None):
        """forward as one call of the whole-mixer CPU kernel (where kernel_takes; under autocast with bf16
        products): out, plus SSMStats when return_ssm, float32. With norm (the block's float32 RMSNorm), after the block's residual add and norm:
        out, the new residual, plus SSMStats when return_ssm."""
        spec, modules, own = self.spec, self._modules, self._parameters
        params = []
        for b in spec.branches:
            conv, dt_proj = modules["conv1d" + b.suffix]._parameters, modules["dt_proj" + b.suffix]._parameters
            params += [conv["weight"], conv["bias"], modules["x_proj" + b.suffix]._parameters["weight"],
                       dt_proj["weight"], dt_proj["bias"], own["D" + b.suffix]]
        branch_reverse, scan_branch, scan_reverse = _KERNEL_LAYOUT[self.variant]
        bf16 = torch.is_autocast_enabled("cpu")
        out, *rest = cpu_kernels.mixer_forward(
            hidden.float() if bf16 else hidden, residual, None if norm is None else norm._parameters["weight"], 0.0 if norm is None else norm.eps,
            modules["in_proj"]._parameters["weight"], modules["out_proj"]._parameters["weight"], params,
            branch_reverse, [own[s.a_log] for s in spec.scans], scan_branch, scan_reverse,
            self.divide_out and len(spec.scans) == 2, return_ssm, bf16)
        head = (out,) if norm is None else (out, rest.pop(0))
        if not return_ssm:
            return head[0] if norm is None else head
        first, last = (3 * spec.scans[i].branch for i in (0, -1))
        b_part = slice(self.dt_rank, self.dt_rank + self.d_state)
        ssm = SSMStats(rest[first].transpose(1, 2), rest[last].transpose(1, 2),
                       rest[first + 1][..., b_part].transpose(1, 2), rest[last + 1][..., b_part].transpose(1, 2),
                       rest[first + 2], rest[last + 2])
        return (*head, ssm)
