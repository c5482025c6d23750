"""Submitting a campaign's jobs with submitit: a SLURM job array, or submitit's local executor on this machine.

* ``slurm``: every job not yet done goes into one job array (``executor.batch()``), at most ``max_parallel``
  running (``%N`` of ``--array``). One task per GPU (``tasks_per_node = gpus_per_node``), so that Lightning's
  ``SLURMEnvironment`` runs DDP across the job's GPUs and nodes. ``--signal USR2@<delay>`` before the time limit
  lets submitit requeue the job (:mod:`finegrained.launch.job`). The command returns once the array is queued.
* ``local``: the jobs run on this machine, ``max_parallel`` at a time, with submitit's ``LocalExecutor``: one
  process per task (per GPU), joined into one DDP group as torchrun's would be. The command waits for them and
  reports each as it ends.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import submitit

from finegrained.launch.campaign import Campaign, JobSpec
from finegrained.launch.job import CampaignJob

EXECUTORS = ("slurm", "local")


@dataclass
class Resources:
    """What each job asks of the scheduler (SLURM's names; ``time_min`` is the time limit in minutes)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # default: one per GPU, or 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    time_min: int = 1440
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    additional: Dict[str, str] = field(default_factory=dict)
    max_requeues: int = 10
    signal_delay_s: int = 120

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def make_executor(campaign: Campaign, executor: str, resources: Resources, max_parallel: int,
                  name: str) -> submitit.Executor:
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch: not found on this machine; --executor slurm needs a SLURM client (run it on "
                                "the cluster's login node), --executor local runs the campaign here")
    folder = os.path.join(campaign.logs, "%j")
    common = dict(name=name, timeout_min=resources.time_min, gpus_per_node=resources.gpus_per_node)
    if executor == "local":
        if resources.nodes > 1:
            raise ValueError(f"--nodes {resources.nodes}: the local executor runs on this machine only; expected 1")
        runner = submitit.AutoExecutor(folder=folder, cluster="local")
        runner.update_parameters(**common, tasks_per_node=resources.tasks)
        return runner
    runner = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=resources.max_requeues)
    optional = {"cpus_per_task": resources.cpus_per_task, "mem_gb": resources.mem_gb,
                "slurm_partition": resources.partition, "slurm_account": resources.account,
                "slurm_qos": resources.qos, "slurm_constraint": resources.constraint}
    runner.update_parameters(**common, nodes=resources.nodes, tasks_per_node=resources.tasks,
                             slurm_array_parallelism=max_parallel, slurm_signal_delay_s=resources.signal_delay_s,
                             slurm_additional_parameters=dict(resources.additional),
                             **{key: value for key, value in optional.items() if value is not None})
    return runner


class SubmissionError(OSError):
    """sbatch refused the submission; the message is its last line."""


def submit_slurm(runner: submitit.Executor, campaign: Campaign, jobs: List[JobSpec], cwd: str) -> Dict[str, str]:
    """Queue ``jobs`` as one array; returns their ids by job name."""
    submitted = []
    try:
        # submitit prints sbatch's stderr before raising: the error below says it in one line
        with contextlib.redirect_stderr(io.StringIO()), runner.batch():
            for spec in jobs:
                submitted.append(runner.submit(CampaignJob(campaign.folder, spec, cwd)))
    except submitit.core.utils.FailedJobError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise SubmissionError(f"sbatch refused the job array: {lines[-1] if lines else 'no message'} (SLURM_CONF="
                              f"{os.environ.get('SLURM_CONF', 'not set')}); expected a SLURM cluster that accepts "
                              f"these resources") from None
    return {spec.name: job.job_id for spec, job in zip(jobs, submitted)}


def run_local(runner: submitit.Executor, campaign: Campaign, jobs: List[JobSpec], cwd: str, max_parallel: int,
              report: Callable[[JobSpec, str, Optional[BaseException]], None],
              poll_s: float = 0.5) -> Dict[str, str]:
    """Run ``jobs`` here, ``max_parallel`` at a time, until all have ended; ``report(spec, job_id, error)`` is
    called as each ends. Returns their ids by job name."""
    waiting, running, ids = list(jobs), [], {}
    try:
        while waiting or running:
            while waiting and len(running) < max_parallel:
                spec = waiting.pop(0)
                job = runner.submit(CampaignJob(campaign.folder, spec, cwd))
                ids[spec.name] = f"local-{job.job_id}"  # as the job's run record names it
                campaign.add_submission("local", {spec.name: ids[spec.name]})
                running.append((spec, job))
            time.sleep(poll_s)
            for spec, job in [pair for pair in running if pair[1].done()]:
                running.remove((spec, job))
                report(spec, ids[spec.name], job.exception())
    except KeyboardInterrupt:  # Ctrl-C: stop the jobs this command started; launching again resumes them
        for _, job in running:
            job.cancel(check=False)
        raise
    return ids
