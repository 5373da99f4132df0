"""A fine-tuned checkpoint records the token reduction it was trained with (issue 17, item 2): `train
--method` writes it, `info` shows it, `eval`, `sweep` and `speed` run it unless told otherwise, and
load_checkpoint / patch give it back in Python."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mambamerge
from mambamerge.checkpoint import MERGE_METADATA_KEY, CheckpointError
from mambamerge.cli.main import main
from mambamerge.merge.recipe import MergeRecipe

from test_training_runs import TINY, folder


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """(data folder, run folder) of one epoch of vim_pico fine-tuned with MaMe at 20% on a tiny folder."""
    root = tmp_path_factory.mktemp("recipe")
    data = folder(root / "data", size=32, per_class=(6, 3))
    out = root / "run"
    threads = torch.get_num_threads()
    assert main(["train", "--data", str(data), *TINY, "--epochs", "1", "--val-split", "2", "--method", "mame",
                 "--reduction", "0.2", "--option", "match=window", "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return data, out


def test_train_records_the_method_its_options_and_schedule(fine_tuned):
    _, out = fine_tuned
    model = mambamerge.load_checkpoint(out / "model.safetensors")
    recipe = model.merge_recipe
    assert model.token_reducer is None  # loaded dense: the recipe is applied on request
    assert (recipe.method, recipe.options["match"], recipe.tokens) == ("mame", "window", 17)
    # the schedule is the one patch derives for the 20% target on this model: re-deriving it gives the same
    fresh = mambamerge.create_model("vim_pico", in_chans=3)
    mambamerge.patch(fresh, "mame", reduction=0.2, match="window")
    assert recipe.removals == fresh.token_reducer.schedule.removals and abs(recipe.average_reduction() - 0.2) < 0.03
    mambamerge.patch(model, model.merge_recipe)
    assert model.token_reducer.schedule == fresh.token_reducer.schedule
    assert model.token_reducer.method == fresh.token_reducer.method
    with pytest.raises(TypeError, match="fixes the method"):
        mambamerge.patch(model, model.merge_recipe, reduction=0.4)
    for name in ("model.safetensors", "model_last.safetensors"):
        with safe_open(str(out / name), framework="pt") as f:
            assert json.loads(f.metadata()[MERGE_METADATA_KEY])["method"] == "mame"


def test_info_shows_the_recipe_and_the_class_names(fine_tuned, capsys):
    _, out = fine_tuned
    assert main(["info", str(out / "model.safetensors")]) == 0
    shown = capsys.readouterr().out
    assert "classes (2): ant, bee" in shown
    assert "mame (match='window')" in shown and "before block 1" in shown


def test_eval_runs_the_recorded_method_and_method_none_runs_dense(fine_tuned, tmp_path, capsys):
    data, out = fine_tuned
    recipe = mambamerge.load_checkpoint(out / "model.safetensors").merge_recipe
    argv = ["eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(data / "val"), "--runs", "1",
            "--threads", "1", "--workers", "0"]
    assert main(argv + ["--json", str(tmp_path / "recorded.json")]) == 0
    err = capsys.readouterr().err
    assert "was fine-tuned with mame" in err and "--method none runs it dense" in err
    result = json.loads((tmp_path / "recorded.json").read_text())["result"]
    assert result["method"] == "mame" and result["schedule"]["removals"] == list(recipe.removals)
    assert result["average_reduction"] == pytest.approx(recipe.average_reduction())

    assert main(argv + ["--method", "none", "--json", str(tmp_path / "dense.json")]) == 0
    assert "fine-tuned" not in capsys.readouterr().err
    dense = json.loads((tmp_path / "dense.json").read_text())["result"]
    assert dense["method"] == "dense" and dense["average_reduction"] == 0

    assert main(argv + ["--method", "tome", "--reduction", "0.1", "--json", str(tmp_path / "tome.json")]) == 0
    assert json.loads((tmp_path / "tome.json").read_text())["result"]["method"] == "tome"
    # at another resolution the recorded per-block counts do not apply: refused, naming the way out
    assert main(argv + ["--img-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "17 tokens" in err and "--method none" in err


def test_speed_and_sweep_default_to_the_recorded_method(fine_tuned, tmp_path, capsys):
    data, out = fine_tuned
    ckpt = str(out / "model.safetensors")
    speed = ["speed", "--checkpoint", ckpt, "--runs", "1", "--batch", "2", "--threads", "1", "--device", "cpu"]
    assert main(speed) == 0
    captured = capsys.readouterr()
    assert "was fine-tuned with mame" in captured.err and "speed-up" in captured.out
    assert main(speed + ["--method", "none"]) == 0
    assert "speed-up" not in capsys.readouterr().out
    assert main(["sweep", "--checkpoint", ckpt, "--data", str(data / "val"), "--runs", "1", "--threads", "1",
                 "--workers", "0", "--reductions", "0.1", "--out", str(tmp_path / "sweep")]) == 0
    assert "sweeping that method" in capsys.readouterr().err
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert [(r["method"], r["options"]) for r in rows[1:]] == [("mame", {"match": "window"})]


def test_a_dense_model_records_none_and_a_damaged_record_is_refused(tmp_path, tiny_model):
    path = mambamerge.save_checkpoint(tiny_model, tmp_path / "dense.safetensors")
    assert mambamerge.load_checkpoint(path).merge_recipe is None
    mambamerge.patch(tiny_model, "tome", reduction=0.2)
    path = mambamerge.save_checkpoint(tiny_model, tmp_path / "tome.safetensors")
    assert tiny_model.token_reducer is not None  # saving leaves the model as it was
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(metadata[MERGE_METADATA_KEY])
    bad = {"unknown method": {**record, "method": "nosuch"}, "bad option": {**record, "options": {"feature": "x"}},
           "deep": [[[]]] * 3, "too many removals": {**record, "removals": [0] + [9] * 3},
           "another depth": {**record, "removals": [0, 1]}, "bool tokens": {**record, "tokens": True},
           "nested option": {**record, "options": {"feature": {"a": 1}}}}
    for case, value in bad.items():
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**metadata, MERGE_METADATA_KEY:
                                                                        json.dumps(value)})
        with pytest.raises(CheckpointError, match=MERGE_METADATA_KEY):
            mambamerge.load_checkpoint(tmp_path / "bad.safetensors")
    save_file(tensors, str(tmp_path / "long.safetensors"),
              metadata={**metadata, MERGE_METADATA_KEY: "[" * 100000})
    with pytest.raises(CheckpointError, match="characters long"):
        mambamerge.read_checkpoint(tmp_path / "long.safetensors")


def test_a_recipe_round_trips_through_json():
    recipe = MergeRecipe("stm", {**mambamerge.merge.METHODS["stm"].options(), "gamma": 0.5}, (0, 3, 0, 3), 50)
    assert MergeRecipe.from_json(recipe.to_json()) == recipe
    assert recipe.changed_options() == {"gamma": 0.5} and "3 before block 1, 3 before block 3" in recipe.describe()
