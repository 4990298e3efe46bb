#!/usr/bin/env bash
# The foundation checks that need a GPU, in one run (device tool): bf16 forward speed
# against PyTorch (fused cuDNN and XLA attention) and the model tests on the GPU.
# The training-step MFU run is `python3 benchmarks/bench_train_memory.py --gpu`.
# Writes logs and result tables to $OUT (or benchmarks/results/gpu when OUT is unset).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
log="$OUT/gpu_log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$log"

run() {  # run NAME TIMEOUT CMD...: time-boxed, output appended to the log
  local name=$1 limit=$2; shift 2
  echo "=== $name" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep -v -i "warning" | tee -a "$log"
}

run "bf16 forward, fused attention (auto)" 100 \
  python3 benchmarks/bench_forward.py --dtype bfloat16 --batch 16 --length 1024 --repeats 10 --tag gpu_bf16
MAKEMOST_ATTENTION=xla run "bf16 forward, XLA attention" 100 \
  python3 benchmarks/bench_forward.py --dtype bfloat16 --batch 16 --length 1024 --repeats 10 --tag gpu_bf16_xla_attention
JAX_DEFAULT_MATMUL_PRECISION=highest run "model tests on GPU" 130 \
  python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k "not default_model"
cp benchmarks/results/forward_gpu_*.md benchmarks/results/forward_gpu_*.json "$OUT"/ 2>/dev/null
ls "$OUT"
