"""`mambamerge eval` and `mambamerge sweep` on a tiny checkpoint against the shipped Fashion-MNIST test split."""
import csv
import json

import pytest
import torch

import mambamerge
import mambamerge.evaluate
from mambamerge.cli.main import main
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy
from mambamerge.atomic import write_files

TINY = dict(in_chans=1, img_size=56, patch_size=8, stride=8, num_classes=10, depth=2)
FAST = ["--limit", "64", "--runs", "1", "--throughput-batch", "4"]
OUTPUTS = {"results.md", "results.csv", "results.json", "accuracy.png"}


def save(folder, name, **overrides):
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_pico", **{**TINY, **overrides})
    return str(mambamerge.save_checkpoint(model, folder / name))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(tmp_path_factory.mktemp("ckpt"), "tiny.safetensors")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_eval_prints_the_numbers_and_writes_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", checkpoint, "--data", "fashion-mnist", *FAST, "--method", "mame",
            "--reduction", "0.4", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for word in ("top-1", "top-5", "GMACs", "images/s", "dense", "speed-up", "40.0% of token-layers"):
        assert word in printed
    payload = json.loads(out.read_text())
    result = payload["result"]
    assert result["method"] == "mame" and result["inputs"] == 64 and 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["input_kind"] == "images"
    assert result["average_reduction"] == pytest.approx(0.4, abs=0.02)
    assert result["gmacs_one_direction"] < result["gmacs_both_directions"]
    assert result["inputs_per_s"] > 0 and result["speedup"] == pytest.approx(
        result["inputs_per_s"] / result["dense_inputs_per_s"])
    assert payload["environment"]["torch"] == torch.__version__
    assert [f.name for f in tmp_path.iterdir()] == ["eval.json"]


def test_dense_eval_matches_accuracy_on_the_same_images(checkpoint, capsys):
    assert main(["eval", "--checkpoint", checkpoint, "--data", "fashion-mnist", *FAST]) == 0
    printed = capsys.readouterr().out
    model = mambamerge.load_checkpoint(checkpoint, img_size=56)
    expected = accuracy(model, load_dataset("fashion-mnist", "test", img_size=56, in_chans=1, limit=64))
    assert f"top-1       {expected:.2%}" in printed and "speed-up" not in printed


def test_sweep_writes_table_csv_json_and_plot(checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    methods, reductions = ["mame", "tome"], [0.2, 0.4, 0.6]
    argv = ["sweep", "--checkpoint", checkpoint, "--data", "fashion-mnist", *FAST, "--out", str(out),
            "--methods", *methods, "--reductions", *map(str, reductions)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert {f.name for f in out.iterdir()} == OUTPUTS
    assert "| dense | 0% |" in printed and str(out / "accuracy.png") in printed

    # which configurations the 2-block model can reach, asked of patch directly
    model = mambamerge.load_checkpoint(checkpoint, img_size=56)
    reachable = {}
    for method in methods:
        for reduction in reductions:
            try:
                mambamerge.patch(model, method, reduction=reduction)
                reachable[method, reduction] = True
            except ValueError:
                reachable[method, reduction] = False
    assert True in reachable.values() and False in reachable.values()

    payload = json.loads((out / "results.json").read_text())
    rows = payload["rows"]
    assert [(r["method"], r["target_reduction"]) for r in rows] == \
        [("dense", 0.0)] + [(m, r) for m in methods for r in reductions]
    assert rows[0]["status"] == "ok" and rows[0]["speedup"] == 1.0 and rows[0]["delta_top1"] == 0.0
    for row in rows[1:]:
        if reachable[row["method"], row["target_reduction"]]:
            assert row["status"] == "ok" and row["inputs"] == 64
            assert row["average_reduction"] == pytest.approx(row["target_reduction"], abs=0.02)
            assert row["schedule"]["removals"][0] == 0 and len(row["schedule"]["removals"]) == 2
            assert row["delta_top1"] == pytest.approx(row["top1"] - rows[0]["top1"])
        else:
            assert row["status"] == "n/a" and "cannot reach" in row["reason"] and "top1" not in row
    assert {"torch", "threads", "date"} <= set(payload["environment"])

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == [r["status"] for r in rows]
    for line, row in zip(table, rows):
        assert (line["reason"] != "") == (row["status"] == "n/a")
        assert (line["top1"] == "") == (row["status"] == "n/a")

    markdown = (out / "results.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(rows)
    not_reached = sum(not ok for ok in reachable.values())
    assert sum("| n/a |" in line for line in table_lines) == not_reached
    notes = [line for line in markdown.splitlines() if line.startswith("- ")]
    assert len(notes) == len({row.get("note", row.get("reason")) for row in rows if row["status"] == "n/a"})
    for (method, reduction), ok in reachable.items():  # each unreachable configuration is named in one note
        assert sum(f"{method} {reduction:.0%}" in line.split(":")[0] for line in notes) == (not ok)

    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.fixture
def bad_inputs(tmp_path, checkpoint):
    """Files for the bad-input cases: named checkpoints and folders."""
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "flat").mkdir()
    (tmp_path / "a_file").write_text("")
    return {"ok": checkpoint, "tmp": str(tmp_path),
            "classes5": save(tmp_path, "c5.safetensors", num_classes=5),
            "rgb": save(tmp_path, "rgb.safetensors", in_chans=3),
            "wide": save(tmp_path, "wide.safetensors", img_size=(56, 64))}


CASES = [  # (command, checkpoint, data, extra arguments, what the message must say)
    ("sweep", "ok", "{tmp}/missing", [], ["data folder not found", "missing"]),
    ("sweep", "ok", "{tmp}/empty", [], ["no images found"]),
    ("sweep", "ok", "{tmp}/flat", [], ["no class sub-folders"]),
    ("sweep", "ok", "{tmp}/flat", ["--split", "test"], ["--split applies to"]),
    ("sweep", "classes5", "fashion-mnist", [], ["5 classes", "has 10"]),
    ("sweep", "rgb", "fashion-mnist", [], ["3-channel", "1-channel"]),
    ("sweep", "wide", "fashion-mnist", [], ["56x64", "--img-size"]),
    ("sweep", "ok", "fashion-mnist", ["--img-size", "4"], ["(4, 4)", "smaller than the patch size (8, 8)"]),
    ("sweep", "{tmp}/none.safetensors", "fashion-mnist", [], ["checkpoint not found"]),
    ("sweep", "ok", "fashion-mnist", ["--methods", "mame", "nosuch"], ["unknown method 'nosuch'", "available"]),
    ("sweep", "ok", "fashion-mnist", ["--reductions", "0.2", "1.0"], ["[0, 1)", "1.0"]),
    ("sweep", "ok", "fashion-mnist", ["--reductions", "-0.1"], ["[0, 1)", "-0.1"]),
    ("sweep", "ok", "fashion-mnist", ["--option", "nosuch=1"], ["unknown option(s) nosuch"]),
    ("sweep", "ok", "fashion-mnist", ["--option", "r=5"], ["--option r=", "--reductions"]),
    ("sweep", "ok", "fashion-mnist", ["--batch", "0"], ["--batch-size must be at least 1"]),
    ("sweep", "ok", "fashion-mnist", ["--out", "{tmp}/a_file/results"], ["cannot write results to", "a_file"]),
    ("eval", "ok", "fashion-mnist", ["--method", "nosuch", "--reduction", "0.4"], ["unknown method 'nosuch'"]),
    ("eval", "ok", "fashion-mnist", ["--reduction", "0.4"], ["need --method"]),
    ("eval", "ok", "fashion-mnist", ["--method", "none", "--reduction", "0.4"], ["need --method NAME"]),
    ("eval", "ok", "fashion-mnist", ["--method", "mame"], ["--method needs --reduction"]),
    ("eval", "ok", "fashion-mnist", ["--method", "mame", "--reduction", "1.5"], ["[0, 1)"]),
    ("eval", "ok", "fashion-mnist", ["--method", "tome", "--reduction", "0.6"], ["cannot reach", "60%"]),
    ("eval", "rgb", "fashion-mnist", [], ["3-channel", "1-channel"]),
    ("eval", "ok", "fashion-mnist", ["--json", "{tmp}/a_file/out.json"], ["cannot write results to"]),
]


@pytest.mark.parametrize("command,ckpt,data,extra,message", CASES,
                         ids=[f"{c[0]}-{c[-1][0]}" for c in CASES])
def test_bad_input_is_one_line_before_any_evaluation(command, ckpt, data, extra, message, bad_inputs, tmp_path,
                                                     monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("an evaluation ran before the input was validated")

    monkeypatch.setattr(mambamerge.evaluate, "top_k_accuracy", no_work)
    out = tmp_path / "results"
    argv = [command, "--checkpoint", bad_inputs.get(ckpt, ckpt), "--data", data, *FAST, *extra]
    if command == "sweep" and "--out" not in extra:
        argv += ["--out", str(out)]
    argv = [arg.format(**bad_inputs) for arg in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mambamerge {command}: error: "), captured.err
    assert all(part in lines[0] for part in message), lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_interrupted_sweep_leaves_no_result_or_temp_file(checkpoint, tmp_path, monkeypatch, capsys):
    real, calls = mambamerge.evaluate.evaluate, []

    def interrupted_on_third(*args, **kwargs):
        calls.append(args[2:3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mambamerge.evaluate, "evaluate", interrupted_on_third)
    out = tmp_path / "sweep"
    argv = ["sweep", "--checkpoint", checkpoint, "--data", "fashion-mnist", *FAST, "--out", str(out),
            "--methods", "mame", "random", "--reductions", "0.2", "0.4"]
    assert main(argv) == 130
    assert len(calls) == 3 and "interrupted" in capsys.readouterr().err
    assert not out.exists()  # created only when the results are written


def test_interrupted_write_leaves_no_partial_or_temp_file(tmp_path):
    class InterruptedText(str):
        def encode(self, *args, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_files(tmp_path, {"results.md": "| table |\n", "results.csv": InterruptedText("a,b\n")})
    assert list(tmp_path.iterdir()) == []
    assert write_files(tmp_path, {"results.md": "| table |\n"}) == [tmp_path / "results.md"]
    assert [f.name for f in tmp_path.iterdir()] == ["results.md"]
