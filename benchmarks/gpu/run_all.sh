#!/usr/bin/env bash
# The GPU suite: every method against its reference, same weights, same process (benchmarks/gpu/suite.py),
# one time-boxed process per step, then summary.json + summary.md. See benchmarks/gpu/README.md.
#
#   bash benchmarks/gpu/run_all.sh                 # GPU, bf16, the issue's shapes -> benchmarks/results/gpu/
#   bash benchmarks/gpu/run_all.sh --out "$OUT"    # the same, written elsewhere (the device tool's $OUT)
#   bash benchmarks/gpu/run_all.sh --smoke         # tiny shapes, any machine (CPU: ~2 min) -> a temporary folder
#   bash benchmarks/gpu/run_all.sh --dry-run       # print each step's command and settings; runs nothing
#   options: --only forward,beam   --dtype float32   --out DIR
#
# A failed or timed-out step does not stop the others; the exit status is non-zero if any step failed,
# and the summary names the failed steps. The log of everything is OUT/run_all.log.
set -u -o pipefail

# step and its time box in seconds on one H100 (all: 470 s; with start-up and the summary, under 8 minutes)
STEPS=(
  "forward 55"      # GPT-2-small + SmolLM2-135M shapes, 16 x 1024, 10 repeats, MFU
  "greedy 35"       # GPT-2-small, 8 prompts x 64 new tokens vs HF generate
  "beam 90"         # GPT-2-small, 8 x 8 beams x 64 tokens, beam + CBS vs HF generate (+ XLA memory analysis)
  "exact 55"        # SmolLM2-135M, 2,048-node bare expansion + length modes 0..3 (4,096 nodes), decode rates
  "hso 70"          # SmolLM2-135M shape, 1,025 tokens, segment 128, cache 384: HSO and lr=0 loops vs PyTorch
  "recurrence 45"   # GPT-2-small width, 4 x 1,024 tokens (8 windows of 128): recurrence vs full-context step
  "nar 30"          # MiniLM shape, batch 64: NAR 1/4/8 steps vs AR greedy
  "train 90"        # GPT-2-small + SmolLM2-135M shapes, 16 x 1024, AdamW vs PyTorch AdamW, MFU
)
MAX_TOTAL=470  # the steps' budgets must fit in this (8 minutes less ~10 s of start-up and summary)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
SMOKE=0 DRY=0 OUT="" ONLY="" DTYPE=""
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --only) ONLY=${2:?--only needs step names}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --dtype) DTYPE=${2:?--dtype needs bfloat16 or float32}; shift ;;
    --dtype=*) DTYPE=${1#--dtype=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

total=0 names=()
for entry in "${STEPS[@]}"; do
  set -- $entry
  names+=("$1"); total=$((total + $2))
done
if [ "$total" -gt "$MAX_TOTAL" ]; then
  echo "run_all.sh: the step budgets sum to $total s, over $MAX_TOTAL s" >&2; exit 2
fi
if [ -n "$ONLY" ]; then
  for want in ${ONLY//,/ }; do
    [[ " ${names[*]} " == *" $want "* ]] || { echo "run_all.sh: unknown step '$want' (steps: ${names[*]})" >&2; exit 2; }
  done
fi

if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT="${TMPDIR:-/tmp}/makemost_gpu_suite.dry-run"
  elif [ "$SMOKE" = 1 ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/makemost_gpu_suite.XXXXXX")
  else OUT=benchmarks/results/gpu; fi
fi
OUT=$(realpath -m "$OUT")
if [ "$SMOKE" = 1 ] && [[ "$OUT/" == "$ROOT/benchmarks/results/"* ]]; then
  echo "run_all.sh: --smoke must not write under benchmarks/results/ (it holds the recorded results); use --out" >&2
  exit 2
fi
[ "$DRY" = 1 ] || mkdir -p "$OUT" || exit 2

flags=(--out "$OUT")
[ "$SMOKE" = 1 ] && flags+=(--smoke)
[ -n "$DTYPE" ] && flags+=(--dtype "$DTYPE")
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$DRY" = 0 ] && [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  # A run-local compilation cache: the beam step compiles each search twice (the jitted call, then
  # `lower().compile()` for XLA's memory analysis); the second becomes a cache hit. Removed at exit.
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/makemost_gpu_suite_xla.XXXXXX")
  export JAX_COMPILATION_CACHE_DIR
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi

if [ "$DRY" = 1 ]; then
  echo "steps (budget $total s of $MAX_TOTAL s), output $OUT:"
  rc=0
  for entry in "${STEPS[@]}"; do
    set -- $entry
    [ -n "$ONLY" ] && [[ ",$ONLY," != *",$1,"* ]] && continue
    echo "timeout -k 5 $2 $PY benchmarks/gpu/suite.py $1 ${flags[*]}"
    "$PY" benchmarks/gpu/suite.py "$1" "${flags[@]}" --dry-run || rc=1
  done
  exit $rc
fi

log="$OUT/run_all.log" status="$OUT/steps.tsv"
: > "$status"
{
  echo "# GPU suite $(date -u +%Y-%m-%dT%H:%M:%SZ), mode $([ "$SMOKE" = 1 ] && echo smoke || echo full), out $OUT"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  git rev-parse --short HEAD 2> /dev/null | sed 's/^/commit /'
} 2>&1 | tee "$log"

failed=0
for entry in "${STEPS[@]}"; do
  set -- $entry
  step=$1 budget=$2
  [ -n "$ONLY" ] && [[ ",$ONLY," != *",$step,"* ]] && continue
  rm -f "$OUT/suite_$step.json" "$OUT/suite_$step.md"
  echo "=== $step (time box $budget s)" | tee -a "$log"
  start=$(date +%s%N)
  timeout -k 5 "$budget" "$PY" benchmarks/gpu/suite.py "$step" "${flags[@]}" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s\t%s\t%s\t%s.%03d\n' "$step" "$budget" "$rc" $((ms / 1000)) $((ms % 1000)) >> "$status"
  if [ "$rc" -ne 0 ]; then
    failed=1
    echo "=== $step FAILED (exit $rc$([ "$rc" = 124 ] && echo ": timed out after $budget s"))" | tee -a "$log"
  fi
done

echo "=== summary" | tee -a "$log"
summary_flags=(--out "$OUT")
[ "$SMOKE" = 1 ] && summary_flags+=(--smoke)
"$PY" benchmarks/gpu/suite.py summarize "${summary_flags[@]}" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -ne 0 ] && failed=1
echo "results in $OUT (summary.md, summary.json, run_all.log)"
exit $failed
