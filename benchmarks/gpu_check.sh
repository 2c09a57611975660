#!/usr/bin/env bash
# The GPU section in one go, for a machine with CUDA: the CUDA tests, then every benchmark with
# --device cuda, each step under its own time limit so that one slow step cannot cost the others.
# Usage: bash benchmarks/gpu_check.sh OUTDIR   (gpu_check.log and the result JSON files land in OUTDIR; copy the
# JSON files into benchmarks/results/ and run benchmarks/report.py to put them in the README).
set -u
out=${1:?give the directory the logs and results go to}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=${PYTHON:-python3}
log="$out/gpu_check.log"
: >"$log"
step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, append its output to OUTDIR/gpu_check.log
  local name=$1 limit=$2 start=$SECONDS status part
  shift 2
  part=$(mktemp)
  timeout "$limit" "$@" >"$part" 2>&1
  status=$?
  { echo "== $name: exit $status after $((SECONDS - start)) s (limit $limit s)"; cat "$part"; } >>"$log"
  echo "== $name: exit $status after $((SECONDS - start)) s (limit $limit s)"
  grep -v "Loading weights" "$part" | tail -n 25
  rm -f "$part"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
step tests "${LIMIT_TESTS:-130}" "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py tests/test_spectral_decompose.py -k cuda
step precision "${LIMIT_PRECISION:-140}" "$py" benchmarks/bench_precision.py --device cuda --repeats 2 --out "$out/precision.json"
step edit_loop "${LIMIT_EDIT_LOOP:-100}" "$py" benchmarks/bench_edit_loop.py --device cuda --repeats 1 --out "$out/edit_loop_cuda.json"
step revive "${LIMIT_REVIVE:-60}" "$py" benchmarks/bench_revive.py --device cuda --reps 5 --alg1-budget 20 --out "$out/revive_cuda.json"
step svd "${LIMIT_SVD:-50}" "$py" benchmarks/bench_svd.py --device cuda --reps 2 --out "$out/svd_cuda.json"
step cuda_svd "${LIMIT_CUDA_SVD:-100}" "$py" benchmarks/bench_cuda_svd.py
