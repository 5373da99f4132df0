"""The shipped demo: the model trained by this project and the README's main command."""
import json

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.cli.main import main
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy


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
