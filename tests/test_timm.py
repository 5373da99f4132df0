"""timm sees mambamerge's models as its own: registration, pretrained_cfg, the classifier methods,
loading a file with pretrained=True, the optimiser's weight-decay groups and the evaluation transform."""
import importlib
import warnings

import numpy as np
import pytest
import timm
import timm.optim
import torch
from PIL import Image

import mambamerge
from mambamerge.data.folders import eval_transform
from mambamerge.models import timm_registry
from mambamerge.train import param_groups

from conftest import perturb_
from test_checkpoint import official_file
from test_families import small_aum, small_videomamba


@pytest.mark.parametrize("name", mambamerge.list_models())
def test_every_registered_model_builds_through_timm_runs_and_has_a_pretrained_cfg(name):
    torch.manual_seed(0)
    model = timm.create_model(name, depth=1).eval()  # one block: the registration, not the size, is tested
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == model.input_shape and cfg["num_classes"] == model.num_classes
    assert cfg["interpolation"] in ("bicubic", "bilinear") and 0 < cfg["crop_pct"] <= 1
    assert cfg["architecture"] == name
    assert timm.models.get_pretrained_cfg(name).input_size == model.input_shape  # registered, before any build
    channels = getattr(model.cfg, "in_chans", None)
    if channels is not None:
        assert len(cfg["mean"]) == len(cfg["std"]) == channels
    assert timm.data.resolve_model_data_config(model)["input_size"] == model.input_shape
    with torch.no_grad():
        out = model(torch.randn(1, *model.input_shape))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


def test_official_vim_names_carry_the_official_evaluation_settings():
    cfg = timm.models.get_pretrained_cfg(next(iter(mambamerge.models.OFFICIAL_NAMES))).to_dict()
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_importing_the_registry_again_overwrites_nothing_and_warns_nothing():
    before = timm.models.model_entrypoint("vim_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(timm_registry)
    assert timm.models.model_entrypoint("vim_tiny") is before


@pytest.fixture
def pico_file(tmp_path):
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_pico")).eval()
    return official_file(tmp_path / "vim_pico.pth", model, input_size=32, name="vim_pico"), model


def test_pretrained_true_loads_an_official_file_through_our_loader(pico_file):
    path, model = pico_file
    loaded = timm.create_model("vim_pico", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert loaded.pretrained_cfg["file"] == str(path) and loaded.pretrained_cfg["input_size"] == (3, 32, 32)


def test_pretrained_true_applies_timms_options(pico_file):
    path, model = pico_file
    tuned = timm.create_model("vim_pico", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=5, drop_rate=0.0, drop_path_rate=0.2).eval()
    assert tuned.num_classes == 5 and tuned.get_classifier().out_features == 5
    assert tuned.drop_path.p == 0.2  # the final addition's stochastic depth (block 1 gets block 0's rate, 0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # a new head on the same trunk
        torch.testing.assert_close(tuned.pooled_features(images), model.pooled_features(images), rtol=0, atol=0)
        assert tuned(images).shape == (2, 5)


def test_pretrained_true_refuses_what_it_cannot_honour(pico_file):
    path, _ = pico_file
    with pytest.raises(ValueError, match="no weights to download.*pretrained_cfg_overlay=dict\\(file=PATH\\)"):
        timm.create_model("vim_pico", pretrained=True)
    with pytest.raises(ValueError, match="does not hold a vim_tiny: embed_dim=32 \\(not 192\\)"):
        timm.create_model("vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match="architecture from the file; unsupported option\\(s\\): depth"):
        timm.create_model("vim_pico", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=3)


@pytest.mark.parametrize("method", [None, "tome"])
def test_forward_features_forward_head_follow_timm(tiny_model, method):
    if method:
        mambamerge.patch(tiny_model, method, schedule=[0, 4, 3])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = tiny_model.forward_features(images)
        assert tokens.shape == (3, 17 - (7 if method else 0), 32)
        pooled = tiny_model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, tiny_model.pooled_features(images), rtol=0, atol=0)
        torch.testing.assert_close(tiny_model.forward_head(tokens), tiny_model(images), rtol=0, atol=0)
        if method:  # the class token moved per image: forward_features puts it first, whatever ran since
            cls_index = tiny_model.token_state(images).cls_index
            assert not torch.equal(cls_index, torch.full((3,), 8))
            tiny_model.forward_features(torch.randn(3, 3, 32, 32))
            torch.testing.assert_close(tiny_model.forward_head(tokens[:2]), tiny_model(images[:2]), rtol=0, atol=0)
            last = tiny_model.token_state(images)
            rest = torch.stack([torch.cat((t[:c], t[c + 1:])) for t, c in zip(tiny_model.final_norm(
                last.hidden, last.residual), cls_index)])
            torch.testing.assert_close(tokens[:, 1:], rest, rtol=0, atol=0)  # the others in order


def test_reset_classifier_and_weight_decay_groups(tiny_model):
    tiny_model.reset_classifier(4)
    assert tiny_model.num_classes == 4 and tiny_model.pretrained_cfg["num_classes"] == 4
    assert tiny_model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    tiny_model.reset_classifier(0)
    with torch.no_grad():
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(tiny_model(images), tiny_model.pooled_features(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="reads its class token; global_pool='avg'"):
        tiny_model.reset_classifier(4, global_pool="avg")
    ssm = {f"layers.{i}.mixer.{name}" for i in range(3) for name in ("A_log", "A_b_log", "D", "D_b")}
    assert tiny_model.no_weight_decay() == {"pos_embed", "cls_token"} | ssm
    no_decay = spared_by_timm(tiny_model)
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.0.mixer.D"} <= no_decay
    assert "layers.0.mixer.in_proj.weight" not in no_decay


def spared_by_timm(model):
    """Names of the parameters timm's optimiser factory puts in a group without weight decay."""
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}


@pytest.mark.parametrize("family", ["vim", "videomamba", "aum:Bi-Bi", "aum:Fo-Bi", "aum:Fo-Fo"])
def test_training_and_timm_spare_the_same_parameters_from_weight_decay(family):
    if family == "vim":
        model = mambamerge.create_model("vim_pico", depth=2)
    elif family == "videomamba":
        model = small_videomamba(depth=2)
    else:
        model = small_aum(family.split(":")[1], depth=2)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert spared == spared_by_timm(model)
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - spared
    tables = {"pos_embed", "pos_embed.pos_embed", "temporal_pos_embedding", "cls_token"} & set(names.values())
    a_logs = {n for n in names.values() if n.endswith(("A_log", "A_b_log"))}  # 2-D: spared by name only
    assert tables and a_logs and tables | a_logs <= model.no_weight_decay() <= spared
    assert "temporal_pos_embedding" in tables or family != "videomamba"
    assert len(a_logs) == 2 * (1 if family == "aum:Fo-Fo" else 2)


def test_evaluation_transform_is_timms_from_the_pretrained_cfg():
    model = mambamerge.create_model("vim_tiny", depth=1)
    timm_transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 411, 3), dtype=np.uint8))
    ours = eval_transform(224)(image)
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, timm_transform(image))
