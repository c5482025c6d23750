"""One job of a campaign: ``finegrained fit`` then ``finegrained test`` of one (recipe, seed), requeue-safe.

The job is a submitit ``Checkpointable``: when SLURM signals a time limit or a preemption (``--signal USR2``),
submitit requeues it (``scontrol requeue``). A job restarted for any reason (that, ``scontrol requeue`` by hand,
a node failure with ``--requeue``) starts again from the top: it resumes the fit from its own ``last.ckpt``
(the project's resume is exact: the same weights and metrics as an uninterrupted fit), or skips the fit when
it had finished, and tests.

Submitit is the only requeue mechanism. Lightning's own SLURM auto-requeue (``SLURMEnvironment(auto_requeue=
True)``, its default, on ``SIGUSR1``) is switched off in every job, so the two never both fire.

Under SLURM with several tasks (``tasks_per_node`` × ``nodes``), every task runs this same function and
Lightning's ``SLURMEnvironment`` joins them into one DDP run: ranks from ``SLURM_PROCID``, the address from the
node list. Only rank 0 writes the job's state and record.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import submitit

from finegrained.launch.campaign import Campaign, JobSpec
from finegrained.results.runs import scheduler_job_id

TEST_RECORD_SUFFIX = ".partial"


class CampaignJobError(RuntimeError):
    """The job's fit or test stopped; the message is the one line ``launch status`` shows."""


def _under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID")) and not os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def placement_args(campaign: Campaign, name: str) -> List[str]:
    """Where the job writes, and how many processes it trains with: one DDP process per task of the job (SLURM's
    tasks and nodes through Lightning's SLURMEnvironment; the local executor's tasks through
    :func:`join_local_tasks`)."""
    args = ["--trainer.default_root_dir", campaign.run_folder(name), "--checkpoint.dirpath", campaign.checkpoints(name)]
    job = submitit.JobEnvironment()
    if _under_slurm():
        plugins = [{"class_path": "finegrained.resume.AtomicCheckpointIO"},
                   {"class_path": "lightning_fabric.plugins.environments.SLURMEnvironment",
                    "init_args": {"auto_requeue": False}}]
        args += ["--trainer.plugins", json.dumps(plugins)]
        if job.num_tasks > 1:
            args += ["--trainer.devices", str(job.num_tasks // job.num_nodes), "--trainer.num_nodes",
                     str(job.num_nodes), "--trainer.strategy", "ddp"]
    elif job.num_tasks > 1:
        args += ["--trainer.devices", str(job.num_tasks), "--trainer.strategy", "ddp"]
    return args


def join_local_tasks() -> None:
    """The local executor's tasks of one job as one DDP group: the variables torchrun would set (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``, from submitit's ``TorchDistributedEnvironment``), so
    that Lightning uses these processes instead of starting its own (its launcher would re-run submitit's entry
    point, not ``finegrained``)."""
    distributed = submitit.helpers.TorchDistributedEnvironment()
    distributed.master_addr = "127.0.0.1"
    distributed.export(set_cuda_visible_devices=False, overwrite=True)


class CampaignJob(submitit.helpers.Checkpointable):
    """fit + test of ``spec`` in ``campaign_dir``; returns the record file's path."""

    def __init__(self, campaign_dir: str, spec: JobSpec, cwd: str):
        self.campaign_dir = campaign_dir
        self.spec = spec
        self.cwd = cwd  # relative paths in the recipes and overrides are read from here, as at launch

    def __call__(self) -> str:
        from finegrained.cli import BAD_INPUT, one_line

        os.chdir(self.cwd)
        campaign, name = Campaign(self.campaign_dir), self.spec.name
        job = submitit.JobEnvironment()
        first = job.global_rank == 0
        if job.num_tasks > 1 and not _under_slurm():
            join_local_tasks()
        if campaign.is_done(name):
            print(f"{name}: already done ({campaign.record_path(name)})")
            return campaign.record_path(name)
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        if threads:  # the cores SLURM gave this task, not every core of the node
            import torch

            torch.set_num_threads(int(threads))
        state = campaign.state(name)
        job_id = scheduler_job_id()
        starts = (state.get("starts", 0) if state.get("job_id") == job_id else 0) + 1
        if first:
            state = campaign.write_state(name, state="running", job_id=job_id, starts=starts,
                                         requeues=max(starts - 1, int(os.environ.get("SLURM_RESTART_COUNT", 0))),
                                         error="")
        try:
            if not state.get("fit_done"):
                self._fit(campaign)
                if first:
                    campaign.write_state(name, fit_done=True)
            return self._test(campaign, first)
        except BAD_INPUT as error:
            self._failed(campaign, first, one_line(error))
            raise CampaignJobError(one_line(error)) from None
        except CampaignJobError as error:
            self._failed(campaign, first, str(error), state="stopped" if "SIGTERM" in str(error) else "failed")
            raise
        except Exception as error:  # a programming error: the log keeps its traceback
            self._failed(campaign, first, f"{type(error).__name__}: {one_line(error)}")
            raise

    def _common_args(self, campaign: Campaign) -> List[str]:
        return (["--config", self.spec.recipe] + list(self.spec.overrides)
                + placement_args(campaign, self.spec.name))

    def _run(self, args: List[str]) -> None:
        from finegrained.cli import main

        status = main(args)
        if status != 0:
            raise CampaignJobError(f"finegrained {args[0]} stopped by SIGTERM before the end (status {status}: "
                                   f"requeued, cancelled or preempted); a requeued or relaunched job resumes from "
                                   f"last.ckpt" if status == 143 else
                                   f"finegrained {args[0]} ended with status {status}")

    def _fit(self, campaign: Campaign) -> None:
        last = os.path.join(campaign.checkpoints(self.spec.name), "last.ckpt")
        resume = ["--ckpt_path", last] if os.path.isfile(last) else []
        print(f"{self.spec.name}: fit" + (f", resuming from {last}" if resume else ""), flush=True)
        self._run(["fit"] + self._common_args(campaign) + ["--seed_everything", str(self.spec.seed)] + resume)

    def _test(self, campaign: Campaign, first: bool) -> str:
        """Test the fit's model (best.ckpt where the fit chose one on a held-out split, else last.ckpt) into a
        record file of its own, renamed into runs/ once complete."""
        folder = campaign.checkpoints(self.spec.name)
        best, last = os.path.join(folder, "best.ckpt"), os.path.join(folder, "last.ckpt")
        ckpt = best if os.path.isfile(best) else last
        record = campaign.record_path(self.spec.name)
        partial = record + TEST_RECORD_SUFFIX
        if first:
            os.makedirs(os.path.dirname(record), exist_ok=True)
            if os.path.isfile(partial):  # a test of this job that was stopped before it finished
                os.remove(partial)
        self._run(["test"] + self._common_args(campaign) + ["--seed_everything", str(self.spec.seed),
                                                           "--ckpt_path", ckpt, "--runs_csv", partial])
        if first:
            os.replace(partial, record)
            print(f"{self.spec.name}: record complete, moved to {record}", flush=True)
            campaign.write_state(self.spec.name, state="done", error="")
        return record

    def _failed(self, campaign: Campaign, first: bool, message: str, state: str = "failed") -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        if first:
            campaign.write_state(self.spec.name, state=state, error=message)

    def checkpoint(self, *args, **kwargs) -> Optional[submitit.helpers.DelayedSubmission]:
        """Called by submitit on the time-limit or preemption signal, before it requeues the job: the requeued
        job resumes from last.ckpt (the work since the last epoch's end is done again)."""
        Campaign(self.campaign_dir).write_state(self.spec.name, state="requeued",
                                                error="time limit or preemption signal: requeued")
        return super().checkpoint(*args, **kwargs)
