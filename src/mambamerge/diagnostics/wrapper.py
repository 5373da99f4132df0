"""Base of the diagnostics' method wrappers: a token-reduction method whose plans are looked at or changed."""
from typing import Optional

from mambamerge.merge.base import ReductionMethod
from mambamerge.merge.plan import MergePlan
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats, TokenLayout


class MethodWrapper:
    """Everything a token reducer asks of a method, passed on to the wrapped one; subclasses override `plan`."""

    def __init__(self, method: ReductionMethod):
        self.method = method
        self.name = method.name

    @property
    def needs_ssm(self) -> bool:
        return self.method.needs_ssm

    def capacity(self, length: int, layout: TokenLayout) -> int:
        return self.method.capacity(length, layout)

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        return self.method.overhead_macs(length, r, dim)

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        return self.method.plan(state, ssm, r)
