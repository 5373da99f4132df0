"""The --data spec is parsed once: named sets (with or without their own folder) against user folders."""
import pytest

from mambamerge.cli.inputs import DataSpec


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
