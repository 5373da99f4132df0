"""Which bf16 arithmetic the CPU has, read from /proc/cpuinfo flags, and the warning of --amp bf16 where
bf16 would be emulated."""
import json

import pytest
import torch

import mambamerge
from mambamerge import devices
from mambamerge.cli.main import main

X86 = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\nflags\t\t: {flags}\nbogomips\t: 4000.00\n\n"
SKYLAKE = "fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"
ZEN4 = SKYLAKE + " avx512_bf16 avx512vnni avx512_vbmi2"
SAPPHIRE_RAPIDS = ZEN4 + " amx_bf16 avx512_fp16 amx_tile amx_int8"
ARM = "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics{extra}\n"


def cpuinfo(flags: str, cores: int = 2) -> str:
    return "".join(X86.format(n=n, model="Test CPU", flags=flags) for n in range(cores))


@pytest.mark.parametrize("text,found", [
    (cpuinfo(SAPPHIRE_RAPIDS), "AMX"),  # AMX is preferred to the AVX-512-BF16 it also has
    (cpuinfo(ZEN4), "AVX-512-BF16"),
    (cpuinfo(SKYLAKE), "none"),  # AVX-512 without its bf16 extension
    (cpuinfo(SKYLAKE + " amx_tile amx_int8"), "none"),  # tiles for int8 only: no bf16 tile multiply
    (ARM.format(extra=" sve bf16 i8mm"), "Arm BF16"),
    (ARM.format(extra=" sve"), "none"),
    ("processor\t: 0\nmodel name\t: Test CPU\n", "unknown"),  # no flags line: nothing to conclude from
    ("", "unknown"),
])
def test_cpu_bf16_reads_the_flags(text, found):
    assert devices.cpu_bf16(text) == found


def test_flags_are_matched_whole_not_as_substrings():
    assert devices.cpu_bf16(cpuinfo(SKYLAKE + " xavx512_bf16 amx_bf16x amx_tile")) == "none"


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    def use(flags):
        path = tmp_path / "cpuinfo"
        path.write_text(cpuinfo(flags))
        monkeypatch.setattr(devices, "CPUINFO", path)
    return use


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SPEED = ["speed", "--model", "vim_pico", "--batch", "1", "--runs", "1", "--threads", "1"]


def test_speed_with_bf16_on_a_cpu_without_it_warns_once_and_still_runs(fake_cpu, capsys):
    fake_cpu(SKYLAKE)
    assert main(SPEED + ["--amp", "bf16"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "emulated and slower than float32" in warnings[0]
    assert "mambamerge speed: warning:" in warnings[0]
    assert "cpu          bf16 arithmetic none" in captured.out and "autocast bf16" in captured.out


@pytest.mark.parametrize("flags,amp,found", [(ZEN4, "bf16", "AVX-512-BF16"), (SAPPHIRE_RAPIDS, "bf16", "AMX"),
                                             (SKYLAKE, "none", "none")])
def test_no_warning_where_bf16_runs_in_hardware_or_is_not_asked_for(fake_cpu, flags, amp, found, capsys):
    fake_cpu(flags)
    assert main(SPEED + ["--amp", amp]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert f"cpu          bf16 arithmetic {found}" in captured.out and "torch's CPU kernels: " in captured.out


def test_eval_with_bf16_warns_and_its_json_records_the_cpu(fake_cpu, tmp_path, capsys):
    fake_cpu(SKYLAKE)
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_pico", in_chans=1, img_size=28, patch_size=7, stride=7, num_classes=10,
                                    depth=1)
    path = mambamerge.save_checkpoint(model, tmp_path / "m.safetensors")
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(path), "--data", "fashion-mnist", "--limit", "16", "--runs", "1",
                 "--throughput-batch", "2", "--threads", "1", "--amp", "bf16", "--json", str(out)]) == 0
    assert "emulated and slower than float32" in capsys.readouterr().err
    assert json.loads(out.read_text())["environment"]["cpu_bf16"] == "none"
