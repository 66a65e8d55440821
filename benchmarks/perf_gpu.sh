#!/usr/bin/env bash
# The GPU benchmark set in one go (one call of the lent GPU machine, at most about 8.5 minutes; on an H100 about 6.5):
#   bash benchmarks/perf_gpu.sh OUT_DIR
# Expects the offline bundle unpacked (see ../shared/gpu/README.md) and runs from the project's root;
# writes OUT_DIR/results.tgz (JSON + markdown + profiles) and OUT_DIR/log.txt. Each part has its
# own time limit so that one slow part cannot take the others' results with it.
set -u
OUT_DIR=${1:?usage: perf_gpu.sh OUT_DIR}
# The scripts import raypeft.adapters / raypeft.pipeline: the root folders are mapped under the
# raypeft package by setup.py, so the tree must be installed, not put on PYTHONPATH. The GPU
# machines reach no package registry: an editable install without dependencies or build isolation
# uses the machine's own setuptools and fetches nothing (checked on an H200 machine: setuptools 81, pip 24).
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "offline install of raypeft failed"; exit 1; }
export BENCH_RESULTS=/tmp/perf_results PYTHONUNBUFFERED=1
mkdir -p "$BENCH_RESULTS" "$OUT_DIR"
finish() { tar -czf "$OUT_DIR/results.tgz" -C "$(dirname "$BENCH_RESULTS")" "$(basename "$BENCH_RESULTS")"; }
trap finish EXIT
part() {  # part SECONDS ARGS...: one benchmark under its own limit
  local limit=$1; shift
  echo "=== $(date +%T) $* (limit ${limit}s)"
  { timeout "$limit" python3 "$@"; echo "=== exit status $?"; } 2>&1 | grep -v -e "^USDT" -e "gemm_4bit"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
part 45  benchmarks/perf_lora_layer.py --device cuda
part 100 benchmarks/perf_train_step.py --device cuda --size 1b --methods lora,lora_dropout,lora_fp32,prompt,prefix --profile
part 80  benchmarks/perf_generate.py --device cuda --size 1b
part 55  benchmarks/perf_train_step.py --device cuda --size 1b --methods qlora --profile --suffix _qlora
part 85  benchmarks/perf_train_step.py --device cuda --size 8b --methods lora --repeats 10 --profile
part 70  benchmarks/perf_generate.py --device cuda --size 8b --batches 1 --repeats 5
part 45  benchmarks/perf_lora_layer.py --device cuda --compile --repeats 30 --suffix _compile
