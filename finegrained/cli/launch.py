"""``finegrained launch``: run recipes × seeds as a campaign on SLURM (a job array through submitit) or here.

::

    finegrained launch RECIPE... --out CAMPAIGN_DIR [--executor slurm|local] [--seeds 0 1 2] [--max_parallel N]
                       [--partition P --nodes N --gpus_per_node G --cpus_per_task C --mem_gb M --time MIN ...]
                       [--data.init_args.root DIR ...any fit/test setting]
    finegrained launch status CAMPAIGN_DIR
    finegrained launch collect CAMPAIGN_DIR [finegrained tables options]

Every ``--section.key VALUE`` option is handed to both ``finegrained fit`` and ``finegrained test`` of every job.
Launching again into the same folder submits only the jobs that are neither done nor queued; they resume from
their ``last.ckpt``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import sys
from typing import List, Tuple

import yaml

USAGE = ("finegrained launch RECIPE... --out CAMPAIGN_DIR [options] [--section.key VALUE ...] | "
         "finegrained launch status CAMPAIGN_DIR | finegrained launch collect CAMPAIGN_DIR [tables options]")


SIGNAL_DELAY_S = 120  # how long before its time limit a SLURM job is told to requeue itself


def split_recipe_settings(argv: List[str]) -> Tuple[List[str], List[str]]:
    """(launch's own arguments, the ``--section.key [VALUE]`` settings for fit and test, in order)."""
    own, settings, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            settings.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                settings.append(argv[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, settings


def expand_recipes(patterns: List[str]) -> List[str]:
    """The recipe files of ``patterns`` (globs expanded, in order, each once), as absolute paths."""
    recipes: List[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"{pattern}: no recipe matches; expected YAML recipe files (recipes/cub/*.yaml)")
        for path in matches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: recipe not found; expected a YAML recipe file")
            try:
                with open(path, encoding="utf-8") as f:
                    content = yaml.safe_load(f)
            except (UnicodeDecodeError, yaml.YAMLError):
                content = None
            if not isinstance(content, dict):
                raise ValueError(f"{path}: not a recipe; expected a YAML mapping of settings (trainer:, model:, "
                                 f"data:, or base:)")
            if os.path.abspath(path) not in recipes:
                recipes.append(os.path.abspath(path))
    return recipes


def _key_value(text: str) -> Tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (an sbatch option without its dashes)")
    key, value = text.split("=", 1)
    return key.lstrip("-"), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegrained launch", usage=USAGE, allow_abbrev=False,
        description="Run recipes × seeds as one campaign: each job runs finegrained fit then test (the same "
                    "checkpoint rule and run record, with the SLURM job id), on SLURM as a job array through "
                    "submitit, or on this machine. Every --section.key VALUE option goes to fit and test.")
    parser.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files or globs (recipes/cub/*.yaml)")
    parser.add_argument("--out", help="the campaign folder (new, empty, or an earlier campaign's)")
    parser.add_argument("--estimate", action="store_true",
                        help="print each job's GPU-hours (epochs × training images ÷ the images/s finegrained bench "
                             "step measured on a GPU) and submit nothing")
    parser.add_argument("--bench", default=None, metavar="FOLDER",
                        help="where the bench step CSVs are (default: results/bench here, else the project's)")
    parser.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one job per recipe and seed (default 0)")
    parser.add_argument("--max_parallel", type=int, default=16, help="jobs running at once (default 16)")
    slurm = parser.add_argument_group("resources of each job (SLURM's names; the local executor uses --gpus_per_node)")
    slurm.add_argument("--partition")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus_per_node", type=int, default=1, help="GPUs per node, one DDP process each (default 1)")
    slurm.add_argument("--tasks_per_node", type=int, default=None,
                       help="processes per node (default: one per GPU; for CPU-only DDP set it with --gpus_per_node 0)")
    slurm.add_argument("--cpus_per_task", type=int, default=None)
    slurm.add_argument("--mem_gb", type=float, default=None)
    slurm.add_argument("--time", type=int, default=1440, help="time limit of each job in minutes (default 1440); "
                       "a job that reaches it is requeued and resumes")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--slurm_additional", type=_key_value, nargs="+", default=[], metavar="KEY=VALUE",
                       help="other sbatch options, e.g. mail-type=END reservation=gpu")
    slurm.add_argument("--max_requeues", type=int, default=10,
                       help="time-limit requeues before a job is given up (default 10)")
    return parser


def launch_command(argv: List[str]) -> int:
    if argv and argv[0] == "status":
        return status_command(argv[1:])
    if argv and argv[0] == "collect":
        return collect_command(argv[1:])
    own, settings = split_recipe_settings(argv)
    args = _parser().parse_args(own)
    _refuse_bad_arguments(args)
    recipes = expand_recipes(args.recipes)
    configs = [check_settings(recipe, settings) for recipe in recipes]
    if args.estimate:
        return estimate(recipes, configs, args)
    if not args.out:
        raise ValueError("finegrained launch: --out CAMPAIGN_DIR is required (the folder of the campaign's jobs, "
                         "checkpoints and records)")
    return launch(recipes, settings, args)


def _refuse_bad_arguments(args: argparse.Namespace) -> None:
    """Every value that SLURM or the jobs would refuse later, refused now in one line."""
    for flag in ("max_parallel", "nodes", "max_requeues", "time"):
        if getattr(args, flag) < (0 if flag == "max_requeues" else 1):
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    if args.executor == "slurm" and args.time * 60 < 2 * SIGNAL_DELAY_S:
        raise ValueError(f"--time {args.time}: expected at least {2 * SIGNAL_DELAY_S // 60} minutes (a job is told "
                         f"{SIGNAL_DELAY_S} s before its time limit to requeue itself)")
    bad_seeds = [seed for seed in args.seeds if not 0 <= seed < 2 ** 32]
    if bad_seeds:
        raise ValueError(f"--seeds {bad_seeds[0]}: expected seeds from 0 to {2 ** 32 - 1} (what the random "
                         f"generators accept)")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"{args.out}: not a folder; expected --out to name a new or empty folder, or an "
                                 f"earlier campaign's")
    if args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        raise ValueError("--gpus_per_node must be 0 or more and --tasks_per_node 1 or more")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")


def check_settings(recipe: str, settings: List[str]):
    """Parse the recipe with the settings as ``finegrained fit`` and ``test`` will (nothing is built), and return
    the fit's configuration: a typo fails here, in one line, not in every job after its wait in the queue."""
    from finegrained.cli.train import check_command_line

    config = check_command_line(["fit", "--config", recipe] + settings)
    check_command_line(["test", "--config", recipe] + settings)
    return config


def estimate(recipes: List[str], configs: list, args: argparse.Namespace) -> int:
    from finegrained.cli.results import project_file
    from finegrained.launch.cost import cost_table, job_cost, measured_steps, total_hours

    bench = args.bench or project_file("results/bench")
    steps = measured_steps(bench)
    rows = [{"recipe": os.path.relpath(recipe), **job_cost(config, steps)} for recipe, config in zip(recipes, configs)]
    print(cost_table(rows))
    per_seed = total_hours(rows)
    missing = sum(row["gpu_hours"] is None for row in rows)
    if per_seed is not None:
        print(f"Total: {per_seed * len(args.seeds):.1f} GPU-hours for {len(rows) - missing} recipe(s) × "
              f"{len(args.seeds)} seed(s) (training epochs only; test-set evaluation, a first stage and requeues "
              f"add more)")
    if missing:
        print(f"{missing} recipe(s) without an estimate: no GPU step measurement of their backbone, head and crop "
              f"in {bench}/step_cuda*.csv (finegrained bench step on a GPU), or an unknown training-set size")
    return 0

def launch(recipes: List[str], settings: List[str], args: argparse.Namespace) -> int:
    from finegrained.launch.campaign import Campaign, JobSpec, job_names
    from finegrained.launch.status import live_jobs
    from finegrained.launch.submit import Resources, make_executor, run_local, submit_slurm

    names = job_names(recipes, args.seeds)
    specs = [JobSpec(name=name, recipe=recipe, seed=seed, overrides=settings)
             for name, (recipe, seed) in zip(names, [(r, s) for r in recipes for s in args.seeds])]
    campaign = Campaign(args.out)
    resources = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                          cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time,
                          partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
                          additional=dict(args.slurm_additional), max_requeues=args.max_requeues,
                          signal_delay_s=SIGNAL_DELAY_S)
    checked = campaign.check_jobs(specs)  # before anything is written
    runner = make_executor(campaign, args.executor, resources, args.max_parallel,
                           name=f"fg-{os.path.basename(os.path.abspath(args.out))}")
    recorded = {"executor": args.executor, **vars(resources)}
    queued = set()
    if campaign.exists() and campaign.job_ids():  # a job still queued or running is not submitted twice
        live = live_jobs(campaign.job_ids()) or {}
        queued = {name for name, job_id in campaign.job_ids().items() if job_id in live}
    todo = [spec for spec in specs if not campaign.is_done(spec.name) and spec.name not in queued]
    new = not campaign.exists()
    skipped = len(specs) - len(todo)
    if skipped:
        print(f"{skipped} of {len(specs)} job(s) already done, queued or running in {campaign.folder}: not "
              f"submitted again")
    if not todo:
        return 0
    cwd = os.getcwd()
    if args.executor == "slurm":
        before = set(os.listdir(campaign.logs)) if os.path.isdir(campaign.logs) else set()
        try:
            ids = submit_slurm(runner, campaign, todo, cwd)
        except OSError:  # nothing was queued: leave nothing of this submission behind
            for entry in set(os.listdir(campaign.logs)) - before if os.path.isdir(campaign.logs) else ():
                path = os.path.join(campaign.logs, entry)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            if new:  # the folder was new or empty
                with contextlib.suppress(OSError):
                    os.rmdir(campaign.logs)
                    os.rmdir(campaign.folder)
            raise
        campaign.create_or_extend(specs, recorded, checked=checked)
        campaign.add_submission("slurm", ids)
        arrays = sorted({job_id.split("_")[0] for job_id in ids.values()})
        print(f"Submitted {len(ids)} job(s) to SLURM" + (f" as job array {arrays[0]}, at most {args.max_parallel} "
                                                         f"at once:" if len(ids) > 1 else ":"))
        for name, job_id in ids.items():
            print(f"  {job_id}  {name}")
        print(f"Follow with: finegrained launch status {args.out}")
        return 0
    failed = []

    def report(spec, job_id, error):
        if error is None:
            print(f"done    {spec.name} ({job_id})", flush=True)
        else:
            failed.append(spec.name)
            print(f"failed  {spec.name} ({job_id}): {campaign.state(spec.name).get('error') or error}", flush=True)

    campaign.create_or_extend(specs, recorded, checked=checked)
    print(f"Running {len(todo)} job(s) here, at most {args.max_parallel} at once (logs under {campaign.logs}/)")
    try:
        run_local(runner, campaign, todo, cwd, args.max_parallel, report)
    except KeyboardInterrupt:
        print("Stopped by Ctrl-C; the running jobs were stopped. Launch again with the same --out to resume "
              "them.", file=sys.stderr)
        return 130
    records = os.path.join(campaign.folder, "runs")
    print(f"{len(todo) - len(failed)} of {len(todo)} job(s) done; records under {records}/")
    return 1 if failed else 0


def status_command(argv: List[str]) -> int:
    from finegrained.launch.status import campaign_status, status_summary

    parser = argparse.ArgumentParser(prog="finegrained launch status", allow_abbrev=False,
                                     description="One row per job of a campaign: its SLURM id, state, epoch, top-1, "
                                                 "requeues and, for a failed job, its one-line error.")
    parser.add_argument("campaign", metavar="CAMPAIGN_DIR")
    args = parser.parse_args(argv)
    table = campaign_status(args.campaign)
    print(table.to_string(index=False) if len(table) else "(no jobs)")
    print(status_summary(table))
    return 0


def collect_command(argv: List[str]) -> int:
    """``finegrained tables --campaign CAMPAIGN_DIR``: the tables from that campaign's records."""
    from finegrained.cli.results import tables_command

    if not argv or argv[0].startswith("-"):
        raise ValueError("finegrained launch collect: expected CAMPAIGN_DIR first (finegrained launch collect "
                         "CAMPAIGN_DIR [tables options])")
    return tables_command(["--campaign", argv[0]] + argv[1:])
