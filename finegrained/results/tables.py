"""Comparison tables: the tutorial's numbers beside ours, from ``results/reference.csv`` and run records.

Layout follows the tutorial: one row per (method, backbone, dim), one column per dataset (Birds,
Aircraft, Cars) for the fine-grained tables, or per metric (top-1 / top-5 error, time) for the
others. A cell reads ``paper / ours (Δ)``; the best paper value and the best of ours in a column
are bold; a number that does not exist is ``—``, never invented. A column prints every number with
the most decimals the paper prints in it (read from the CSV text, so ``24.70`` and ``0.505`` keep
their digits and ``24.7`` beside ``23.82`` reads ``24.70``). Our numbers come only from run
records (:mod:`finegrained.results.runs`), selected by ``runs``: ``latest`` (default) or ``best`` run per
recipe, ``all`` (mean over runs), or a comma-separated list of run ids. A run matches a row by its dataset id
(the DataModule's ``dataset_id``: ``cub``, ``aircraft``, ``cars``, ...), method and backbone.

A run that changed its recipe (its ``overrides``: fewer epochs, smaller images, no pretrained weights, ...) is
not the paper's protocol: where a run that follows its recipe exists for the same recipe or cell it is shown
instead; otherwise the modified run's number is marked ``‡n`` and its overrides are listed under the table
(``modified="mark"``, the default), or it is left out (``modified="hide"``).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pandas as pd

from finegrained.heads import available_heads, head_display_name

DASH = "—"
MODIFIED_MARK = "‡"
MODIFIED_CHOICES = ("mark", "hide")
DATASET_COLUMNS = {"cub": "Birds", "aircraft": "Aircraft", "cars": "Cars", "mit": "MIT Indoor",
                   "imagenet": "ImageNet-1K", "imagenet_a": "ImageNet-A"}
METRIC_COLUMNS = {"top1_acc": "Top-1 acc.", "top5_acc": "Top-5 acc.", "top1_err": "Top-1 err.", "top5_err": "Top-5 err.",
                  "time_ms": "FP+BP (ms)", "time_ms_bp": "BP (ms)", "memory": "Memory"}
LOWER_IS_BETTER = {"top1_err", "top5_err", "time_ms", "time_ms_bp", "memory"}
# Rows of the reference tables that are not heads of this library (other papers' methods, ablations,
# timings); the heads' display names come from their registry.
REFERENCE_METHOD_NAMES = {
    "sop": "SOP", "gm_gap": "GM-GAP", "fbn": "FBN", "sort": "SORT", "isqrt_frobenius": "iSQRT-COV (Frob.)",
    "isqrt_n3": "iSQRT-COV (N=3)", "isqrt_bn_compensation": "iSQRT-COV (BN compensation)",
    "improved_bcnn_svd": "Improved B-CNN (SVD)", "eig": "EIG", "svd": "SVD",
    "cls_token": "Class token (baseline)", "isice_precision": "Precision matrix (iSICE Alg. 1)",
    "mtp": "MTP-Lya", "ns_iteration": "NS iteration", "svd_pade": "SVD-Padé",
}
METHOD_NAMES = {**{name: head_display_name(name) for name in available_heads()}, **REFERENCE_METHOD_NAMES}
BACKBONE_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
                  "resnet152": "ResNet-152", "vgg16": "VGG-16", "alexnet": "AlexNet", "wrn36_2": "WRN-36-2",
                  "efficientnet_lite0": "EfficientNet-Lite0", "resnet34": "ResNet-34", "deit_t": "DeiT-T",
                  "deit_s": "DeiT-S", "deit_b": "DeiT-B", "swin_t": "Swin-T", "swin_b": "Swin-B",
                  "t2t_vit_14": "T2T-ViT-14", "sot_tiny": "SoT-Tiny", "sot_small": "SoT-Small", "sot_base": "SoT-Base",
                  "so_vit_7": "So-ViT-7", "so_vit_10": "So-ViT-10", "so_vit_14": "So-ViT-14",
                  "matrix_48": "64 × 48×48", "timm/convnext_tiny": "ConvNeXt-T",
                  "timm/vit_small_patch16_224": "ViT-S/16"}
TITLES = {"finegrained": "Fine-grained top-1 accuracy (%)", "fgvc_comparison": "FGVC comparison, top-1 accuracy (%)",
          "imagenet_resnet": "ImageNet, ResNets (error %)", "imagenet_alexnet": "ImageNet, AlexNet meta-layers (error %)",
          "isqrt_post_compensation": "iSQRT-COV post-compensation, ResNet-50 on ImageNet (error %)",
          "meta_layer_timing": "Single meta-layer cost, AlexNet on ImageNet",
          "eig_svd_timing": "EIG / SVD of a 256×256 covariance (ms)", "gmsop_imagenet": "GM-SOP on ImageNet-1K (error %)",
          "places365": "Places365 (error %)", "imagenet64": "ImageNet-1K at 64×64 (error %)",
          "sot_imagenet": "SoT on ImageNet-1K and ImageNet-A, top-1 accuracy (%)",
          "dropcov_imagenet": "DropCov on ImageNet-1K, top-1 accuracy (%)",
          "isice_fgvc": "iSICE, fine-grained and scene top-1 accuracy (%)",
          "mpa_sovit_imagenet": "Matrix square roots in So-ViT on ImageNet-1K, accuracy (%)",
          "mpa_timing": "Matrix square root FP+BP, 64 matrices of 48×48 (ms)"}


def load_reference(path: str = "results/reference.csv") -> pd.DataFrame:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the papers' numbers not found (expected results/reference.csv of the project)")
    reference = pd.read_csv(path, dtype={"dim": str, "backbone": str, "dataset": str, "value": str},
                            keep_default_na=False)
    required = {"method", "backbone", "dim", "dataset", "metric", "value", "source", "table"}
    missing = required - set(reference.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    # The decimals come from the text as the paper printed it: a float has forgotten that 24.70 had two.
    reference["decimals"] = reference["value"].map(_printed_decimals)
    reference["value"] = reference["value"].astype(float)
    # Optional: the classifier the paper's number was measured with (B-CNN and HIHCA report SVM accuracy),
    # and a note marked on the row (e.g. a number from another model than the row's).
    for column, default in (("classifier", "softmax"), ("note", "")):
        if column not in reference.columns:
            reference[column] = default
        reference[column] = reference[column].replace("", default)
    return reference


def _classifier(run: pd.Series) -> str:
    value = run.get("classifier", "softmax")
    return value if isinstance(value, str) and value else "softmax"


# Records may hold a DataModule's display name instead of its id: the benchmark names map to their ids.
_DATASET_IDS = {"CUB-200-2011": "cub", "FGVC-Aircraft 2013b": "aircraft", "Stanford Cars": "cars"}


def _modified(runs: pd.DataFrame) -> pd.Series:
    return runs["overrides"].fillna("").astype(str) != ""


def select_runs(runs: pd.DataFrame, how: str = "latest", modified: str = "mark") -> pd.DataFrame:
    """One row per recipe (``latest``, ``best``, or ``all`` = mean), or the runs whose ids are listed.

    Within a recipe, runs that follow it are preferred to runs that changed it (their ``overrides``); with
    ``modified="hide"`` changed runs are left out altogether.
    """
    if modified not in MODIFIED_CHOICES:
        raise ValueError(f"modified must be one of {MODIFIED_CHOICES}, got {modified!r}")
    if runs.empty:
        return runs
    runs = runs.copy()
    runs["recipe"] = runs["recipe"].fillna("").astype(str)
    runs["classifier"] = runs.apply(_classifier, axis=1) if len(runs) else runs.get("classifier")
    runs["overrides"] = runs["overrides"].fillna("").astype(str) if "overrides" in runs else ""
    runs["dataset"] = runs["dataset"].map(lambda d: _DATASET_IDS.get(d, d))
    if modified == "hide":
        runs = runs[~_modified(runs)]
    if how not in ("latest", "best", "all"):
        ids = {i.strip() for i in how.split(",") if i.strip()}
        unknown = ids - set(runs["run_id"].astype(str))
        if unknown:
            raise ValueError(f"--runs: unknown run ids {sorted(unknown)}; use latest, best, all or ids from the runs "
                             f"file")
        return runs[runs["run_id"].astype(str).isin(ids)]
    keys = ["recipe", "classifier"]
    followed = ~_modified(runs)
    runs = runs[followed | ~followed.groupby([runs[k] for k in keys]).transform("any")]
    if how == "latest":
        return runs.sort_values("timestamp").groupby(keys, as_index=False).tail(1)
    if how == "best":
        return runs.sort_values("top1").groupby(keys, as_index=False).tail(1)
    keys += ["dataset", "method", "backbone", "head_dim", "overrides"]
    return runs.groupby(keys, as_index=False, dropna=False)[["top1", "top5", "mean_class_acc"]].mean()


def _our_value(run: pd.Series, metric: str) -> float:
    if metric == "top1_acc":
        return 100 * float(run["top1"])
    if metric == "top1_err":
        return 100 - 100 * float(run["top1"])
    if metric in ("top5_err", "top5_acc") and pd.notna(run.get("top5")) and run.get("top5") != "":
        return 100 - 100 * float(run["top5"]) if metric == "top5_err" else 100 * float(run["top5"])
    return float("nan")


def _dim_label(head_dim) -> str:
    try:
        d = int(float(head_dim))
    except (TypeError, ValueError):
        return ""
    return f"{d / 1000:.0f}K" if d >= 1000 else str(d)


class Comparison(NamedTuple):
    """Numeric (paper, ours) frames indexed by (method, backbone, dim), columns = datasets or metrics; ``overrides``
    maps a (row, column) cell filled by a run that changed its recipe to those changes."""

    paper: pd.DataFrame
    ours: pd.DataFrame
    columns: List[str]
    overrides: Dict[Tuple[tuple, str], str]


def comparison(reference: pd.DataFrame, runs: pd.DataFrame, table: str) -> Comparison:
    """The paper's numbers and ours for ``table``; a cell that both a run following its recipe and a modified run
    match shows the former."""
    ref = reference[reference["table"] == table]
    by_dataset = set(ref["metric"]) == {"top1_acc"}
    column_of = (lambda r: r["dataset"]) if by_dataset else (lambda r: r["metric"])
    columns = list(dict.fromkeys(column_of(r) for _, r in ref.iterrows()))
    paper: Dict[tuple, Dict[str, float]] = {}
    classifier_of: Dict[tuple, str] = {}
    for _, r in ref.iterrows():
        paper.setdefault((r["method"], r["backbone"], r["dim"]), {})[column_of(r)] = r["value"]
        classifier_of[(r["method"], r["backbone"], r["dim"])] = r["classifier"]
    ours: Dict[tuple, Dict[str, float]] = {row: {} for row in paper}
    overrides: Dict[Tuple[tuple, str], str] = {}
    datasets = set(ref["dataset"])
    if "overrides" in runs and len(runs):
        runs = runs.assign(_modified=_modified(runs)).sort_values("_modified", kind="stable", ascending=False)
    for _, run in runs.iterrows():
        dataset = _DATASET_IDS.get(run["dataset"], run["dataset"])
        if dataset not in datasets:
            continue
        # Like for like: a paper number measured with SVMs is compared with our SVM run, others with softmax.
        rows = [row for row in paper if row[0] == run["method"] and row[1] == run["backbone"]
                and classifier_of[row] == _classifier(run)]
        if not rows:  # a run without a paper row (e.g. a GAP baseline) gets a row of its own
            if table != "finegrained" or _classifier(run) != "softmax" or any(
                    row[0] == run["method"] and row[1] == run["backbone"] for row in paper):
                continue
            rows = [(run["method"], run["backbone"], _dim_label(run["head_dim"]))]
        changed = str(run.get("overrides") or "") if isinstance(run.get("overrides"), str) else ""
        for row in rows:
            for column in columns:
                if by_dataset and column != dataset:
                    continue
                value = _our_value(run, "top1_acc" if by_dataset else column)
                if not np.isnan(value):
                    ours.setdefault(row, {})[column] = value  # runs that follow their recipe come last and win
                    if changed:
                        overrides[(row, column)] = changed
                    else:
                        overrides.pop((row, column), None)
    index = list(paper) + [row for row in ours if row not in paper]

    def frame(values):
        return pd.DataFrame([[values.get(row, {}).get(c, np.nan) for c in columns] for row in index],
                            index=pd.MultiIndex.from_tuples(index), columns=columns, dtype=float)

    return Comparison(frame(paper), frame(ours), columns, overrides)


def _printed_decimals(text: str) -> int:
    text = str(text).strip()
    return len(text.split(".", 1)[1]) if "." in text and "e" not in text.lower() else 0


def column_decimals(reference: pd.DataFrame, table: str) -> Dict[str, int]:
    """Decimals each column of ``table`` prints: the most the paper prints in it (at least one, so that
    our numbers and differences stay readable beside whole-number papers)."""
    ref = reference[reference["table"] == table]
    key = "dataset" if set(ref["metric"]) == {"top1_acc"} else "metric"
    decimals = ref["decimals"]  # recorded by load_reference from the CSV text
    return {column: max(1, int(decimals[ref[key] == column].max())) for column in dict.fromkeys(ref[key])}


def _best(frame: pd.DataFrame, metric_of) -> Dict[str, float]:
    best = {}
    for column in frame.columns:
        values = frame[column].dropna()
        if len(values):
            best[column] = values.min() if metric_of(column) in LOWER_IS_BETTER else values.max()
    return best


def render(paper: pd.DataFrame, ours: pd.DataFrame, columns, table: str, fmt: str,
           marks: Optional[Dict[tuple, str]] = None, decimals: Optional[Dict[str, int]] = None,
           cell_marks: Optional[Dict[Tuple[tuple, str], str]] = None) -> pd.DataFrame:
    """Display frame: cells ``paper / ours (Δ)`` with the column's best values in bold; ``marks`` maps a row
    to a marker appended to its method (a footnote), ``cell_marks`` a (row, column) cell to one appended to our
    number (a run that changed its recipe); ``decimals`` gives each column's decimals (:func:`column_decimals`;
    default 1 for dataset columns, 2 for the others)."""
    by_dataset = all(c in DATASET_COLUMNS for c in columns)
    metric_of = (lambda c: "top1_acc") if by_dataset else (lambda c: c)
    best_paper, best_ours = _best(paper, metric_of), _best(ours, metric_of)
    places_of = {column: (decimals or {}).get(column, 1 if by_dataset else 2) for column in columns}

    def number(value, best, places):
        if np.isnan(value):
            return DASH
        text = f"{value:.{places}f}"
        if best is not None and np.isclose(value, best):
            text = f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"
        return text

    def name(key, names):
        text = names.get(key, key)
        if table == "finegrained" and key == "isqrt" and names is METHOD_NAMES:
            text = "MPN-COV (iSQRT-COV)"  # the tutorial's label for its ResNet rows
        return text.replace("²", "$^2$") if fmt == "tex" else text

    records = []
    for index in paper.index:
        method, backbone, dim = index
        mark = (marks or {}).get(index, "")
        if mark and fmt == "tex":
            mark = f"$^{{{mark}}}$"
        record = {"Method": name(method, METHOD_NAMES) + mark, "Backbone": name(backbone, BACKBONE_NAMES),
                  "Dim": dim or DASH}
        for column in columns:
            p, o = paper.loc[index, column], ours.loc[index, column]
            places = places_of[column]
            cell = (f"{number(p, best_paper.get(column), places)} / {number(o, best_ours.get(column), places)}"
                    f"{(cell_marks or {}).get((index, column), '')}")
            if not np.isnan(p) and not np.isnan(o):
                cell += f" ({o - p:+.{places}f})"
            header = DATASET_COLUMNS.get(column) or METRIC_COLUMNS.get(column, column)
            record[header] = cell
        records.append(record)
    return pd.DataFrame(records)


def write_tables(reference: pd.DataFrame, runs: pd.DataFrame, out_dir: str,
                 runs_source: str = "results/runs.csv") -> List[str]:
    """Write ``<table>.md`` and ``<table>.tex`` for every table of the reference (``runs_source``: where the runs
    were read, named in the caption); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for table in dict.fromkeys(reference["table"]):
        paper, ours, columns, overrides = comparison(reference, runs, table)
        title = TITLES.get(table, table)
        rows = reference[reference["table"] == table]
        sources = "; ".join(dict.fromkeys(rows["source"]))
        notes = list(dict.fromkeys(note for note in rows["note"] if note))
        marks = {(r["method"], r["backbone"], r["dim"]): "†" * (notes.index(r["note"]) + 1)
                 for _, r in rows.iterrows() if r["note"]}
        changes = list(dict.fromkeys(overrides[cell] for cell in sorted(overrides, key=str)))
        cell_marks = {cell: f"{MODIFIED_MARK}{changes.index(text) + 1}" for cell, text in overrides.items()}
        svm = sorted({METHOD_NAMES.get(r["method"], r["method"]) for _, r in rows.iterrows() if r["classifier"] == "svm"})
        decimals = column_decimals(reference, table)
        md = render(paper, ours, columns, table, "md", marks, decimals, cell_marks)
        path = os.path.join(out_dir, f"{table}.md")
        with open(path, "w") as f:
            f.write(f"### {title}\n\nCells: paper / ours (ours − paper). Paper: {sources}. "
                    f"Ours: {runs_source}. {DASH} = no number.\n\n")
            f.write(md.to_markdown(index=False) + "\n")
            if svm:
                f.write(f"\nSVM numbers (one-vs-all linear SVMs on l2-normalised features), compared with our "
                        f"`finegrained test --svm` runs: {', '.join(svm)}.\n")
            for k, note in enumerate(notes):
                f.write(f"\n{'†' * (k + 1)} {note}\n")
            for k, text in enumerate(changes):
                f.write(f"\n{MODIFIED_MARK}{k + 1} A run that changed its recipe, not the paper's protocol: "
                        f"{text.replace('|', '/')}\n")
        written.append(path)
        tex_cells = {cell: f"$^{{\\ddagger{mark[1:]}}}$" for cell, mark in cell_marks.items()}
        tex = render(paper, ours, columns, table, "tex", {row: "\\dagger" * len(mark) for row, mark in marks.items()},
                     decimals, tex_cells)
        path = os.path.join(out_dir, f"{table}.tex")
        with open(path, "w") as f:
            caption = f"{title}. Cells: paper / ours (difference).".replace("%", r"\%")
            if changes:
                caption += r" $\ddagger$: a run that changed its recipe (" + "; ".join(
                    f"{k + 1}: {_tex_escape(text)}" for k, text in enumerate(changes)) + ")."
            f.write(tex.to_latex(index=False, escape=False, caption=caption,
                                 label=f"tab:{table}", column_format="lll" + "r" * len(columns)))
        written.append(path)
    return written


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(text: str) -> str:
    return re.sub(r"[\\_%&#$\{\}~^]", lambda m: _TEX_SPECIAL[m.group(0)], text)


def accuracy_vs_dim_points(reference: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Points (label, dataset, dim, value, kind) of the fine-grained table for the dimension plot."""
    points = []
    ref = reference[(reference["table"] == "finegrained") & (reference["metric"] == "top1_acc")]
    for _, r in ref.iterrows():
        dim = _parse_dim(r["dim"])
        if dim:
            points.append({"label": f"{METHOD_NAMES.get(r['method'], r['method'])} ({BACKBONE_NAMES.get(r['backbone'], r['backbone'])})",
                           "dataset": DATASET_COLUMNS[r["dataset"]], "dim": dim, "value": r["value"], "kind": "paper"})
    for _, run in runs.iterrows():
        if run["dataset"] in DATASET_COLUMNS and pd.notna(run["head_dim"]):
            points.append({"label": f"{METHOD_NAMES.get(run['method'], run['method'])} ({BACKBONE_NAMES.get(run['backbone'], run['backbone'])})",
                           "dataset": DATASET_COLUMNS[run["dataset"]], "dim": float(run["head_dim"]),
                           "value": 100 * float(run["top1"]), "kind": "ours"})
    return pd.DataFrame(points, columns=["label", "dataset", "dim", "value", "kind"])


def _parse_dim(text: str) -> Optional[float]:
    text = (text or "").strip().upper()
    if not text:
        return None
    return float(text[:-1]) * 1000 if text.endswith("K") else float(text)
