"""A method on a schedule: what runs between the blocks of a patched model (see runner.py)."""
from typing import Optional

from mambamerge.merge.base import ReductionMethod
from mambamerge.merge.schedule import Schedule
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats


class TokenReducer:
    """method + schedule. The block runner calls `wants_ssm(l)` before running block l and `step(l, ...)`
    after it.

    track_source: keep the (B, L, L0) map of which original tokens each token holds; the last state
    of a forward is kept in `last_state` for inspection.
    """

    def __init__(self, method: ReductionMethod, schedule: Schedule, track_source: bool = False):
        self.method = method
        self.schedule = schedule
        self.track_source = track_source
        self.last_state: Optional[TokenState] = None

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
