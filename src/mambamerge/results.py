"""Evaluation results as texts: the markdown table, CSV and JSON, and the environment they came from.

A result row is a dict: what mambamerge.evaluate.evaluate returns plus status "ok", delta_top1 and
speedup (against the dense row); or, for a configuration a method cannot reach, method,
target_reduction, options, status "n/a" and the reason.
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
from mambamerge.ops import mixer_backend
from mambamerge.threads import openmp_waiting

# (header, key, format) of the markdown table
TABLE: List[Tuple[str, str, Callable[[object], str]]] = [
    ("method", "method", str),
    ("target reduction", "target_reduction", "{:.0%}".format),
    ("avg reduction", "average_reduction", "{:.1%}".format),
    ("final tokens", "final_tokens", str),
    ("top-1", "top1", "{:.2%}".format),
    ("Δ top-1 (pp)", "delta_top1", lambda v: f"{100 * v:+.2f}"),
    ("GFLOPs (1-dir)", "gflops_total_one_direction", "{:.4g}".format),
    ("images/s", "images_per_s", "{:.1f}".format),
    ("speed-up", "speedup", "{:.2f}x".format),
]
CSV_FIELDS = ["method", "target_reduction", "status", "reason", "average_reduction", "average_tokens",
              "final_tokens", "initial_tokens", "top1", "delta_top1", "gflops_one_direction",
              "gflops_both_directions", "gflops_merge_overhead", "gflops_total_one_direction",
              "gflops_total_both_directions", "images_per_s", "dense_images_per_s", "speedup", "throughput_batch",
              "timing_runs", "images", "options", "removals"]


def markdown_table(rows: List[dict]) -> str:
    """The results as a markdown table; n/a cells for unreachable configurations, whose reasons follow
    the table as a list."""
    lines = ["| " + " | ".join(header for header, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    reasons = []
    for row in rows:
        cells = [fmt(row[key]) if key in row else "n/a" for _, key, fmt in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
        if row["status"] == "n/a":
            reasons.append(f"- {row['method']} at {row['target_reduction']:.0%}: {row['reason']}")
    notes = ["", "GFLOPs: GMACs per image, scan branch counted once (the literature's convention), merge "
             "overhead included. Δ top-1: against the dense row. Speed-up: against the dense forward timed "
             "interleaved with each configuration (median of the runs)."]
    if reasons:
        notes += ["", "n/a: the method cannot reach that average reduction with this schedule (on the command "
                  "line, --option every=1 steps before every block and reaches further):", *reasons]
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
    """Where and when the numbers were measured."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mambamerge": mambamerge.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads(),
            "openmp_waiting": openmp_waiting(),
            "scan": mixer_backend(device)}


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
