"""`patch(model, method, ...)`: make a model reduce tokens between its blocks, in place."""
import functools
import math
import numbers
from typing import Optional, Sequence, Union

from torch import nn

from mambamerge.merge import METHODS
from mambamerge.merge.recipe import MergeRecipe
from mambamerge.merge.reducer import TokenReducer
from mambamerge.merge.schedule import Schedule, check_arguments, resolve
from mambamerge.models.base import MambaClassifier


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, MambaClassifier):
        raise TypeError(f"{type(model).__name__} is not a model mambamerge can patch (expected a model from "
                        f"mambamerge.create_model or mambamerge.load_checkpoint: Vim, VideoMamba or Audio Mamba)")


def make_method(method: str, **options):
    """Instantiate a method by name with its options; unknown names or options are errors that list
    the valid ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    valid = cls.options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; its options: {listed}")
    for name, value in options.items():
        _check_option_type(method, name, value, valid[name])
    return cls(**options)


def check_options(method: str, *, reduction: Optional[float] = None, schedule=None, r: Optional[int] = None,
                  keep: Optional[float] = None, start: Optional[int] = None, every: Optional[int] = None,
                  **options) -> None:
    """The errors `patch` gives for these arguments that need no model (an unknown method or option, an
    option value of the wrong kind, a schedule parameter out of range), to refuse them before any work."""
    make_method(method, **options)
    check_arguments(reduction, r, keep, start, every)


def _check_option_type(method: str, name: str, value, default) -> None:
    """A ValueError naming the option when `value` is not of its default's kind: a whole number for an
    int option (24.0 is not rounded), a finite number for a float one, text for a text one."""
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "True or False"
    elif isinstance(default, int):
        ok, wanted = isinstance(value, numbers.Integral) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    elif isinstance(default, str):
        ok, wanted = isinstance(value, str), "text"
    else:
        return
    if not ok:
        raise ValueError(f"{method}: option {name} must be {wanted} (default {default!r}), got {value!r}")


def patch(model: nn.Module, method: Union[None, str, MergeRecipe] = None, reduction: Optional[float] = None,
          schedule: Union[None, str, Sequence[int], Schedule] = None, *, r: Optional[int] = None,
          keep: Optional[float] = None, start: Optional[int] = None, every: Optional[int] = None,
          track_source: bool = False, config: Optional[dict] = None, **options) -> nn.Module:
    """Turn `model` into a token-reducing one in place and return it.

    method: a name in mambamerge.merge.METHODS ("mame", "stm", "tome", ...; see docs/merging.md), or
        the MergeRecipe a fine-tuned checkpoint records (`patch(model, model.merge_recipe)`: its method,
        options and per-block schedule, exactly as trained; nothing else may be given with it).
    reduction: target average reduction in [0, 1) (fraction of token-layers removed, averaged over
        depth); the schedule's parameter is derived from it.
    schedule: None / "geometric" (keep ratio per step from block `start`=1 every `every`=2), "constant" (r tokens
        before blocks start, start+every, ...; R-MeeTo's layout is start=2, every=2), a list of
        per-block counts, or a Schedule.
    r, keep, start, every: schedule parameters, instead of a target; r alone is ToMe's constant
        schedule (r tokens before every block from block 1). `model.r = n` later changes it in place.
    track_source: keep which original tokens each token holds (`model.token_state(x).source`).
    options: the method's own options (see each method's docstring, or METHODS[name].options()).
    config: instead of a method, what mambamerge.tune chose (`result.config`, or that dict read back from
        JSON): its method, options and per-block schedule; refused on a model of another depth or token count.

    The state dict is untouched: the patched model still loads and saves the same checkpoints.
    `unpatch(model)` restores the dense model.
    """
    if config is not None:
        if method is not None:
            raise TypeError("give either a method or a tune config, not both")
        from mambamerge.tune import recipe_of_config

        _check_model(model)
        method = recipe_of_config(config, model)
    elif method is None:
        raise TypeError("patch needs a method name (e.g. 'mame'), a MergeRecipe or config= (a tune result's config)")
    model.token_reducer = make_reducer(model, method, reduction, schedule, r=r, keep=keep, start=start, every=every,
                                       track_source=track_source, **options)
    return model


def make_reducer(model: nn.Module, method: Union[str, MergeRecipe], reduction: Optional[float] = None,
                 schedule: Union[None, str, Sequence[int], Schedule] = None, *, r: Optional[int] = None,
                 keep: Optional[float] = None, start: Optional[int] = None, every: Optional[int] = None,
                 track_source: bool = False, **options) -> TokenReducer:
    """The TokenReducer `patch` gives `model` for these arguments, with the same checks and errors,
    without patching it: the model is only read (e.g. to refuse an unreachable target before any work)."""
    _check_model(model)
    if isinstance(method, MergeRecipe):
        given = [k for k, v in dict(reduction=reduction, schedule=schedule, r=r, keep=keep, start=start,
                                    every=every).items() if v is not None] + sorted(options)
        if given:
            raise TypeError(f"a MergeRecipe fixes the method, options and schedule; got {', '.join(given)} too")
        method.check_fits(model)
        return make_reducer(model, method.method, track_source=track_source, **method.patch_options())
    m = make_method(method, **options)
    schedule_for = functools.partial(_schedule_for, m, len(model.layers), model.layout, start, every)
    sch = schedule_for(reduction=reduction, schedule=schedule, r=r, keep=keep)
    constant = schedule if schedule == "constant" else None  # model.r keeps R-MeeTo's spacing, else ToMe's
    return TokenReducer(m, sch, track_source=track_source,
                        schedule_for_r=functools.partial(schedule_for, schedule=constant))


def _schedule_for(method, depth: int, layout, start: Optional[int], every: Optional[int], **size) -> Schedule:
    """resolve() for a model of `depth` blocks embedding its input as `layout`, under `method`'s capacity
    (a module-level function, so that a patched model stays picklable)."""
    return resolve(depth, layout.length, lambda length: method.capacity(length, layout), start=start, every=every,
                   **size)


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the token reducer: the model is dense again."""
    _check_model(model)
    model.token_reducer = None
    return model


def reduction_summary(model: nn.Module) -> dict:
    """Average reduction, average and final token count of a (patched or dense) model."""
    _check_model(model)
    tokens = model.layout.length
    sch = model.token_reducer.schedule if model.token_reducer else Schedule((0,) * len(model.layers))
    return sch.summary(tokens)
