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
