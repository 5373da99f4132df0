"""What the commands print and draw: the results table's columns agree with each other, top-5, the
n/a notes, plain progress lines off a terminal, the accuracy plot's colours and labels, wrapped figure
titles, and visualize's colour inputs and class-token mark."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import mambamerge
from mambamerge import plots
from mambamerge.cli.main import main
from mambamerge.data import load_dataset
from mambamerge.diagnostics import canvas, figures
from mambamerge.results import markdown_table

pytestmark = pytest.mark.usefixtures("keep_torch_threads")  # the commands set torch's threads

TINY = dict(in_chans=1, img_size=56, patch_size=8, stride=8, num_classes=10, depth=2)
FAST = ["--limit", "48", "--runs", "1", "--throughput-batch", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_pico", **TINY)
    return str(mambamerge.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


def cells(markdown: str) -> list:
    """The table of `markdown` as dicts, header -> cell."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def test_sweep_table_shows_the_dense_figure_its_speed_up_is_against_and_top5(checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--checkpoint", checkpoint, "--data", "fashion-mnist", *FAST, "--out", str(out),
            "--methods", "tome", "random", "--reductions", "0.2", "0.4"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    table = cells((out / "results.md").read_text())
    assert {"top-5", "GMACs (1-dir)", "GMACs (2-dir)", "images/s", "dense images/s", "speed-up"} <= set(table[0])
    assert not any("GFLOPs" in header for header in table[0])
    for row, line in zip(rows, table):
        if row["status"] != "ok":
            continue
        assert float(line["speed-up"].rstrip("x")) == pytest.approx(
            float(line["images/s"]) / float(line["dense images/s"]), abs=0.011)  # both from one timing
        assert row["speedup"] == pytest.approx(row["inputs_per_s"] / row["dense_inputs_per_s"])
        assert line["top-5"] == f"{row['top5']:.2%}" and row["top1"] <= row["top5"]
        assert row["delta_top5"] == pytest.approx(row["top5"] - rows[0]["top5"])
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"top5", "delta_top5", "gmacs_total_one_direction", "inputs_per_s", "dense_inputs_per_s"} <= set(header)


def test_top5_is_the_share_of_labels_among_the_five_highest_logits(checkpoint):
    from mambamerge.evaluate import top_k_accuracy
    model = mambamerge.load_checkpoint(checkpoint, img_size=56).eval()
    data = load_dataset("fashion-mnist", "test", img_size=56, in_chans=1, limit=40)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([int(data[i][1]) for i in range(len(data))])
    with torch.no_grad():
        logits = model(images)
    in_top5 = [int(label) in logits[i].argsort(descending=True)[:5].tolist() for i, label in enumerate(labels)]
    scores = top_k_accuracy(model, data, (1, 5, 10), batch_size=16)
    assert scores[5] == pytest.approx(sum(in_top5) / len(in_top5))
    assert scores[1] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert scores[10] is None  # 10 classes: every label is among the top 10


def test_unreachable_cells_get_one_true_note_per_reason(checkpoint, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--checkpoint", checkpoint, "--data", "fashion-mnist", *FAST, "--out", str(out),
            "--methods", "tome", "rmeeto", "stm", "--reductions", "0.5", "0.6", "0.7", "0.8",
            "--option", "every=1"]
    assert main(argv) == 0
    markdown = (out / "results.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    stopped = [r for r in rows if r["status"] == "n/a"]
    notes = [line for line in markdown.splitlines() if line.startswith("- ")]
    assert len(stopped) >= 6 and len(notes) == 1  # the same schedule stops them all, for the same reason
    assert all(f"{r['method']} {r['target_reduction']:.0%} (at most {r['most_reduction']:.1%})" in notes[0]
               for r in stopped)
    assert "every=1" in notes[0] and "--option every=1" not in markdown  # already every=1: not advised again


def test_tables_name_the_inputs_of_the_family():
    rows = [{"method": "dense", "target_reduction": 0.0, "status": "ok", "average_reduction": 0.0, "final_tokens": 65,
             "top1": 0.5, "top5": None, "delta_top1": 0.0, "gmacs_total_one_direction": 0.01,
             "gmacs_total_both_directions": 0.02, "inputs_per_s": 10.0, "dense_inputs_per_s": 10.0, "speedup": 1.0}]
    for kind in ("clips", "spectrograms"):
        text = markdown_table(rows, kind)
        assert f"| {kind}/s | dense {kind}/s |" in text and "image" not in text
        assert f"per {kind[:-1]}" in text and "| — |" in text  # top-5 of 5 classes or fewer: not shown


def test_a_sweep_off_a_terminal_prints_a_line_per_configuration_as_it_ends(checkpoint, tmp_path):
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "mambamerge", "sweep", "--checkpoint", checkpoint, "--data", "fashion-mnist",
            *FAST, "--out", str(out), "--methods", "tome", "random", "--reductions", "0.2", "0.4"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "0"})
    lines, running_at_first = [], None
    for line in process.stderr:  # read as it comes: the pipe is not a terminal
        if line.startswith("sweep "):
            lines.append(line)
            if running_at_first is None:
                running_at_first = process.poll() is None and not (out / "results.json").exists()
    process.wait(timeout=300)
    assert process.returncode == 0, process.stdout.read()
    rows = json.loads((out / "results.json").read_text())["rows"]
    ran = [row for row in rows if row["status"] == "ok"]
    assert running_at_first  # the first line came while the sweep was still running
    assert len(lines) == len(ran) >= 4 and lines[0].startswith(f"sweep 1/{len(ran)} configs: dense: top-1 ")
    for line, row in zip(lines[1:], ran[1:]):
        assert f"{row['method']} {row['target_reduction']:.0%}: top-1 {row['top1']:.2%}" in line
    assert "left)" in lines[1] and "elapsed" in lines[-1]
    assert "\x1b[" not in "".join(lines)


def test_log_lines_come_every_interval_within_a_long_piece_of_work(capsys, monkeypatch):
    from mambamerge import progress as progress_module
    clock = iter(range(0, 1000, 20))
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    lines = progress_module.LogLines(range(6), desc="top-1", unit="batches", every=30)
    assert list(lines) == list(range(6))
    printed = capsys.readouterr().err.splitlines()
    assert len(printed) == 3 and printed[0].startswith("top-1 2/6 batches (40 s elapsed, about 1 min 20 s left)")


def test_each_method_keeps_its_colour_and_no_speed_up_labels_overlap(monkeypatch):
    figures_drawn = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures_drawn.append(fig) or b"")

    def rows(methods):
        out = [{"method": "dense", "target_reduction": 0.0, "top1": 0.9, "gmacs_total_one_direction": 1.0,
                "speedup": 1.0}]
        for method in methods:  # speed-ups close together: the labels would sit on each other
            out += [{"method": method, "target_reduction": t, "top1": 0.8 - t / 2, "gmacs_total_one_direction": 1 - t,
                     "speedup": 1.0 + t + 0.005 * len(method)} for t in (0.2, 0.4, 0.6, 0.8)]
        return out

    plots.accuracy_png(rows(["tome", "mame", "stm"]), "all", "batch 8")
    plots.accuracy_png(rows(["stm"]), "one", "batch 8")
    colours = [{line.get_label(): line.get_color() for line in fig.axes[0].get_lines()} for fig in figures_drawn]
    assert colours[0]["stm"] == colours[1]["stm"] == plots.method_style("stm")[0]
    assert len({colours[0][m] for m in ("tome", "mame", "stm")}) == 3
    fig = figures_drawn[0]
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in fig.axes[1].texts]
    assert len(boxes) == 12
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_correlation_title_fits_its_figure(monkeypatch):
    drawn = []
    monkeypatch.setattr(figures, "_png", lambda fig: drawn.append(fig) or b"")
    rows = [{"statistic": f"stat {i}", "by_block": {1: 0.1 * i, 3: -0.1 * i}} for i in range(4)]
    figures.correlation_png(rows, [1, 3], "vim_nano_fmnist: Spearman ρ(statistic, leave-one-out KL), mean over "
                                          "images\n(> 0: tokens with a high statistic are the costly ones to remove)")
    fig = drawn[0]
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= title.x0 and title.x1 <= fig.bbox.x1


def test_colour_inputs_are_drawn_in_colour_and_the_class_token_is_marked(monkeypatch):
    model = mambamerge.create_model("vim_pico")  # 3x32x32, 4x4 patches of 8, class token in the middle (index 8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.rand(2, 3, 32, 32)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    colour = canvas.colour_planes(normalised, model.layout, model.input_kind, mean, std)
    assert colour.shape == (2, 32, 32, 3) and torch.allclose(colour, pixels.permute(0, 2, 3, 1), atol=1e-6)
    assert canvas.colour_planes(normalised[:, :1], model.layout, model.input_kind, mean[:1], std[:1]) is None  # grey: no colour
    geometry = canvas.patch_geometry(model)
    assert canvas.class_token_mark(model.layout, geometry, (32, 32)) == (0, 19.5, -0.5)  # before patch 8: row 2
    video = mambamerge.create_model("videomamba_nano")
    assert canvas.class_token_mark(video.layout, canvas.patch_geometry(video), (8, 32, 32)) == (0, 3.5, -0.5)

    drawn = []
    monkeypatch.setattr(figures, "_png", lambda fig: drawn.append(fig) or b"")
    planes = canvas.grid_planes(normalised, model.layout, model.input_kind)
    groups = torch.arange(16).repeat(2, 1)
    steps = [{"block": 1, "tokens": 16, "picture": canvas.group_pictures(planes, groups, model.layout.grid, geometry)}]
    figures.merge_groups_png(planes, model.layout.axes, steps, None, "title", colour=colour,
                             cls_mark=canvas.class_token_mark(model.layout, geometry, (32, 32)))
    first = drawn[0].axes[0]
    assert first.get_images()[0].get_array().shape == (32, 32, 3)
    marks = [line for line in first.get_lines() if line.get_marker() == ">"]
    assert len(marks) == 1 and tuple(marks[0].get_xydata()[0]) == (-0.5, 19.5)
    assert "class token" in drawn[0]._suptitle.get_text()
