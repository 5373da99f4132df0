"""The interface every token-reduction method implements, and the helpers they share."""
from dataclasses import dataclass, fields
from typing import ClassVar, Literal, Optional, get_args, get_origin, get_type_hints

import torch

from mambamerge.merge.plan import MergePlan
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats, TokenLayout


@dataclass
class ReductionMethod:
    """Base of all methods. Subclasses are dataclasses whose fields are the method's options (each with
    its default in the subclass docstring; the evidence for it in docs/), implement `plan`, and are made
    known by name with the `@register` decorator (registry.py).

    A text option is typed `Literal[...]` and its value is checked here; `overrides` declares the options
    a value of another makes meaningless ({option: {value: (ignored options...)}}), refused when set
    together; `check` holds the remaining bounds (numbers, options that need each other).
    needs_ssm: the method reads the SSMStats of the block just run (Δ, B).
    """

    name = "base"
    needs_ssm = False
    overrides: ClassVar[dict] = {}

    def __post_init__(self):
        for option, kind in get_type_hints(type(self)).items():
            value = getattr(self, option, None)
            if get_origin(kind) is Literal and value not in get_args(kind):
                *rest, last = map(repr, get_args(kind))
                allowed = f"{', '.join(rest)} or {last}" if rest else last
                raise ValueError(f"{self.name}: {option} must be {allowed}, got {value!r}")
        defaults = self.options()
        for option, by_value in self.overrides.items():
            value = getattr(self, option)
            for ignored in by_value.get(value, ()):
                if getattr(self, ignored) != defaults[ignored]:
                    raise ValueError(f"{self.name}: {option}={value!r} ignores {ignored} (got "
                                     f"{ignored}={getattr(self, ignored)!r}); set one of them, not both")
        self.check()

    def check(self) -> None:
        """Bounds beyond an option's type: a ValueError naming the option."""

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        """Which r tokens leave and where they go. state holds L tokens; r <= capacity(L)."""
        raise NotImplementedError

    def capacity(self, length: int, layout: TokenLayout) -> int:
        """Most tokens one step can remove from `length` tokens of a sequence embedded as `layout`
        (where its class token is); by default all but two (the class token and one more) stay."""
        return max(length - 2, 0)

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        """Multiply-accumulates of one step's scoring and matching (for the FLOPs counter)."""
        return 0

    @classmethod
    def search_space(cls, layout: TokenLayout) -> dict:
        """{option: values worth trying} for mambamerge.tune on tokens laid out as `layout` (clips get the
        frame options); options left out keep their defaults."""
        return {}

    @classmethod
    def options(cls) -> dict:
        return {f.name: f.default for f in fields(cls)}


def token_norms(x: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L) L2 norms, floored at 1e-12 (as F.normalize): cosine similarities are dot
    products divided by these, which is cheaper than normalising the whole stream first."""
    return x.norm(dim=-1).clamp(min=1e-12)


def delta_importance(ssm: SSMStats) -> torch.Tensor:
    """MaMe's token importance: mean over channels of the forward plus the backward step size Δ.
    (B, d_inner, L) x2 -> (B, L). Large Δ: the token is written strongly into the state."""
    fwd, bwd = ssm.mean_delta()
    return fwd + bwd


def least(score: torch.Tensor, cls: torch.Tensor, k: int) -> torch.Tensor:
    """The k non-class tokens of lowest score, lowest first. score, cls: (B, L) -> (B, k) indices.
    NaN and infinite scores (an image of NaN / inf) rank as the largest finite one: never the class token."""
    highest = torch.finfo(score.dtype).max
    score = score.nan_to_num(nan=highest, posinf=highest, neginf=-highest)
    return score.masked_fill(cls, float("inf")).topk(k, dim=1, largest=False).indices


Feature = Literal["residual", "hidden"]


def stream(state: TokenState, feature: str) -> torch.Tensor:
    """The stream a method compares tokens on, in float32 or wider: "residual" (the running sum the
    block just run normalised) or "hidden" (that block's output)."""
    x = state.residual if feature == "residual" and state.residual is not None else state.hidden
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
