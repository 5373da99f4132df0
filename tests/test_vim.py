import math

import pytest
import timm
import torch
import torch.nn.functional as F

import mambamerge
from conftest import perturb_
from official_reference import official_vim_logits

OFFICIAL_TINY_SHAPES = {
    "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "patch_embed.proj.weight": (192, 3, 16, 16),
    "patch_embed.proj.bias": (192,), "head.weight": (1000, 192), "head.bias": (1000,), "norm_f.weight": (192,),
    "layers.0.norm.weight": (192,), "layers.0.mixer.in_proj.weight": (768, 192),
    "layers.0.mixer.out_proj.weight": (192, 384), "layers.0.mixer.conv1d.weight": (384, 1, 4),
    "layers.0.mixer.conv1d.bias": (384,), "layers.0.mixer.conv1d_b.weight": (384, 1, 4),
    "layers.0.mixer.conv1d_b.bias": (384,), "layers.0.mixer.x_proj.weight": (44, 384),
    "layers.0.mixer.x_proj_b.weight": (44, 384), "layers.0.mixer.dt_proj.weight": (384, 12),
    "layers.0.mixer.dt_proj.bias": (384,), "layers.0.mixer.dt_proj_b.weight": (384, 12),
    "layers.0.mixer.dt_proj_b.bias": (384,), "layers.0.mixer.A_log": (384, 16), "layers.0.mixer.A_b_log": (384, 16),
    "layers.0.mixer.D": (384,), "layers.0.mixer.D_b": (384,),
}


def test_state_dict_keys_are_the_official_ones():
    sd = mambamerge.create_model("vim_tiny").state_dict()
    per_layer = {k for k in OFFICIAL_TINY_SHAPES if k.startswith("layers.0.")}
    expected = {k for k in OFFICIAL_TINY_SHAPES if not k.startswith("layers.")}
    expected |= {k.replace("layers.0.", f"layers.{i}.") for i in range(24) for k in per_layer}
    assert set(sd) == expected
    for key, shape in OFFICIAL_TINY_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key


@pytest.mark.parametrize("name,overrides,img", [
    ("vim_pico", dict(depth=3), 32),
    ("vim_pico", dict(depth=2, img_size=(40, 24), patch_size=8, stride=4, num_classes=7), (40, 24)),
    ("vim_pico", dict(depth=2, img_size=36, patch_size=6, stride=6, in_chans=1, divide_out=False), 36),
])
def test_logits_match_the_official_forward(name, overrides, img):
    torch.manual_seed(1)
    model = perturb_(mambamerge.create_model(name, **overrides)).eval()
    h, w = (img, img) if isinstance(img, int) else img
    images = torch.randn(3, model.cfg.in_chans, h, w)
    sd64 = {k: v.double() for k, v in model.state_dict().items()}
    truth = official_vim_logits(sd64, images.double(), stride=model.cfg.stride, divide_out=model.cfg.divide_out)
    with torch.no_grad():
        logits32 = model(images)
        logits64 = model.double()(images.double())
    assert truth.abs().max() > 0.1
    assert (logits32.double() - truth).abs().max() <= 1e-4
    assert (logits64 - truth).abs().max() <= 1e-10


def test_vim_tiny_logits_match_the_official_forward():
    torch.manual_seed(2)
    model = perturb_(mambamerge.create_model("vim_tiny"), seed=2).eval()
    images = torch.randn(1, 3, 224, 224)
    sd64 = {k: v.double() for k, v in model.state_dict().items()}
    truth = official_vim_logits(sd64, images.double(), stride=(16, 16))
    with torch.no_grad():
        logits = model(images)
    assert (logits.double() - truth).abs().max() <= 1e-4


def _official_backward_delta(mixer, hidden):
    """Backward-branch step size the official way: flip, causal conv, project, softplus, flip back."""
    x, _ = mixer.in_proj(hidden).chunk(2, dim=-1)
    xb = x.flip(1).transpose(1, 2)
    w = mixer.conv1d_b.weight
    xb = F.silu(F.conv1d(xb, w, mixer.conv1d_b.bias, padding=w.shape[-1] - 1, groups=w.shape[0])[..., :x.shape[1]])
    dt = mixer.x_proj_b(xb.transpose(1, 2))[..., :mixer.dt_rank]
    return F.softplus(mixer.dt_proj_b(dt)).flip(1).transpose(1, 2)


def test_mixer_reports_delta_and_B_in_sequence_order(tiny_model):
    mixer = tiny_model.layers[1].mixer
    hidden = torch.randn(2, 17, mixer.d_model)
    with torch.no_grad():
        out, stats = mixer(hidden, return_ssm=True)
        plain = mixer(hidden)
        expected_bwd = _official_backward_delta(mixer, hidden)
    assert torch.equal(out, plain)
    assert stats.delta_fwd.shape == stats.delta_bwd.shape == (2, mixer.d_inner, 17)
    assert stats.B_fwd.shape == stats.B_bwd.shape == (2, mixer.d_state, 17)
    assert (stats.delta_fwd >= 0).all() and (stats.delta_bwd >= 0).all()
    torch.testing.assert_close(stats.delta_bwd, expected_bwd, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stats.delta_bwd, stats.delta_bwd.flip(-1))


def test_block_return_ssm_keeps_outputs(tiny_model):
    tokens = tiny_model.embed(torch.randn(2, 3, 32, 32))
    block = tiny_model.layers[0]
    with torch.no_grad():
        h1, r1 = block(tokens, None)
        h2, r2, stats = block(tokens, None, return_ssm=True)
    assert torch.equal(h1, h2) and torch.equal(r1, r2)
    assert stats.delta_fwd.shape[-1] == tokens.shape[1]


def test_residual_stream_is_float32_under_bfloat16_autocast(tiny_model):
    tokens = tiny_model.embed(torch.randn(2, 3, 32, 32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, residual = tiny_model.layers[0](tokens.bfloat16(), None)
        hidden, residual = tiny_model.layers[1](hidden, residual)
    assert residual.dtype == torch.float32


def test_gradients_reach_every_parameter(tiny_model):
    tiny_model.train()
    logits = tiny_model(torch.randn(2, 3, 32, 32))
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_class_token_sits_in_the_middle():
    model = mambamerge.create_model("vim_tiny")
    assert model.cls_index == 98 and model.cfg.num_patches == 196
    plus = mambamerge.create_model("vim_tiny_plus")
    assert plus.cfg.num_patches == 729 and plus.cls_index == 364
    tokens = model.embed(torch.zeros(1, 3, 224, 224))
    torch.testing.assert_close(tokens[0, 98], (model.cls_token + model.pos_embed[:, 98])[0, 0])


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 48, 48), "built for 32x32"),
    ((2, 1, 32, 32), "3-channel"),
    ((3, 32, 32), "expected images of shape"),
])
def test_bad_images_get_a_clear_error(tiny_model, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(torch.randn(*shape))


def test_create_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model 'vim_huge'.*vim_tiny"):
        mambamerge.create_model("vim_huge")
    with pytest.raises(ValueError, match="bad option.*valid options"):
        mambamerge.create_model("vim_pico", width=3)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        mambamerge.create_model("vim_pico", img_size=4)


def test_timm_knows_the_official_names():
    name = "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    model = timm.create_model(name, num_classes=10)
    assert isinstance(model, mambamerge.VisionMamba)
    assert model.cfg.embed_dim == 384 and model.cfg.stride == (8, 8) and model.cfg.num_classes == 10
    assert {"vim_tiny", "vim_base"} <= set(timm.list_models("vim_*"))
    with pytest.raises(ValueError, match="load_checkpoint"):
        timm.create_model("vim_tiny", pretrained=True)


def test_config_derived_sizes():
    cfg = mambamerge.create_model("vim_base").cfg
    assert cfg.dt_rank == math.ceil(768 / 16) and cfg.grid_size == (14, 14)
