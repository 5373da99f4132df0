"""`mambamerge tune` end to end on the shipped audio demo model, and `eval` / `sweep --config` applying what
it chose: the files it writes, the test split refused, a rerun continuing from its journal."""
import importlib
import json

import pytest
import torch

import mambamerge
from mambamerge.cli.main import main
from mambamerge.data import load_dataset

tune_module = importlib.import_module("mambamerge.tune")  # mambamerge.tune is also the function



@pytest.fixture(scope="module")
def checkpoint():
    from importlib.resources import files

    return str(files("mambamerge") / "assets" / "aum_nano_fsdd.safetensors")


def tune_args(checkpoint, out, *extra):
    return ["tune", "--checkpoint", checkpoint, "--data", "fsdd", "--split", "test", "--allow-test-split",
            "--limit", "20", "--reduction", "0.5", "--methods", "mame", "stm", "--max-candidates", "8",
            "--threads", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tuned(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "out"
    assert main(tune_args(checkpoint, out)) == 0
    return out


def test_tune_writes_a_config_per_reduction_and_every_candidate(tuned):
    assert sorted(p.name for p in tuned.iterdir()) == ["config_0.5.json", "journal_0.5.json", "tune.csv", "tune.json",
                                                       "tune.md", "tune.png"]
    config = json.loads((tuned / "config_0.5.json").read_text())
    payload = json.loads((tuned / "tune.json").read_text())
    assert payload["tunes"][0]["config"] == config and config["method"] in ("mame", "stm")
    assert abs(config["reduction"] - 0.5) < 0.02 and sum(config["removals"]) > 0
    assert len((tuned / "tune.csv").read_text().splitlines()) == 1 + len(payload["tunes"][0]["candidates"])
    assert (tuned / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert payload["data"]["split"] == "test" and payload["data"]["inputs"] == 20


def test_eval_config_gives_what_patch_config_gives(tuned, checkpoint, tmp_path):
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", checkpoint, "--data", "fsdd", "--limit", "30", "--config",
                 str(tuned / "config_0.5.json"), "--runs", "1", "--threads", "1", "--json", str(report)]) == 0
    top1 = json.loads(report.read_text())["result"]["top1"]
    model = mambamerge.load_checkpoint(checkpoint)
    mambamerge.patch(model, config=json.loads((tuned / "config_0.5.json").read_text()))
    data = load_dataset("fsdd", "test", input_shape=model.input_shape, limit=30)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).double().mean().item() == pytest.approx(top1)


def test_sweep_config_adds_a_tuned_row(tuned, checkpoint, tmp_path):
    assert main(["sweep", "--checkpoint", checkpoint, "--data", "fsdd", "--limit", "20", "--methods", "mame",
                 "--reductions", "0.5", "--config", str(tuned / "config_0.5.json"), "--runs", "1", "--threads", "1",
                 "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "mame", "tuned"]


def test_a_rerun_continues_from_the_journal(tuned, checkpoint, monkeypatch):
    scored = []
    original = tune_module._logits

    def logits(model, inputs, batch_size):
        if model.token_reducer is not None:
            scored.append(len(inputs))
        return original(model, inputs, batch_size)

    monkeypatch.setattr(tune_module, "_logits", logits)
    before = (tuned / "config_0.5.json").read_text()
    assert main(tune_args(checkpoint, tuned)) == 0
    assert scored == [] and (tuned / "config_0.5.json").read_text() == before


def test_bad_requests_fail_before_any_work(checkpoint, tmp_path, capsys):
    out = tmp_path / "refused"
    args = tune_args(checkpoint, out)
    args.remove("--allow-test-split")
    assert main(args) == 2
    assert "test split is for reporting" in capsys.readouterr().err and not out.exists()
    assert main(tune_args(checkpoint, out, "--reduction", "0")) == 2
    assert "nothing to tune" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", checkpoint, "--data", "fsdd", "--config", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(["eval", "--checkpoint", checkpoint, "--data", "fsdd", "--config", str(tmp_path / "bad.json")]) == 2
    assert "not a tune configuration" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", checkpoint, "--data", "fsdd", "--config", str(tmp_path / "bad.json"),
                 "--method", "mame", "--reduction", "0.5"]) == 2
