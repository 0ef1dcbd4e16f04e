#!/usr/bin/env bash
# The one script to run on the GPU machine, from the repository root:
#
#     bash benchmarks/run_gpu.sh [STAGE ...]          (default: the essential set: check latency throughput,
#                                                      about 8-9 minutes on an H100; one stage per device call
#                                                      when the call's limit is 10 minutes)
#
# The GPU kind (h100, h200, ...) comes from the device name; results go to $OUT/<gpu>/ when OUT is set (the
# device machine's output folder), else to benchmarks/results/<gpu>/. Logs go to $OUT/logs/ (or /tmp/gpu-logs).
#
# Stages, in the order given (a failed stage is recorded and the next one still runs). Times are for an H100;
# each stage gets a --budget-s well under the 10 minutes of one device call:
#   check         benchmarks/check.py --quick: the public ops vs float64 in bf16, the engine vs transformers (tiny
#                 fp32 model both ways; the Qwen3-0.6B-shaped bf16 checkpoint eagerly), every fused variant,
#                 the split-K fixup                                                                 (~2-3 min)
#   latency       benchmarks/latency.py: fusion vs nofusion in interleaved pairs, batch 1, 8, 64, 256   (~3 min)
#   throughput    benchmarks/throughput.py --no-cold: the 256-request workload per mode with the caches the
#                 stages before left (warm builds), first run / second run of each fresh engine          (~2-3 min)
#   throughput-cold  the same with cold and warm builds per mode (fresh Triton / Inductor caches) and the
#                 transformers peer; writes the same file, so run it after `throughput`                (~5-6 min)
#   latency-llama benchmarks/latency.py --second-only on the Llama-3.2-1B shape, added to latency.json
#                 (needs scripts/make_qwen3_06b_checkpoint.py --shape llama-3.2-1b)               (~3 min)
#   throughput-llama  benchmarks/throughput.py --no-cold on the Llama-3.2-1B shape, under the key llama-3.2-1b of
#                 throughput.json                                                                  (~4 min)
#   first-runs    benchmarks/first_runs.py: a fresh fusion engine's first runs, what each compiles, the build's
#                 phases (run it on a fresh machine for a cold build)                              (~2-3 min)
#   decode-chain  benchmarks/harness/kernel_pdl_chain.py: the batch-1 decode step's kernels in one CUDA graph, each
#                 kernel's share by leaving it out, the weights in L2                               (~1 min)
#   workload-profile  python -m benchmarks.harness.profile_workload: the offline workload under torch.profiler,
#                 its decode by batch size and kernel category against the K/V and weights' floors  (~3-4 min)
#   decode-order  python -m benchmarks.harness.decode_order_ab: the decode batch longest first against scheduling
#                 order on one engine, the offline workload in interleaved pairs                    (~2-3 min)
#   async-scheduling  python -m benchmarks.harness.decode_order_ab --compare async: async scheduling against rounds one
#                 at a time on one engine, the offline workload in interleaved pairs                (~2-3 min)
#   attention-order  python -m benchmarks.harness.attention_order: the split attention kernel alone on unequal
#                 contexts, batch order against longest first and more splits                       (~1 min)
#   hf-generate   hf_decode's generate part in modes default and reduce-overhead at batch 1, 8 and 32 (the
#                 default mode with coconut.launch "auto": decode sites launched by Inductor)        (~8 min)
#   check-full    benchmarks/check.py with every part at full size                                   (~4 min)
#   kernels       benchmarks/kernels.py: fused op, GEMV, decode attention through their public entry points
#                 against the unfused paths and bytes floors (KERNELS_ARGS="--what fusion-variants,..." for more) (~4 min)
#   profile       benchmarks/profile.py: decode and prefill step breakdown                           (~5 min)
#   serving       python -m benchmarks.harness.serving: Poisson arrivals against the OpenAI server, TTFT / ITL /
#                 TPOT per request rate, the offline engine beside it (docs/serving.md)                (~4 min)
#   hf-decode     python -m benchmarks.harness.hf_decode: transformers with Inductor vs coconut (docs/backend.md),
#                 when that module exists                                                           (~4 min)
#   tests         python -m pytest -x -q tests (on the GPU)                                          (~3 min)
#   plot          benchmarks/plot.py: PNGs from the JSON of this run into $OUT/img (or docs/img)
# Checkpoints (random weights, built once per machine, a few seconds): $CKPT (default /tmp/qwen3-0.6b) and, for
# latency-llama, $LLAMA_CKPT (default /tmp/llama-3.2-1b).
#
# Environment: OUT, CKPT, LLAMA_CKPT, PYTEST_ARGS (default "-x -q tests"), and extra flags per stage:
# CHECK_ARGS, LATENCY_ARGS, THROUGHPUT_ARGS, KERNELS_ARGS, PROFILE_ARGS, SERVING_ARGS, HF_DECODE_ARGS.
set -u
set -o pipefail
export PYTHONUNBUFFERED=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python >/dev/null 2>&1 && echo python || echo python3)}"
CKPT="${CKPT:-/tmp/qwen3-0.6b}"
LLAMA_CKPT="${LLAMA_CKPT:-/tmp/llama-3.2-1b}"
PYTEST_ARGS="${PYTEST_ARGS:--x -q tests}"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(check latency throughput)

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
case "$GPU_NAME" in
  *H200*) GPU=h200 ;;
  *H100*) GPU=h100 ;;
  "")     GPU=cpu ;;
  *)      GPU="$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | sed 's/^nvidia //; s/[^a-z0-9]\+/-/g; s/-$//')" ;;
esac
if [ -n "${OUT:-}" ]; then
  RESULTS="$OUT/$GPU"; LOGS="$OUT/logs"; IMG="$OUT/img"
else
  RESULTS="benchmarks/results/$GPU"; LOGS="/tmp/gpu-logs"; IMG="docs/img"
fi
mkdir -p "$RESULTS" "$LOGS"
SUMMARY="$LOGS/summary.txt"
declare -a DONE=()
{
  echo "# run_gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) stages: ${STAGES[*]}"
  echo "# gpu: $GPU_NAME ($GPU); results: $RESULTS"
  echo "# $($PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' 2>&1 | tail -1)"
  echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo none)"
} | tee "$SUMMARY"

# stage NAME BUDGET_S CMD: run CMD (a bash string) under a hard limit of BUDGET_S + 60 s, log to $LOGS/NAME.log.
stage() {
  local name="$1" budget="$2"; shift 2
  echo; echo "=================== $name (budget ${budget}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 $(( budget + 60 )) bash -c "$*" 2>&1 | tee "$LOGS/$name.log"
  rc=$?
  status=OK; [ $rc -ne 0 ] && status=FAILED; [ $rc -eq 124 ] && status=TIMEOUT
  DONE+=("$(printf '%-14s %-8s rc=%-3s %5ss' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))")")
  echo "${DONE[-1]}" | tee -a "$SUMMARY"
}

# seed NAME: copy the committed results/<gpu>/NAME into $RESULTS unless a file is there (the stages that add a key
# to an existing JSON: latency-llama, throughput-llama).
seed() {
  [ -f "$RESULTS/$1" ] || [ ! -f "benchmarks/results/$GPU/$1" ] || cp "benchmarks/results/$GPU/$1" "$RESULTS/$1"
}

# checkpoint DIR [SHAPE]: build the random checkpoint unless it exists.
checkpoint() {
  local dir="$1" shape="${2:-}"
  if [ -f "$dir/config.json" ] && ls "$dir"/*.safetensors >/dev/null 2>&1; then return 0; fi
  if [ -n "$shape" ]; then
    $PY scripts/make_qwen3_06b_checkpoint.py --help | grep -q -- '--shape' || {
      echo "scripts/make_qwen3_06b_checkpoint.py has no --shape: cannot build $shape"; return 1; }
    $PY scripts/make_qwen3_06b_checkpoint.py --shape "$shape" --out "$dir"
  else
    $PY scripts/make_qwen3_06b_checkpoint.py --out "$dir"
  fi
}

for s in "${STAGES[@]}"; do
  case "$s" in
    check)        checkpoint "$CKPT"
                  stage check 300 "$PY benchmarks/check.py --quick --model $CKPT --budget-s 240 --out $RESULTS/check.json ${CHECK_ARGS:-}" ;;
    check-full)   checkpoint "$CKPT"
                  stage check-full 480 "$PY benchmarks/check.py --what fusion,fixup,engine,bf16-agreement --model $CKPT --budget-s 420 --out $RESULTS/check.json ${CHECK_ARGS:-}" ;;
    latency)      checkpoint "$CKPT"
                  stage latency 480 "$PY benchmarks/latency.py --model $CKPT --budget-s 300 --out $RESULTS/latency.json ${LATENCY_ARGS:-}" ;;
    latency-llama) checkpoint "$LLAMA_CKPT" llama-3.2-1b && seed latency.json && \
                  stage latency-llama 480 "$PY benchmarks/latency.py --second-only --second-model $LLAMA_CKPT --budget-s 300 --out $RESULTS/latency.json ${LATENCY_ARGS:-}" ;;
    throughput)   checkpoint "$CKPT"
                  stage throughput 360 "$PY benchmarks/throughput.py --model $CKPT --no-cold --budget-s 300 --out $RESULTS/throughput.json ${THROUGHPUT_ARGS:-}" ;;
    throughput-llama) checkpoint "$LLAMA_CKPT" llama-3.2-1b && seed throughput.json && \
                  stage throughput-llama 360 "$PY benchmarks/throughput.py --model $LLAMA_CKPT --no-cold --budget-s 300 --into-key llama-3.2-1b --out $RESULTS/throughput.json ${THROUGHPUT_ARGS:-}" ;;
    throughput-cold) checkpoint "$CKPT"
                  stage throughput-cold 540 "$PY benchmarks/throughput.py --model $CKPT --peer --budget-s 450 --out $RESULTS/throughput.json ${THROUGHPUT_ARGS:-}" ;;
    kernels)      stage kernels 540 "$PY benchmarks/kernels.py --budget-s 420 --out $RESULTS/kernels.json ${KERNELS_ARGS:-}" ;;
    profile)      checkpoint "$CKPT"
                  stage profile 540 "$PY benchmarks/profile.py --model $CKPT --budget-s 420 --part-args 'decode=--budget-s 240' --out $RESULTS/profile.json ${PROFILE_ARGS:-}" ;;
    serving)      checkpoint "$CKPT"
                  stage serving 540 "$PY -m benchmarks.harness.serving --model $CKPT --out $RESULTS/serving.json ${SERVING_ARGS:-}" ;;
    hf-decode)    if [ -f benchmarks/harness/hf_decode.py ]; then
                    stage hf-decode 540 "$PY -m benchmarks.harness.hf_decode --budget-s 420 --out $RESULTS/hf-decode.json ${HF_DECODE_ARGS:-}"
                  else
                    DONE+=("$(printf '%-14s SKIPPED  (benchmarks/harness/hf_decode.py is not in this checkout)' "$s")")
                    echo "${DONE[-1]}" | tee -a "$SUMMARY"
                  fi ;;
    first-runs)   checkpoint "$CKPT"
                  stage first-runs 300 "$PY benchmarks/first_runs.py --model $CKPT --runs 2 --out $RESULTS/first-runs.json" ;;
    decode-chain) stage decode-chain 240 "$PY -m benchmarks.harness.kernel_pdl_chain --ctx 512 --rounds 60 --modes store,store+wide,store+shared,store+skip-attn,store+skip-qknorm,store+skip-o,store+skip-gu,store+skip-down,store+skip-qkv,store+skip-qknorm+skip-attn,store+shared+skip-qknorm+skip-attn --out $RESULTS/decode-chain.json" ;;
    workload-profile) checkpoint "$CKPT"
                  stage workload-profile 420 "$PY -m benchmarks.harness.profile_workload --model $CKPT --out $RESULTS/workload-profile.json" ;;
    decode-order) checkpoint "$CKPT"
                  stage decode-order 300 "$PY -m benchmarks.harness.decode_order_ab --model $CKPT --pairs 2 --budget-s 200 --out $RESULTS/decode-order.json" ;;
    async-scheduling) checkpoint "$CKPT"
                  stage async-scheduling 300 "$PY -m benchmarks.harness.decode_order_ab --compare async --model $CKPT --pairs 2 --budget-s 200 --out $RESULTS/async-scheduling.json" ;;
    attention-order) stage attention-order 180 "$PY -m benchmarks.harness.attention_order --out $RESULTS/attention-order.json" ;;
    hf-generate)  stage hf-generate 540 "$PY -m benchmarks.harness.hf_decode --models llama-3.2-1b,qwen3-0.6b --pairs 5 --generate-runs 3 --modes default,reduce-overhead --parts generate --batches 1,8,32 --budget-s 460 --out $RESULTS/hf-decode-generate.json ${HF_DECODE_ARGS:-}" ;;
    tests)        stage tests 540 "$PY -m pytest $PYTEST_ARGS" ;;
    plot)         stage plot 60 "$PY benchmarks/plot.py --results $(dirname "$RESULTS") --img $IMG" ;;
    *)            DONE+=("$(printf '%-14s UNKNOWN  (stages: check check-full latency latency-llama throughput throughput-llama throughput-cold first-runs decode-chain workload-profile decode-order async-scheduling attention-order kernels profile serving hf-decode hf-generate tests plot)' "$s")")
                  echo "${DONE[-1]}" | tee -a "$SUMMARY" ;;
  esac
done

echo; echo "=================== summary"; cat "$SUMMARY"
n_failed=$(printf '%s\n' "${DONE[@]}" | grep -cE ' (FAILED|TIMEOUT|UNKNOWN) ' || true)
exit $(( n_failed > 0 ? 1 : 0 ))
