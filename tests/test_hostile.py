"""Hostile files and broken runs (issue 11): nothing runs planted code, nothing asks for unbounded
memory, a damaged cache or image or a kill at any moment gives a named error or a warning, never a
traceback or a half-written output."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mambamerge.cli.main import main

TRAIN = ["train", "--model", "vim_pico", "--epochs", "1", "--batch-size", "4", "--eval-batch-size", "4",
         "--threads", "1"]


def image_folder(root, splits=("train", "val"), classes=("ant", "bee"), per_class=2):
    """A tiny real data set in the ImageNet layout (PNG files), with train/ and val/ sub-folders."""
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((36, 36, 3), 50 * c + 20 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def data(tmp_path):
    return ["--data", str(image_folder(tmp_path / "data"))]


class _Plant:
    """Unpickling this creates `marker`: what a planted file would do with any code it likes."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_never_runs_code_planted_in_last_pt(tmp_path, data, capsys):
    out, marker = tmp_path / "run", tmp_path / "planted-code-ran"
    out.mkdir()
    torch.save({"config": _Plant(marker)}, out / "last.pt")
    assert main(TRAIN + data + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "refused unread" in err and "Traceback" not in err
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # command.json not written either


def test_resume_without_a_saved_state_is_an_error_not_a_fresh_start(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + data + ["--out", str(out), "--resume"]) == 2
    assert "leave out --resume to start a new one" in capsys.readouterr().err
    assert not out.exists()
    assert main(TRAIN + data + ["--out", str(out)]) == 0
    command = json.loads((out / "command.json").read_text())
    assert main(TRAIN + data + ["--out", str(out), "--resume", "--lr", "0.1"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((out / "command.json").read_text()) == command  # a refused resume leaves it alone
