"""benchmarks/few_rows.py builds the kernel library with and without its few-row projections, checks that
both give the same logits and times them side by side (its times are measurements, not asserted)."""
import re

import pytest
from conftest import benchmark

from mambamerge.ops.cpu_kernels import library

pytestmark = pytest.mark.skipif(not library.available(), reason=f"kernels unavailable: {library.unavailable_reason()}")


def test_both_builds_run_every_block_and_forward_and_the_process_keeps_its_library(capsys):
    before = library.loaded()
    benchmark("few_rows").main(["--models", "vim_pico", "--lengths", "1", "3", "--methods", "mame",
                                "--reductions", "0.3", "--runs", "1"])
    out = capsys.readouterr().out
    assert len(re.findall(r"^  L=\d+\s+few_rows\s+[\d.]+\s+sgemm_\s+[\d.]+\s+ratio [\d.]+$", out, flags=re.M)) == 2
    assert re.search(r"^  mame\s+30%\s+few_rows\s+[\d.]+\s+sgemm_\s+[\d.]+\s+ratio [\d.]+$", out, flags=re.M)
    assert library.loaded() is before
