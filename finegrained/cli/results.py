"""``finegrained tables`` (the papers' numbers beside ours, from the run records) and ``finegrained report``
(a static HTML page of what a trained classifier learned)."""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import List


def tables_command(argv: List[str]) -> int:
    from finegrained.results.plots import plot_accuracy_vs_dim
    from finegrained.results.runs import read_runs
    from finegrained.results.tables import accuracy_vs_dim_points, load_reference, select_runs, write_tables

    parser = argparse.ArgumentParser(prog="finegrained tables", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Regenerate results/tables/*.md and *.tex: the papers' numbers "
                                                 "beside ours from the run records.",
                                     epilog=published_tables_text(project_file("results/reference.csv")))
    parser.add_argument("--reference", default=None,
                        help="the papers' numbers (default: results/reference.csv here, else the project's)")
    parser.add_argument("--runs-csv", default="results/runs.csv", help="run records written by finegrained test")
    parser.add_argument("--campaign", default=None, metavar="CAMPAIGN_DIR",
                        help="read the records of this finegrained launch campaign (CAMPAIGN_DIR/runs/*.csv) instead "
                             "of --runs-csv; the tables go to CAMPAIGN_DIR/tables unless --out says otherwise")
    parser.add_argument("--runs", default=None,
                        help="which runs count: latest (per recipe), best (per recipe), all (mean), or run ids a,b,c "
                             "(default: latest; all with --campaign, the mean over its seeds)")
    parser.add_argument("--out", default=None, help="folder of the tables (default results/tables)")
    parser.add_argument("--modified", choices=["mark", "hide"], default="mark",
                        help="runs that changed their recipe (fewer epochs, smaller images, ...; the run record's "
                             "overrides): mark their numbers with ‡ and list the changes under the table (default), "
                             "or leave them out. A run that follows its recipe is always preferred for a cell")
    parser.add_argument("--plots", action="store_true", help="also draw accuracy versus representation dimension")
    args = parser.parse_args(argv)
    if args.campaign:
        from finegrained.launch.campaign import read_campaign_runs

        every_run, source = read_campaign_runs(args.campaign), os.path.join(args.campaign, "runs", "")
        args.out = args.out or os.path.join(args.campaign, "tables")
        args.runs = args.runs or "all"
    else:
        if args.runs_csv != parser.get_default("runs_csv") and not os.path.isfile(args.runs_csv):
            raise FileNotFoundError(f"{args.runs_csv}: run records not found (expected the CSV finegrained test "
                                    f"appends to)")
        every_run, source = read_runs(args.runs_csv), args.runs_csv
    args.out, args.runs = args.out or "results/tables", args.runs or "latest"
    reference = load_reference(args.reference or project_file("results/reference.csv"))
    runs = select_runs(every_run, args.runs, modified=args.modified)
    paths = write_tables(reference, runs, args.out, runs_source=source)
    with open(os.path.join(args.out, "finegrained.md")) as f:
        print(f.read())
    changed = int((every_run["overrides"].fillna("") != "").sum()) if len(every_run) else 0
    print(f"{len(runs)} run(s) from {source} ({args.runs}); wrote {len(paths)} files under {args.out}/")
    if changed:
        print(f"{changed} of the {len(every_run)} recorded run(s) changed their recipe: "
              + ("not shown (--modified mark shows them, marked ‡)" if args.modified == "hide" else
                 "marked ‡ where no run that follows its recipe fills the cell (--modified hide leaves them out)"))
    if args.plots:
        path = plot_accuracy_vs_dim(accuracy_vs_dim_points(reference, runs), os.path.join(args.out, "accuracy_vs_dim.png"))
        print(f"wrote {path}")
    return 0


def published_tables_text(reference_csv: str) -> str:
    """The published tables ``finegrained tables`` holds, one line each: its name, how many numbers, their source."""
    import pandas as pd

    try:
        reference = pd.read_csv(reference_csv)
    except (OSError, ValueError):
        return f"(the published numbers: {reference_csv}, not readable here)"
    lines = [f"The published tables ({os.path.relpath(reference_csv)}, every number with its source):"]
    for table, rows in reference.groupby("table", sort=False):
        sources = list(dict.fromkeys(str(source) for source in rows["source"]))  # each once, in file order
        if len(sources) == 1:
            lines.append(f"  {table} ({len(rows)} numbers): {sources[0]}")
        else:
            lines.append(f"  {table} ({len(rows)} numbers): {len(sources)} sources")
            lines += [f"    - {source}" for source in sources]
    return "\n".join(lines)


def project_file(relative: str) -> str:
    """``relative`` (a file or folder) in the current folder if it is there, else in the checkout this package
    runs from, else in the copy an installed package keeps (``<prefix>/share/finegrained``, setup.cfg's
    data_files: the papers' numbers and the recipes)."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    installed = os.path.join(sys.prefix, "share", "finegrained")
    for folder in (".", checkout, installed):
        if os.path.exists(os.path.join(folder, relative)):
            return relative if folder == "." else os.path.join(folder, relative)
    return os.path.join(checkout, relative)  # named as missing where a checkout would hold it


def _recipe_beside(checkpoint: str) -> str:
    """The config.yaml LightningCLI saved for the run of ``checkpoint`` (newest), or ''."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    candidates = [os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml"),
                  os.path.join(run, "config.yaml")] + sorted(
        glob.glob(os.path.join(run, "lightning_logs", "version_*", "config.yaml")), key=os.path.getmtime, reverse=True)
    return next((path for path in candidates if os.path.isfile(path)), "")


def report_command(argv: List[str]) -> int:
    from finegrained.cli.data import datamodule_from_config
    from finegrained.results.report import write_report

    parser = argparse.ArgumentParser(
        prog="finegrained report",
        description="A static HTML page of a trained classifier: per-class accuracy, most-confused pairs with "
                    "images, Grad-CAM overlays, training curves and exports (opens from disk, no server).")
    parser.add_argument("--ckpt", required=True, help="the checkpoint (best.ckpt or last.ckpt)")
    parser.add_argument("--config", default=None,
                        help="recipe whose data: section to evaluate (default: the config.yaml saved with the run)")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--out", required=True, help="folder for index.html and its images")
    parser.add_argument("--pairs", type=int, default=10, help="most-confused pairs shown")
    parser.add_argument("--images-per-pair", type=int, default=3, help="example images of each class of a pair")
    parser.add_argument("--cam-images", type=int, default=8, help="Grad-CAM overlays (half correct, half wrong)")
    parser.add_argument("--seed", type=int, default=0, help="which images are drawn")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"{args.ckpt}: checkpoint not found")
    config = args.config or _recipe_beside(args.ckpt)
    if not config:
        raise ValueError(f"no --config given and no config.yaml saved beside {args.ckpt}: pass the recipe whose "
                         f"data to evaluate (--config RECIPE)")
    path = write_report(args.ckpt, datamodule_from_config(config), args.out, split=args.split, recipe=config,
                        pairs=args.pairs, images_per_pair=args.images_per_pair, cam_images=args.cam_images,
                        seed=args.seed)
    print(f"report: {path}")
    return 0
