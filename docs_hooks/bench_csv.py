"""MkDocs hook: a benchmark CSV that ``finegrained bench`` wrote, shown as a table on the page.

A line ``<!-- bench-csv: results/bench/heads_cpu.csv | map, case, median_ms | without: (b) -->`` becomes the
CSV's chosen columns (all without the second part) as a Markdown table, leaving out rows whose cells contain
the ``without`` text, under one line saying when, on what machine and with which versions the file was
measured (its ``timestamp``, ``gpu`` or ``processor``, ``cpu_count``, ``torch`` and ``finegrained`` columns).
The page therefore shows whatever the file holds and cannot drift from it. A marker or a file that cannot be
read stops the build with one line naming the page and the file.
"""
from __future__ import annotations

import os
import re

import pandas as pd
from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!-- bench-csv: (?P<path>\S+)(?: \| (?P<columns>[^|>]*?))?(?: \| without: (?P<without>[^>]*?))? -->$")


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.3g}"  # NaN: the column does not apply to this row
    return str(value)


def _distinct(frame: pd.DataFrame, column: str) -> str:
    values = [str(v) for v in frame[column].dropna().unique()] if column in frame else []
    return " / ".join(values) or "not recorded"


def _machine(frame: pd.DataFrame) -> str:
    if "gpu" in frame and frame["gpu"].notna().any():
        return _distinct(frame, "gpu")
    cores = _distinct(frame, "cpu_count")
    return f"{cores}-core {_distinct(frame, 'processor')} ({_distinct(frame, 'torch_threads')} torch threads)"


def bench_table(path: str, columns=None, without=None) -> str:
    """The table and its one-line header; ValueError with what was expected if the file cannot serve."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as err:  # missing, empty, not a CSV
        raise ValueError(f"expected a CSV written by finegrained bench ({err})") from None
    missing = [c for c in ("timestamp", "torch") if c not in frame]
    if frame.empty or missing:
        raise ValueError(f"expected rows and the columns timestamp and torch (missing: {', '.join(missing) or 'rows'})")
    chosen = [c.strip() for c in columns.split(",")] if columns else list(frame.columns)
    unknown = [c for c in chosen if c not in frame]
    if unknown:
        raise ValueError(f"no column {', '.join(unknown)} (it has {', '.join(frame.columns)})")
    if without:
        frame = frame[~frame[chosen].astype(str).apply(lambda col: col.str.contains(without, regex=False)).any(axis=1)]
    when = ", ".join(sorted({str(t)[:10] for t in frame["timestamp"].dropna()}))
    header = (f"*`{path}`: measured {when} on {_machine(frame)}; torch {_distinct(frame, 'torch')}, "
              f"finegrained {_distinct(frame, 'finegrained')}.*")
    return header + "\n\n" + frame[chosen].map(_cell).to_markdown(index=False, disable_numparse=True) + "\n"


def render(markdown: str, root: str, page: str) -> str:
    lines = markdown.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.lstrip().startswith("<!-- bench"):
            continue
        marker = MARKER.match(line.strip())
        where = f"{page}:{number}"
        if not marker:
            raise PluginError(f"error: {where}: expected <!-- bench-csv: PATH | COLUMN, ... | without: TEXT --> "
                              f"(the last two parts optional), got {line.strip()!r}")
        try:
            lines[number - 1] = bench_table(os.path.join(root, marker["path"]), marker["columns"], marker["without"]) \
                .replace(os.path.join(root, ""), "")
        except ValueError as err:
            raise PluginError(f"error: {where}: {marker['path']}: {err}") from None
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    return render(markdown, os.path.dirname(config["config_file_path"]), page.file.src_uri if page else "page")
