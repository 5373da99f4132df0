"""CPU kernels in ``_cpu_kernels.cpp``: the selective scan, softplus, and planning and applying a
token-merge step.

The kernel is built with g++ on first use into a cache directory
(``$MAMBAMERGE_CACHE/<hash>/`` or ``~/.cache/mambamerge/kernels/<hash>/``), the
hash covering the source, the compiler version, the flags and the CPU flags
(the build uses ``-march=native``). It is loaded with ctypes, which releases
the GIL during the call; the kernel runs on ``torch.get_num_threads()`` threads,
taken from torch's own OpenMP team when torch uses OpenMP (see
_openmp_launcher), else started with std::thread. Each kernel is a torch custom operator
(torch.ops.mambamerge.*) with a fake implementation and, where differentiable, a registered backward,
so torch.compile captures models that use them without graph breaks.
"""
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

_SOURCE = Path(__file__).with_name("_cpu_kernels.cpp")
_CXX = "g++"
_BLOCK = 16  # channels per task, kBlock in the C++ source
_COMPILE_FLAGS = (
    "-std=c++17",
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-ffast-math",
    "-fno-finite-math-only",
    "-fopenmp-simd",
    "-fPIC",
)
# Linked in a separate step without -ffast-math: with it gcc links crtfastmath.o,
# which turns on flush-to-zero for the whole process (torch included).
_LINK_FLAGS = ("-shared", "-pthread")
_LIBS = ("-lm",)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_FORWARD_ARGS = [_P] * 7 + [_I64] * 4 + [_INT] * 2 + [_P]
_BACKWARD_ARGS = [_P] * 13 + [_I64] * 4 + [_INT] * 2 + [_P]
_SOFTPLUS_ARGS = [_P] * 3 + [_I64] * 2 + [_INT, _P]
_MERGE_ARGS = [_P] * 10 + [_I64] * 5 + [_INT] * 2 + [_P]
_OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)([-.].*)?\.so[.0-9]*$")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_state = {"tried": False, "lib": None, "error": None, "launcher": None}


def _cache_root():
    env = os.environ.get("MAMBAMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mambamerge" / "kernels"


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        return next((line.strip() for line in f if line.startswith("flags")), "")


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
    return result.stdout


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(lib: Path) -> bool:
    """The cached library is the file its build recorded (a truncated or altered one would crash the
    process with SIGBUS or worse on its first call, past any Python error handling)."""
    record = lib.with_suffix(".sha256")
    try:
        return lib.is_file() and record.read_text().strip() == _digest(lib)
    except OSError:
        return False


def _remove_stale_builds(out_dir: Path) -> None:
    """Temp folders of builds whose process no longer runs (killed mid-build)."""
    for folder in out_dir.glob(".build-*-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _build(cxx):
    """Compiles the kernel unless an intact copy is cached; returns the path of the shared library."""
    source = _SOURCE.read_text()
    key = "\0".join(
        [source, _run([cxx, "--version"]), *_COMPILE_FLAGS, *_LINK_FLAGS, *_LIBS, _cpu_flags()]
    )
    out_dir = _cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]
    lib = out_dir / "_cpu_kernels.so"
    if out_dir.is_dir():
        _remove_stale_builds(out_dir)
    if _intact(lib):
        return lib
    if lib.with_suffix(".sha256").exists():  # (a library without a record is an older version's: replaced)
        warnings.warn(f"the cached kernel library {lib} is damaged or incomplete (its SHA-256 differs from the "
                      f"one its build recorded); rebuilding it", stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".build-{os.getpid()}-") as tmp:
        src, obj, so = (Path(tmp) / name for name in ("scan.cpp", "scan.o", "scan.so"))
        src.write_text(source)
        _run([cxx, *_COMPILE_FLAGS, "-c", str(src), "-o", str(obj)])
        _run([cxx, *_LINK_FLAGS, str(obj), "-o", str(so), *_LIBS])
        record = Path(tmp) / "scan.sha256"
        record.write_text(_digest(so))
        # each rename is atomic: concurrent builders end with complete files, and a record that does
        # not match its library (another builder's) only costs a rebuild
        os.replace(record, lib.with_suffix(".sha256"))
        os.replace(so, lib)
    return lib


def _trial(lib) -> None:
    """One tiny call checked against torch before the library is trusted with real work."""
    x = torch.linspace(-30.0, 30.0, 7)
    y = torch.empty_like(x)
    if lib.mm_softplus_f32(x.data_ptr(), y.data_ptr(), None, 1, 7, 1, None) != 0 or not torch.allclose(
            y, torch.nn.functional.softplus(x), rtol=1e-5, atol=1e-6):
        raise RuntimeError("the compiled library gives wrong results on a trial call; using torch")


class _Unsupported(RuntimeError):
    """A machine the kernels are not built for: the torch path is expected there, no warning."""


def _load():
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        raise _Unsupported(f"the compiled kernel targets Linux x86_64, not {sys.platform} {platform.machine()}")
    cxx = shutil.which(_CXX)
    if cxx is None:
        raise _Unsupported(f"no C++ compiler ({_CXX}) on PATH")
    lib = ctypes.CDLL(str(_build(cxx)))
    for suffix in _SUFFIX.values():
        for name, args in (("forward", _FORWARD_ARGS), ("backward", _BACKWARD_ARGS)):
            fn = getattr(lib, f"mm_scan_{name}_{suffix}")
            fn.argtypes = args
            fn.restype = _INT
        for name, args in (("softplus", _SOFTPLUS_ARGS), ("merge_apply", _MERGE_ARGS)):
            fn = getattr(lib, f"mm_{name}_{suffix}")
            fn.argtypes = args
            fn.restype = _INT
    lib.mm_plan_from_selection.argtypes = [_P] * 4 + [_I64] * 3
    lib.mm_plan_from_selection.restype = _INT
    _trial(lib)
    return lib


def _openmp_launcher():
    """Address of GOMP_parallel in the OpenMP runtime torch runs its ops on, or None.

    The kernel runs its tasks on that runtime's team when it can: right after a
    torch op its workers spin waiting for work, so threads of our own would
    compete with them for the cores. Falls back to std::thread (None) when torch
    is not built with OpenMP or the runtime is ambiguous.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    with open("/proc/self/maps") as f:
        loaded = {line.split()[-1] for line in f if _OPENMP_RUNTIME.search(line.strip())}
    torch_dir = os.path.dirname(torch.__file__)
    # the one shipped with torch (torch/lib or torch.libs) first
    candidates = [p for p in loaded if p.startswith(torch_dir)] or list(loaded)
    if len(candidates) != 1:
        return None
    try:
        return ctypes.cast(ctypes.CDLL(candidates[0]).GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _library():
    """The loaded library or None; the lock is only taken until the first attempt has finished."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["lib"] = _load()
                    _state["launcher"] = _openmp_launcher()
                except _Unsupported as exc:
                    _state["error"] = str(exc)
                except (OSError, RuntimeError) as exc:
                    _state["error"] = str(exc)
                    warnings.warn(f"compiled CPU kernels unavailable, using the slower torch path: {exc}",
                                  stacklevel=3)
                _state["tried"] = True
    return _state["lib"]


@torch.compiler.assume_constant_result
def available() -> bool:
    """True if the kernel is built (building it on the first call) and loaded. A constant for
    torch.compile, which calls it once while tracing."""
    return _library() is not None


def handles(x: torch.Tensor) -> bool:
    """True if the kernels can take x: a CPU float32/float64 tensor, with the library built and loaded."""
    return x.device.type == "cpu" and x.dtype in _SUFFIX and available()


def unavailable_reason():
    """Why the kernel cannot be used (a string), or None if it can."""
    _library()
    return _state["error"]


def check_inputs(u, delta, A, B, C, D):
    """Checks shapes, and that all six tensors share one floating dtype and device.

    Raises ValueError naming the offending argument.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"selective scan: {name} must be a tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be (batch, L, d), got shape {tuple(u.shape)}")
    if A.dim() != 2:
        raise ValueError(f"selective scan: A must be (d, N), got shape {tuple(A.shape)}")
    batch, length, d = u.shape
    n_state = A.shape[1]
    expected = {
        "delta": (batch, length, d),
        "A": (d, n_state),
        "B": (batch, length, n_state),
        "C": (batch, length, n_state),
        "D": (d,),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"selective scan: {name} has shape {tuple(named[name].shape)}, expected {shape} "
                f"for u of shape {tuple(u.shape)} and A of shape (d, N)"
            )
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1 or not u.is_floating_point():
        raise ValueError(f"selective scan: all inputs need one floating dtype, got {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"selective scan: all inputs need to be on one device, got {devices}")


def _ptrs(*tensors):
    return [t.data_ptr() for t in tensors]


def _run_kernel(name, *args):
    """Calls kernel `name` with args, then the thread count and the OpenMP launcher; returns its status."""
    return getattr(_library(), name)(*args, torch.get_num_threads(), _state["launcher"])


# The kernels as torch custom operators (torch.ops.mambamerge.*): torch.compile traces them as single
# graph nodes (shapes from the fake implementations), autograd goes through the registered backward.
# Each implementation allocates its outputs contiguous and calls the kernel once; the fake
# implementations give the same shapes and strides without running anything.


def _dispatch(op, impl, args, differentiable=()):
    """op(*args) under torch.compile or where autograd records the call (any of `differentiable` needs a
    gradient); elsewhere impl(*args), the same kernel without the dispatcher, whose cost buys nothing in
    eager inference (2.5% of a batch-1 Vim-Ti forward's CPU time, 12% with MaMe merging half the tokens:
    benchmarks/dispatch.py)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)):
        return op(*args)
    return impl(*args)


def _scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
          D: torch.Tensor, reverse: bool) -> torch.Tensor:
    u, delta, B, C, D = (t.contiguous() for t in (u, delta, B, C, D))
    At = A.t().contiguous()  # (N, d); every tensor passed by address stays referenced until the call returns
    y = u.new_empty(u.shape)
    status = _run_kernel(f"mm_scan_forward_{_SUFFIX[u.dtype]}", *_ptrs(u, delta, At, B, C, D, y), *u.shape,
                         A.shape[1], int(reverse))
    if status != 0:
        raise MemoryError("selective scan kernel (forward) failed to allocate its buffers")
    return y


_scan_op = torch.library.custom_op("mambamerge::selective_scan", _scan, mutates_args=(), device_types="cpu")


@_scan_op.register_fake
def _(u, delta, A, B, C, D, reverse):
    return u.new_empty(u.shape)


@torch.library.custom_op("mambamerge::selective_scan_backward", mutates_args=(), device_types="cpu")
def _scan_backward_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor, dy: torch.Tensor, reverse: bool) -> List[torch.Tensor]:
    """Gradients of the scan for all six inputs, each shaped and laid out as a contiguous copy of its input."""
    u, delta, B, C, D, dy = (t.contiguous() for t in (u, delta, B, C, D, dy))
    At = A.t().contiguous()
    batch, length, d = u.shape
    n_state = A.shape[1]
    n_blocks = -(-d // _BLOCK)
    du, ddelta = u.new_empty(u.shape), u.new_empty(u.shape)
    # per-task partial sums, reduced below
    dA = u.new_empty(batch, d, n_state)
    dB = u.new_empty(batch, n_blocks, length, n_state)
    dC = u.new_empty(batch, n_blocks, length, n_state)
    dD = u.new_empty(batch, d)
    status = _run_kernel(f"mm_scan_backward_{_SUFFIX[u.dtype]}",
                         *_ptrs(u, delta, At, B, C, D, dy, du, ddelta, dA, dB, dC, dD),
                         batch, length, d, n_state, int(reverse))
    if status != 0:
        raise MemoryError("selective scan kernel (backward) failed to allocate its buffers")
    return [du, ddelta, dA.sum(0), dB.sum(1), dC.sum(1), dD.sum(0)]


@_scan_backward_op.register_fake
def _(u, delta, A, B, C, D, dy, reverse):
    return [t.new_empty(t.shape) for t in (u, delta, A, B, C, D)]


def _scan_setup_context(ctx, inputs, output):
    *tensors, reverse = inputs
    ctx.reverse = reverse
    ctx.save_for_backward(*tensors)


def _scan_backward(ctx, dy):
    grads = torch.ops.mambamerge.selective_scan_backward(*ctx.saved_tensors, dy, ctx.reverse)
    return (*grads, None)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def selective_scan_compiled(u, delta, A, B, C, D, reverse=False):
    """Selective scan with the compiled CPU kernel (torch.ops.mambamerge.selective_scan); differentiable
    in all six inputs (once: the backward is itself a kernel without a backward).

    Args:
        u, delta: (batch, L, d); A: (d, N); B, C: (batch, L, N); D: (d,). CPU
            tensors, all float32 or all float64.
        reverse: scan from the last token to the first.

    Returns:
        y: (batch, L, d), as selective_scan_reference.
    """
    check_inputs(u, delta, A, B, C, D)
    if u.device.type != "cpu":
        raise ValueError(f"compiled selective scan runs on CPU tensors only, got {u.device}")
    if u.dtype not in _SUFFIX:
        raise ValueError(f"compiled selective scan supports float32 and float64, got {u.dtype}")
    if not available():
        raise RuntimeError(f"compiled selective scan unavailable: {unavailable_reason()}")
    args = (u, delta, A, B, C, D, bool(reverse))
    return _dispatch(torch.ops.mambamerge.selective_scan, _scan, args, differentiable=args[:6])


def _softplus_call(x, row_mean):
    """softplus of a float32/float64 CPU tensor, and the mean over its last dimension of the result when
    row_mean (else None)."""
    x = x.contiguous()
    y = x.new_empty(x.shape)
    if x.numel() == 0:
        return y, (y.mean(-1) if row_mean else None)
    mean = x.new_empty(x.shape[:-1]) if row_mean else None
    status = _run_kernel(f"mm_softplus_{_SUFFIX[x.dtype]}", x.data_ptr(), y.data_ptr(),
                         None if mean is None else mean.data_ptr(), x.numel() // x.shape[-1], x.shape[-1])
    if status != 0:
        raise MemoryError("softplus kernel failed: a worker thread could not run")
    return y, mean


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return _softplus_call(x, False)[0]


_softplus_op = torch.library.custom_op("mambamerge::softplus", _softplus, mutates_args=(), device_types="cpu")


@_softplus_op.register_fake
def _(x):
    return x.new_empty(x.shape)


def _softplus_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _softplus_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return dy * torch.sigmoid(x)


_softplus_op.register_autograd(_softplus_backward, setup_context=_softplus_setup_context)


def _softplus_with_row_mean(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _softplus_call(x, True)


_softplus_row_mean_op = torch.library.custom_op("mambamerge::softplus_with_row_mean", _softplus_with_row_mean,
                                                mutates_args=(), device_types="cpu")


@_softplus_row_mean_op.register_fake
def _(x):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1])


def _check_softplus_input(x):
    if x.device.type != "cpu" or x.dtype not in _SUFFIX:
        raise ValueError(f"compiled softplus takes CPU float32/float64 tensors, got {x.dtype} on {x.device}")
    if not available():
        raise RuntimeError(f"compiled kernels unavailable: {unavailable_reason()}")


def softplus_compiled(x):
    """softplus(x) = log(1 + exp(x)) with the compiled CPU kernel, differentiable; x: a CPU float32 or
    float64 tensor of any shape. About 28x faster than torch's CPU softplus on a Vim-Ti step-size
    tensor (torch computes log1p one value at a time). Relative error in float32 under 2e-6 for
    |x| <= 20 and 5e-6 for |x| <= 80 (the argument rounding of the float32 exp the scan also uses;
    CUDA Mamba's fast-math expf is of the same order); float64 under 1e-14."""
    _check_softplus_input(x)
    return _dispatch(torch.ops.mambamerge.softplus, _softplus, (x,), differentiable=(x,))


def softplus_with_row_mean_compiled(x):
    """(softplus(x), its mean over the last dimension) from one pass over x, without autograd: the step
    sizes of a block and each token's mean step size (x: (..., d_inner) -> (...), (...))."""
    _check_softplus_input(x)
    return _dispatch(torch.ops.mambamerge.softplus_with_row_mean, _softplus_with_row_mean, (x,))


def _merge_apply(hidden: torch.Tensor, residual: Optional[torch.Tensor], size: torch.Tensor, rep: torch.Tensor,
                 assign: torch.Tensor, movers: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                 mean: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, length, channels = hidden.shape
    new_length, m = rep.shape[1], movers.shape[1]
    out = hidden.new_empty(batch, new_length, channels)
    size_out = size.new_empty(batch, new_length)
    streams = [None if t is None else t.contiguous() for t in (residual, hidden)]
    index = [t.contiguous() for t in (rep, assign, movers, targets)]
    weight = weight.to(hidden.dtype).contiguous()
    size = size.contiguous()
    status = _run_kernel(f"mm_merge_apply_{_SUFFIX[hidden.dtype]}", *(None if t is None else t.data_ptr()
                                                                       for t in streams),
                         *_ptrs(*index, weight, size, out, size_out), batch, length, new_length, m, channels,
                         int(mean))
    if status != 0:
        raise MemoryError("merge kernel failed to allocate its buffers")
    return out, size_out


_merge_apply_op = torch.library.custom_op("mambamerge::merge_apply", _merge_apply, mutates_args=(),
                                          device_types="cpu")


@_merge_apply_op.register_fake
def _(hidden, residual, size, rep, assign, movers, targets, weight, mean):
    batch, new_length = rep.shape
    return hidden.new_empty(batch, new_length, hidden.shape[2]), size.new_empty(batch, new_length)


def merge_apply_compiled(hidden, residual, size, rep, assign, movers, targets, weight, mean: bool):
    """One token-merge step on the sum of two streams and on the token sizes, without autograd
    (mambamerge.merge.state.MergePlan documents the arguments): (B, L, C) streams of one dtype, float32
    or float64 (residual may be None), float32 sizes (B, L) -> (B, L', C), (B, L'). Untouched tokens are
    residual + hidden bit for bit."""
    args = (hidden, residual, size, rep, assign, movers, targets, weight, mean)
    return _dispatch(torch.ops.mambamerge.merge_apply, _merge_apply, args)


def _plan(src: torch.Tensor, dst: Optional[torch.Tensor], length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, r = src.shape
    rep = src.new_empty(batch, length - r)
    assign = src.new_empty(batch, length)
    src = src.contiguous()
    dst = None if dst is None else dst.contiguous()
    status = _library().mm_plan_from_selection(src.data_ptr(), None if dst is None else dst.data_ptr(),
                                               rep.data_ptr(), assign.data_ptr(), batch, length, r)
    if status != 0:
        raise ValueError("plan_from_selection: src must hold distinct tokens of the sequence and dst survivors")
    return rep, assign


_plan_op = torch.library.custom_op("mambamerge::plan_from_selection", _plan, mutates_args=(), device_types="cpu")


@_plan_op.register_fake
def _(src, dst, length):
    batch, r = src.shape
    return src.new_empty(batch, length - r), src.new_empty(batch, length)


def plan_from_selection_compiled(src, dst, length: int):
    """rep (B, L - r), the survivors in ascending order, and assign (B, L), each token's new index or -1,
    from src (B, r) the tokens that leave and dst (B, r) the survivor each joins (None: dropped); CPU
    int64 tensors."""
    return _dispatch(torch.ops.mambamerge.plan_from_selection, _plan, (src, dst, length))
