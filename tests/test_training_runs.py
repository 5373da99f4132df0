"""Training runs as users launch them (issue 12): killed and resumed, refused resumes, torchrun with two
processes, small grey and RGB folders. Runs go through real processes and real signals; the models
are vim_pico-sized at 16x16 so each run takes seconds."""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mambamerge
from mambamerge.cli.main import main
from mambamerge.data.loading import holdout_split
from mambamerge.evaluate import accuracy

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vim_pico", "--threads", "1", "--workers", "0", "--batch-size", "4", "--eval-batch-size", "4"]


def folder(root: Path, size=16, mode="RGB", classes=("ant", "bee"), per_class=(7, 3)):
    """A small data set in the ImageNet layout: noise images whose brightness depends on the class."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                shape = (size, size) if mode == "L" else (size, size, 3)
                pixels = np.clip(rng.normal(60 + 120 * c, 40, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode).save(root / split / name / f"{i}.png")
    return root


def child_env():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def files(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def weights(path: Path) -> dict:
    return load_file(str(path))


# A training process that SIGKILLs itself right after its KILL_AT-th optimiser step: the kill lands at a
# chosen point, mid-epoch and between two saves, in a real process with no chance to clean up. (A timer
# from outside would land anywhere on a loaded machine, even after the run ended, and the test would
# prove nothing reliably.)
KILLER = """
import os, signal, sys
import torch
from mambamerge.cli.main import main

kill_at, done = int(os.environ["KILL_AT"]), [0]
step = torch.optim.AdamW.step

def step_then_maybe_die(self, *args, **kwargs):
    result = step(self, *args, **kwargs)
    done[0] += 1
    if done[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

torch.optim.AdamW.step = step_then_maybe_die
sys.exit(main(sys.argv[1:]))
"""


def test_killed_mid_epoch_and_resumed_reaches_the_uninterrupted_weights(tmp_path):
    data = folder(tmp_path / "data")
    # 14 images, 2 held out: 12 -> 3 steps an epoch; saves at steps 2, 3 (epoch end), 4, 6; mixup, cutmix,
    # RandAugment and random erasing on (the folder recipe), so every random stream must be reproduced
    argv = ["train", "--data", str(data), *TINY, "--img-size", "16", "--epochs", "2", "--val-split", "2",
            "--save-every", "2", "--lr", "0.01", "--warmup-epochs", "0.5"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script), *argv, "--out", str(killed)],
                          env=dict(child_env(), KILL_AT="5"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = torch.load(killed / "last.pt", weights_only=True)
    assert (saved["state"]["epoch"], saved["state"]["step"]) == (1, 4)  # mid-epoch 2, step 5 lost

    assert main(argv + ["--out", str(killed), "--resume"]) == 0
    for name in ("model_last.safetensors", "model.safetensors"):
        whole, resumed = weights(tmp_path / "whole" / name), weights(killed / name)
        assert whole.keys() == resumed.keys()
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), (name, key)
    history = [json.loads((d / "history.json").read_text()) for d in (tmp_path / "whole", killed)]
    assert [h["train_loss"] for h in history[0]] == [h["train_loss"] for h in history[1]]
    # the uninterrupted run (this process) and the killed one (a fresh process) were both seeded: the
    # same seed gives the same weights whatever ran before
    assert json.loads((killed / "summary.json").read_text())["test_accuracy"] is not None


def test_resume_of_another_run_a_corrupt_state_or_a_rerun_is_refused_and_touches_nothing(tmp_path, capsys):
    data = folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), *TINY, "--img-size", "32", "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    before = files(out)
    for change, named in ((["--limit", "8"], "train_images"), (["--method", "tome", "--reduction", "0.2"], "method"),
                          (["--val-split", "0.3"], "val_split"), (["--teacher", str(out / "model.safetensors")],
                                                                  "teacher"),
                          (["--img-size", "24"], "img_size"), (["--lr", "0.5"], "lr")):
        assert main(argv + ["--resume", *change]) == 2, change
        err = capsys.readouterr().err
        assert named in err and ("another run" in err or "other settings" in err) and "Traceback" not in err
        assert files(out) == before, change
    other = folder(tmp_path / "other", classes=("cat", "dog"))
    assert main(argv[:2] + [str(other)] + argv[3:] + ["--resume"]) == 2
    assert "classes" in capsys.readouterr().err and files(out) == before

    state = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(state[: len(state) // 2])
    before = files(out)
    assert main(argv + ["--resume"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert files(out) == before

    # a rerun into the folder without --resume is refused too, unless --overwrite replaces the run
    for again in (argv, argv + ["--lr", "0.5"], argv + ["--resume", "--overwrite"]):
        assert main(again) == 2
        err = capsys.readouterr().err
        assert "--resume" in err and "--overwrite" in err and "Traceback" not in err, again
        assert files(out) == before
    (out / "notes.txt").write_text("mine")
    assert main(argv + ["--lr", "0.5", "--overwrite", "--epochs", "2"]) == 0
    assert json.loads((out / "command.json").read_text())["train"]["lr"] == 0.5
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    (tmp_path / "empty").mkdir()  # an empty folder holds no run: training into it needs neither flag
    assert main(argv[:-1] + [str(tmp_path / "empty")]) == 0


# Every process saves the weights it ends with and the (correct, total) counts of every evaluation.
SPY = """
import os, sys
import torch
import mambamerge.train as training
import mambamerge.evaluate as evaluate
from mambamerge.cli.main import main

out, rank, sums = sys.argv[1], os.environ["RANK"], []
train, sum_all = training.train, evaluate.sum_all

def train_and_keep(model, *args, **kwargs):
    result = train(model, *args, **kwargs)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    return result

def sum_and_keep(values, device):
    total = sum_all(values, device)
    sums.append(total)
    return total

training.train, evaluate.sum_all = train_and_keep, sum_and_keep  # what the CLI imports when it runs
code = main(sys.argv[3:])
torch.save(sums, f"{out}/sums{rank}-{sys.argv[2]}.pt")
sys.exit(code)
"""


def test_train_and_eval_in_two_processes_under_torchrun(tmp_path):
    data = folder(tmp_path / "data", per_class=(8, 3))  # 16 train images: 5 held out (odd: 3 + 2 per process)
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "spy.py"
    script.write_text(SPY)
    argv = ["train", "--data", str(data), *TINY, "--img-size", "16", "--epochs", "2", "--val-split", "5",
            "--out", str(out), "--device", "cpu"]
    evaluate = ["eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(data / "val"), "--runs", "1",
                "--batch", "4", "--threads", "1", "--workers", "0", "--device", "cpu"]
    runs = {}
    for tag, command in (("train", argv), ("eval", evaluate)):  # two launches, as a user runs them
        runs[tag] = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    "2", str(script), str(out), tag, *command], env=child_env(), capture_output=True,
                                   text=True, timeout=600)
        assert runs[tag].returncode == 0, runs[tag].stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    saved = weights(out / "model_last.safetensors")
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)

    # every validation (5) and test (6) image counted once, the same sums on both processes: by train
    # (2 epochs, then the test split), then by eval on the test split
    sums = [[total for tag in ("train", "eval") for total in torch.load(out / f"sums{r}-{tag}.pt", weights_only=True)]
            for r in range(2)]
    assert sums[0] == sums[1]
    evaluations = sums[0]
    assert [total for _, total in evaluations] == [5, 5, 6, 6]
    test_top1 = json.loads((out / "summary.json").read_text())["test_accuracy"]
    assert test_top1 == evaluations[2][0] / 6 == evaluations[3][0] / 6
    assert f"top-1       {test_top1:.2%}" in runs["eval"].stdout and runs["eval"].stdout.count("top-1       ") == 1
    # and the reported accuracy is the single-process one of the same weights on the same images
    model = mambamerge.load_checkpoint(out / "model_last.safetensors")
    plain = mambamerge.data.folders.image_folder(data / "train", img_size=16, in_chans=3)
    val = mambamerge.data.loading.subset(plain, holdout_split(len(plain), 5)[1])
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["val_accuracy"] == accuracy(model, val, 4) == evaluations[1][0] / 5
    assert "epoch 2/2" in runs["train"].stdout and runs["train"].stdout.count("epoch 2/2") == 1  # one process reports


def test_under_torchrun_every_process_names_the_unreadable_images_of_all_shares(tmp_path):
    """Each process decodes its own share: the reports list the unreadable images of both shares."""
    data = folder(tmp_path / "data", per_class=(6, 3))
    bad = [data / "train" / "ant" / "0.png", data / "train" / "bee" / "5.png", data / "val" / "ant" / "0.png",
           data / "val" / "bee" / "2.png"]  # in val, images 0 and 5 of 6: one in each process's share
    for path in bad:
        path.write_bytes(b"not an image")
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "mambamerge"]
    trained = subprocess.run(launch + ["train", "--data", str(data), *TINY, "--img-size", "16", "--epochs", "1",
                                       "--val-split", "2", "--out", str(out), "--device", "cpu"],
                             env=child_env(), capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    skipped = json.loads((out / "summary.json").read_text())["unreadable_images"]
    assert sorted(Path(p.split(" (")[0]) for p in skipped) == sorted(bad)
    evaluated = subprocess.run(launch + ["eval", "--checkpoint", str(out / "model.safetensors"), "--data",
                                         str(data / "val"), "--runs", "1", "--batch", "2", "--threads", "1",
                                         "--workers", "0", "--device", "cpu"],
                               env=child_env(), capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "skipped     2 unreadable files" in evaluated.stdout
    assert str(bad[2]) in evaluated.stderr and str(bad[3]) in evaluated.stderr


@pytest.mark.parametrize("mode, size, chans", [("L", 28, 1), ("RGB", 64, 3)])
def test_a_users_own_folder_trains_at_its_size_and_channels(tmp_path, capsys, mode, size, chans):
    data = folder(tmp_path / "data", size=size, mode=mode, per_class=(4, 2))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), *TINY, "--model", "vim_nano", "--epochs", "1", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "\x1b[" not in log and "images/s" in log and f"{data / 'val'} top-1" in log and "test top-1" not in log
    model = mambamerge.load_checkpoint(out / "model.safetensors")
    assert (model.cfg.in_chans, model.cfg.img_size, model.classes) == (chans, (size, size), ["ant", "bee"])
    fashion = ["eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(data / "val"), "--runs", "1"]
    assert main(fashion) == 0
    renamed = folder(tmp_path / "renamed", size=size, mode=mode, classes=("cat", "dog"), per_class=(1, 1))
    assert main(fashion[:4] + [str(renamed / "val")] + fashion[5:]) == 2
    assert "trained on the classes ['ant', 'bee']" in capsys.readouterr().err


def test_bf16_autocast_trains_and_evaluates_on_cpu_and_fp16_asks_for_a_gpu(tmp_path):
    from mambamerge.data import load_dataset
    from mambamerge.train import TrainConfig, train

    data = load_dataset("fashion-mnist", "test", img_size=32, limit=16)
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_pico", in_chans=1)
    dense = accuracy(model, data, 16)
    assert abs(accuracy(model, data, 16, amp="bf16") - dense) <= 2 / 16  # bf16 rounding flips at most a couple
    cfg = TrainConfig(epochs=1, batch_size=8, eval_batch_size=16, amp="bf16")
    result = train(model, data, data, tmp_path / "bf16", cfg, log=lambda *_: None)
    assert np.isfinite(result["history"][0]["train_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
            train(model, data, data, tmp_path / "fp16", TrainConfig(epochs=1, amp="fp16"), log=lambda *_: None)
        assert not (tmp_path / "fp16").exists()


@pytest.mark.parametrize("command", ["eval", "sweep", "demo"])
def test_every_model_command_takes_a_device_and_names_a_bad_one(tmp_path, capsys, command):
    argv = {"eval": ["--checkpoint", "model.safetensors", "--data", "fashion-mnist"],
            "sweep": ["--checkpoint", "model.safetensors", "--data", "fashion-mnist", "--out", str(tmp_path / "s")],
            "demo": ["--out", str(tmp_path / "d")]}[command]
    assert main([command, *argv, "--device", "banana"]) == 2
    assert "--device 'banana' is not a device name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([command, *argv, "--device", "cuda"]) == 2
        assert "no usable CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_distillation_loss_against_a_written_out_kl():
    from mambamerge.train import distillation_loss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen), 3 * torch.randn(5, 7, generator=gen)
    for t in (1.0, 2.5):
        expected = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist()):
            zs = sum(np.exp(v / t) for v in s_row)
            zt = sum(np.exp(v / t) for v in t_row)
            for sv, tv in zip(s_row, t_row):
                p, q = np.exp(tv / t) / zt, np.exp(sv / t) / zs
                expected += p * np.log(p / q)
        assert distillation_loss(student, teacher, t).item() == pytest.approx(t * t * expected / 5, rel=1e-5)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_validation_slice_and_epoch_shares():
    from mambamerge.data.loading import epoch_batches

    train, val = holdout_split(1000, 0.1)
    assert len(val) == 100 and not set(train) & set(val) and sorted(train + val) == list(range(1000))
    assert holdout_split(1000, 0.1) == (train, val) and holdout_split(1000, 100) == (train, val)
    assert val != list(range(900, 1000))  # a random slice: a folder sorted by class keeps every class in train
    with pytest.raises(ValueError, match="--val-split 1.5"):
        holdout_split(10, 1.5)
    # 10 images, 3 processes, batches of 2: each process takes 4 (two repeated), all 10 are seen each epoch
    shares = [epoch_batches(10, 2, seed=1, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert [[len(b) for b in s] for s in shares] == [[2, 2]] * 3
    seen = torch.cat([torch.cat(s) for s in shares]).tolist()
    assert sorted(set(seen)) == list(range(10)) and len(seen) == 12
    # the order depends on (seed, epoch) only
    assert torch.equal(torch.cat(epoch_batches(10, 2, 1, 0)), torch.cat(epoch_batches(10, 3, 1, 0)))
    assert not torch.equal(torch.cat(epoch_batches(10, 2, 1, 0)), torch.cat(epoch_batches(10, 2, 1, 1)))
