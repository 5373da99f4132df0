"""Hostile files and broken runs (issue 11): nothing runs planted code, nothing asks for unbounded
memory, a damaged cache or image or a kill at any moment gives a named error or a warning, never a
traceback or a half-written output."""
import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mambamerge
import mambamerge.merge
from mambamerge import CheckpointError, load_checkpoint
from mambamerge import atomic
from mambamerge.atomic import recover, write_bytes, write_files
from mambamerge.cli.main import main
from conftest import perturb_

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


# --- checkpoints: bounded, and every damage a CheckpointError (items 2, 4, 9, 11) ---

@pytest.fixture
def pico_sd():
    torch.manual_seed(0)
    return mambamerge.create_model("vim_pico").state_dict()


def test_a_file_cannot_make_the_loader_build_more_than_it_holds(tmp_path, pico_sd, monkeypatch, capsys):
    from mambamerge.models import VisionMamba
    from mambamerge.models.adapter import ADAPTERS

    built = []

    class Recording(VisionMamba):
        def __init__(self, cfg):
            built.append(cfg.depth)
            assert cfg.depth <= 2, f"the loader builds a {cfg.depth}-block model for a 2-block file"
            super().__init__(cfg)

    monkeypatch.setattr(ADAPTERS["vim"], "model_class", Recording)
    path = tmp_path / "absurd.pth"
    torch.save({**pico_sd, "layers.99999.foo": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="3 blocks numbered from 0 to 99999.*without gaps"):
        load_checkpoint(path, img_size=32)
    assert built == []
    assert main(["info", str(path)]) == 2
    assert "without gaps" in capsys.readouterr().err


def _safetensors(path, sd, metadata):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case,message", [
    ("empty", "the file is empty"),
    ("random", "neither safetensors nor a torch.save file"),
    ("json", "a JSON file"),
    ("A_log_1d", r"layers\.0\.mixer\.A_log has shape \(64,\), a Vim's is \(d_inner, d_state\)"),
    ("patch_1d", r"patch_embed\.proj\.weight has shape \(32,\), a Vim's is \(embed_dim, channels, patch_h"),
    ("zero_dim", r"norm_f\.weight has shape \(0,\)"),
    ("metadata_not_json", "metadata is not JSON"),
    ("metadata_list", "metadata is a JSON list"),
    ("stride_0", "metadata's stride is 0: expected a whole number of pixels"),
    ("img_size_huge", "metadata's img_size is 1000000"),
    ("args_bad_size", r"args\.input_size is 'big'"),
])
def test_damaged_checkpoints_are_named_never_a_traceback(tmp_path, pico_sd, case, message, capsys):
    path = tmp_path / f"{case}.pth"
    meta = lambda cfg: {"mambamerge_config": cfg if isinstance(cfg, str) else json.dumps(cfg)}  # noqa: E731
    if case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "json":
        path.write_text(json.dumps({"model": "vim_pico", "weights": [1, 2, 3]}))
    elif case in ("A_log_1d", "patch_1d", "zero_dim"):
        key = {"A_log_1d": "layers.0.mixer.A_log", "patch_1d": "patch_embed.proj.weight", "zero_dim": "norm_f.weight"}
        shape = {"A_log_1d": (64,), "patch_1d": (32,), "zero_dim": (0,)}
        torch.save({**pico_sd, key[case]: torch.zeros(shape[case])}, path)
    elif case == "metadata_not_json":
        path = _safetensors(tmp_path / "m.safetensors", pico_sd, meta("{img_size: 32"))
    elif case == "metadata_list":
        path = _safetensors(tmp_path / "m.safetensors", pico_sd, meta([32, 8]))
    elif case == "stride_0":
        path = _safetensors(tmp_path / "m.safetensors", pico_sd, meta({"img_size": 32, "stride": 0}))
    elif case == "img_size_huge":
        path = _safetensors(tmp_path / "m.safetensors", pico_sd, meta({"img_size": 10 ** 6, "stride": 8}))
    elif case == "args_bad_size":
        torch.save({"model": pico_sd, "args": {"input_size": "big"}}, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "python objects beyond tensors" not in err.lower()
    assert err.startswith("mambamerge info: error:") and err.count("\n") == 1


def test_metadata_without_sizes_leaves_them_to_the_tensors(tmp_path, pico_sd):
    path = _safetensors(tmp_path / "m.safetensors", pico_sd, {"mambamerge_config": json.dumps({"depth": 2})})
    assert load_checkpoint(path, img_size=32).cfg.stride == (8, 8)


def test_pickled_objects_are_refused_with_advice_that_works_from_the_command_line(tmp_path, pico_sd, capsys):
    path = tmp_path / "objs.pth"
    torch.save({"model": pico_sd, "extra": argparse.ArgumentParser}, path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "argparse.ArgumentParser" in err and "convert it once in Python" in err
    with pytest.warns(UserWarning, match="runs arbitrary pickled code"):
        model = load_checkpoint(path, 32, trust_pickle=True)
    converted = mambamerge.save_checkpoint(model, tmp_path / "model.safetensors")
    assert main(["info", str(converted)]) == 0


def test_a_plain_state_dict_that_does_not_tell_its_size_is_not_guessed(tmp_path, pico_sd, capsys):
    path = tmp_path / "pico.pth"
    torch.save(pico_sd, path)  # a 32-pixel model: at the default 224 its 4x4 grid would need a stride of 72
    with pytest.raises(CheckpointError, match=r"stride of 72, which skips pixels.*--img-size"):
        load_checkpoint(path)
    assert load_checkpoint(path, img_size=32).cfg.stride == (8, 8)
    assert main(["info", str(path)]) == 2
    assert main(["info", str(path), "--img-size", "32"]) == 0


def test_info_refuses_partial_and_misshaped_files(tmp_path, pico_sd, capsys):
    partial = {k: v for k, v in pico_sd.items() if k != "layers.1.mixer.x_proj.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    assert main(["info", str(tmp_path / "partial.pth"), "--img-size", "32"]) == 2
    assert "missing 1: layers.1.mixer.x_proj.weight" in capsys.readouterr().err
    torch.save({**pico_sd, "head.weight": torch.zeros(10, 31)}, tmp_path / "bad.pth")
    assert main(["info", str(tmp_path / "bad.pth"), "--img-size", "32"]) == 2
    assert "mis-shaped 1: head.weight (10, 31) (expected (10, 32))" in capsys.readouterr().err


# --- train checks its arguments before any work (item 8) ---

@pytest.mark.parametrize("extra,message", [
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--limit", "-3"], "--limit must be at least 1, got -3"),
    (["--epochs", "0"], "epochs (--epochs) must be at least 1, got 0"),
    (["--batch-size", "0"], "batch_size (--batch-size) must be at least 1"),
    (["--eval-batch-size", "0"], "eval_batch_size (--eval-batch-size) must be at least 1"),
    (["--lr", "nan"], "lr (--lr) must be above 0"),
    (["--label-smoothing", "1"], "label_smoothing (--label-smoothing) must be in [0, 1)"),
    (["--threads", "-1"], "--threads must be at least 1, got -1"),
    (["--method", "mame"], "--method mame needs --reduction R"),
    (["--reduction", "0.4"], "--reduction and --option need --method"),
    (["--method", "mame", "--reduction", "1.2"], "[0, 1)"),
    (["--method", "mamee", "--reduction", "0.4"], "unknown method 'mamee'"),
    (["--out", "{tmp}/a_file/run"], "cannot write results to"),
])
def test_train_refuses_bad_arguments_before_any_work(tmp_path, data, extra, message, monkeypatch, capsys):
    import mambamerge.data

    def no_work(*args, **kwargs):
        raise AssertionError("data was read before the arguments were checked")

    monkeypatch.setattr(mambamerge.data, "load_dataset", no_work)
    (tmp_path / "a_file").write_text("")
    argv = [a.format(tmp=tmp_path) for a in TRAIN + data + ["--out", str(tmp_path / "run")] + extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_folder_is_named(tmp_path, data, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # as root every folder is writable: /sys refuses new entries to everyone
    target = locked / "run" if not os.access(locked, os.W_OK) else Path("/sys/mambamerge-run")
    assert main(TRAIN + data + ["--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write results to {target}" in err and "Traceback" not in err


# --- errors that speak the command line's language (item 11) ---

def test_a_data_root_given_where_a_split_is_expected_is_named(tmp_path, capsys):
    root = image_folder(tmp_path / "data")
    ckpt = mambamerge.save_checkpoint(mambamerge.create_model("vim_pico", num_classes=2), tmp_path / "m.safetensors")
    out = tmp_path / "sweep"
    argv = ["sweep", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(out), "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds the split folders train, val, not class folders" in err and f"{root / 'val'}" in err
    assert not out.exists()  # a failed sweep leaves no empty folder


def test_a_misspelt_data_set_lists_the_known_ones(tmp_path, capsys):
    ckpt = mambamerge.save_checkpoint(mambamerge.create_model("vim_pico"), tmp_path / "m.safetensors")
    for spec in ("fashion-mnst", "mnsit:/some/folder"):
        assert main(["eval", "--checkpoint", str(ckpt), "--data", spec, "--threads", "1"]) == 2
        assert "known data sets: fashion-mnist, mnist" in capsys.readouterr().err


# --- schedules: no silent truncation, no TypeError, advice that was not already tried (item 9) ---

@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule="constant", r=2.7), "r must be a whole number, got 2.7"),
    (dict(schedule=[0, 2.7]), r"schedule counts must be whole numbers of tokens, got \[0, 2.7\]"),
    (dict(reduction="0.3"), r"reduction must be a number, got '0.3' \(str\)"),
    (dict(reduction=0.3, every=1.5), "every must be a whole number"),
    (dict(schedule="geometric", keep="0.5"), "keep must be a number"),
])
def test_schedule_arguments_of_the_wrong_type_are_named(kwargs, message):
    model = mambamerge.create_model("vim_pico", depth=4)
    with pytest.raises(ValueError, match=message):
        mambamerge.patch(model, "mame", **kwargs)


def test_an_unreachable_target_does_not_advise_the_settings_that_failed():
    model = mambamerge.create_model("vim_pico", depth=4)
    with pytest.raises(ValueError, match="cannot reach") as failed:
        mambamerge.patch(model, "tome", reduction=0.7)  # geometric from block 1, every block: tried already
    assert "every=1" in str(failed.value).split(";")[0] and "every=1" not in str(failed.value).split(";")[1]
    with pytest.raises(ValueError, match="--option every=1"):
        mambamerge.patch(model, "tome", reduction=0.7, schedule="constant")


# --- one bad image never fails or changes the others of its batch (item 6) ---

DETERMINISTIC = sorted(set(mambamerge.merge.METHODS) - {"random"})


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_a_nan_or_inf_image_leaves_the_rest_of_its_batch_as_alone(method):
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_pico", img_size=64, depth=4)).eval()
    mambamerge.patch(model, method, reduction=0.3)
    good = torch.randn(2, 3, 64, 64)
    batch = torch.stack([good[0], torch.full_like(good[0], float("nan")), torch.full_like(good[0], float("inf")),
                         good[1], -torch.full_like(good[0], float("inf"))])
    with torch.no_grad():
        out = model(batch)
        alone = torch.cat([model(good[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(out[[0, 3]], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(mambamerge.merge.METHODS))
def test_an_empty_batch_gives_an_empty_result(method):
    model = mambamerge.create_model("vim_pico", img_size=64, depth=4).eval()
    mambamerge.patch(model, method, reduction=0.3)
    with torch.no_grad():
        assert model(torch.zeros(0, 3, 64, 64)).shape == (0, 10)


# --- writes: all or nothing under a real kill, no temp file left for ever, the umask's mode (item 7) ---

# the child loads atomic.py on its own (no torch import: a second, not half a minute on a loaded machine)
_LOAD_ATOMIC = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("atomic", {str(Path(atomic.__file__))!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
"""
_KILL_AFTER_FIRST_RENAME = _LOAD_ATOMIC + """
import os, signal, sys
real, done = os.replace, []
def replace(src, dst):
    real(src, dst)
    if not os.path.basename(dst).startswith("."):  # a result file, not the journal
        done.append(dst)
        if len(done) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
atomic.write_files(sys.argv[1], {name: "new " + name for name in ("results.md", "results.csv", "results.json")})
"""

_KILL_WHILE_WRITING = _LOAD_ATOMIC + """
import os, signal, sys
from pathlib import Path
def write(tmp):
    Path(tmp).write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
atomic.atomic_write(Path(sys.argv[1]) / "model.safetensors", write)
"""


def _killed(script, folder):
    result = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr


def test_a_kill_while_renaming_results_never_leaves_new_beside_old(tmp_path):
    names = ("results.md", "results.csv", "results.json")
    write_files(tmp_path, {name: "old " + name for name in names})
    _killed(_KILL_AFTER_FIRST_RENAME, tmp_path)
    left = {p.name: p.read_text() for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert set(left.values()) <= {"new " + name for name in names} and left  # no old file beside a new one
    recover(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {name: "new " + name for name in names}


def test_a_kill_while_writing_leaves_the_old_file_and_no_temp_for_ever(tmp_path):
    (tmp_path / "model.safetensors").write_text("old")
    _killed(_KILL_WHILE_WRITING, tmp_path)
    assert (tmp_path / "model.safetensors").read_text() == "old"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # what the killed process left
    write_files(tmp_path, {"history.json": "[]"})  # the next write into the folder clears it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "model.safetensors"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        paths = write_files(tmp_path, {"a.md": "a", "b.csv": "b"}) + [write_bytes(tmp_path / "c.json", "{}")]
        paths.append(mambamerge.save_checkpoint(mambamerge.create_model("vim_pico"), tmp_path / "m.safetensors"))
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths} == {mode}


# --- a corrupt or truncated image is skipped with a warning and counted (item 5) ---

def damage(folder):
    """Two real damaged files among the images: random bytes named .png, and a JPEG cut in half."""
    (folder / "ant" / "garbage.png").write_bytes(np.random.default_rng(1).bytes(300))
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
        folder / "bee" / "whole.jpg", quality=95)
    data = (folder / "bee" / "whole.jpg").read_bytes()
    (folder / "bee" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "bee" / "whole.jpg").unlink()


@pytest.fixture
def pico_ckpt(tmp_path):
    torch.manual_seed(0)
    return str(mambamerge.save_checkpoint(mambamerge.create_model("vim_pico", num_classes=2), tmp_path / "m.safetensors"))


def test_eval_and_sweep_skip_unreadable_images_and_say_so(tmp_path, pico_ckpt, capsys):
    root = image_folder(tmp_path / "data", splits=("val",))
    common = ["--checkpoint", pico_ckpt, "--runs", "1", "--throughput-batch", "2", "--threads", "1"]
    assert main(["eval", *common, "--data", str(root / "val"), "--json", str(tmp_path / "clean.json")]) == 0
    damage(root / "val")
    capsys.readouterr()
    assert main(["eval", *common, "--data", str(root / "val"), "--json", str(tmp_path / "damaged.json")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "skipped     2 unreadable files" in captured.out
    assert "warning: skipped an unreadable image" in captured.err and "garbage.png" in captured.err
    clean, damaged = (json.loads((tmp_path / f"{n}.json").read_text())["result"] for n in ("clean", "damaged"))
    assert damaged["inputs"] == clean["inputs"] == 4 and damaged["top1"] == clean["top1"]
    assert [Path(p.split(" (")[0]).name for p in damaged["unreadable_images"]] == ["garbage.png", "cut.jpg"]
    out = tmp_path / "sweep"
    assert main(["sweep", *common, "--data", str(root / "val"), "--out", str(out), "--methods", "mame",
                 "--reductions", "0.2"]) == 0
    assert len(json.loads((out / "results.json").read_text())["data"]["unreadable_images"]) == 2


def test_training_goes_on_past_an_unreadable_image(tmp_path, data, capsys):
    damage(tmp_path / "data" / "train")
    out = tmp_path / "run"
    # 3 of the 6 training images held out for validation: at least one of them is readable
    assert main(TRAIN + data + ["--out", str(out), "--val-split", "3"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "cut.jpg" in captured.err
    assert (out / "model.safetensors").is_file() and (out / "last.pt").is_file()


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path, pico_sd):
    """`mambamerge info x.pth | head -1`: the pipe closes before the output is written."""
    torch.save(pico_sd, tmp_path / "m.pth")
    child = subprocess.Popen([sys.executable, "-m", "mambamerge", "info", str(tmp_path / "m.pth"), "--img-size", "32"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # as head does once it has its lines; the command is still importing torch
    err = child.stderr.read().decode()
    assert child.wait() == 128 + signal.SIGPIPE and err == ""


# --- a damaged kernel cache is rebuilt, not run (item 3) ---

_FORWARD_ON_THE_CACHE = """
import warnings, torch
from mambamerge.ops import cpu_kernels
x = torch.linspace(-5, 5, 64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = cpu_kernels.softplus(x)
assert torch.allclose(y, torch.nn.functional.softplus(x), atol=1e-6)
print(cpu_kernels.available(), *[str(w.message) for w in caught], sep="\\n")
"""


def test_a_truncated_cached_kernel_library_is_rebuilt_with_a_warning(tmp_path):
    from mambamerge.ops import cpu_kernels
    from mambamerge.ops.cpu_kernels import build

    if not cpu_kernels.available():
        pytest.skip(f"no compiled kernels here: {cpu_kernels.unavailable_reason()}")
    built = build.build_library("g++").parent  # this source's build (the cache may hold other versions' too)
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / built.name)
    lib = cache / built.name / build.LIBRARY_NAME
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])  # a copy cut short, as a full disk leaves it
    stale = cache / built.name / ".build-999999999-x"  # what a build killed long ago left (no such pid)
    stale.mkdir()
    env = {**os.environ, "MAMBAMERGE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _FORWARD_ON_THE_CACHE], env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"returncode {result.returncode}: {result.stderr[-2000:]}"  # SIGBUS: -7
    lines = result.stdout.splitlines()
    assert lines[0] == "True" and "is damaged or incomplete" in lines[1] and "rebuilding" in lines[1]
    assert lib.read_bytes() == (built / build.LIBRARY_NAME).read_bytes() or build.intact(lib)
    assert not stale.exists()


# --- threads: the cores free at start (item 10) ---

def test_free_cores_counts_the_cores_others_leave_free(monkeypatch):
    from mambamerge import threads

    samples = iter([{0: (0, 100), 1: (0, 100), 2: (0, 100)},
                    {0: (10, 200), 1: (100, 200), 2: (100, 200)}])  # core 0 10% busy, 1 fully, 2 not ours
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads.free_cores(window=0) == 1
    samples = iter([{0: (0, 100), 1: (0, 100)}, {0: (100, 200), 1: (100, 200)}])  # both busy: still one
    assert threads.free_cores(window=0) == 1
    assert threads.default_threads(3) == 3


def test_commands_default_to_the_free_cores(monkeypatch, capsys):
    from mambamerge import threads

    monkeypatch.setattr(threads, "free_cores", lambda window=0.1: 1)
    before = torch.get_num_threads()
    try:
        assert main(["speed", "--model", "vim_pico", "--batch", "1", "--runs", "1"]) == 0
        assert " 1 CPU threads" in capsys.readouterr().out
        assert main(["speed", "--model", "vim_pico", "--batch", "1", "--runs", "1", "--threads", "0"]) == 2
    finally:
        torch.set_num_threads(before)


def test_the_command_leaves_openmp_waiting_to_the_user():
    """A spin bound does not prevent the collapse under load (benchmarks/threads.py); the free-core
    thread count does, so the command sets no OpenMP waiting policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-m", "mambamerge", "speed", "--model", "vim_pico", "--batch", "1", "--runs",
                          "1", "--threads", "1"], env=env, capture_output=True, text=True, check=True).stdout
    assert "OpenMP's default waiting" in out and "GOMP_SPINCOUNT" not in out
    env["GOMP_SPINCOUNT"] = "5000"
    out = subprocess.run([sys.executable, "-m", "mambamerge", "speed", "--model", "vim_pico", "--batch", "1", "--runs",
                          "1", "--threads", "1"], env=env, capture_output=True, text=True, check=True).stdout
    assert "GOMP_SPINCOUNT=5000" in out
