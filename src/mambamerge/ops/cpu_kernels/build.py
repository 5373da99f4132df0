"""Building kernels.cpp with g++ into a cache directory, once per source, compiler, flags and CPU.

The library goes to ``$MAMBAMERGE_CACHE/<key>/`` or ``~/.cache/mambamerge/kernels/<key>/``, the key a hash
of the source, the compiler's version, the flags and the CPU flags (the build uses ``-march=native``),
beside a record of its SHA-256 that is checked before a cached copy is loaded.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cpp")
LIBRARY_NAME = "_cpu_kernels.so"
COMPILE_FLAGS = (
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
LINK_FLAGS = ("-shared", "-pthread")
LIBS = ("-lm",)


def cache_root() -> Path:
    env = os.environ.get("MAMBAMERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mambamerge" / "kernels"


def _cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.strip() for line in f if line.startswith("flags")), "")


def _run(cmd) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
    return result.stdout


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def intact(lib: Path) -> bool:
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


def build_library(cxx: str) -> Path:
    """Compiles the kernels with the compiler at `cxx` unless an intact copy is cached; returns the path of
    the shared library."""
    source = SOURCE.read_text()
    key = "\0".join([source, _run([cxx, "--version"]), *COMPILE_FLAGS, *LINK_FLAGS, *LIBS, _cpu_flags()])
    out_dir = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]
    lib = out_dir / LIBRARY_NAME
    if out_dir.is_dir():
        _remove_stale_builds(out_dir)
    if intact(lib):
        return lib
    if lib.with_suffix(".sha256").exists():  # (a library without a record is an older version's: replaced)
        warnings.warn(f"the cached kernel library {lib} is damaged or incomplete (its SHA-256 differs from the "
                      f"one its build recorded); rebuilding it", stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".build-{os.getpid()}-") as tmp:
        src, obj, so = (Path(tmp) / name for name in ("scan.cpp", "scan.o", "scan.so"))
        src.write_text(source)
        _run([cxx, *COMPILE_FLAGS, "-c", str(src), "-o", str(obj)])
        _run([cxx, *LINK_FLAGS, str(obj), "-o", str(so), *LIBS])
        record = Path(tmp) / "scan.sha256"
        record.write_text(_digest(so))
        # each rename is atomic: concurrent builders end with complete files, and a record that does
        # not match its library (another builder's) only costs a rebuild
        os.replace(record, lib.with_suffix(".sha256"))
        os.replace(so, lib)
    return lib
