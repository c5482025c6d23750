"""``finegrained launch status``: one row per job of a campaign, from what the jobs wrote and what SLURM says.

Columns: ``job`` (``<folder>-<recipe>-s<seed>``), ``seed``, ``job_id``, ``state``, ``epoch`` (completed / planned,
from the job's ``last.ckpt``), ``top1`` (its record), ``requeues`` and ``error`` (the job's one-line error).

A job's state is, in this order: ``done`` (its record is in ``runs/``); ``failed`` or ``stopped`` (what it wrote
when it stopped); SLURM's state while ``squeue`` lists it (``pending``, ``running``, ...), or ``running`` while a
local job's process lives; ``lost`` when it said it was running or requeued but neither SLURM nor this machine
runs it any more (killed without a word: out of memory, node failure, a requeue that never came; the error is
the last ``error:`` line of its log); otherwise what it last wrote, or ``not started``.
"""
from __future__ import annotations

import getpass
import glob
import os
import subprocess
from typing import Dict, List, Optional

import pandas as pd

from finegrained.launch.campaign import Campaign
from finegrained.results.runs import read_runs

STATUS_COLUMNS = ["job", "seed", "job_id", "state", "epoch", "top1", "requeues", "error"]


def slurm_states() -> Optional[Dict[str, str]]:
    """This user's jobs that SLURM holds, ``{job id: STATE}`` (one entry per array task), or None without squeue."""
    try:
        result = subprocess.run(["squeue", "--noheader", "--array", "--user", getpass.getuser(), "--format", "%i|%T"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in result.stdout.split() if "|" in line)


def _local_process_alive(pid: int) -> bool:
    """Whether the submitit process ``pid`` of a local job still runs on this machine."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"submitit" in f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return not os.path.isdir("/proc")  # without /proc, a live pid is all there is to go by


def live_jobs(job_ids: Dict[str, str]) -> Optional[Dict[str, str]]:
    """Which of ``job_ids`` (by job name) still run or wait, ``{job id: STATE}``: SLURM's jobs from ``squeue``,
    local jobs (``local-<pid>``) from their process. None when SLURM cannot be asked (no squeue here)."""
    live: Dict[str, str] = {}
    if any(not job_id.startswith("local-") for job_id in job_ids.values()):
        slurm = slurm_states()
        if slurm is None:
            return None
        live.update(slurm)
    for job_id in job_ids.values():
        if job_id.startswith("local-") and job_id[6:].isdigit() and _local_process_alive(int(job_id[6:])):
            live[job_id] = "RUNNING"
    return live


def epoch_of(campaign: Campaign, name: str) -> str:
    """``completed/planned`` epochs of the job's last.ckpt, '' before there is one."""
    from finegrained.resume import CheckpointFileError, completed_epochs, planned_epochs, read_checkpoint_file

    path = os.path.join(campaign.checkpoints(name), "last.ckpt")
    if not os.path.isfile(path):
        return ""
    try:
        checkpoint = read_checkpoint_file(path, mmap=True)
    except CheckpointFileError:
        return "?"
    planned = planned_epochs(checkpoint)
    return f"{completed_epochs(checkpoint)}/{planned}" if planned else str(completed_epochs(checkpoint))


def last_log_error(campaign: Campaign, job_id: str) -> str:
    """The last ``error:`` line of the job's stderr log, else its last line ('' without a log)."""
    lines: List[str] = []
    folder = job_id.removeprefix("local-")  # submitit names a local job's folder by its process id
    for path in sorted(glob.glob(os.path.join(glob.escape(campaign.logs), glob.escape(folder), "*_log.err"))):
        with open(path, errors="replace") as f:
            lines += [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def campaign_status(folder: str, live: Optional[Dict[str, str]] = None) -> pd.DataFrame:
    """The status table of the campaign in ``folder``; ``live`` is which jobs run or wait (default:
    :func:`live_jobs`)."""
    campaign = Campaign(folder)
    ids = campaign.job_ids()
    if live is None:
        live = live_jobs(ids)
    rows = []
    for spec in campaign.jobs():
        state = campaign.state(spec.name)
        job_id = ids.get(spec.name, "")
        queued = (live or {}).get(job_id)
        record = read_runs(campaign.record_path(spec.name))
        record = record[record["classifier"] == "softmax"]
        error = state.get("error", "")
        if campaign.is_done(spec.name):
            shown = "done"
        elif state.get("state") in ("failed", "stopped") and not queued:
            shown = state["state"]
        elif queued:
            shown = queued.lower()
        elif state.get("state") in ("running", "requeued") and live is not None:
            shown = "lost"
            error = error or last_log_error(campaign, job_id) or "no longer in the queue, no error written"
        else:
            shown = state.get("state") or ("not started" if job_id else "not submitted")
        rows.append({"job": spec.name, "seed": spec.seed, "job_id": job_id, "state": shown,
                     "epoch": epoch_of(campaign, spec.name),
                     "top1": f"{float(record['top1'].iloc[-1]):.4f}" if len(record) else "",
                     "requeues": state.get("requeues", 0), "error": error})
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def status_summary(table: pd.DataFrame) -> str:
    counts = table["state"].value_counts()
    return f"{len(table)} job(s): " + ", ".join(f"{n} {state}" for state, n in counts.items())
