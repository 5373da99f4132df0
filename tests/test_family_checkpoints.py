"""Loading VideoMamba and Audio Mamba files: official layouts, inference of the architecture from the
tensors, position-table interpolation, our safetensors round trip, and files of the wrong family."""
import argparse

import pytest
import torch

import mambamerge
from mambamerge import CheckpointError, load_checkpoint, save_checkpoint
from mambamerge.models.videomamba import interpolate_temporal
from conftest import perturb_


def video_model(**overrides):
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depth=2, num_frames=4, tubelet=2, img_size=32, patch_size=16, d_state=4,
                  num_classes=7)
    return perturb_(mambamerge.create_model("videomamba_tiny", **{**kwargs, **overrides})).eval()


def audio_model(variant="Bi-Bi", **overrides):
    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depth=2, spec_size=(128, 64), d_state=4, num_classes=5, variant=variant)
    return perturb_(mambamerge.create_model("aum_tiny", **{**kwargs, **overrides})).eval()


def same_logits(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_official_videomamba_file_loads_with_its_architecture(tmp_path):
    model = video_model()
    path = tmp_path / "videomamba_t16_k400_f4.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(num_frames=4)}, path)
    loaded = load_checkpoint(path)
    cfg = loaded.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.d_state, cfg.tubelet, cfg.num_frames, cfg.img_size, cfg.patch_size,
            cfg.num_classes) == (16, 2, 4, 2, 4, (32, 32), (16, 16), 7)
    same_logits(model, loaded, torch.randn(2, 3, 4, 32, 32))


def test_videomamba_runs_at_another_clip_length_and_frame_size(tmp_path):
    model = video_model()
    path = tmp_path / "v.pth"
    torch.save({"model": model.state_dict()}, path)
    longer = load_checkpoint(path, num_frames=8, img_size=48)
    assert longer.cfg.grid_size == (4, 3, 3) and longer.layout.length == 1 + 4 * 9
    old, new = model.temporal_pos_embedding.detach(), longer.temporal_pos_embedding.detach()
    a, b = old[0, 0], old[0, 1]
    torch.testing.assert_close(new[0], torch.stack((a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b)))
    assert torch.equal(longer.pos_embed[:, 0], model.pos_embed[:, 0])  # the class entry is kept
    with torch.no_grad():
        assert longer(torch.randn(1, 3, 8, 48, 48)).shape == (1, 7)
    same_logits(load_checkpoint(path, num_frames=4, img_size=32), model, torch.randn(1, 3, 4, 32, 32))


def test_spatial_interpolation_keeps_a_constant_table_constant():
    table = torch.full((1, 5, 3), 0.25)
    assert torch.equal(interpolate_temporal(table, 9), torch.full((1, 9, 3), 0.25))
    from mambamerge.models.videomamba import interpolate_spatial
    out = interpolate_spatial(torch.full((1, 1 + 4, 3), 0.5), (2, 2), (3, 5))
    torch.testing.assert_close(out, torch.full((1, 16, 3), 0.5))


@pytest.mark.parametrize("variant", ["Bi-Bi", "Fo-Bi", "Fo-Fo"])
def test_official_aum_file_loads_with_its_variant(tmp_path, variant):
    model = audio_model(variant)
    path = tmp_path / "aum.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # as saved under DataParallel
    loaded = load_checkpoint(path)
    assert (loaded.cfg.variant, loaded.cfg.spec_size, loaded.cfg.embed_dim, loaded.cfg.num_classes) == (
        variant, (128, 64), 16, 5)
    same_logits(model, loaded, torch.randn(2, 64, 128))


def test_aum_spectrogram_size_is_an_argument_where_the_tensors_cannot_tell(tmp_path):
    model = audio_model(spec_size=(40, 48), stride=(8, 16))  # 4 x 3 patches: not 8 (128 mel bins) x T'
    path = tmp_path / "aum.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"12 patches.*pass train_spec_size=\(F, T\) and stride="):
        load_checkpoint(path)
    loaded = load_checkpoint(path, train_spec_size=(40, 48), stride=(8, 16))
    same_logits(model, loaded, torch.randn(1, 48, 40))
    longer = load_checkpoint(path, train_spec_size=(40, 48), stride=(8, 16), spec_size=(40, 128))
    assert longer.layout.grid == (4, 8) and longer.input_shape == (128, 40)
    with torch.no_grad():
        assert longer(torch.randn(1, 128, 40)).shape == (1, 5)


@pytest.mark.parametrize("make,x", [(video_model, (2, 3, 4, 32, 32)), (audio_model, (2, 64, 128))])
def test_safetensors_round_trip_keeps_family_and_config(tmp_path, make, x):
    model = make()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    same_logits(model, loaded, torch.randn(*x))


def test_a_checkpoint_of_another_family_is_a_clear_error(tmp_path):
    vim_path = save_checkpoint(mambamerge.create_model("vim_pico"), tmp_path / "vim.safetensors")
    video_path = tmp_path / "video.pth"
    torch.save({"model": video_model().state_dict()}, video_path)
    with pytest.raises(CheckpointError,
                       match="is a Vision Mamba \\(Vim\\) checkpoint, but family='videomamba' \\(VideoMamba\\) was"):
        load_checkpoint(vim_path, family="videomamba")
    with pytest.raises(CheckpointError,
                       match="is a VideoMamba checkpoint, but family='aum'.*load this one with family='videomamba'"):
        load_checkpoint(video_path, family="aum")
    assert load_checkpoint(video_path, family="videomamba").family == "videomamba"
    with pytest.raises(CheckpointError, match="unknown option.*spec_size.*VideoMamba takes img_size"):
        load_checkpoint(video_path, spec_size=(128, 64))


def test_unsupported_aum_variants_are_named(tmp_path):
    sd = audio_model().state_dict()
    sd["cls_token_head"] = sd.pop("cls_token")
    torch.save(sd, tmp_path / "double.pth")
    with pytest.raises(CheckpointError, match="two class tokens or RoPE"):
        load_checkpoint(tmp_path / "double.pth")


@pytest.mark.parametrize("damage,message", [
    (lambda sd: sd.update({"layers.7.norm.weight": sd["layers.0.norm.weight"]}), "numbered from 0 to 7"),
    (lambda sd: sd.update({"temporal_pos_embedding": torch.zeros(2, 16)}), "temporal_pos_embedding has shape"),
    (lambda sd: sd.update({"head.weight": torch.zeros(7)}), "head.weight has shape"),
    (lambda sd: sd.update({"layers.0.mixer.D_b": torch.zeros(5)}), "mis-shaped 1: layers.0.mixer.D_b"),
])
def test_damaged_videomamba_files_are_named_before_any_model_is_built(tmp_path, damage, message):
    sd = video_model().state_dict()
    damage(sd)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.pth")


@pytest.mark.parametrize("options,message", [
    (dict(num_frames=10**9), r"num_frames= is 1000000000: expected a whole number from 1 to 4096"),
    (dict(num_frames=3), "num_frames=3 is not a multiple of the tubelet size 2"),
    (dict(img_size=(32, -1)), "img_size= is"),
])
def test_bad_video_options_are_named(tmp_path, options, message):
    torch.save({"model": video_model().state_dict()}, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "v.pth", **options)


def test_bad_audio_options_are_named(tmp_path):
    torch.save(audio_model().state_dict(), tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"spec_size= is \(128, 0\)"):
        load_checkpoint(tmp_path / "a.pth", spec_size=(128, 0))
