import triton_interpreter  # noqa: F401  (first: TRITON_INTERPRET before any kernel is imported)
import importlib.util
from pathlib import Path

import pytest
import torch

import mambamerge


def benchmark(name):
    """benchmarks/<name>.py imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb_(model, seed=0):
    """Move every parameter away from its structured initialisation (A_log = log(1..N), D = 1, zero
    biases) so that tests exercise realistic, irregular weights, including step sizes up to ~1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith(("A_log", "A_b_log")):
                p.add_(0.5 * noise)
            elif "dt_proj" in name and name.endswith("bias"):
                p.add_(1.5 * noise.abs())
            else:
                p.add_(0.05 * noise)
    return model


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return perturb_(mambamerge.create_model("vim_pico", depth=3)).eval()


@pytest.fixture
def keep_torch_threads():
    """torch's thread count restored after a test that runs a command (the commands set it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def captured_graphs(monkeypatch):
    """mambamerge.compiling.compile replaced by dynamo's capture, run as captured (inductor is
    tests/test_compile.py's): the list of graphs captured so far."""
    from mambamerge import compiling

    graphs = []

    def recording(module, mode=None):
        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        return torch.compile(module, backend=backend, fullgraph=True, dynamic=False)

    monkeypatch.setattr(compiling, "compile", recording)
    return graphs
