"""benchmarks/merge.py runs every model x batch x method configuration it is asked for and reports the
cost of a reduction step (its figures are measurements, recorded in docs/performance.md, not asserted)."""
import re

import torch

import mambamerge
from conftest import benchmark


def test_bench_prints_one_table_per_model_batch_and_method_with_the_step_cost(capsys):
    threads = torch.get_num_threads()
    try:
        benchmark("merge").main(["--models", "vim_nano", "--batch", "1", "2", "--methods", "tome", "mame",
                                 "--reductions", "0.5", "--runs", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.findall(r"== (vim_nano batch \d)", out) == ["vim_nano batch 1", "vim_nano batch 2"]
    rows = re.findall(r"^\s+50%\s.*$", out, flags=re.M)
    assert len(rows) == 4  # 2 batches x 2 methods
    for row in rows:
        ideal, measured, ratio, merge_ms, share, step_ms = row.split()[-6:]
        assert float(ideal) == 2.0  # the demo model's 196 tokens halved on average
        assert abs(float(ratio) - float(measured) / float(ideal)) < 0.011  # printed to two decimals
        assert 0 < float(step_ms) <= float(merge_ms)
    assert out.count("vim_nano batch") == 2 + 4  # table headers and the goal lines


def test_the_step_cost_counts_only_the_steps_that_remove_tokens():
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_pico", depth=6).eval()
    reducer = mambamerge.patch(model, "mame", schedule=[0, 3, 0, 3, 0, 0]).token_reducer
    images = torch.randn(1, *model.input_shape)
    seconds, steps = benchmark("merge").merge_seconds(model, reducer, images, runs=1)
    assert steps == 2 and seconds > 0  # six calls of reducer.step, two of them merging
