"""VideoMamba and Audio Mamba: official keys and shapes, parameter counts, parity with an independent
restatement of the official forward, and clear errors on input of the wrong shape."""
import pytest
import torch

import mambamerge
from conftest import perturb_
from official_reference import official_aum_logits, official_videomamba_logits


def mixer_shapes(d, d_state=16, d_conv=4, suffixes=("", "_b"), a_logs=("A_log", "A_b_log"), skips=("D", "D_b")):
    """Keys and shapes of one official mixer (mamba_simple.Mamba), written from its definition."""
    d_inner, rank = 2 * d, -(-d // 16)
    shapes = {"in_proj.weight": (2 * d_inner, d), "out_proj.weight": (d, d_inner)}
    for s in suffixes:
        shapes.update({f"conv1d{s}.weight": (d_inner, 1, d_conv), f"conv1d{s}.bias": (d_inner,),
                       f"x_proj{s}.weight": (rank + 2 * d_state, d_inner), f"dt_proj{s}.weight": (d_inner, rank),
                       f"dt_proj{s}.bias": (d_inner,)})
    shapes.update({a: (d_inner, d_state) for a in a_logs})
    shapes.update({s: (d_inner,) for s in skips})
    return shapes


def official_shapes(top, d, depth, mixer):
    shapes = dict(top)
    shapes["norm_f.weight"] = (d,)
    for i in range(depth):
        shapes[f"layers.{i}.norm.weight"] = (d,)
        shapes.update({f"layers.{i}.mixer.{k}": v for k, v in mixer.items()})
    return shapes


def videomamba_shapes(d, depth, classes=1000, frames=8, tubelet=1, grid=14, patch=16):
    top = {"cls_token": (1, 1, d), "pos_embed": (1, grid * grid + 1, d),
           "temporal_pos_embedding": (1, frames // tubelet, d),
           "patch_embed.proj.weight": (d, 3, tubelet, patch, patch), "patch_embed.proj.bias": (d,),
           "head.weight": (classes, d), "head.bias": (classes,)}
    return official_shapes(top, d, depth, mixer_shapes(d))


AUM_MIXERS = {"Bi-Bi": dict(), "Fo-Bi": dict(suffixes=("",), skips=("D",)),
              "Fo-Fo": dict(suffixes=("",), a_logs=("A_log",), skips=("D",))}


def aum_shapes(d, depth, variant, classes=527, patches=8 * 64):
    top = {"cls_token": (1, 1, d), "pos_embed.pos_embed": (1, patches + 1, d),
           "patch_embed.proj.weight": (d, 1, 16, 16), "patch_embed.proj.bias": (d,),
           "head.weight": (classes, d), "head.bias": (classes,)}
    return official_shapes(top, d, depth, mixer_shapes(d, **AUM_MIXERS[variant]))


def shapes_of(name, **overrides):
    with torch.device("meta"):
        model = mambamerge.create_model(name, **overrides)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,d,depth,millions", [
    ("videomamba_tiny", 192, 24, 7.1), ("videomamba_small", 384, 24, 25.8), ("videomamba_middle", 576, 32, 74.2)])
def test_videomamba_configs_have_the_official_keys_shapes_and_size(name, d, depth, millions):
    shapes, params = shapes_of(name)
    assert shapes == videomamba_shapes(d, depth)
    assert params / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize("variant,sizes", [("Bi-Bi", (7.02, 25.5, 97.1)), ("Fo-Bi", (6.44, 23.9, 92.1)),
                                           ("Fo-Fo", (6.29, 23.6, 91.5))])
def test_aum_configs_have_the_official_keys_shapes_and_size(variant, sizes):
    for (name, d), millions in zip((("aum_tiny", 192), ("aum_small", 384), ("aum_base", 768)), sizes):
        shapes, params = shapes_of(name, variant=variant)
        assert shapes == aum_shapes(d, 24, variant), name
        assert params / 1e6 == pytest.approx(millions, abs=0.05), name


def small_videomamba(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(embed_dim=24, depth=3, num_frames=4, tubelet=2, img_size=(16, 24), patch_size=8, d_state=4,
                  num_classes=5)
    return perturb_(mambamerge.create_model("videomamba_tiny", **{**kwargs, **overrides}), seed=seed).eval()


def small_aum(variant="Bi-Bi", seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(embed_dim=16, depth=3, spec_size=(32, 64), patch_size=16, stride=(8, 16), d_state=4,
                  num_classes=6, variant=variant)
    return perturb_(mambamerge.create_model("aum_tiny", **{**kwargs, **overrides}), seed=seed).eval()


def assert_parity(model, x, truth_fn):
    sd64 = {k: v.double() for k, v in model.state_dict().items()}
    truth = truth_fn(sd64, x.double())
    with torch.no_grad():
        logits32 = model(x)
        logits64 = model.double()(x.double())
    assert truth.abs().max() > 0.1
    assert (logits32.double() - truth).abs().max() <= 1e-4
    assert (logits64 - truth).abs().max() <= 1e-10


@pytest.mark.parametrize("overrides", [dict(), dict(tubelet=1, num_frames=3, patch_size=(8, 12), in_chans=2)])
def test_videomamba_logits_match_the_official_forward(overrides):
    model = small_videomamba(**overrides)
    video = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(1))
    assert_parity(model, video, official_videomamba_logits)


@pytest.mark.parametrize("variant", ["Bi-Bi", "Fo-Bi", "Fo-Fo"])
def test_aum_logits_match_the_official_forward(variant):
    model = small_aum(variant)
    spec = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(2))
    assert model.input_shape == (64, 32) and model.layout.grid == (3, 4)
    assert_parity(model, spec, lambda sd, x: official_aum_logits(sd, x, model.cfg.stride, variant))


def test_layouts_say_where_the_class_token_is():
    video, audio = small_videomamba().layout, small_aum().layout
    assert (video.grid, video.axes, video.cls, video.cls_index, video.length) == (
        (2, 2, 3), ("frame", "row", "col"), "head", 0, 13)
    assert (audio.grid, audio.axes, audio.cls, audio.cls_index, audio.length) == (
        (3, 4), ("freq", "time"), "middle", 6, 13)


def test_videomamba_tokens_are_frame_major_after_the_class_token():
    model = small_videomamba(tubelet=1, num_frames=2)
    video = torch.zeros(1, *model.input_shape)
    video[0, :, 1, 8:16, 0:8] = 1.0  # frame 1, patch row 1, col 0
    with torch.no_grad():
        tokens = model.embed(video) - model.embed(torch.zeros_like(video))
    changed = tokens.abs().sum(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == [1 + 1 * 6 + 1 * 3 + 0]


def test_aum_tokens_are_frequency_major_around_the_class_token():
    model = small_aum(stride=16)  # 2 x 4 patches, class token at 4
    spec = torch.zeros(1, *model.input_shape)
    spec[0, 48:64, 16:32] = 1.0  # time patch 3, frequency patch 1 -> patch 1 * 4 + 3 = 7 -> token 8
    with torch.no_grad():
        tokens = model.embed(spec) - model.embed(torch.zeros_like(spec))
    assert tokens.abs().sum(dim=-1)[0].nonzero().flatten().tolist() == [8]


@pytest.mark.parametrize("shape,message", [
    ((2, 3, 2, 16, 24), "too few frames: the model was built for clips of 4 frames, got 2"),
    ((2, 3, 6, 16, 24), "too many frames"),
    ((2, 3, 4, 16, 16), "built for 16x24 frames, got 16x16"),
    ((2, 1, 4, 16, 24), "3-channel frames, got 1"),
    ((2, 3, 16, 24), "expected clips of shape"),
])
def test_videomamba_rejects_clips_of_the_wrong_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        small_videomamba()(torch.randn(*shape))


@pytest.mark.parametrize("shape,message", [
    ((2, 32, 64), r"64 frames x 32 mel bins .* got 32 x 64 \(time and frequency swapped\?\)"),
    ((2, 60, 32), "got 60 x 32; pad or crop"),
    ((2, 1, 64, 32), "expected log-mel spectrograms of shape"),
])
def test_aum_rejects_spectrograms_of_the_wrong_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        small_aum()(torch.randn(*shape))


@pytest.mark.parametrize("name,kwargs,message", [
    ("videomamba_tiny", dict(num_frames=1, tubelet=2), "fewer than one tubelet"),
    ("aum_tiny", dict(variant="Bi-Fo"), "variant must be one of Bi-Bi, Fo-Bi, Fo-Fo"),
    ("aum_tiny", dict(spec_size=(8, 1024)), "smaller than the patch size"),
    ("videomamba_tiny", dict(colour=1), "bad option.*valid options"),
    # the trunk's fields, checked once for every family
    ("vim_pico", dict(depth=0), r"VimConfig\.depth must be a whole number >= 1, got 0"),
    ("aum_tiny", dict(d_state=2.5), r"AuMConfig\.d_state must be a whole number >= 1, got 2\.5"),
    ("videomamba_tiny", dict(drop_path_rate=1.0), r"VideoMambaConfig\.drop_path_rate must be in \[0, 1\)"),
    ("vim_pico", dict(num_classes=-1), r"VimConfig\.num_classes must be a whole number >= 0"),
    ("videomamba_tiny", dict(in_chans=0), r"VideoMambaConfig\.in_chans is 0: expected a whole number from 1"),
])
def test_bad_configs_get_clear_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mambamerge.create_model(name, **kwargs)


@pytest.mark.parametrize("name,size", [("vim_pico", (48, 40)), ("videomamba_nano", (4, 48, 40)),
                                       ("aum_nano", (64, 96))])
def test_token_layout_at_another_size_is_the_layout_of_a_model_built_for_it(name, size):
    model = mambamerge.create_model(name)
    option = {"vim": dict(img_size=size), "videomamba": dict(num_frames=size[0], img_size=size[1:]),
              "aum": dict(spec_size=(size[1], size[0]))}[model.family]
    built = mambamerge.create_model(name, **option)
    assert built.input_shape[-len(size):] == size
    assert model.token_layout(size) == built.layout and model.token_layout(size) != model.layout
    assert model.token_layout(None) == model.layout
    with pytest.raises(ValueError, match=rf"input_size must be \({', '.join(model.input_axes)}\) or one int"):
        model.token_layout(size + (8,))
    with pytest.raises(ValueError, match="smaller than the patch size|fewer than one tubelet"):
        model.token_layout(1)
