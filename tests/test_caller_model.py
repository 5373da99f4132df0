"""Functions handed a model leave it as they got it: evaluate, paired_throughput and the diagnostics
restore its token reducer and train / eval mode, and never change its dtype or weights."""
import torch

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.data import load_dataset
from mambamerge.diagnostics.report import Settings, diagnose
from mambamerge.evaluate import evaluate, paired_throughput
from conftest import perturb_


def snapshot(model):
    return (model.token_reducer, model.training, {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, before):
    reducer, training, weights = before
    assert model.token_reducer is reducer and model.training == training
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in weights.items())


def test_evaluate_and_paired_throughput_restore_the_callers_reducer_and_mode():
    model = mambamerge.load_checkpoint(demo_checkpoint())
    data = load_dataset("fashion-mnist", "test", input_shape=model.input_shape, limit=16)
    mambamerge.patch(model, "tome", r=4)
    model.train()
    before = snapshot(model)
    result = evaluate(model, data, "mame", 0.5, batch_size=8, throughput_batch=2, runs=1)
    assert result["method"] == "mame" and abs(result["average_reduction"] - 0.5) < 0.02
    assert_unchanged(model, before)
    dense = evaluate(model, data, batch_size=8, throughput_batch=2, runs=1)
    assert dense["average_reduction"] == 0.0  # evaluated dense, although the caller's model is patched
    assert_unchanged(model, before)
    paired_throughput(model, batch_size=2, runs=1)
    assert_unchanged(model, before)


def test_diagnose_leaves_the_callers_model_as_it_was():
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_pico", depth=3)).double()
    mambamerge.patch(model, "mame", 0.3)
    model.train()
    before = snapshot(model)
    cfg = model.cfg
    images = torch.randn(2, cfg.in_chans, *cfg.img_size, dtype=torch.float64)
    report = diagnose(model, images, torch.tensor([0, 1]), Settings(parts=("attention", "decay")))
    assert "attention" in report.numbers
    assert_unchanged(model, before)
