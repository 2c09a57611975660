"""Shared helpers of the benchmarks: device handling, timing, summaries, provenance and result files.

Every benchmark times work inside one process with ``time.perf_counter`` (synchronising the GPU
when there is one), repeats it, and reports the median with the min-max spread. A comparison is
always a ratio taken within one run, pair by pair, so that a machine whose speed drifts (shared
cores, frequency scaling) shifts both sides of a pair alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: Where results land by default: benchmarks/results/<name>.json next to the scripts.
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Packages whose versions are recorded with every result.
VERSIONED = ("spectra", "torch", "numpy", "scipy", "transformers", "weightwatcher")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--out``, the options every benchmark takes."""
    parser.add_argument("--device", default="cpu", help="Where spectra's side runs: cpu (default) or cuda[:N].")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="Result JSON to write [default: benchmarks/results/<benchmark>.json].",
    )


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; asking for CUDA on a machine without it is an error, not a fallback."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for, but this machine has no CUDA GPU; run with --device cpu.")
    return device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds one call of ``fn`` takes (GPU work included) and what it returned."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and count of repeated measurements."""
    if not values:
        raise ValueError("no measurements to summarise")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float | int]:
    """Summary of the ratios a_i / b_i of measurements taken as pairs (same repetition, one after the other)."""
    if len(numerators) != len(denominators):
        raise ValueError("paired ratios need as many numerators as denominators")
    return summary([a / b for a, b in zip(numerators, denominators)])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    return float(torch.linalg.matrix_norm((a - b).double()) / torch.linalg.matrix_norm(b.double()))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}{'+dirty' if dirty else ''}"


def environment(device: torch.device) -> dict[str, Any]:
    """The machine, versions and settings a measurement was taken with."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_gib": _memory_gib(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes sharing the cores
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in VERSIONED},
        "git": _git_commit(),
    }


def write_result(name: str, payload: dict[str, Any], out: Path | None) -> Path:
    """Write ``payload`` as JSON to ``out`` (default ``results/<name>.json``) and return the path."""
    path = out if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path
