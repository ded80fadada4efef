#!/usr/bin/env bash
# The GPU benchmark in one go, 9 minutes at most ($BUDGET): GPT-2-1.5B (gpt2-xl) and GPT-2-124M
# shapes with random weights, bfloat16, batch 1/8/64, prompt 16, 256 new tokens, greedy and
# nanoGPT's sampling (temperature 0.8, top_k 200), against PyTorch at its best (torch-fast:
# gpt-fast's static cache and CUDA graphs; hf-static: transformers' static cache, compiled with
# CUDA graphs) and Hugging Face's default generate; then a profile of gpt2-xl at batch 1 with
# XLA's CUDA graphs left on. Needs JAX with CUDA, torch and transformers installed; no network.
#
#   OUT=/path/to/results bash scripts/gpu_bench.sh
#
# Writes $OUT/<run>/results.{json,csv} and throughput.png, and everything printed to
# $OUT/log.txt. Each run is its own process under a time limit drawn from a shared budget
# ($BUDGET seconds), so a failed or slow run loses only its own remaining rows: results are
# rewritten after every row. Inside a run, --max_seconds lets the harness skip a run whose
# estimated time is too long.
set -x
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench-out-gpu}
BUDGET=${BUDGET:-540}
DEVICE=${DEVICE:-gpu}
DTYPE=${DTYPE:-bfloat16}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package need not be installed
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory for torch
export TQDM_MININTERVAL=20  # a progress line every 20 s, not a log full of them
START=$SECONDS

{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PYTHON" -c 'import jax, flax, torch, transformers; print("jax", jax.__version__, jax.devices(),
"flax", flax.__version__, "torch", torch.__version__, torch.cuda.is_available(),
"transformers", transformers.__version__)'
} >>"$LOG" 2>&1

# bench NAME CAP_SECONDS FLAGS...: one process, limited to min(CAP, what is left of BUDGET)
bench() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 30)); then
    echo "== $name: skipped, ${left}s of the ${BUDGET}s budget left" >>"$LOG"
    return
  fi
  echo "== $name: up to ${limit}s" >>"$LOG"
  timeout --signal=INT --kill-after=15 "$limit" "$PYTHON" scripts/bench.py \
    --device="$DEVICE" --dtype="$DTYPE" --prompt_len=16 --new_tokens="${NEW_TOKENS:-256}" \
    --out="$OUT/$name" "$@" >>"$LOG" 2>&1
  echo "== $name: exit status $? after $((SECONDS - START))s in all" >>"$LOG"
}

# Seen on an H200 (jax, hf): gpt2-xl takes about 4 minutes (~60 s to start and check
# agreement, ~25 s of compiling per batch size); torch.compile with CUDA graphs adds its own
# compile per batch size. gpt2-xl goes first: its batch-1 row is the one the floor target is
# about. Rows run greedy first, then sampled, each by batch size, so a cut-off run loses its
# largest sampled batch first.
bench gpt2-xl 300 --model=gpt2-xl --batch_sizes=1,8,64 --impls=jax,torch-fast,hf-static,hf \
  --sampling=both --repeats=1 --max_seconds=30
bench gpt2 150 --model=gpt2 --batch_sizes=1,8,64 --impls=jax,torch-fast,hf-static,hf \
  --sampling=both --repeats=2 --max_seconds=30
# gpt2-xl at batch 1 traced with XLA's CUDA graphs on (the profiler turns them off unless told):
# gpt2-xl-profile/profile-*.txt say which kernels a step launches and how long the GPU idles
XLA_FLAGS="${XLA_FLAGS:-} --xla_enable_command_buffers_during_profiling=true" \
  bench gpt2-xl-profile 90 --model=gpt2-xl --batch_sizes=1 --impls=jax,torch-fast --repeats=1 \
  --check_steps=8 --profile

ls -lR "$OUT" >>"$LOG" 2>&1
echo "done in $((SECONDS - START))s" >>"$LOG"
