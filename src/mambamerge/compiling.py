"""torch.compile for inference: the settings a token-reducing model needs, and where torch keeps the
compiled code between runs. The commands' --compile and the benchmarks use it."""
import torch

RECOMPILE_LIMIT = 64  # graphs per forward: a sweep compiles the dense model and one per method x reduction


def compile(model: torch.nn.Module, mode=None) -> torch.nn.Module:
    """`model`'s forward compiled by torch.compile (inductor), `model` itself left as it is.

    Patching or unpatching `model` afterwards is seen by the compiled forward: dynamo guards on
    `model.token_reducer`, so the dense model and each attached reducer compile their own graph on their
    first call (that call is the compile; time it apart, see timing.first_call_seconds) and later calls
    reuse it. fullgraph=True: a graph break is an error, not a silently slower model (the kernels are
    custom ops, tests/test_compile.py); dynamic=False: one graph per input shape, no symbolic sizes. The
    recompile limit is raised to RECOMPILE_LIMIT so that many reducers do not fall back to eager.
    mode: torch.compile's mode ("reduce-overhead", "max-autotune", ...), None for its default."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, fullgraph=True, dynamic=False, mode=mode)


def cache_dir() -> str:
    """The folder where inductor caches compiled graphs between processes ($TORCHINDUCTOR_CACHE_DIR,
    else torch's default in the temp folder): a later run with the same torch, model, reducer and
    shapes loads its kernels from there instead of generating and building them (dynamo still traces)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return inductor_cache_dir()
