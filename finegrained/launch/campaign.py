"""A campaign folder: the jobs of one ``finegrained launch``, where each job works, and what it recorded.

Layout (every path under ``CAMPAIGN_DIR``)::

    campaign.json          the jobs (name, recipe, seed, fit/test overrides) and every submission's job ids
    jobs/<name>/           the job's run folder: lightning_logs/, checkpoints/{best,last}.ckpt
    jobs/<name>/state.json what the job last said of itself (running, done, failed + its one-line error, requeues)
    runs/<name>.csv        the job's run record(s), as ``finegrained test`` writes them, plus the SLURM job id
    logs/<job id>/         submitit's pickles and the job's stdout/stderr

Many jobs write at once on a shared file system, so nothing is shared between them: each writes its own
``state.json`` (atomically, by rename) and its own record file, renamed into ``runs/`` only once complete. The
campaign's records are the union of those files, read by :func:`read_campaign_runs`.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import pandas as pd

CAMPAIGN_FILE = "campaign.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class JobSpec:
    """One (recipe, seed) of a campaign and the settings its fit and test get on top of the recipe."""

    name: str
    recipe: str
    seed: int
    overrides: List[str] = field(default_factory=list)


def job_names(recipes: List[str], seeds: List[int]) -> List[str]:
    """``<folder>-<recipe>-s<seed>`` (``cub-isqrt_resnet50-s0``): short, unique, and safe as a file name. Two
    recipes with the same folder and file name take more of their path; two that still read the same once made
    safe (``a b.yaml`` and ``a_b.yaml``) get a short hash of their path."""
    def label(path: str, depth: int) -> str:
        parts = os.path.normpath(os.path.splitext(os.path.abspath(path))[0]).split(os.sep)[-depth:]
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(part for part in parts if part))

    paths = list(dict.fromkeys(os.path.abspath(r) for r in recipes))
    deepest = max(len(p.split(os.sep)) for p in paths)
    depth = 2
    while depth < deepest and len({label(p, depth) for p in paths}) < len(paths):
        depth += 1
    labels = {p: label(p, depth) for p in paths}
    clashing = {name for name, count in Counter(labels.values()).items() if count > 1}
    labels = {p: f"{name}-{hashlib.sha256(p.encode()).hexdigest()[:6]}" if name in clashing else name
              for p, name in labels.items()}
    return [f"{labels[os.path.abspath(r)]}-s{seed}" for r in recipes for seed in seeds]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json_atomically(path: str, content: Dict[str, Any]) -> None:
    """Write ``content`` to ``path`` through a temporary file and a rename (:func:`finegrained.resume.replacing`): a
    reader never sees half a file, and a failed write leaves the previous one."""
    from finegrained.resume import replacing

    with replacing(path, "campaign file") as temporary, open(temporary, "w") as f:
        json.dump(content, f, indent=1)


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable as JSON ({err}); expected a file finegrained launch wrote") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object written by finegrained launch")
    return content


class Campaign:
    """The folder of one campaign (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)

    # -- paths ----------------------------------------------------------------------------------------------
    @property
    def spec_path(self) -> str:
        return os.path.join(self.folder, CAMPAIGN_FILE)

    @property
    def logs(self) -> str:
        return os.path.join(self.folder, "logs")

    def run_folder(self, name: str) -> str:
        return os.path.join(self.folder, "jobs", name)

    def checkpoints(self, name: str) -> str:
        return os.path.join(self.run_folder(name), "checkpoints")

    def state_path(self, name: str) -> str:
        return os.path.join(self.run_folder(name), "state.json")

    def record_path(self, name: str) -> str:
        return os.path.join(self.folder, "runs", f"{name}.csv")

    # -- the campaign file ------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.isfile(self.spec_path)

    def read(self) -> Dict[str, Any]:
        content = _read_json(self.spec_path)
        if content is None:
            raise FileNotFoundError(f"{self.folder}: not a campaign folder (no {CAMPAIGN_FILE}); expected the --out "
                                    f"folder of finegrained launch")
        if content.get("format") != FORMAT_VERSION or not isinstance(content.get("jobs"), list):
            raise ValueError(f"{self.spec_path}: expected a campaign file of format {FORMAT_VERSION} "
                             f"written by finegrained launch")
        return content

    def jobs(self) -> List[JobSpec]:
        return [JobSpec(**job) for job in self.read()["jobs"]]

    def create_or_extend(self, jobs: List[JobSpec], settings: Dict[str, Any],
                         checked: Optional[Dict[str, Any]] = None) -> None:
        """Start the campaign file, or add ``jobs`` to it; ``checked`` is what :meth:`check_jobs` returned for them
        (it checks them when not given)."""
        content = checked if checked is not None else self.check_jobs(jobs)
        known = {job["name"] for job in content["jobs"]}
        content["jobs"] += [asdict(job) for job in jobs if job.name not in known]
        content["settings"] = settings
        os.makedirs(self.folder, exist_ok=True)
        write_json_atomically(self.spec_path, content)

    def check_jobs(self, jobs: List[JobSpec]) -> Dict[str, Any]:
        """The campaign file's content (a new one for a new or empty folder), having checked that ``jobs`` may go
        into it: a folder of someone else's files is refused, and a job already in the campaign must come back
        with the same recipe, seed and overrides (its checkpoints and records belong to those). Writes nothing."""
        if not self.exists():
            if os.path.isdir(self.folder) and os.listdir(self.folder):
                raise FileExistsError(f"{self.folder}: holds files and is not a campaign folder (no {CAMPAIGN_FILE}); "
                                      f"expected a new or empty folder, or the --out of an earlier finegrained launch")
            return {"format": FORMAT_VERSION, "created": _now(), "cwd": os.getcwd(), "jobs": [], "submissions": []}
        content = self.read()
        known = {job["name"]: job for job in content["jobs"]}
        for job in jobs:
            earlier = known.get(job.name)
            if earlier is not None and earlier != asdict(job):
                changed = [key for key in ("recipe", "seed", "overrides") if earlier[key] != asdict(job)[key]]
                if changed[0] == "overrides":  # the first setting that differs, not both lists
                    was, now = earlier["overrides"], job.overrides
                    first = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b), min(len(was), len(now)))
                    detail = (f"setting {first + 1}: {' '.join(was[first:first + 2]) or 'none'} then, "
                              f"{' '.join(now[first:first + 2]) or 'none'} now")
                else:
                    detail = f"{changed[0]} {earlier[changed[0]]!r} then, {asdict(job)[changed[0]]!r} now"
                raise ValueError(f"{self.spec_path}: job {job.name} was launched with other settings ({detail}); "
                                 f"expected the same settings in the same order to continue it, or a new --out")
        return content

    def add_submission(self, executor: str, job_ids: Dict[str, str]) -> None:
        content = self.read()
        content["submissions"].append({"time": _now(), "executor": executor, "job_ids": job_ids})
        write_json_atomically(self.spec_path, content)

    def job_ids(self) -> Dict[str, str]:
        """Each job's latest submission id."""
        ids: Dict[str, str] = {}
        for submission in self.read()["submissions"]:
            ids.update(submission["job_ids"])
        return ids

    # -- what the jobs wrote ----------------------------------------------------------------------------------
    def state(self, name: str) -> Dict[str, Any]:
        return _read_json(self.state_path(name)) or {}

    def write_state(self, name: str, **values: Any) -> Dict[str, Any]:
        """Update the job's ``state.json`` with ``values`` (and the time)."""
        os.makedirs(self.run_folder(name), exist_ok=True)
        state = {**self.state(name), **values, "updated": _now()}
        write_json_atomically(self.state_path(name), state)
        return state

    def is_done(self, name: str) -> bool:
        return os.path.isfile(self.record_path(name))


def read_campaign_runs(folder: str) -> pd.DataFrame:
    """Every run record of the campaign in ``folder`` (``runs/*.csv``), one table, oldest first."""
    from finegrained.results.runs import RUN_FIELDS, read_runs

    Campaign(folder).read()  # a clear error for a folder that is not a campaign
    frames = [read_runs(path) for path in sorted(glob.glob(os.path.join(glob.escape(folder), "runs", "*.csv")))]
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return pd.DataFrame(columns=RUN_FIELDS)
    return pd.concat(frames, ignore_index=True).sort_values("timestamp", kind="stable").reset_index(drop=True)
