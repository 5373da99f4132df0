"""`mambamerge eval` / `train` on Audio Mamba and VideoMamba checkpoints with the audio and video data
specs, and the errors for data of the wrong kind or shape."""
import numpy as np
import pytest
import soundfile
import torch

import mambamerge
from mambamerge.cli.main import main
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy


def tiny_aum(frames=32):
    torch.manual_seed(0)
    return mambamerge.create_model("aum_nano", embed_dim=16, depth=3, spec_size=(128, frames))


def tiny_videomamba():
    torch.manual_seed(0)
    return mambamerge.create_model("videomamba_nano", embed_dim=16, depth=3)


@pytest.mark.parametrize("make, data", [(tiny_aum, "fsdd"), (tiny_videomamba, "moving-fashion-mnist")])
def test_eval_audio_and_video_checkpoints(tmp_path, capsys, make, data):
    model = make()
    path = mambamerge.save_checkpoint(model, tmp_path / "model.safetensors")
    argv = ["eval", "--checkpoint", str(path), "--data", data, "--limit", "12", "--method", "tome",
            "--reduction", "0.4", "--runs", "1", "--throughput-batch", "2", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    mambamerge.patch(model, "tome", reduction=0.4)
    expected = accuracy(model, load_dataset(data, "test", limit=12, input_shape=model.input_shape,
                                             input_kind=model.input_kind))
    assert f"top-1       {expected:.2%}" in out and f"{model.family} model" in out
    assert f"reduction   {mambamerge.reduction_summary(model)['average_reduction']:.1%}" in out
    kind = "spectrograms" if data == "fsdd" else "clips"
    assert f"{kind}/s; dense" in out and f"12 {kind}" in out and "image" not in out  # the family's inputs, named


def test_data_of_another_kind_is_a_clear_error(tmp_path, capsys):
    path = mambamerge.save_checkpoint(tiny_aum(), tmp_path / "aum.safetensors")
    assert main(["eval", "--checkpoint", str(path), "--data", "fashion-mnist", "--limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "the model (aum) takes spectrograms of 32 frames x 128 mel bins but fashion-mnist test gives 1x56x56 images" in err
    video = mambamerge.create_model("videomamba_nano", embed_dim=16, depth=3, num_classes=10)
    path = mambamerge.save_checkpoint(video, tmp_path / "video.safetensors")
    assert main(["eval", "--checkpoint", str(path), "--data", "fsdd", "--limit", "4"]) == 2
    assert "the model (videomamba) takes clips of 8 frames of 1x32x32 but fsdd test gives spectrograms" in capsys.readouterr().err


def test_audio_folder_of_other_rates_and_channels(tmp_path, capsys):
    rate = 44100
    t = np.arange(rate // 2) / rate
    for label, freq in (("high", 2000), ("low", 300)):
        (tmp_path / "clips" / label).mkdir(parents=True)
        stereo = np.stack([np.sin(2 * np.pi * freq * t), np.sin(2 * np.pi * freq * t + 1)], 1) * 0.3
        soundfile.write(tmp_path / "clips" / label / "a.wav", stereo.astype(np.float32), rate)
    torch.manual_seed(0)
    model = mambamerge.create_model("aum_nano", embed_dim=16, depth=3, spec_size=(128, 32), num_classes=2)
    path = mambamerge.save_checkpoint(model, tmp_path / "aum.safetensors")
    assert main(["eval", "--checkpoint", str(path), "--data", str(tmp_path / "clips"), "--runs", "1",
                 "--throughput-batch", "2"]) == 0
    data = load_dataset(str(tmp_path / "clips"), input_shape=(32, 128), input_kind="spectrograms")
    assert data.info.classes == ["high", "low"] and data.features.shape == (2, 32, 128)
    assert f"top-1       {accuracy(model.eval(), data):.2%}" in capsys.readouterr().out
    path = mambamerge.save_checkpoint(tiny_aum(), tmp_path / "aum10.safetensors")
    assert main(["eval", "--checkpoint", str(path), "--data", str(tmp_path / "clips")]) == 2
    assert "the model has 10 classes but" in capsys.readouterr().err


def test_video_clip_with_too_few_frames_is_a_clear_error(tmp_path, capsys):
    from PIL import Image

    for label in ("a", "b"):
        clip = tmp_path / "clips" / label / "clip0"
        clip.mkdir(parents=True)
        for t in range(3):
            Image.fromarray(np.full((32, 32), 40 * t, dtype=np.uint8)).save(clip / f"{t}.png")
    model = mambamerge.create_model("videomamba_nano", embed_dim=16, depth=3, num_classes=2)
    path = mambamerge.save_checkpoint(model, tmp_path / "video.safetensors")
    assert main(["eval", "--checkpoint", str(path), "--data", str(tmp_path / "clips")]) == 2
    assert "clip0 has 3 frames but the model takes 8; use clips of at least 8 frames" in capsys.readouterr().err
