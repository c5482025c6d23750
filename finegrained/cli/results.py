"""``finegrained tables``: the papers' numbers beside ours, regenerated from the run records."""
from __future__ import annotations

import argparse
import os
from typing import List


def tables_command(argv: List[str]) -> int:
    from finegrained.results.plots import plot_accuracy_vs_dim
    from finegrained.results.runs import read_runs
    from finegrained.results.tables import accuracy_vs_dim_points, load_reference, select_runs, write_tables

    parser = argparse.ArgumentParser(prog="finegrained tables",
                                     description="Regenerate results/tables/*.md and *.tex: the seed's numbers "
                                                 "beside ours from the run records.")
    parser.add_argument("--reference", default="results/reference.csv")
    parser.add_argument("--runs-csv", default="results/runs.csv", help="run records written by finegrained test")
    parser.add_argument("--runs", default="latest",
                        help="which runs count: latest (per recipe), best (per recipe), all (mean), or run ids a,b,c")
    parser.add_argument("--out", default="results/tables")
    parser.add_argument("--plots", action="store_true", help="also draw accuracy versus representation dimension")
    args = parser.parse_args(argv)
    reference = load_reference(args.reference)
    runs = select_runs(read_runs(args.runs_csv), args.runs)
    paths = write_tables(reference, runs, args.out)
    with open(os.path.join(args.out, "finegrained.md")) as f:
        print(f.read())
    print(f"{len(runs)} run(s) from {args.runs_csv} ({args.runs}); wrote {len(paths)} files under {args.out}/")
    if args.plots:
        path = plot_accuracy_vs_dim(accuracy_vs_dim_points(reference, runs), os.path.join(args.out, "accuracy_vs_dim.png"))
        print(f"wrote {path}")
    return 0
