"""The command line parses before it imports torch: `--help` and argument errors are instant, every
help ends with examples, and the names offered before torch loads agree with the registries."""
import json
import os
import subprocess
import sys
import time

import pytest

from mambamerge import dataspec
from mambamerge.cli import names
from mambamerge.cli.main import COMMANDS

PROBE = """
import json, sys
from mambamerge.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def probe(*argv):
    """(exit code, torch imported?, stdout, stderr without the probe's line, wall seconds) of `argv`
    run through the CLI's main in a fresh interpreter."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    seconds = time.perf_counter() - start
    *err, last = done.stderr.strip().splitlines()
    state = json.loads(last)
    return state["code"], state["torch"], done.stdout, "\n".join(err), seconds


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_instant_ends_with_examples_and_imports_no_torch(command):
    code, torch_imported, out, _, seconds = probe(*([command] if command else []), "--help")
    assert code == 0 and not torch_imported
    assert seconds < 1.0, f"--help took {seconds:.2f} s"
    examples = out[out.index("examples:"):].splitlines()[1:]
    assert len(examples) >= 2 and all(line.strip().startswith("mambamerge ") for line in examples)


@pytest.mark.parametrize("argv,message", [
    (["train", "--out", "x"], "the following arguments are required: --data"),
    (["eval", "--checkpoint", "m.safetensors"], "required: --data"),
    (["speed", "--model", "vim_huge"], "invalid choice: 'vim_huge'"),
    (["diagnose", "--checkpoint", "m", "--data", "d", "--out", "o", "--parts", "nope"], "invalid choice"),
])
def test_argument_errors_come_before_torch(argv, message):
    code, torch_imported, _, err, _ = probe(*argv)
    assert code == 2 and not torch_imported and message in err


def test_version():
    code, torch_imported, out, _, _ = probe("--version")
    import mambamerge
    assert code == 0 and out.strip() == f"mambamerge {mambamerge.__version__}" and not torch_imported


def test_batch_size_has_one_name_everywhere_and_demo_takes_workers():
    from mambamerge.cli.main import build_parser
    parser = build_parser()
    for argv in (["eval", "--checkpoint", "m", "--data", "d"], ["sweep", "--checkpoint", "m", "--data", "d",
                                                                  "--out", "o"],
                 ["train", "--data", "d", "--out", "o"], ["speed"]):
        assert parser.parse_args(argv + ["--batch-size", "5"]).batch_size == 5
        assert parser.parse_args(argv + ["--batch", "6"]).batch_size == 6  # the alias
    assert parser.parse_args(["demo", "--workers", "2"]).workers == 2


def test_the_names_offered_before_torch_loads_are_the_registries():
    from mambamerge.data import IDX_SETS, VAL_SPLIT_SETS
    from mambamerge.devices import AMP_CHOICES
    from mambamerge.diagnostics.report import PARTS
    from mambamerge.merge import METHODS
    from mambamerge.models import list_models
    assert names.METHODS == tuple(sorted(METHODS)), "update mambamerge/cli/names.py"
    assert names.MODELS == tuple(list_models()), "update mambamerge/cli/names.py"
    assert names.AMP_CHOICES == AMP_CHOICES and names.DIAGNOSTIC_PARTS == PARTS
    assert dataspec.IDX_SETS == tuple(IDX_SETS) and dataspec.VAL_SPLIT_SETS == tuple(VAL_SPLIT_SETS)


@pytest.mark.parametrize("order", ["mambamerge first", "timm first"])
def test_import_mambamerge_costs_no_torch_and_registers_with_timm_in_either_order(order):
    first, second = ("mambamerge", "timm") if order == "mambamerge first" else ("timm", "mambamerge")
    script = (f"import sys\nimport {first}\nlight = 'torch' not in sys.modules\nimport {second}\n"
              f"import timm\nprint(light, timm.models.is_model('vim_pico'), timm.models.is_model('aum_nano'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(order == "mambamerge first"), "True", "True"]
