"""Size arguments beyond what the machine can hold are refused (exit 2, the figures named) before any
output is written, under a small address-space limit so that a missed check fails fast."""
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mambamerge import memory
from mambamerge.memory import check_fits, step_bytes
from mambamerge.models import create_model

SRC = str(Path(__file__).resolve().parents[1] / "src")
DEMO = str(Path(SRC) / "mambamerge" / "assets" / "vim_nano_fmnist.safetensors")
LIMIT = 6 * 2**30  # torch alone maps ~3 GiB of address space


def _image_folder(root: Path) -> Path:
    """root with train/ and val/, each two classes of two 56x56 grey images."""
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for c, value in (("a", 40), ("b", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((56, 56), value + i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _cli(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mambamerge", *argv, "--threads", "1"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=_limited)


@pytest.mark.parametrize("argv, named", [
    (["speed", "--batch", "1000000000"], "GiB free; the largest that fits is --batch-size"),
    (["speed", "--img-size", "100000"], "--img-size 100000 is beyond"),
    (["train", "--data", "fashion-mnist", "--img-size", "20000", "--out", "run"], "--img-size 20000 is beyond"),
    (["train", "--data", "IMAGES", "--batch-size", "10000000", "--out", "run"], "--batch-size 10000000 needs"),
    (["eval", "--checkpoint", DEMO, "--data", "fashion-mnist", "--limit", "10", "--throughput-batch", "200000000"],
     "--throughput-batch 200000000 needs"),
    (["visualize", "--checkpoint", DEMO, "--data", "fashion-mnist", "--images", "100000000", "--out", "v"],
     "--images 100000000 needs"),
])
def test_oversized_arguments_are_refused_before_output(tmp_path, tmp_path_factory, argv, named):
    """IMAGES: a small ImageNet-layout folder (train/ and val/), so that no installed train split is needed."""
    if "IMAGES" in argv:
        argv = [str(_image_folder(tmp_path_factory.mktemp("images"))) if a == "IMAGES" else a for a in argv]
    proc = _cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no --out folder, no command.json


def test_largest_fitting_value_is_named_and_fits(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * 2**30)
    model = create_model("vim_tiny")
    with pytest.raises(ValueError, match=r"the largest that fits is --batch-size (\d+)") as err:
        check_fits("--batch-size", 10**9, lambda n: step_bytes(model, n), "cpu")
    largest = int(err.value.args[0].rsplit(" ", 1)[1])
    check_fits("--batch-size", largest, lambda n: step_bytes(model, n), "cpu")
    assert step_bytes(model, largest + 1) > 4 * 2**30
    assert step_bytes(model, 128) < step_bytes(model, 128, training=True) < step_bytes(model, 128, True, "parallel")
