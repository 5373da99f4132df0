"""Evaluation results as texts: the markdown table, CSV and JSON, and the environment they came from.

A result row is a dict: what mambamerge.evaluate.evaluate returns plus status "ok", delta_top1 and
delta_top5 (against the dense row); or, for a configuration that cannot run, method, target_reduction,
options, status "n/a" and the reason (for an unreachable target also a note without the target's
numbers and most_reduction, the most the schedule reaches).
"""
import csv
import datetime
import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import torch

import mambamerge
from mambamerge.devices import cpu_bf16
from mambamerge.ops import mixer_backend
from mambamerge.threads import openmp_waiting


def _percent(value) -> str:
    return "—" if value is None else f"{value:.2%}"


# (header, key, format) of the markdown table; "{kind}" is what the model takes (images, clips, spectrograms)
TABLE: List[Tuple[str, str, Callable[[object], str]]] = [
    ("method", "method", str),
    ("target reduction", "target_reduction", "{:.0%}".format),
    ("avg reduction", "average_reduction", "{:.1%}".format),
    ("final tokens", "final_tokens", str),
    ("top-1", "top1", _percent),
    ("top-5", "top5", _percent),
    ("Δ top-1 (pp)", "delta_top1", lambda v: f"{100 * v:+.2f}"),
    ("GMACs (1-dir)", "gmacs_total_one_direction", "{:.4g}".format),
    ("GMACs (2-dir)", "gmacs_total_both_directions", "{:.4g}".format),
    ("{kind}/s", "inputs_per_s", "{:.1f}".format),
    ("dense {kind}/s", "dense_inputs_per_s", "{:.1f}".format),
    ("speed-up", "speedup", "{:.2f}x".format),
]
CSV_FIELDS = ["method", "target_reduction", "status", "reason", "average_reduction", "average_tokens",
              "final_tokens", "initial_tokens", "top1", "top5", "delta_top1", "delta_top5", "gmacs_one_direction",
              "gmacs_both_directions", "gmacs_merge_overhead", "gmacs_total_one_direction",
              "gmacs_total_both_directions", "inputs_per_s", "dense_inputs_per_s", "speedup", "throughput_batch",
              "timing_runs", "inputs", "input_kind", "options", "removals"]


def markdown_table(rows: List[dict], kind: str = "images") -> str:
    """The results as a markdown table of `kind` (what the model takes: images, clips, spectrograms);
    n/a cells for configurations that cannot run, whose reasons follow the table, one note per reason
    (a row's "note", else its "reason") naming the configurations it stops."""
    lines = ["| " + " | ".join(header.format(kind=kind) for header, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    stopped: Dict[str, List[str]] = {}
    for row in rows:
        cells = [fmt(row[key]) if key in row else "n/a" for _, key, fmt in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
        if row["status"] == "n/a":
            most = f" (at most {row['most_reduction']:.1%})" if "most_reduction" in row else ""
            stopped.setdefault(row.get("note", row["reason"]), []).append(
                f"{row['method']} {row['target_reduction']:.0%}{most}")
    one = kind[:-1] if kind.endswith("s") else kind
    notes = ["", f"GMACs: multiply-accumulates per {one} (x10^9; the literature reports them as \"GFLOPs\"), merge "
             f"overhead included: 1-dir counts each block's scan once (the literature's convention), 2-dir both scan "
             f"directions. Δ top-1: against the dense row. {kind}/s and dense {kind}/s: medians of forwards of one "
             f"batch timed interleaved, the configuration's and the dense model's, in one measurement; speed-up is "
             f"their ratio."]
    if stopped:
        notes += ["", "n/a: configurations that cannot run, one note per reason:"]
        notes += [f"- {', '.join(configs)}: {note}" for note, configs in stopped.items()]
    return "\n".join(lines + notes) + "\n"


def csv_text(rows: List[dict]) -> str:
    """One CSV line per row, every number unformatted; n/a rows leave the numbers empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = dict(row, options=json.dumps(row.get("options", {})))
        if "schedule" in row:
            flat["removals"] = " ".join(str(r) for r in row["schedule"]["removals"])
        writer.writerow(flat)
    return out.getvalue()


def json_text(payload: dict) -> str:
    return json.dumps(payload, indent=2) + "\n"


def environment(device: torch.device) -> dict:
    """Where and when the numbers were measured (on a CPU, also its bf16 arithmetic: devices.cpu_bf16)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mambamerge": mambamerge.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads(),
            "openmp_waiting": openmp_waiting(),
            "scan": mixer_backend(device), **({"cpu_bf16": cpu_bf16()} if device.type == "cpu" else {})}


def check_writable(folder: Union[str, os.PathLike], create: bool = True) -> Path:
    """Prove `folder` writable by creating and removing a temp file in it, or, when it does not exist
    yet, in the nearest folder above it that does (so that a run refused later leaves no empty folder
    behind); create=True also creates it. A ValueError naming the folder and the reason otherwise."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write results to {folder}: {existing} is a file, not a folder; choose a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test.", suffix=".tmp"):
            pass
        if create:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write results to {folder}: {err.strerror or err}; choose a writable folder") from None
    return folder
