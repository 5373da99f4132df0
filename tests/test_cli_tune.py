"""`mambamerge tune` (issue 19) on a tiny checkpoint: its files, a GMACs budget instead of a reduction, the
test split refused unless forced, a killed tune continued from its journal without rescoring, --compile's
dense reference, and `eval --config` / `sweep --config` running what it chose exactly as `patch(config=)`
does."""
import csv
import functools
import importlib
import json

import pytest
import torch
from conftest import perturb_

import mambamerge
from mambamerge.cli.main import main
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy

pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # the commands set torch's threads

TUNE = importlib.import_module("mambamerge.tune")  # the module: mambamerge.tune is the function
TINY = dict(in_chans=1, img_size=56, patch_size=8, stride=8, num_classes=10, depth=4)
OUTPUTS = {"config_0.5.json", "tune.md", "tune.csv", "tune.json", "tune.png"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_pico", **TINY))  # irregular weights: the methods differ
    return str(mambamerge.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


@pytest.fixture(scope="module")
def gmacs(checkpoint):
    """A GMACs budget the tiny model reaches: MaMe's with its defaults at 50%."""
    from mambamerge.flops import flops

    model = mambamerge.patch(mambamerge.load_checkpoint(checkpoint), "mame", reduction=0.5)
    return round(flops(model).total_one_direction / 1e9, 6)


def tune_argv(checkpoint, out, *extra, budget=("--reduction", "0.5")):
    """A small tune on the shipped test split (forced: the train split may not be installed here)."""
    return ["tune", "--checkpoint", checkpoint, "--data", "fashion-mnist", "--split", "test", "--allow-test-split",
            "--limit", "12", *budget, "--methods", "mame", "stm", "--max-candidates", "10",
            "--threads", "1", "--workers", "0", "--out", str(out), *extra]


@pytest.fixture
def count_scoring(monkeypatch):
    """How many candidates were scored (each scoring counts the patched model's FLOPs once)."""
    calls = []
    real = TUNE.flops

    def counted(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(TUNE, "flops", counted)
    return calls


def test_tune_writes_the_configs_and_every_candidate(checkpoint, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(tune_argv(checkpoint, out, "--labels")) == 0
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config_0.5.json").read_text())
    assert config["method"] in ("mame", "stm") and config["depth"] == 4
    assert config["reduction"] == pytest.approx(0.5, abs=0.03) and "top1" in config["score"]
    payload = json.loads((out / "tune.json").read_text())
    candidates = payload["tunes"][0]["candidates"]
    assert payload["data"]["split"] == "test" and payload["data"]["inputs"] == 12
    with open(out / "tune.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(candidates) >= 3 and {r["method"] for r in rows} <= {"mame", "stm"}
    assert [float(r["kl"]) for r in rows] == pytest.approx([c["kl"] for c in candidates])
    assert (out / "tune.md").read_text().count("| 50% |") == len(candidates) + 1  # every one, and the chosen
    assert (out / "tune.png").read_bytes().startswith(b"\x89PNG")
    assert "config_0.5.json" in capsys.readouterr().out


def test_a_gmacs_budget_names_its_files_and_its_reports(checkpoint, gmacs, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(tune_argv(checkpoint, out, budget=("--gmacs", str(gmacs)))) == 0
    name = f"config_gmacs_{gmacs:g}.json"
    assert {p.name for p in out.iterdir() if p.name.startswith("config_")} == {name}
    config = json.loads((out / name).read_text())
    assert config["budget"] == {"gmacs": gmacs} and config["gmacs"] <= gmacs
    tune = json.loads((out / "tune.json").read_text())["tunes"][0]
    assert tune["target_gmacs"] == gmacs and "target_reduction" not in tune
    with open(out / "tune.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["target_gmacs"], r["target_reduction"]) for r in rows} == {(str(gmacs), "")}
    report = (out / "tune.md").read_text()
    title = report.splitlines()[0]
    assert title.endswith(f"at {gmacs:g} GMACs") and report.count(f"| {gmacs:g} GMACs |") == len(rows) + 1
    assert f"tune {gmacs:g} GMACs:" in report
    assert name in capsys.readouterr().out


def test_exactly_one_budget_is_given(checkpoint, gmacs, tmp_path, capsys):
    both = tune_argv(checkpoint, tmp_path / "t") + ["--gmacs", str(gmacs)]
    neither = tune_argv(checkpoint, tmp_path / "t", budget=())
    for argv, message in [(both, "argument --gmacs: not allowed with argument --reduction"),
                          (neither, "one of the arguments --reduction --gmacs is required")]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert main(tune_argv(checkpoint, tmp_path / "t", budget=("--gmacs", "0"))) == 2
    assert "--gmacs must be positive" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_compile_computes_the_dense_reference_once_compiled(checkpoint, tmp_path, capsys, captured_graphs):
    """One graph for every calibration batch and both targets (the short last batch padded); the candidates
    stay eager; the compile is reported apart; the choice is the eager tune's."""
    graphs = captured_graphs
    budget = ("--reduction", "0.5", "0.6")
    assert main(tune_argv(checkpoint, tmp_path / "eager", "--batch-size", "5", budget=budget)) == 0
    assert not graphs
    assert main(tune_argv(checkpoint, tmp_path / "compiled", "--batch-size", "5", "--compile", budget=budget)) == 0
    assert len(graphs) == 1
    eager, compiled = (json.loads((tmp_path / d / "tune.json").read_text()) for d in ("eager", "compiled"))
    assert eager["dense_reference"]["compile_s"] is None and set(compiled["dense_reference"]["compile_s"]) == {"dense"}
    for a, b in zip(eager["tunes"], compiled["tunes"]):
        assert {k: a["config"][k] for k in ("method", "options", "removals")} == \
            {k: b["config"][k] for k in ("method", "options", "removals")}
        assert b["config"]["score"]["kl"] == pytest.approx(a["config"]["score"]["kl"], rel=1e-4)
    report = (tmp_path / "compiled" / "tune.md").read_text()
    assert "dense reference:" in report and "torch.compile'd" in report and "- compile: torch.compile" in report
    assert "- compile:" in capsys.readouterr().out


def test_the_test_split_is_refused_unless_forced(checkpoint, tmp_path, capsys):
    argv = ["tune", "--checkpoint", checkpoint, "--data", "fashion-mnist", "--split", "test", "--reduction", "0.5",
            "--out", str(tmp_path / "t")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "test split is for reporting" in err and "--allow-test-split" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_calibration_defaults_to_val_where_there_is_one_else_train():
    from mambamerge.cli.main import build_parser
    from mambamerge.cli.tune import calibration_split

    parser = build_parser()
    for data, split in [("fashion-mnist", "train"), ("fsdd", "val"), ("moving-mnist", "val")]:
        args = parser.parse_args(["tune", "--checkpoint", "m", "--data", data, "--reduction", "0.5", "--out", "o"])
        assert calibration_split(args) == split


def test_bad_input_fails_before_any_work(checkpoint, tmp_path, capsys, count_scoring):
    for extra, message in [(["--methods", "nope"], "unknown method"), (["--limit", "0"], "--limit"),
                           (["--reduction", "1.5"], "[0, 1)")]:
        argv = tune_argv(checkpoint, tmp_path / "t") + extra
        assert main(argv) == 2 and message in capsys.readouterr().err
    assert not count_scoring and not (tmp_path / "t").exists()


@pytest.mark.parametrize("kind", ["reduction", "gmacs"])
def test_a_killed_tune_continues_from_its_journal_without_rescoring(checkpoint, gmacs, kind, tmp_path, capsys,
                                                                    count_scoring, monkeypatch):
    out = tmp_path / "tune"
    budget = ("--reduction", "0.5") if kind == "reduction" else ("--gmacs", str(gmacs))
    argv = functools.partial(tune_argv, budget=budget)
    real = TUNE.flops  # count_scoring's counter

    def killed_after_two(model):
        if len(count_scoring) == 2:
            raise KeyboardInterrupt
        return real(model)

    monkeypatch.setattr(TUNE, "flops", killed_after_two)
    assert main(argv(checkpoint, out)) == 130
    stem = "0.5" if kind == "reduction" else f"gmacs_{gmacs:g}"
    assert [p.name for p in out.iterdir()] == [p.name for p in out.glob(f"journal_{stem}_*.json")]  # all or nothing
    monkeypatch.setattr(TUNE, "flops", real)
    assert main(argv(checkpoint, out)) == 0
    first = json.loads((out / "tune.json").read_text())["tunes"][0]
    scored = len(count_scoring)
    assert scored > 2
    assert main(argv(checkpoint, out)) == 0  # everything journaled: nothing is scored again
    assert len(count_scoring) == scored
    again = json.loads((out / "tune.json").read_text())["tunes"][0]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    # other inputs are other scores: the journal of 12 inputs is not reused for 10
    assert main(argv(checkpoint, out)[:-2] + ["--limit", "10", "--out", str(out)]) == 0
    assert len(count_scoring) > scored
    capsys.readouterr()


def test_eval_and_sweep_run_the_config_as_patch_does(checkpoint, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(tune_argv(checkpoint, out)) == 0
    config_file = out / "config_0.5.json"
    config = json.loads(config_file.read_text())
    model = mambamerge.load_checkpoint(checkpoint)
    dataset = load_dataset("fashion-mnist", "test", input_shape=model.input_shape, limit=40)
    mambamerge.patch(model, config=config)
    expected = accuracy(model, dataset)
    capsys.readouterr()
    eval_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", checkpoint, "--data", "fashion-mnist", "--limit", "40", "--runs", "1",
                 "--throughput-batch", "2", "--threads", "1", "--config", str(config_file),
                 "--json", str(eval_json)]) == 0
    assert f"from {config_file}" in capsys.readouterr().out
    result = json.loads(eval_json.read_text())["result"]
    assert result["top1"] == pytest.approx(expected, abs=1e-12)
    assert result["average_reduction"] == pytest.approx(config["reduction"])
    assert main(["sweep", "--checkpoint", checkpoint, "--data", "fashion-mnist", "--limit", "40", "--runs", "1",
                 "--throughput-batch", "2", "--threads", "1", "--methods", "mame", "--reductions", "0.5",
                 "--config", str(config_file), "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    tuned = [r for r in rows if r["method"] == "tuned"]
    assert len(tuned) == 1 and tuned[0]["top1"] == pytest.approx(expected, abs=1e-12)
    assert main(["eval", "--checkpoint", checkpoint, "--data", "fashion-mnist", "--config", str(config_file),
                 "--method", "mame", "--reduction", "0.4"]) == 2
    assert "--config gives the method" in capsys.readouterr().err
