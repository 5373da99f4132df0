"""benchmarks/tune_ablation.py reads a tuned config of any family's model, loads that family's inputs and
reports the config's top-1 as patch(config=) gives it, beside its variants."""
import json
import re

import pytest
import torch
from conftest import benchmark, perturb_

import mambamerge
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy

pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # the benchmark sets torch's threads


@pytest.mark.parametrize("name, data", [("videomamba_nano", "moving-fashion-mnist"), ("aum_nano", "fsdd")])
def test_the_tuned_row_is_the_config_as_patch_applies_it(tmp_path, capsys, name, data):
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model(name, embed_dim=16, depth=3)).eval()
    checkpoint = mambamerge.save_checkpoint(model, tmp_path / "model.safetensors")
    inputs = load_dataset(data, "test", limit=8, input_shape=model.input_shape, input_kind=model.input_kind)
    config = mambamerge.tune(model, torch.stack([x for x, _ in inputs]), reduction=0.5, methods=["mame"],
                             max_candidates=3).config
    path = tmp_path / "config_0.5.json"
    path.write_text(json.dumps(config))

    benchmark("tune_ablation").main([str(path), "--checkpoint", str(checkpoint), "--data", data, "--limit", "8"])
    rows = re.findall(r"^\| \S+ \| (.+?) \| ([\d.]+)% \|", capsys.readouterr().out, flags=re.M)
    assert rows[0][0] == "tuned" and len(rows) >= 2
    expected = accuracy(mambamerge.patch(model, config=config), inputs)
    assert float(rows[0][1]) == pytest.approx(100 * expected, abs=0.006)  # printed to two decimals
