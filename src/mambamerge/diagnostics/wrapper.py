"""Base of the diagnostics' method wrappers: a token-reduction method whose plans are looked at or changed."""
from typing import Optional

from mambamerge.merge.base import ReductionMethod
from mambamerge.merge.state import MergePlan, TokenState
from mambamerge.models.blocks import SSMStats


class MethodWrapper:
    """Everything a token reducer asks of a method, passed on to the wrapped one; subclasses override `plan`."""

    def __init__(self, method: ReductionMethod):
        self.method = method
        self.name = method.name

    @property
    def needs_ssm(self) -> bool:
        return self.method.needs_ssm

    def capacity(self, length: int) -> int:
        return self.method.capacity(length)

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        return self.method.overhead_macs(length, r, dim)

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        return self.method.plan(state, ssm, r)
