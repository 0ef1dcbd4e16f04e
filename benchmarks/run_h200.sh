#!/usr/bin/env bash
# The one script to run on the H200 device machine, from the repository root:
#
#     bash benchmarks/run_h200.sh [STAGE ...]          (default: kernels tests smoke throughput latency)
#
# Stages (run in the order given; a failed stage is recorded and the next one still runs):
#   kernels     python benchmarks/check_fusion_gpu.py --out benchmarks/results/check-fusion-h200.json;
#               python benchmarks/bench_attention.py; python benchmarks/bench_fusion_kernel.py   (~2-4 min)
#   engine      python benchmarks/check_engine_gpu.py --model $CKPT  (optional, not in the default list)
#   tests       python -m pytest -x -q tests  (on the GPU)                                (~1-3 min)
#   smoke       python -m nanovllm --model $CKPT --max-tokens 16                          (~1 min)
#   throughput  python benchmarks/bench_throughput.py --modes fusion,nofusion --peer      (~3-4 min)
#   latency     python benchmarks/bench_latency.py  (fusion, nofusion, eager; 1..256)     (~5-6 min)
#   profile     python benchmarks/profile_decode.py --model $CKPT  (torch.profiler of decode steps: fusion,
#               nofusion x batch 1, 64, 256; optional, not in the default list)          (~4-6 min)
#   e2e         python benchmarks/bench_e2e.py --model $CKPT --peer: latency (fusion, nofusion, eager),
#               throughput + peer (fusion, nofusion) and profile (fusion, nofusion) with ONE engine build per
#               mode instead of 7; writes the same three JSONs; optional, not in the default list
#               (as long as the budget allows; parts that cannot start in time are recorded as skipped)
#   ab          python benchmarks/bench_ab_latency.py --model $CKPT: fusion-ms8 and nofusion-ms8 engines alive in
#               one process, decode steps timed in interleaved pairs (the "no batch slower by 1 %" question;
#               optional, not in the default list)                                          (~6-8 min)
#   markov      scripts/train_markov_checkpoint.py on $CKPT (-> $CKPT-markov), then check_engine_gpu.py --prompts
#               markov --skip-tiny --modes eager,coconut+graphs (bf16 greedy tokens vs transformers on a checkpoint
#               with peaked predictions; optional)                                          (~3-4 min)
#   fixup       python benchmarks/check_fixup_gpu.py: the skinny kernels' split-K fixup under CUDA graphs with PDL,
#               bit for bit against the two-kernel path (optional)                          (~1 min)
#   prefill     python benchmarks/profile_prefill.py --model $CKPT: batch-1 TTFT and its host / GPU profile, coconut
#               and Inductor (optional; PREFILL_ARGS)                                        (~3 min)
#   host        python benchmarks/bench_host_overhead.py: host time per call of the ops a prefill calls from Python,
#               define_op against custom_op registration (optional)                        (~1 min)
#   plot        python benchmarks/plot_results.py (PNGs into docs/img; they are not copied back)
# Stages that need it first build the random Qwen3-0.6B-shaped checkpoint at $CKPT (default /tmp/qwen3-0.6b;
# kept if it already exists; a few seconds).
#
# One device call runs at most 10 minutes: split the stages over calls, e.g.
#     bash benchmarks/run_h200.sh kernels tests smoke      then      bash benchmarks/run_h200.sh throughput latency
# Each stage gets at most the time left before DEADLINE_S (default 570 s after the start, leaving time to pack
# the results); a stage that cannot start in time is skipped and reported.
#
# Output in $OUT (default /tmp/h200-out), at most 8 files:
#   summary.txt          GPU and versions, one line per stage: status, exit code, seconds (rewritten after each)
#   logs.tar.gz          every stage's full log (<stage>.log)
#   <name>.json          benchmarks/results/{throughput,latency,fusion-kernel,attention,decode-profile}-h200.json
#                        written by this run (the e2e stage writes throughput, latency and decode-profile)
#   results-other.tar    any other JSON that appeared in benchmarks/results/ during this run
# While a stage runs, its log is $OUT/<stage>.log (so a run killed from outside still returns it);
# logs.tar is gzipped only at the very end.
#
# Environment: CKPT, OUT, DEADLINE_S, PYTEST_ARGS (default "-x -q tests"), THROUGHPUT_ARGS, LATENCY_ARGS,
# PROFILE_ARGS, E2E_ARGS, AB_ARGS, PREFILL_ARGS (extra flags appended to the bench command lines; the profile stage passes --budget-s so
# that it starts no new case within 120 s of DEADLINE_S, the e2e stage so that it starts no new engine or part
# within 60 s of DEADLINE_S; a --budget-s in PROFILE_ARGS / E2E_ARGS overrides it, and E2E_ARGS=--no-peer drops
# the peer), e.g. E2E_ARGS="--modes fusion,nofusion --what throughput,profile".

set -u
set -o pipefail
export PYTHONUNBUFFERED=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
CKPT="${CKPT:-/tmp/qwen3-0.6b}"
OUT="${OUT:-/tmp/h200-out}"
DEADLINE_S="${DEADLINE_S:-570}"
PYTEST_ARGS="${PYTEST_ARGS:--x -q tests}"
THROUGHPUT_ARGS="${THROUGHPUT_ARGS:-}"
LATENCY_ARGS="${LATENCY_ARGS:-}"
PROFILE_ARGS="${PROFILE_ARGS:-}"
E2E_ARGS="${E2E_ARGS:-}"
AB_ARGS="${AB_ARGS:-}"
PREFILL_ARGS="${PREFILL_ARGS:-}"
PY="${PYTHON:-$(command -v python >/dev/null 2>&1 && echo python || echo python3)}"
mkdir -p "$OUT"
START=$(date +%s)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(kernels tests smoke throughput latency)

SUMMARY="$OUT/summary.txt"
LOGTAR="$OUT/logs.tar"
OTHER_TAR="$OUT/results-other.tar"
MARK="$(mktemp /tmp/run_h200.start.XXXXXX)"   # results newer than this were written by this run
KEEP_JSON="throughput-h200.json latency-h200.json fusion-kernel-h200.json attention-h200.json decode-profile-h200.json latency-ab-h200.json prefill-profile-h200.json host-overhead-h200.json"
declare -a RESULTS=()

HEADER="$(mktemp /tmp/run_h200.header.XXXXXX)"
{
  echo "# run_h200.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)  stages: ${STAGES[*]}"
  echo "# $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "# $($PY -c 'import torch, triton, transformers, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1)"
  echo "# git $(git rev-parse --short HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l) changed files"
} > "$HEADER"
cat "$HEADER"

elapsed() { echo $(( $(date +%s) - START )); }

# (Re)write summary.txt: header, one line per stage so far, elapsed time. Called after every stage.
write_summary() {
  {
    cat "$HEADER"
    echo "# stage       status   rc     time"
    for r in "${RESULTS[@]}"; do echo "$r"; done
    echo "# total $(elapsed)s${1:-}"
  } > "$SUMMARY.new" && mv -f "$SUMMARY.new" "$SUMMARY"
}

# Pack a finished stage's log into logs.tar and collect the result JSONs written since the start.
collect() {
  local log="$1"
  if [ -f "$OUT/$log" ]; then
    tar -C "$OUT" -rf "$LOGTAR" "$log" && rm -f "$OUT/$log"
  fi
  local f base
  for f in benchmarks/results/*.json; do
    [ -f "$f" ] && [ "$f" -nt "$MARK" ] || continue
    base="$(basename "$f")"
    if [[ " $KEEP_JSON " == *" $base "* ]]; then
      cp -f "$f" "$OUT/$base"
    else
      tar -C benchmarks/results -rf "$OTHER_TAR" "$base"   # appended again if rewritten: tar keeps the last
    fi
  done
}

# run_stage NAME MIN_SECONDS CMD...: run CMD (a bash string) with the log teed to $OUT/NAME.log.
run_stage() {
  local name="$1" need="$2"; shift 2
  local left=$(( DEADLINE_S - $(elapsed) ))
  if [ "$left" -lt "$need" ]; then
    RESULTS+=("$(printf '%-11s SKIPPED  (only %ss left of DEADLINE_S=%s, needs ~%ss)' "$name" "$left" "$DEADLINE_S" "$need")")
    echo "${RESULTS[-1]}"
    write_summary " (still running)"
    return
  fi
  echo; echo "=================== stage $name (timeout ${left}s): $*"
  local t0=$(date +%s) rc
  timeout -k 10 "$left" bash -c "$*" 2>&1 | tee "$OUT/$name.log"
  rc=$?
  local dt=$(( $(date +%s) - t0 )) status=OK
  [ $rc -ne 0 ] && status=FAILED
  [ $rc -eq 124 ] && status=TIMEOUT
  RESULTS+=("$(printf '%-11s %-8s rc=%-3s %5ss' "$name" "$status" "$rc" "$dt")")
  collect "$name.log"
  write_summary " (still running)"
}

needs_ckpt=0
for s in "${STAGES[@]}"; do
  case "$s" in throughput|latency|smoke|engine|profile|e2e|ab|markov|prefill) needs_ckpt=1 ;; esac
done
if [ $needs_ckpt -eq 1 ]; then
  if [ -f "$CKPT/config.json" ] && ls "$CKPT"/*.safetensors >/dev/null 2>&1; then
    echo "checkpoint $CKPT exists; reusing it"
  else
    run_stage checkpoint 20 "$PY scripts/make_qwen3_06b_checkpoint.py --out $CKPT"
  fi
fi

for s in "${STAGES[@]}"; do
  case "$s" in
    kernels)
      run_stage kernels 60 "rc=0; for cmd in 'check_fusion_gpu.py --out benchmarks/results/check-fusion-h200.json' \
          bench_attention.py bench_fusion_kernel.py; do
          echo \"--- benchmarks/\$cmd\"; $PY benchmarks/\$cmd || { r=\$?; echo \"--- benchmarks/\$cmd FAILED rc=\$r\"; rc=1; };
        done; exit \$rc" ;;
    engine)     run_stage engine 60 "$PY benchmarks/check_engine_gpu.py --model $CKPT --out benchmarks/results/engine-check-h200.json" ;;
    tests)      run_stage tests 60 "$PY -m pytest $PYTEST_ARGS" ;;
    smoke)      run_stage smoke 30 "$PY -m nanovllm --model $CKPT --max-tokens 16" ;;
    throughput) run_stage throughput 120 "$PY benchmarks/bench_throughput.py --model $CKPT --modes fusion,nofusion --peer $THROUGHPUT_ARGS" ;;
    latency)    run_stage latency 180 "$PY benchmarks/bench_latency.py --model $CKPT $LATENCY_ARGS" ;;
    profile)    run_stage profile 180 "$PY benchmarks/profile_decode.py --model $CKPT --budget-s $(( DEADLINE_S - $(elapsed) - 120 )) $PROFILE_ARGS" ;;
    e2e)        run_stage e2e 240 "$PY benchmarks/bench_e2e.py --model $CKPT --peer --budget-s $(( DEADLINE_S - $(elapsed) - 60 )) $E2E_ARGS" ;;
    ab)         run_stage ab 300 "$PY benchmarks/bench_ab_latency.py --model $CKPT $AB_ARGS" ;;
    markov)     run_stage markov 200 "$PY scripts/train_markov_checkpoint.py --src $CKPT --out $CKPT-markov && \
                  $PY benchmarks/check_engine_gpu.py --model $CKPT-markov --prompts markov --skip-tiny \
                  --modes eager,coconut+graphs --out benchmarks/results/engine-check-markov-h200.json" ;;
    fixup)      run_stage fixup 60 "$PY benchmarks/check_fixup_gpu.py --out benchmarks/results/fixup-check-h200.json" ;;
    prefill)    run_stage prefill 120 "$PY benchmarks/profile_prefill.py --model $CKPT $PREFILL_ARGS" ;;
    host)       run_stage host 30 "$PY benchmarks/bench_host_overhead.py" ;;
    plot)       run_stage plot 10 "$PY benchmarks/plot_results.py" ;;
    *)          RESULTS+=("$(printf '%-11s UNKNOWN  (stages: kernels engine tests smoke throughput latency profile e2e ab markov fixup prefill host plot)' "$s")") ;;
  esac
done

# final packing: summary, gzip the logs
write_summary
rm -f "$MARK" "$HEADER"
[ -f "$LOGTAR" ] && gzip -f "$LOGTAR"
echo; echo "=================== summary"; cat "$SUMMARY"
echo "files in $OUT:"; ls -la "$OUT"
n_failed=$(printf '%s\n' "${RESULTS[@]}" | grep -cE ' (FAILED|TIMEOUT|SKIPPED|UNKNOWN) ' || true)
exit $(( n_failed > 0 ? 1 : 0 ))
