"""Arguments that do what they say (issues 16 and 17): every bad value is exit 2 with a one-line message
naming it and its range, before any output is written; a knob that would silently run the model dense
(no size given, every step past the last block) is refused; ToMe's `r` works as ToMe users expect."""
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mambamerge
from mambamerge.cli.main import main
from mambamerge.patch import make_method

ASSETS = Path(str(resources.files("mambamerge") / "assets"))
VIM = str(ASSETS / "vim_nano_fmnist.safetensors")
AUM = str(ASSETS / "aum_nano_fsdd.safetensors")


def refused(argv, capsys, *expected):
    """Run the command in this process: exit 2, one line on stderr naming each of `expected`, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mambamerge {argv[0]}: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def images(tmp_path):
    """A tiny image folder in the ImageNet layout (train/ and val/, two classes of grey PNGs)."""
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / "img" / split / c / f"{i}.png")
    return str(tmp_path / "img")


# --- ToMe's knob (issue 17 item 5) ---

def test_r_alone_is_tomes_constant_schedule_and_model_r_changes_it():
    model = mambamerge.create_model("vim_pico", depth=4).eval()
    images = torch.randn(2, *model.input_shape)
    mambamerge.patch(model, "tome", r=4)
    assert mambamerge.reduction_summary(model)["removals"] == [0, 4, 4, 4]
    assert model.r == model.token_reducer.r == 4
    assert model.token_state(images).length == model.layout.length - 12
    model.r = 2
    assert mambamerge.reduction_summary(model)["removals"] == [0, 2, 2, 2]
    assert model.token_state(images).length == model.layout.length - 6
    model.token_reducer.r = 3
    assert model.r == 3 and mambamerge.reduction_summary(model)["removals"] == [0, 3, 3, 3]
    model.r = 0
    assert mambamerge.reduction_summary(model)["average_reduction"] == 0
    pickle.loads(pickle.dumps(model))  # a patched model stays picklable


def test_model_r_is_validated_and_keeps_the_patch_spacing():
    model = mambamerge.create_model("vim_pico", depth=6)
    mambamerge.patch(model, "rmeeto", schedule="constant", r=2)
    assert mambamerge.reduction_summary(model)["removals"] == [0, 0, 2, 0, 2, 0]  # R-MeeTo's start=2, every=2
    model.r = 3
    assert mambamerge.reduction_summary(model)["removals"] == [0, 0, 3, 0, 3, 0]
    with pytest.raises(ValueError, match="only 8 of the 17 tokens"):
        model.r = 100  # ToMe-style matching removes under half of the tokens
    with pytest.raises(ValueError, match="r must be a whole number"):
        model.r = 2.5
    assert model.r == 3  # a refused value leaves the schedule as it was
    mambamerge.patch(model, "mame", reduction=0.4)
    assert model.r is None  # a geometric schedule's steps differ
    mambamerge.unpatch(model)
    assert model.r is None
    with pytest.raises(ValueError, match="patch it first"):
        model.r = 2


def test_cli_option_r_alone_runs_the_constant_schedule(capsys):
    assert main(["eval", "--checkpoint", VIM, "--data", "fashion-mnist", "--limit", "4", "--batch", "4",
                 "--throughput-batch", "1", "--runs", "1", "--threads", "1", "--method", "tome", "--option", "r=2"]) == 0
    assert "final 175 of 197" in capsys.readouterr().out  # 2 tokens before each of blocks 1..11


# --- silent no-ops refused (issue 17 item 6, issue 16 item 14) ---

@pytest.mark.parametrize("kwargs, message", [
    (dict(), "nothing to reduce by"),
    (dict(schedule="geometric"), "nothing to reduce by"),
    (dict(every=2), "nothing to reduce by"),
    (dict(schedule="constant", r=2, start=2), "start=2 is past the model's last block: it has 2 blocks"),
    (dict(reduction=0.3, start=5), "start=5 is past the model's last block"),
    (dict(keep=0.9999), "removes no token"),
    (dict(reduction=0.3, every=0), "every must be at least 1"),
    (dict(reduction=0.3, start=-1), "start must be at least 1"),
    (dict(schedule="constant", r=-5), r"r \(tokens removed per step\) must be 0 or more, got -5"),
    (dict(schedule="constant", r=-5, start=30), "must be 0 or more"),
    (dict(reduction=0.3, r=2), "not both"),
    (dict(schedule="geometric", r=2), "r= is the count of a constant schedule"),
    (dict(schedule="constant", keep=0.5), "keep= is the ratio of a geometric schedule"),
    (dict(schedule=[0, 1], every=2), "either an explicit schedule list or every="),
])
def test_schedules_that_would_run_dense_or_ignore_an_argument_are_refused(kwargs, message):
    model = mambamerge.create_model("vim_pico")  # 2 blocks
    with pytest.raises(ValueError, match=message):
        mambamerge.patch(model, "mame", **kwargs)
    assert model.token_reducer is None


def test_an_explicit_zero_is_still_allowed():
    model = mambamerge.create_model("vim_pico")
    for kwargs in (dict(reduction=0.0), dict(r=0), dict(schedule=[0, 0])):
        mambamerge.patch(model, "mame", **kwargs)
        assert mambamerge.reduction_summary(model)["average_reduction"] == 0


@pytest.mark.parametrize("method, options, message", [
    ("mame", dict(w_protect="abc"), "mame: option w_protect must be a whole number (default 24), got 'abc'"),
    ("mame", dict(w_protect=float("inf")), "must be a whole number"),
    ("mame", dict(w_protect=24.0), "must be a whole number"),
    ("stm", dict(gamma=float("inf")), "stm: option gamma must be a finite number"),
    ("mame", dict(match=3), "option match must be text"),
])
def test_method_options_of_the_wrong_kind_are_named(method, options, message):
    with pytest.raises(ValueError) as err:
        make_method(method, **options)
    assert message in str(err.value)


def test_reduction_message_prints_the_real_target():
    model = mambamerge.create_model("vim_pico")
    with pytest.raises(ValueError, match=r"reduction of 99\.99% .*the most it can reach"):
        mambamerge.patch(model, "tome", reduction=0.9999)


def test_videomamba_takes_an_empty_batch():
    model = mambamerge.create_model("videomamba_nano").eval()
    with torch.no_grad():
        assert model(torch.randn(0, *model.input_shape)).shape == (0, 40)
        mambamerge.patch(model, "mame", reduction=0.3)
        assert model(torch.randn(0, *model.input_shape)).shape == (0, 40)


# --- the command line: exit 2, one line, nothing written ---

EVAL = ["--checkpoint", VIM, "--data", "fashion-mnist", "--limit", "4", "--threads", "1"]


@pytest.mark.parametrize("argv, expected", [
    (["eval", *EVAL, "--method", "mame", "--reduction", "0.3", "--option", "w_protect=abc"], ["w_protect", "'abc'"]),
    (["eval", *EVAL, "--method", "mame", "--reduction", "0.3", "--option", "w_protect=1e999"], ["w_protect", "inf"]),
    (["eval", *EVAL, "--method", "tome", "--reduction", "0.3", "--option", "every=0"], ["every must be at least 1"]),
    (["eval", *EVAL, "--method", "tome", "--reduction", "0.3", "--option", "start=-1"], ["start must be at least 1"]),
    (["eval", *EVAL, "--method", "tome", "--option", "schedule=constant", "--option", "r=-5"], ["must be 0 or more"]),
    (["eval", *EVAL, "--method", "mame", "--option", "every=2"], ["--method needs --reduction"]),
    (["eval", *EVAL, "--method", "tome", "--reduction", "0.9999"], ["99.99%", "the most it can reach 82.5%"]),
    (["sweep", *EVAL, "--methods", "mame", "--option", "w_protect=1e999"], ["w_protect"]),
    (["visualize", "--checkpoint", VIM, "--data", "fashion-mnist", "--split", "test", "--option", "w_protect=abc"],
     ["w_protect"]),
    (["speed", "--model", "vim_pico", "--img-size", "0"], ["--img-size must be at least 1, got 0"]),
    (["speed", "--model", "vim_pico", "--batch", "0"], ["--batch-size and --runs must be at least 1"]),
    (["demo", "--limit", "0"], ["--limit must be at least 1, got 0"]),
    (["train", "--data", "fashion-mnist", "--val-split", "nan"], ["--val-split must be a fraction", "nan"]),
])
def test_bad_arguments_are_one_line_errors_and_write_nothing(argv, expected, tmp_path, capsys):
    out = tmp_path / "out"
    if argv[0] in ("sweep", "visualize", "train", "demo"):
        argv = [*argv, "--out", str(out)]
    elif argv[0] == "eval":
        argv = [*argv, "--json", str(out / "e.json")]
    refused(argv, capsys, *expected)
    assert not out.exists()


@pytest.mark.parametrize("extra, expected", [
    (["--aa", "evil-policy"], ["--aa 'evil-policy' is not a timm augmentation policy"]),
    (["--aa", "rand-m9-n999999999"], ["asks for 999999999 augmentations per image; at most 16"]),
    (["--reprob", "2"], ["--reprob is a probability in [0, 1], got 2.0"]),
    (["--init", AUM], ["(Audio Mamba (AuM)) takes spectrograms", "gives images"]),
])
def test_train_refuses_bad_settings_before_writing(extra, expected, images, tmp_path, capsys):
    out = tmp_path / "run"
    refused(["train", "--data", images, "--epochs", "1", "--threads", "1", "--out", str(out), *extra], capsys,
            *expected)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_speed_checks_the_device_as_eval_does(capsys):
    refused(["speed", "--model", "vim_pico", "--device", "cuda:7"], capsys, "--device cuda:7")
