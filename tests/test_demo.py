"""The shipped demo: the model trained by this project and the README's main command."""
import json

import pytest

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.cli.main import main
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy

# the shipped audio / video models' test top-1 less a margin (docs/results.md has the measured values)
AUDIO_FLOOR, VIDEO_FLOOR = 0.80, 0.55  # measured 87.67% (300 clips), 64.76% (10,000; 65.3% on the first 300; chance 2.5%)


def test_shipped_demo_model_is_the_trained_vim_nano():
    model = mambamerge.load_checkpoint(demo_checkpoint())  # at the resolution the file records
    assert model.cfg == mambamerge.create_model("vim_nano").cfg
    assert (model.cfg.num_patches, model.cls_index) == (196, 98)  # ImageNet Vim's token geometry
    data = load_dataset("fashion-mnist", "test", limit=2000)
    assert accuracy(model, data, batch_size=500) > 0.87


def test_demo_command_writes_the_sweep(tmp_path, capsys):
    assert main(["demo", "--limit", "24", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mame | 60% |" in out and str(tmp_path / "accuracy.png") in out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    methods = {row["method"] for row in rows}
    assert methods == {"dense"} | set(mambamerge.merge.METHODS)
    assert len(rows) == 1 + 4 * len(mambamerge.merge.METHODS)
    assert all(row["status"] == "ok" for row in rows), [row.get("reason") for row in rows]


@pytest.mark.parametrize("task, name, data, floor", [("audio", "aum_nano", "fsdd", AUDIO_FLOOR),
                                                     ("video", "videomamba_nano", "moving-fashion-mnist", VIDEO_FLOOR)])
def test_shipped_audio_and_video_demo_models(task, name, data, floor):
    model = mambamerge.load_checkpoint(demo_checkpoint(task))
    assert model.cfg == mambamerge.create_model(name).cfg and model.layout.length == 65
    assert accuracy(model, load_dataset(data, "test", limit=300, input_shape=model.input_shape,
                                             input_kind=model.input_kind)) > floor


@pytest.mark.parametrize("task", ["audio", "video"])
def test_demo_audio_and_video_commands_write_the_sweep(tmp_path, capsys, task):
    assert main(["demo", task, "--limit", "8", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert "| mame | 80% |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 1 + 4 * len(mambamerge.merge.METHODS) and rows[0]["inputs"] == 8
