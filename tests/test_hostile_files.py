"""Hostile files, round two (issue 16): planted journals, links, FIFOs and folders where outputs go,
concurrent writers, headless checkpoints, metadata that exhausts the JSON parser, and integer or NaN
weights. Nothing outside the output folder is touched, nothing is a traceback, nothing loads wrong."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mambamerge
from mambamerge import CheckpointError, load_checkpoint, save_checkpoint
from mambamerge import atomic
from mambamerge.atomic import OutputError, hold, write_bytes, write_files
from mambamerge.cli.main import main
from test_hostile import _LOAD_ATOMIC, image_folder

RESULTS = ("results.md", "results.csv", "results.json", "accuracy.png")


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited (what a kill -9 leaves a journal or a temp file under)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- planted journals and temp names (item 1) ---

def _temp(name, pid):
    return f".{name}.mambamerge-{pid}-0123abcd.tmp"


HOSTILE_JOURNALS = {
    "absolute target": lambda outside, pid: json.dumps({str(outside): "evil.bin"}),
    "absolute target, our temp": lambda outside, pid: json.dumps({str(outside): _temp("target", pid)}),
    "dot-dot target": lambda outside, pid: json.dumps({"../outside/target": _temp("target", pid)}),
    "separator in the temp": lambda outside, pid: json.dumps({"e.json": "../outside/target"}),
    "temp not ours": lambda outside, pid: json.dumps({"e.json": "evil.bin"}),
    "temp of another name": lambda outside, pid: json.dumps({"e.json": _temp("other", pid)}),
    "temp of another pid": lambda outside, pid: json.dumps({"e.json": _temp("e.json", pid + 1)}),
    "not a string": lambda outside, pid: json.dumps({"a": 5}),
    "not json": lambda outside, pid: "not json",
    "a list": lambda outside, pid: json.dumps(["e.json"]),
    "nested too deeply": lambda outside, pid: "[" * 100000,
    "not utf-8": lambda outside, pid: b"\xff\xfe{}",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JOURNALS))
def test_a_planted_journal_is_left_alone_with_a_warning_and_never_blocks_a_write(tmp_path, dead_pid, case):
    folder, outside = tmp_path / "d", tmp_path / "outside" / "target"
    folder.mkdir()
    outside.parent.mkdir()
    outside.write_text("precious")
    for name in ("evil.bin", _temp("target", dead_pid), _temp("other", dead_pid + 1)):
        (folder / name).write_text("evil")
    text = HOSTILE_JOURNALS[case](outside, dead_pid)
    journal = folder / f".mambamerge-commit-{dead_pid}-0123abcd.json"
    journal.write_bytes(text if isinstance(text, bytes) else text.encode())
    for attempt in range(2):
        with pytest.warns(UserWarning, match=r"left alone, it is not a commit journal mambamerge wrote"):
            write_files(folder, {"e.json": f"{attempt}", "f.json": "x"})
        assert (folder / "e.json").read_text() == f"{attempt}"
    assert outside.read_text() == "precious" and sorted(os.listdir(outside.parent)) == ["target"]
    assert (folder / "evil.bin").read_text() == "evil" and journal.exists()


def test_a_journal_of_another_name_is_not_followed(tmp_path, dead_pid):
    """The issue's repro: `.commit.<pid>.<x>.json` naming an absolute path (not a name this library writes)."""
    folder, outside = tmp_path / "d", tmp_path / "target"
    folder.mkdir()
    outside.write_text("precious")
    (folder / "evil.bin").write_text("evil")
    (folder / f".commit.{dead_pid}.ab12.json").write_text(json.dumps({str(outside): "evil.bin"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_bytes(folder / "e.json", "{}")
    assert outside.read_text() == "precious" and (folder / "evil.bin").exists()


def test_eval_json_into_a_folder_with_a_planted_journal_warns_and_writes(tmp_path, dead_pid, capsys):
    folder, outside = tmp_path / "d", tmp_path / "bashrc"
    folder.mkdir()
    outside.write_text("precious")
    (folder / _temp("bashrc", dead_pid)).write_text("evil")
    journal = folder / f".mambamerge-commit-{dead_pid}-0123abcd.json"
    journal.write_text(json.dumps({str(outside): _temp("bashrc", dead_pid)}))
    torch.manual_seed(0)
    ckpt = save_checkpoint(mambamerge.create_model("vim_pico", num_classes=2), tmp_path / "m.safetensors")
    data = image_folder(tmp_path / "data", splits=("val",))
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data / "val"), "--runs", "1", "--threads", "1",
                 "--json", str(folder / "e.json")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {journal}: left alone" in err and "not a plain file name" in err and "Traceback" not in err
    assert outside.read_text() == "precious" and json.loads((folder / "e.json").read_text())["result"]["inputs"] == 4


def test_only_temp_files_this_library_named_for_a_dead_process_are_removed(tmp_path, dead_pid):
    ours = tmp_path / _temp("model.safetensors", dead_pid)
    users = [tmp_path / name for name in (".x.123.y.tmp", f".notes.{dead_pid}.abcdefgh.tmp",
                                          f".commit.{dead_pid}.ab12.json", f".a.mambamerge-{dead_pid}-xyz.tmp")]
    alive = tmp_path / _temp("b", os.getppid())
    for path in (ours, alive, *users):
        path.write_text("keep")
    (tmp_path / _temp("dir", dead_pid)).mkdir()  # not a file: left alone, no error
    write_bytes(tmp_path / "e.json", "{}")
    assert not ours.exists()
    assert all(p.exists() for p in (alive, *users)) and (tmp_path / _temp("dir", dead_pid)).is_dir()


def test_a_valid_journal_of_a_killed_writer_is_still_completed(tmp_path, dead_pid):
    for name in RESULTS:
        (tmp_path / _temp(name, dead_pid)).write_text("new " + name)
    (tmp_path / f".mambamerge-commit-{dead_pid}-0123abcd.json").write_text(
        json.dumps({name: _temp(name, dead_pid) for name in RESULTS}))
    atomic.recover(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {name: "new " + name for name in RESULTS}


# --- special files and links where an output goes (item 2, item 11's folder) ---

def test_a_fifo_a_folder_or_a_link_is_never_replaced(tmp_path):
    fifo, folder, target = tmp_path / "out.json", tmp_path / "m.safetensors", tmp_path / "other" / "target.json"
    os.mkfifo(fifo)
    folder.mkdir()
    target.parent.mkdir()
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    with pytest.raises(OutputError, match=r"out\.json is a FIFO \(named pipe\), not a regular file"):
        write_bytes(fifo, "{}")
    with pytest.raises(OutputError, match=r"m\.safetensors is a folder, not a regular file"):
        save_checkpoint(mambamerge.create_model("vim_pico"), folder)
    with pytest.raises(OutputError, match=rf"link\.json is a symbolic link \(to {target}\).*give the target's own"):
        write_files(tmp_path, {"a.md": "a", "link.json": "{}"})
    assert os.path.isfile(target) and target.read_text() == "old" and os.listdir(target.parent) == ["target.json"]
    assert sorted(os.listdir(tmp_path)) == ["link.json", "m.safetensors", "other", "out.json"]  # no temp, no a.md
    assert os.listdir(folder) == [] and os.path.islink(tmp_path / "link.json")


def test_a_folder_reached_through_a_link_is_written_in_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    write_files(tmp_path / "out", {"a.md": "a", "b.csv": "b"})
    assert sorted(os.listdir(tmp_path / "real")) == ["a.md", "b.csv"]


def test_eval_refuses_a_fifo_or_a_link_as_json_before_any_work(tmp_path, capsys):
    (tmp_path / "target.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    os.mkfifo(tmp_path / "fifo.json")
    for name, what in (("fifo.json", "a FIFO"), ("link.json", "a symbolic link")):
        assert main(["eval", "--checkpoint", str(tmp_path / "absent.safetensors"), "--data", str(tmp_path),
                     "--json", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{name} is {what}" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "target.json").read_text() == "old"


# --- one folder, two writers (item 3) ---

_WRITE_SET = _LOAD_ATOMIC + """
import os, random, sys, time
real = os.replace
def slow(src, dst):  # a wide commit window: without the lock, two writers interleave
    real(src, dst)
    time.sleep(random.random() * 0.03)
os.replace = slow
print("ready", flush=True)
sys.stdin.read()  # both start together
atomic.write_files(sys.argv[1], {name: sys.argv[2] for name in %r})
""" % (RESULTS,)


def test_concurrent_writers_into_one_folder_end_with_one_complete_set(tmp_path):
    for trial in range(6):
        folder = tmp_path / str(trial)
        folder.mkdir()
        writers = [subprocess.Popen([sys.executable, "-c", _WRITE_SET, str(folder), tag], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for tag in "AB"]
        assert [w.stdout.readline() for w in writers] == ["ready\n"] * 2
        for w in writers:
            w.stdin.close()
        assert [w.wait() for w in writers] == [0, 0]
        contents = {name: (folder / name).read_text() for name in RESULTS}
        assert len(set(contents.values())) == 1, contents
        assert sorted(os.listdir(folder)) == sorted(RESULTS)  # no journal, temp or lock left


_HOLD = _LOAD_ATOMIC + """
import sys
with atomic.hold(sys.argv[1], "mambamerge sweep"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_sweep_into_a_folder_being_swept_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["sweep", "--checkpoint", str(tmp_path / "absent.safetensors"), "--data", str(tmp_path),
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"mambamerge sweep: error: {out} is being written by process {holder.pid} (mambamerge sweep); "
                       f"wait until it is done, or write elsewhere\n")
        monkeypatch.setattr(atomic, "WAIT_S", 0.1)
        with pytest.raises(OutputError, match=f"being written by process {holder.pid}"):
            write_bytes(out / "e.json", "{}")
    finally:
        holder.stdin.close()
        holder.wait()
    assert not out.exists()  # released, and the folder the holder made removed again
    with hold(out, "test") as held:
        write_files(held, {"a.md": "a", "b.csv": "b"})  # this process's own writes go through
        with pytest.raises(OutputError, match=f"process {os.getpid()} \\(test\\)"):
            with hold(out, "another"):
                pass
    assert sorted(os.listdir(out)) == ["a.md", "b.csv"]


def test_a_refused_sweep_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert main(["sweep", "--checkpoint", str(tmp_path / "absent.safetensors"), "--data", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# --- checkpoints without a head (item 8) ---

@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    folder = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    return {name: str(save_checkpoint(mambamerge.create_model(name, num_classes=0), folder / f"{name}.safetensors"))
            for name in ("aum_nano", "videomamba_nano", "vim_pico")}


@pytest.mark.parametrize("name", ["aum_nano", "videomamba_nano", "vim_pico"])
def test_a_headless_file_loads_as_a_feature_extractor(headless, name, capsys):
    model = load_checkpoint(headless[name])
    assert model.num_classes == 0
    with torch.no_grad():
        assert model(torch.randn(2, *model.input_shape)).shape == (2, model.num_features)
    assert main(["info", headless[name]]) == 0
    assert "no classification head: a feature extractor" in capsys.readouterr().out
    assert main(["speed", "--checkpoint", headless[name], "--batch", "1", "--runs", "1", "--threads", "1",
                 "--device", "cpu"]) == 0
    assert "inputs/s" in capsys.readouterr().out


@pytest.mark.parametrize("command", [
    ["eval", "--checkpoint", "{aum}", "--data", "fsdd", "--limit", "2", "--runs", "1"],
    ["diagnose", "--checkpoint", "{aum}", "--data", "fsdd", "--split", "test", "--images", "2", "--out", "{tmp}/d"],
    ["train", "--model", "vim_pico", "--teacher", "{vim}", "--data", "{tmp}/data", "--img-size", "32", "--epochs", "1",
     "--out", "{tmp}/run"],
])
def test_commands_say_a_headless_model_has_no_head(tmp_path, headless, command, capsys):
    image_folder(tmp_path / "data")
    argv = [a.format(tmp=tmp_path, aum=headless["aum_nano"], vim=headless["vim_pico"]) for a in command]
    assert main(argv + ["--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "the model has no classification head (num_classes=0: a feature extractor" in err
    assert len(err.strip().splitlines()) == 1
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.relative_to(tmp_path).parts[0] != "data"]


# --- metadata the JSON parser cannot take (item 9), integer and non-finite weights (item 13) ---

@pytest.fixture(scope="module")
def pico_sd():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in mambamerge.create_model("vim_pico").state_dict().items()}


@pytest.mark.parametrize("key,text,message", [
    ("mambamerge_config", "[" * 100000, r"is not JSON mambamerge can read \(it is nested too deeply"),
    ("mambamerge_classes", "[" * 100000, r"is not JSON mambamerge can read \(it is nested too deeply"),
    ("mambamerge_config", '{"img_size": ' + "9" * 5000 + "}", r"is not JSON mambamerge can read \(it holds an "
                                                              "integer with too many digits"),
    ("mambamerge_classes", "[" + "1" * 5000 + "]", r"is not JSON mambamerge can read \(it holds an integer with too "
                                                   "many digits"),
    ("mambamerge_merge", "[" * 60000, "is not JSON"),
    ("mambamerge_merge", '{"tokens": ' + "9" * 5000 + "}", "is not JSON"),
])
def test_metadata_that_exhausts_the_json_parser_is_named(tmp_path, pico_sd, key, text, message, capsys):
    path = tmp_path / "m.safetensors"
    save_file(pico_sd, str(path), metadata={key: text})
    with pytest.raises(CheckpointError, match=f"{path}: the {key} metadata.* {message}"):
        load_checkpoint(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "set_int_max_str_digits" not in err and "Traceback" not in err and str(path) in err


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("damage,message", [
    ("int8", r"tensors that are not floating point: layers\.1\.mixer\.in_proj\.weight int8;"),
    ("nan", r"tensors with NaN or infinite values: layers\.0\.mixer\.D;"),
    ("inf", r"tensors with NaN or infinite values: norm_f\.weight;"),
])
def test_integer_or_non_finite_weights_are_refused_by_name(tmp_path, pico_sd, fmt, damage, message, capsys):
    sd = dict(pico_sd)
    if damage == "int8":
        sd["layers.1.mixer.in_proj.weight"] = (sd["layers.1.mixer.in_proj.weight"] * 100).to(torch.int8)
    elif damage == "nan":
        sd["layers.0.mixer.D"] = sd["layers.0.mixer.D"].clone().index_fill_(0, torch.tensor([3]), float("nan"))
    else:
        sd["norm_f.weight"] = sd["norm_f.weight"].clone().index_fill_(0, torch.tensor([0]), float("inf"))
    path = tmp_path / f"m.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path), metadata={"mambamerge_config": json.dumps({"img_size": 32, "stride": 8})})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, img_size=32)
    assert main(["info", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# --- what the checkpoint path is when it is no file (item 15) ---

def test_a_checkpoint_that_is_no_regular_file_says_what_it_is(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.pth")
    (tmp_path / "zero.pth").symlink_to("/dev/zero")
    (tmp_path / "dir.safetensors").mkdir()
    for name, what in (("fifo.pth", "is a FIFO (named pipe)"), ("dir.safetensors", "is a folder"),
                       ("zero.pth", "(a link to /dev/zero) is a character device")):
        with pytest.raises(CheckpointError, match=re.escape(f"{name} {what}, not a checkpoint file")):
            load_checkpoint(tmp_path / name)
        assert main(["info", str(tmp_path / name)]) == 2
        assert what in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pth")
