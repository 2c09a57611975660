"""Run every benchmark (REVIVE filter, spectral pass, edit loop, and on a GPU the editors' precision), then
refresh the table in README.md.

Each benchmark runs in its own process with the same ``--device``; results land in
``benchmarks/results/<name>.json``, or ``<name>_cuda.json`` with ``--device cuda`` so that the GPU figures
sit beside the CPU ones. ``--quick`` runs small sizes with few repetitions to check that the
scripts work (a minute or two on a laptop CPU); its results go to a temporary directory and the
README is left alone. Set OMP_NUM_THREADS to the number of cores you want measured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: benchmark -> (arguments of a full run, arguments of a --quick run).
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "revive": ([], ["--shapes", "256x1024", "512x2048", "--reps", "3", "--alg1-reps", "2"]),
    "svd": ([], ["--models", "gpt2-small", "--gpt2-hidden", "128", "--gpt2-layers", "2", "--reps", "2"]),
    "edit_loop": ([], ["--rounds", "1", "--batch-size", "5", "--repeats", "1"]),
    "precision": ([], ["--editors", "memit", "--batch-size", "4", "--repeats", "1"]),
}
#: Benchmarks that compare a GPU with the CPU, so they run only with ``--device cuda``.
GPU_ONLY = {"precision"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N], passed to every benchmark.")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS),
                        help="Run only these benchmarks.")
    parser.add_argument("--quick", action="store_true", help="Small sizes, few repetitions; results to a temp dir.")
    parser.add_argument("--results", type=Path, default=HERE / "results",
                        help="Directory the result JSON files go to (a full run) [default: benchmarks/results].")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")

    with tempfile.TemporaryDirectory(prefix="spectra-bench-quick-") as tmp:
        for name in args.only:
            if name in GPU_ONLY and not on_gpu:
                continue
            full, quick = BENCHMARKS[name]
            command = [sys.executable, str(HERE / f"bench_{name}.py"), "--device", args.device]
            result = f"{name}_cuda.json" if on_gpu and name not in GPU_ONLY else f"{name}.json"
            command += quick + ["--out", str(Path(tmp) / result)] if args.quick else full + ["--out", str(args.results / result)]
            print(f"$ {' '.join(command)}", flush=True)
            subprocess.run(command, check=True)
    if not args.quick:
        subprocess.run([sys.executable, str(HERE / "report.py"), "--results", str(args.results)], check=True)


if __name__ == "__main__":
    main()
