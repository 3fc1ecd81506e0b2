#!/usr/bin/env bash
# The first thing to run on a GPU machine (under 9 minutes on an H100), everything written to OUT:
#
#   bench/gpu_run.sh OUT
#
#   1. the test suite with CUDA tensors (pytest -n 8)   OUT/suite.log, OUT/junit.xml
#   2. the parity report                                 OUT/parity.log, OUT/parity.json
#   3. the default benchmark (python -m fastrnn bench)   OUT/bench.log, OUT/<device>-<date>.json,
#                                                        .csv and .png (the JSON carries the
#                                                        suite's summary line in "suite")
#   4. the strategy timings                              OUT/strategies.log, OUT/strategies.json
#   and OUT/environment.txt, then OUT/gpu_run.tar.gz holding all of it.
#
# Each step runs under its own time limit and the script goes on whatever a step does, so a
# failure or a hang in one still leaves the others' results; at the end it exits 1 and names
# every stage that failed or timed out (also in OUT/failed.txt), after writing everything. Runs from a checkout without
# installing (PYTHONPATH), as on machines without network.
set -uo pipefail
OUT=${1:?usage: bench/gpu_run.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
export FASTRNN_ALLOW_MISSING="onnx onnxscript"  # the GPU image has no ONNX exporter
start=$SECONDS
FAILED=()

step() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "   TIMED OUT" | tee -a "$OUT/$name.log"
    [ $rc -ne 0 ] && FAILED+=("$name (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))")
    echo "   exit $rc; $((SECONDS - start)) s so far"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

{
    date -u
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1

TIMEOUT_ARG=""
python -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG="--timeout=300"
step suite 270 python -m pytest -n 8 -q -p no:cacheprovider $TIMEOUT_ARG \
    --junitxml="$OUT/junit.xml" -o junit_family=xunit2
SUMMARY=$(grep -E "[0-9]+ (passed|failed|error)" "$OUT/suite.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
[ -z "$SUMMARY" ] && SUMMARY="no summary (see suite.log)"
step parity 60 python -m fastrnn parity --json "$OUT/parity.json"
step bench 150 python -m fastrnn bench --no-parity --out "$OUT" --max-minutes 2 --suite "$SUMMARY"
step strategies 45 python bench/tune_strategies.py --out "$OUT/strategies.json" --max-seconds 35

tar czf "$OUT/gpu_run.tar.gz" -C "$OUT" --exclude gpu_run.tar.gz .
echo "suite: $SUMMARY"
echo "done in $((SECONDS - start)) s; results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED stage: %s\n' "${FAILED[@]}" | tee "$OUT/failed.txt"
    exit 1
fi
