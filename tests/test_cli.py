import re
import subprocess
import sys

import pytest
import torch

import mambamerge
from mambamerge.cli.main import main


def test_demo_prints_size_and_throughput(capsys):
    assert main(["speed", "--model", "vim_pico", "--batch", "2", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "inputs/s" in out and "class token in the middle (index 8)" in out


def test_demo_on_a_checkpoint(tmp_path, capsys):
    path = mambamerge.save_checkpoint(mambamerge.create_model("vim_pico"), tmp_path / "m.safetensors")
    assert main(["speed", "--checkpoint", str(path), "--img-size", "32", "--batch", "1", "--runs", "1"]) == 0
    assert "m.safetensors" in capsys.readouterr().out


def test_info_lists_models_and_describes_checkpoints(tmp_path, capsys):
    assert main(["info"]) == 0
    assert "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2  (= vim_tiny)" in \
        capsys.readouterr().out
    torch.save({"model": mambamerge.create_model("vim_tiny_plus", depth=2).state_dict()}, tmp_path / "p.pth")
    assert main(["info", str(tmp_path / "p.pth")]) == 0
    out = capsys.readouterr().out
    assert "trained grid 27x27" in out and "stride          (8, 8)" in out and "depth           2" in out


@pytest.mark.parametrize("argv,message", [
    (["speed", "--checkpoint", "/nonexistent/x.pth"], "checkpoint not found"),
    (["speed", "--model", "vim_pico", "--batch", "0"], "--batch-size and --runs must be at least 1"),
])
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_checkpoint_is_reported_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    assert main(["info", str(bad)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mambamerge", "info", "--models"], capture_output=True, text=True,
                         check=True).stdout
    assert "vim_small_plus" in out


@pytest.mark.parametrize("method", [[], ["--method", "mame", "--reduction", "0.3"]], ids=["dense", "mame"])
def test_speed_compile_reports_each_compile_apart_from_the_timed_forwards(method, monkeypatch, capsys,
                                                                          keep_torch_threads):
    compiled = []

    def traced(model):  # dynamo's tracing without inductor's code generation: the same first-call cost, faster
        compiled.append(model)
        return torch.compile(model, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr("mambamerge.compiling.compile", traced)
    torch._dynamo.reset()  # no graph left from an earlier test: every forward here compiles on its first call
    speed = ["speed", "--model", "vim_pico", "--batch", "1", "--runs", "2", "--threads", "1"] + method
    assert main(speed) == 0
    assert "\ncompile " not in capsys.readouterr().out and not compiled
    assert main(speed + ["--compile"]) == 0
    out = capsys.readouterr().out
    assert len(compiled) == 1
    line = next(line for line in out.splitlines() if line.startswith("compile "))
    seconds = dict(re.findall(r"(\w+) ([\d.]+) s", line.split("not timed:")[1]))
    assert set(seconds) == ({"patched", "dense"} if method else {"model"})
    # seconds per forward of the timed runs (batch 1): merged and dense, or the model's
    timed = [1 / float(x) for x in re.findall(r"([\d.]+) (?:inputs/s|dense,)", out)]
    assert len(timed) == len(seconds)
    assert min(map(float, seconds.values())) > 10 * max(timed)  # the compile is not in the timed runs
