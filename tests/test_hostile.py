"""Hostile files and broken runs (issue 11): nothing runs planted code, nothing asks for unbounded
memory, a damaged cache or image or a kill at any moment gives a named error or a warning, never a
traceback or a half-written output."""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mambamerge
import mambamerge.merge
from mambamerge import CheckpointError, load_checkpoint
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
    import mambamerge.checkpoint as ckpt

    built = []

    class Recording(ckpt.VisionMamba):
        def __init__(self, cfg):
            built.append(cfg.depth)
            assert cfg.depth <= 2, f"the loader builds a {cfg.depth}-block model for a 2-block file"
            super().__init__(cfg)

    monkeypatch.setattr(ckpt, "VisionMamba", Recording)
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
    (["--reduction", "0.4"], "--reduction needs --method"),
    (["--method", "mame", "--reduction", "1.2"], "[0, 1)"),
    (["--method", "mamee", "--reduction", "0.4"], "unknown method 'mamee'"),
    (["--out", "{tmp}/a_file/run"], "cannot write results to"),
])
def test_train_refuses_bad_arguments_before_any_work(tmp_path, data, extra, message, monkeypatch, capsys):
    import mambamerge.cli.train as train_command

    def no_work(*args, **kwargs):
        raise AssertionError("data was read before the arguments were checked")

    monkeypatch.setattr(train_command, "load_dataset", no_work)
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
