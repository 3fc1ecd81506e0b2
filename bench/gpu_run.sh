#!/usr/bin/env bash
# The first thing to run on a GPU machine, everything written to OUT as it comes:
#
#   bench/gpu_run.sh OUT
#
# Stages, the most valuable first (a run cut short still says the most), each under its own
# limit; the planned total, kill-after margins included, stays under 7 minutes (printed first):
#
#   1. environment        OUT/environment.txt
#   2. smoke              OUT/smoke.jsonl, OUT/smoke.log: the cooperative strategy for every cell
#                         at fp32 (TF32 on and off), fp16 and bf16, persistent and stepwise at two
#                         precisions, some packed; forward + backward against float64, barrier
#                         error flags read after a synchronize, launches counted, one timing each
#                         (bench/smoke.py), each row written as it completes
#   3. parity             OUT/parity.jsonl (rows as they complete), OUT/parity.json, parity.log
#   4. bench              OUT/bench.log, OUT/<device>-<date>.json, .csv, .png (--max-minutes)
#   5. suite              OUT/suite.log (test names, -rfE), OUT/junit.xml: tests/ with CUDA
#                         tensors, without slow tests, the CPU-side checks (host_only: resource
#                         compiles, planted bugs, the whole main job) and the benchmark suites;
#                         SIGINT at its limit, so pytest still reports what it ran
#   6. strategies         OUT/strategies.log, OUT/strategies.json
#   then OUT/gpu_run.tar.gz holding all of it.
#
# The script goes on whatever a stage does; at the end it exits 1 and names every stage that
# failed or timed out (also in OUT/failed.txt), after writing everything. Runs from a checkout
# without installing (PYTHONPATH), as on machines without network. GPU_RUN_DRY=1 only prints the
# plan and the suite's selection (the CPU test of this script uses it).
set -uo pipefail
OUT=${1:?usage: bench/gpu_run.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
export FASTRNN_ALLOW_MISSING="onnx onnxscript"  # the GPU image has no ONNX exporter
unset TRITON_INTERPRET
start=$SECONDS
FAILED=()
KILL_AFTER=5

# name:limit in seconds, in order
STAGES="environment:10 smoke:95 parity:40 bench:70 suite:120 strategies:35"
SUITE_SELECT=(tests -m "not slow and not host_only")
total=0
for s in $STAGES; do total=$((total + ${s#*:} + KILL_AFTER)); done
echo "plan: $STAGES (+${KILL_AFTER} s kill-after each) = ${total} s at most"
echo "suite selection: ${SUITE_SELECT[*]}"
[ "${GPU_RUN_DRY:-0}" = 1 ] && exit 0

limit() { for s in $STAGES; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }

step() {  # name, command... (SIGINT at the limit: pytest and Python report what they ran)
    local name=$1 lim
    lim=$(limit "$1")
    shift
    echo "== $name (limit ${lim} s): $*"
    timeout -s INT --kill-after=$KILL_AFTER "$lim" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "   TIMED OUT" | tee -a "$OUT/$name.log"
    [ $rc -ne 0 ] && FAILED+=("$name (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))")
    echo "   exit $rc; $((SECONDS - start)) s so far"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

environment() {
    date -u
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
}
export -f environment
step environment bash -c environment
cp "$OUT/environment.log" "$OUT/environment.txt"

step smoke python bench/smoke.py "$OUT" --max-seconds 80
step parity python -m fastrnn parity --jsonl "$OUT/parity.jsonl" --json "$OUT/parity.json"
step bench python -m fastrnn bench --no-parity --out "$OUT" --max-minutes 1
step suite python -m pytest "${SUITE_SELECT[@]}" -n 8 -v -rfE -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$OUT/junit.xml" -o junit_family=xunit2
step strategies python bench/tune_strategies.py --out "$OUT/strategies.json" --max-seconds 25

SUMMARY=$(grep -E "[0-9]+ (passed|failed|error)" "$OUT/suite.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
tar czf "$OUT/gpu_run.tar.gz" -C "$OUT" --exclude gpu_run.tar.gz .
echo "suite: ${SUMMARY:-no summary (see suite.log)}"
echo "done in $((SECONDS - start)) s; results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED stage: %s\n' "${FAILED[@]}" | tee "$OUT/failed.txt"
    exit 1
fi
