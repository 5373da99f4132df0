"""benchmarks/step_cost.py counts a step's and a block's operations in worker processes and, given a
baseline version, reports both side by side (its times are measurements, not asserted)."""
import re
from pathlib import Path

import pytest
from conftest import benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_against_itself_the_step_cost_reports_the_same_operations_for_both(capsys):
    benchmark("step_cost").main(["--models", "vim_pico", "--batch", "1", "--reduction", "0.3", "--runs", "1",
                                 "--rounds", "1", "--baseline", str(ROOT / "src")])
    out = capsys.readouterr().out
    rows = {m[0]: m[1:] for m in re.findall(r"^(step|block|block_ssm)\s+(\d+)\s+[\d.]+\s+(\d+)\s+[\d.]+\s+[\d.]+$",
                                            out, flags=re.M)}
    assert set(rows) == {"step", "block", "block_ssm"}
    assert all(before == after and int(before) > 0 for before, after in rows.values())
    assert "step ops baseline -> this: same" in out and "block_ssm ops baseline -> this: same" in out


def test_a_baseline_without_the_package_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="no mambamerge package there"):
        benchmark("step_cost").main(["--baseline", str(tmp_path)])


def test_a_failed_measurement_names_its_error():
    with pytest.raises(SystemExit, match="failed:\n.*cannot reach an average reduction of 90%"):
        benchmark("step_cost").main(["--models", "vim_pico", "--batch", "1", "--reduction", "0.9", "--runs", "1"])
