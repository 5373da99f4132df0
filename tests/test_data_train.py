import gzip

import numpy as np
import pytest
import torch
from PIL import Image

import mambamerge
from mambamerge.data import batches, load_dataset, read_idx
from mambamerge.train import TrainConfig, lr_at, param_groups, train


def write_idx(path, array):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_round_trip_and_damage(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", images)
    assert torch.equal(read_idx(tmp_path / "a.gz"), torch.from_numpy(images))
    ints = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    write_idx(tmp_path / "b", ints)
    assert torch.equal(read_idx(tmp_path / "b"), torch.from_numpy(ints))
    raw = (tmp_path / "b").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "cut")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_shipped_fashion_mnist_test_split():
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 10000 and ds.info.num_classes == 10 and ds.info.img_size == (56, 56)
    counts = torch.bincount(ds.labels, minlength=10)
    assert (counts == 1000).all()
    x, y = next(batches(ds, 32))
    assert x.shape == (32, 1, 56, 56) and abs(x.mean().item()) < 0.5 and y.dtype == torch.long


def test_a_slice_of_a_split_starts_where_asked(tmp_path):
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([5, 4, 3, 2, 1, 0], dtype=np.uint8))
    spec = f"mnist:{tmp_path}"
    tail = load_dataset(spec, "train", img_size=4, start=4)
    assert tail.labels.tolist() == [1, 0] and torch.equal(tail.images, torch.from_numpy(images[4:]))
    # from image 1 on, labels 4 3 2 1 0: a limit of 2 takes the first of classes 0 and 1
    assert load_dataset(spec, "train", img_size=4, start=1, limit=2).labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"start must be in \[0, 6\) for the 6 images of mnist train, got 6"):
        load_dataset(spec, "train", start=6)


def test_missing_idx_data_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no mnist train split .* in {tmp_path}"):
        load_dataset(f"mnist:{tmp_path}", "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_dataset("fashion-mnist", "val")


def test_image_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        load_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(str(tmp_path / "noimg"))
    for cls in ("ant", "bee"):
        (tmp_path / "ok" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 50, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "ok" / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path / "ok"), img_size=32)
    assert ds.info.classes == ["ant", "bee"] and len(ds) == 4
    x, y = next(batches(ds, 4))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]


def tiny():
    torch.manual_seed(0)
    return mambamerge.create_model("vim_pico", in_chans=1, img_size=56, patch_size=8, stride=8, num_classes=10)


def test_training_learns_and_resumes_exactly(tmp_path):
    train_set = load_dataset("fashion-mnist", "test", limit=96, augment=True)
    val_set = load_dataset("fashion-mnist", "test", limit=64)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, warmup_epochs=0.3, eval_batch_size=64)
    full = tiny()
    result = train(full, train_set, val_set, tmp_path / "full", cfg, log=lambda *_: None)
    assert result["epochs"] == 2 and result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    assert (tmp_path / "full" / "model.safetensors").is_file()

    def interrupt(*_):  # Ctrl-C right after the first epoch was saved and reported
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny(), train_set, val_set, tmp_path / "split", cfg, log=interrupt)
    resumed = tiny()
    train(resumed, train_set, val_set, tmp_path / "split", cfg, resume=True, log=lambda *_: None)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def quiet_train(*args, **kwargs):
    """train() with its small-validation-set warning expected (these sets are kept small to run fast)."""
    with pytest.warns(UserWarning, match="held-out images"):
        return train(*args, log=kwargs.pop("log", lambda *_: None), **kwargs)


def test_resume_with_more_epochs_extends_the_schedule_as_documented(tmp_path):
    train_set = load_dataset("fashion-mnist", "test", limit=96, augment=True)
    val_set = load_dataset("fashion-mnist", "test", start=96, limit=64)
    two, four = (TrainConfig(epochs=n, batch_size=32, lr=3e-3, warmup_epochs=0.3, eval_batch_size=64) for n in (2, 4))
    steps = 3  # 96 images in batches of 32
    first = quiet_train(tiny(), train_set, val_set, tmp_path / "a", two)
    extended = tiny()
    result = quiet_train(extended, train_set, val_set, tmp_path / "a", four, resume=True)
    assert result["epochs"] == 4 and result["extensions"] == [{"step": 2 * steps, "epochs_before": 2, "epochs": 4}]
    history = result["history"]
    for kept, now in zip(first["history"], history[:2]):  # the epochs done keep what they had
        assert {k: now[k] for k in ("train_loss", "val_accuracy", "lr")} == \
               {k: kept[k] for k in ("train_loss", "val_accuracy", "lr")}
    warmup = int(0.3 * steps)
    assert history[1]["lr"] == lr_at(2 * steps - 1, 2 * steps, warmup, two)  # the 2-epoch cosine's last rate
    for epoch in (3, 4):  # from the resume on: the 4-epoch schedule
        assert history[epoch - 1]["lr"] == lr_at(epoch * steps - 1, 4 * steps, warmup, four)
    assert history[2]["lr"] > history[1]["lr"]

    # an extension interrupted (after epoch 3) and resumed reaches the same weights as an uninterrupted one
    quiet_train(tiny(), train_set, val_set, tmp_path / "b", two)

    def interrupt(line):
        if line.startswith("epoch 3/4"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quiet_train(tiny(), train_set, val_set, tmp_path / "b", four, resume=True, log=interrupt)
    resumed = tiny()
    again = quiet_train(resumed, train_set, val_set, tmp_path / "b", four, resume=True)
    assert again["extensions"] == result["extensions"]
    for (name, a), b in zip(extended.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="cannot shorten"):
        train(tiny(), train_set, val_set, tmp_path / "b", two, resume=True)


def test_selecting_on_too_few_held_out_images_warns(tmp_path, recwarn):
    data = load_dataset("fashion-mnist", "test", limit=200)
    cfg = TrainConfig(epochs=1, batch_size=64, eval_batch_size=200)
    train(tiny(), data, data, tmp_path / "enough", cfg, log=lambda *_: None)
    assert not [w for w in recwarn if "held-out" in str(w.message)]
    few = load_dataset("fashion-mnist", "test", limit=64)
    with pytest.warns(UserWarning, match="selected on 64 held-out images.*--val-split"):
        train(tiny(), data, few, tmp_path / "few", cfg, log=lambda *_: None)


def test_resume_with_other_settings_is_refused(tmp_path):
    data = load_dataset("fashion-mnist", "test", limit=32)
    cfg = TrainConfig(epochs=1, batch_size=32, eval_batch_size=32)
    train(tiny(), data, data, tmp_path, cfg, log=lambda *_: None)
    with pytest.raises(ValueError, match="other settings"):
        train(tiny(), data, data, tmp_path, TrainConfig(epochs=1, batch_size=16, eval_batch_size=32), resume=True)


def test_no_weight_decay_on_ssm_and_embedding_parameters():
    model = tiny()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.0.mixer.D_b", "norm_f.weight",
            "head.bias"} <= skipped
    assert "layers.0.mixer.in_proj.weight" in {names[id(p)] for p in decay["params"]}


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, 100, 10, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3) and lrs[-1] < 2e-5
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_train_command_on_an_image_folder(tmp_path, capsys):
    from mambamerge.cli.main import main

    for split in ("train", "val"):
        for cls in ("ant", "bee", "cow"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = np.full((36, 36, 3), 40 * i + 20 * len(cls), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / cls / f"{i}.png")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "data"), "--model", "vim_pico", "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--eval-batch-size", "4"]
    assert main(argv) == 0
    assert "best val top-1" in capsys.readouterr().out
    model = mambamerge.load_checkpoint(out / "model.safetensors")
    assert model.cfg.num_classes == 3 and model.cfg.img_size == (36, 36)  # the images' own size
    assert model.classes == ["ant", "bee", "cow"]
    assert main(["train", "--data", str(tmp_path / "data" / "train"), "--model", "vim_pico",
                 "--out", str(tmp_path / "other")]) == 2
    assert "needs train/ and val/ sub-folders" in capsys.readouterr().err


def test_train_command_names_a_bad_device(tmp_path, capsys):
    from mambamerge.cli.main import main

    argv = ["train", "--data", "fashion-mnist", "--model", "vim_pico", "--out", str(tmp_path / "run"), "--device"]
    assert main(argv + ["banana"]) == 2
    assert "--device 'banana' is not a device name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(argv + ["cuda"]) == 2
        assert "no usable CUDA GPU; use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work
