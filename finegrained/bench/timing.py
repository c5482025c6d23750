"""How the benchmarks measure: medians of interleaved rounds, saved-tensor memory, CSV records.

Every number is a median over repeats, timed in interleaved rounds (each round runs every case
once); ratios compare with baselines timed in the same process, never with remembered numbers.
Each bench writes a CSV with the machine's description under ``results/bench/``.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import pandas as pd
import torch
from torch import Tensor

import finegrained


def machine_info(device: torch.device) -> Dict[str, str]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "finegrained": finegrained.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int,
                        warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each function, timed in rounds that run every function once.

    Ratios are taken between these medians; interleaving makes a slow drift of a shared machine
    (another tenant, frequency scaling) hit the case and its baseline alike instead of whichever
    happened to run during it.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_bytes(fn: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """Bytes of the distinct storages that autograd saves for backward while computing fn(x)."""
    storages: Dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(storages.values())


def write_csv(rows: List[dict], name: str, device: torch.device, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    frame = pd.DataFrame(rows)
    for key, value in machine_info(device).items():
        frame[key] = value
    frame["timestamp"] = stamp
    path = os.path.join(out_dir, f"{name}_{device.type}.csv")
    frame.to_csv(path, index=False)
    return path


def format_rows(rows: List[dict]) -> str:
    frame = pd.DataFrame(rows)
    return frame.to_markdown(index=False, floatfmt=".3g")
