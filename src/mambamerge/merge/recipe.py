"""The token reduction a model was saved running (a MergeRecipe): method, its options and the per-block
schedule, as a fine-tuned checkpoint records it in its metadata, so that it is run the way it was
trained. Read back bounded and checked: a damaged or foreign record is a ValueError, never a guess."""
import json
import math
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

from mambamerge.merge.registry import METHODS

MAX_CHARS = 65536  # the longest record read (a 4096-block schedule and every option fit easily)
MAX_BLOCKS = 4096
MAX_TOKENS = 1 << 24
_MAX_TEXT = 200  # the longest string option value


@dataclass(frozen=True)
class MergeRecipe:
    """method: a name in METHODS; options: every option of the method, as it ran; removals: tokens
    removed before each block (a Schedule's removals, one per block); tokens: the tokens entering
    block 0 it was made for (the training resolution's)."""

    method: str
    options: Dict[str, object]
    removals: Tuple[int, ...]
    tokens: int

    @classmethod
    def of(cls, model) -> Optional["MergeRecipe"]:
        """What a patched model runs, or None for a dense one. The model is only read."""
        reducer = getattr(model, "token_reducer", None)
        if reducer is None:
            return None
        method = reducer.method
        return cls(method.name, {f.name: getattr(method, f.name) for f in fields(method)},
                   tuple(reducer.schedule.removals), model.layout.length)

    def patch_options(self) -> dict:
        """Keyword arguments of mambamerge.patch (after the method name) that apply it."""
        return {"schedule": list(self.removals), **self.options}

    def check_fits(self, model) -> None:
        """A ValueError when `model` is not the depth or token count the schedule was made for."""
        depth, tokens = len(model.layers), model.layout.length
        if (depth, tokens) != (len(self.removals), self.tokens):
            raise ValueError(f"the recorded {self.method} schedule is for {len(self.removals)} blocks and "
                             f"{self.tokens} tokens (the resolution it was fine-tuned at), but this model has "
                             f"{depth} blocks and {tokens} tokens: run it at that resolution, or choose the reduction "
                             f"yourself (on the command line --method NAME --reduction R, or --method none)")

    def average_reduction(self) -> float:
        """1 - mean tokens per block / initial tokens (as Schedule.average_reduction)."""
        length, total = self.tokens, 0
        for r in self.removals:
            length -= r
            total += length
        return 1.0 - total / (len(self.removals) * self.tokens)

    def changed_options(self) -> Dict[str, object]:
        """The options that differ from the method's defaults."""
        defaults = METHODS[self.method].options()
        return {k: v for k, v in self.options.items() if k not in defaults or defaults[k] != v}

    def describe(self) -> str:
        """One line: method, the options that differ from its defaults, and the schedule."""
        changed = ", ".join(f"{k}={v!r}" for k, v in self.changed_options().items())
        steps = [f"{r} before block {b}" for b, r in enumerate(self.removals) if r]
        return (f"{self.method}" + (f" ({changed})" if changed else "")
                + f", {self.average_reduction():.1%} average reduction of {self.tokens} tokens: "
                + (", ".join(steps) or "no removal"))

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "options": self.options, "removals": list(self.removals),
                           "tokens": self.tokens})

    @classmethod
    def from_json(cls, text: str) -> "MergeRecipe":
        """The record `to_json` wrote; a ValueError saying what is wrong with any other text."""
        if len(text) > MAX_CHARS:
            raise ValueError(f"is {len(text)} characters long, more than a record ever needs ({MAX_CHARS})")
        try:
            record = json.loads(text)
        except (ValueError, RecursionError) as err:  # ValueError: also an integer of too many digits
            raise ValueError(f"is not JSON ({type(err).__name__})") from None
        if not isinstance(record, dict) or set(record) != {"method", "options", "removals", "tokens"}:
            raise ValueError("is not an object with the entries method, options, removals and tokens")
        method, options, removals, tokens = (record[k] for k in ("method", "options", "removals", "tokens"))
        if not isinstance(method, str) or method not in METHODS:
            shown = repr(method)[:40]
            raise ValueError(f"names the method {shown}, which this version does not know (known: "
                             f"{', '.join(sorted(METHODS))})")
        if not (isinstance(options, dict) and all(_scalar(v) for v in options.values())):
            raise ValueError("options is not an object of plain values (numbers, strings, booleans)")
        if not (_whole(tokens) and 1 <= tokens <= MAX_TOKENS):
            raise ValueError(f"tokens is {tokens!r}, not a whole number from 1 to {MAX_TOKENS}")
        if not (isinstance(removals, list) and 1 <= len(removals) <= MAX_BLOCKS
                and all(_whole(r) and r >= 0 for r in removals) and sum(removals) < tokens):
            raise ValueError(f"removals is not a list of 1 to {MAX_BLOCKS} counts of at least 0 that leave one of "
                             f"the {tokens} tokens")
        from mambamerge.patch import make_method  # the method's own checks of its options

        try:
            make_method(method, **options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"options are not ones {method} takes ({err})") from None
        return cls(method, dict(options), tuple(removals), tokens)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (bool, int)) or (isinstance(value, str) and len(value) <= _MAX_TEXT)
