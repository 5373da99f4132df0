"""The --data spec is parsed once: named sets (with or without their own folder) against user folders."""
import pytest

from mambamerge.dataspec import DataSpec


@pytest.mark.parametrize("text, name, root, idx, val", [
    ("fashion-mnist", "fashion-mnist", None, True, False),
    ("mnist:/data/mnist", "mnist", "/data/mnist", True, False),
    ("fsdd", "fsdd", None, False, True),
    ("moving-mnist:", "moving-mnist", "", False, True),
    ("imagenet/val", None, None, False, False),
    ("fsdd-copy:/x", None, None, False, False),
])
def test_data_spec(text, name, root, idx, val):
    spec = DataSpec.parse(text)
    assert (spec.text, spec.name, spec.root, spec.is_idx, spec.has_val_split, spec.named) == \
        (text, name, root, idx, val, name is not None)


def test_load_dataset_reads_a_spec_as_the_command_line_parses_it(tmp_path):
    """data.load_dataset takes the spec through DataSpec: "name:" is the shipped copy, text and a parsed
    spec load the same inputs, a folder whose name holds a colon is still a folder, and an unknown
    "name:folder" is refused naming the known sets."""
    import numpy as np
    import torch
    from PIL import Image

    from mambamerge.data import load_dataset

    shipped = load_dataset("fashion-mnist:", "test", limit=6)
    parsed = load_dataset(DataSpec.parse("fashion-mnist"), "test", limit=6)
    assert torch.equal(shipped.batch(list(range(6)))[0], parsed.batch(list(range(6)))[0])
    folder = tmp_path / "run:1"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 200 if c == "a" else 20, np.uint8)).save(folder / c / "0.png")
    assert load_dataset(str(folder), img_size=8, in_chans=1).info.classes == ["a", "b"]
    with pytest.raises(ValueError, match="neither a known data set.*fashion-mnist"):
        load_dataset("fsdd-copy:/x")
