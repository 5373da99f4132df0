"""A method on a schedule: what runs between the blocks of a patched model (see runner.py)."""
from typing import Callable, Optional

from mambamerge.merge.base import ReductionMethod
from mambamerge.merge.schedule import Schedule
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats


class TokenReducer:
    """method + schedule. The block runner calls `wants_ssm(l)` before running block l and `step(l, ...)`
    after it.

    track_source: keep the (B, L, L0) map of which original tokens each token holds (see the model's
    `token_state`).
    schedule_for_r: r=tokens per step -> the schedule that `reducer.r = n` sets (patch gives it: the
    model's depth, tokens and the method's capacity); without it r cannot be set.
    """

    def __init__(self, method: ReductionMethod, schedule: Schedule, track_source: bool = False,
                 schedule_for_r: Optional[Callable[..., Schedule]] = None):
        self.method = method
        self.schedule = schedule
        self.track_source = track_source
        self._schedule_for_r = schedule_for_r

    @property
    def r(self) -> Optional[int]:
        """Tokens each step removes (ToMe's knob): 0 for no step, None when the steps differ."""
        steps = {count for count in self.schedule.removals if count}
        return steps.pop() if len(steps) == 1 else None if steps else 0

    @r.setter
    def r(self, value: int) -> None:
        """A constant schedule of `value` tokens per step, validated as patch(..., r=value) would be
        (a ValueError leaves the schedule as it was)."""
        if self._schedule_for_r is None:
            raise ValueError("this reducer was built without its model; set r through mambamerge.patch")
        self.schedule = self._schedule_for_r(r=value)

    def removal_after(self, block: int) -> int:
        nxt = block + 1
        return self.schedule.removals[nxt] if nxt < len(self.schedule.removals) else 0

    def wants_ssm(self, block: int) -> bool:
        return self.method.needs_ssm and self.removal_after(block) > 0

    def step(self, block: int, state: TokenState, ssm: Optional[SSMStats]) -> TokenState:
        """After block `block` ran: remove the tokens the schedule asks for before the next block."""
        r = self.removal_after(block)
        if r == 0:
            return state
        return state.apply(self.method.plan(state, ssm, r))

    def __repr__(self) -> str:
        return f"TokenReducer({self.method!r}, removals={list(self.schedule.removals)})"
