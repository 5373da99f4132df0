import argparse
import os

import pytest
import torch
from safetensors.torch import save_file

import mambamerge
from mambamerge import CheckpointError, load_checkpoint, save_checkpoint
from mambamerge.models import interpolate_pos_embed
from conftest import perturb_


def official_file(path, model, ema_model=None, input_size=224, name="vim_tiny_patch16_224_bimambav2"):
    """A file laid out as the official training script writes it."""
    args = argparse.Namespace(model=name, input_size=input_size, batch_size=128, lr=5e-4)
    torch.save({"model": model.state_dict(), "model_ema": (ema_model or model).state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
                "epoch": 299, "scaler": {"scale": 65536.0}, "args": args}, path)
    return path


@pytest.fixture
def odd_model():
    torch.manual_seed(3)
    return perturb_(mambamerge.create_model("vim_pico", embed_dim=48, depth=3, d_state=6, img_size=40, patch_size=8,
                                            stride=4, num_classes=7, expand=2)).eval()


def assert_same_model(a, b, img):
    assert a.cfg == b.cfg
    x = torch.randn(2, a.cfg.in_chans, *img)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_official_vim_tiny_file_loads_strict_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_tiny")).eval()
    loaded = load_checkpoint(official_file(tmp_path / "vim_t_midclstok_76p1acc.pth", model))
    assert not loaded.training
    assert_same_model(model, loaded, (224, 224))


@pytest.mark.parametrize("fmt", ["official", "plain", "safetensors", "safetensors_no_meta", "ddp"])
def test_architecture_is_inferred_from_the_tensors(tmp_path, odd_model, fmt):
    sd = odd_model.state_dict()
    path = tmp_path / f"ckpt_{fmt}.{'safetensors' if 'safetensors' in fmt else 'pth'}"
    if fmt == "official":
        official_file(path, odd_model, input_size=40)
    elif fmt == "plain":
        torch.save(sd, path)
    elif fmt == "ddp":
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif fmt == "safetensors":
        save_checkpoint(odd_model, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_checkpoint(path, img_size=40)
    assert_same_model(odd_model, loaded, (40, 40))


def test_ema_weights_are_taken_on_request(tmp_path, odd_model):
    ema = perturb_(mambamerge.create_model("vim_pico", embed_dim=48, depth=3, d_state=6, img_size=40, patch_size=8,
                                           stride=4, num_classes=7), seed=9).eval()
    path = official_file(tmp_path / "both.pth", odd_model, ema_model=ema, input_size=40)
    assert_same_model(ema, load_checkpoint(path, img_size=40, ema=True), (40, 40))
    assert_same_model(odd_model, load_checkpoint(path, img_size=40), (40, 40))
    torch.save({"model": odd_model.state_dict()}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="no 'model_ema'"):
        load_checkpoint(tmp_path / "no_ema.pth", img_size=40, ema=True)


def test_stride8_plus_variant_is_recognised(tmp_path):
    model = mambamerge.create_model("vim_tiny_plus", depth=1)
    torch.save(model.state_dict(), tmp_path / "plus.pth")
    cfg = load_checkpoint(tmp_path / "plus.pth").cfg
    assert cfg.stride == (8, 8) and cfg.patch_size == (16, 16) and cfg.num_patches == 729
    official_file(tmp_path / "plus_official.pth", model, name="vim_tiny_patch16_stride8_224_bimambav2")
    assert load_checkpoint(tmp_path / "plus_official.pth", img_size=448).cfg.grid_size == (55, 55)
    with pytest.raises(CheckpointError, match="cannot infer the patch stride.*train_img_size"):
        load_checkpoint(tmp_path / "plus.pth", img_size=300)
    assert load_checkpoint(tmp_path / "plus.pth", img_size=300, stride=8).cfg.grid_size == (36, 36)


def test_loading_at_another_size_interpolates_around_the_middle_class_token(tmp_path):
    model = mambamerge.create_model("vim_tiny", depth=1).eval()
    grid = torch.stack(torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij"), -1).reshape(196, 2)
    pos = torch.zeros(1, 197, 192)
    patches = torch.zeros(196, 192)
    patches[:, 0], patches[:, 1] = grid[:, 0], grid[:, 1]
    pos[0, :98], pos[0, 99:] = patches[:98], patches[98:]
    pos[0, 98, 2] = 123.0  # the class slot, distinct from every patch slot
    with torch.no_grad():
        model.pos_embed.copy_(pos)
    path = official_file(tmp_path / "t.pth", model)
    big = load_checkpoint(path, img_size=448)
    new = big.pos_embed.detach()[0]
    assert new.shape == (785, 192) and big.cls_index == 392
    assert new[392, 2] == 123.0 and (torch.cat((new[:392, 2], new[393:, 2])) == 0).all()
    rows = torch.cat((new[:392], new[393:]))[:, 0].reshape(28, 28)
    cols = torch.cat((new[:392], new[393:]))[:, 1].reshape(28, 28)
    assert (rows.diff(dim=0) > 0).all() and (rows.diff(dim=1).abs() < 1e-4).all()
    assert (cols.diff(dim=1) > 0).all() and (cols.diff(dim=0).abs() < 1e-4).all()
    with torch.no_grad():
        assert big(torch.randn(1, 3, 448, 448)).shape == (1, 1000)
    assert torch.equal(interpolate_pos_embed(pos, (14, 14), (14, 14)), pos)


def test_another_models_checkpoint_is_rejected_by_name(tmp_path):
    vit = {"cls_token": torch.zeros(1, 1, 192), "pos_embed": torch.zeros(1, 197, 192),
           "patch_embed.proj.weight": torch.zeros(192, 3, 16, 16), "blocks.0.attn.qkv.weight": torch.zeros(576, 192),
           "blocks.0.mlp.fc1.weight": torch.zeros(768, 192), "head.weight": torch.zeros(1000, 192)}
    torch.save({"model": vit}, tmp_path / "deit.pth")
    with pytest.raises(CheckpointError, match=r"not a Vision Mamba.*missing.*norm_f.weight.*blocks\.0\.attn"):
        load_checkpoint(tmp_path / "deit.pth")


def test_partial_and_misshaped_checkpoints_list_the_keys(tmp_path, odd_model):
    sd = odd_model.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("layers.1.mixer.x_proj")}
    partial["layers.0.mixer.rope.freqs"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing 2: layers\.1\.mixer\.x_proj\.weight.*unexpected 1: "
                                              r"layers\.0\.mixer\.rope\.freqs"):
        load_checkpoint(tmp_path / "partial.pth", img_size=40, stride=4)
    bad = dict(sd)
    bad["layers.2.mixer.A_b_log"] = torch.zeros(96, 5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"mis-shaped 1: layers\.2\.mixer\.A_b_log \(96, 5\) \(expected \(96, 6\)\)"):
        load_checkpoint(tmp_path / "bad.pth", img_size=40, stride=4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_files_are_reported_as_such(tmp_path, odd_model, suffix):
    path = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        torch.save(odd_model.state_dict(), path)
    else:
        save_checkpoint(odd_model, path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut, img_size=40)


def test_missing_file_and_untrusted_pickles(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "extra": argparse.ArgumentParser}, tmp_path / "objs.pth")
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_checkpoint(tmp_path / "objs.pth")


def test_save_is_atomic_and_round_trips_a_non_default_geometry(tmp_path, odd_model, monkeypatch):
    path = save_checkpoint(odd_model, tmp_path / "out" / "m.safetensors")
    assert_same_model(odd_model, load_checkpoint(path, img_size=40), (40, 40))
    import mambamerge.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(odd_model, tmp_path / "out" / "n.safetensors")
    assert sorted(os.listdir(tmp_path / "out")) == ["m.safetensors"]


def test_default_resolution_is_the_one_the_file_records(tmp_path, odd_model):
    ours = save_checkpoint(odd_model, tmp_path / "m.safetensors")
    assert load_checkpoint(ours).cfg.img_size == (40, 40)
    official = official_file(tmp_path / "o.pth", odd_model, input_size=40)
    assert load_checkpoint(official).cfg.img_size == (40, 40)
    torch.save(mambamerge.create_model("vim_tiny", depth=1).state_dict(), tmp_path / "plain.pth")
    assert load_checkpoint(tmp_path / "plain.pth").cfg.img_size == (224, 224)
