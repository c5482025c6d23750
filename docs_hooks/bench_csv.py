"""MkDocs hook: a benchmark CSV that ``finegrained bench`` wrote, shown as a table on the page.

A line ``<!-- bench-csv: results/bench/heads_cpu.csv | map, case, median_ms -->`` in a page becomes the
CSV's chosen columns as a Markdown table, under one line saying when, on what machine and with which
versions the file was measured (its ``timestamp``, ``gpu`` or ``processor``, ``cpu_count``, ``torch`` and
``finegrained`` columns). The page therefore shows whatever the file holds and cannot drift from it.
"""
from __future__ import annotations

import os
import re

import pandas as pd

MARKER = re.compile(r"^<!-- bench-csv: (?P<path>\S+)(?: \| (?P<columns>[^>]*?))? -->$", re.M)


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.3g}"  # NaN: the column does not apply to this row
    return str(value)


def bench_table(path: str, columns=None) -> str:
    frame = pd.read_csv(path)
    first = frame.iloc[0]
    if "gpu" in frame and isinstance(first.get("gpu"), str):
        machine = first["gpu"]
    else:
        machine = f"{first.get('cpu_count', '?')}-core {first.get('processor', 'CPU')} ({first.get('torch_threads', '?')} torch threads)"
    version = first["finegrained"] if "finegrained" in frame and isinstance(first.get("finegrained"), str) \
        else "not recorded"
    when = ", ".join(sorted({str(t)[:10] for t in frame["timestamp"]}))
    header = (f"*`{path}`: measured {when} on {machine}; torch {first['torch']}, finegrained {version}.*")
    shown = frame[[c.strip() for c in columns.split(",")]] if columns else frame
    return header + "\n\n" + shown.map(_cell).to_markdown(index=False, disable_numparse=True) + "\n"


def on_page_markdown(markdown, page, config, files):
    root = os.path.dirname(config["config_file_path"])
    return MARKER.sub(lambda m: bench_table(os.path.join(root, m["path"]), m["columns"])
                      .replace(os.path.join(root, ""), ""), markdown)
