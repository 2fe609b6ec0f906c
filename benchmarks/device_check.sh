#!/usr/bin/env bash
# The GPU checks of issues 11 and 12, prepared to run as ONE call of the device tool (a session
# lent a GPU has 15 minutes of device time in all, the machine's start included):
#
#   run(command="bash benchmarks/device_check.sh", timeout_s=560)
#
# On the lent machine (its image has PyTorch with CUDA, transformers, pytest and our other
# offline dependencies, but no FastAPI/uvicorn and no internet): installs this checkout without
# dependencies (so the scheduler entry points exist and the image's torch stays), runs the CUDA
# tests, `benchmarks/sdpa_shapes.py` (SDPA over growing decode widths, torch's backend choice
# against the engine's), `benchmarks/decode_step.py --device cuda` (the step against its GEMMs
# at 1-64 rows and in prefill), `benchmarks/profile_schedulers.py --device cuda` (each
# scheduler's host time, GPU busy time, kernel launches and syncs), then `runtime bench
# --device cuda` on the SmolLM2-135M shape: BATON (and BATON with one bucket) against Orca and
# the literal Orca (`attention: loop`) on the two traces, in bfloat16 and float32. Each step has
# its own time limit so that a slow one cannot eat the others'. Everything lands under $OUT as it
# is written (results.json per workload and dtype, device_check.log), so that a run cut short
# still brings back what it finished.
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
DEVICE=${DEVICE:-cuda}
SPEC=${SPEC:-smollm2-135m-shape}  # SPEC=tiny DEVICE=cpu: a quick try of the script here
WORK=$(mktemp -d)
LOG="$OUT/device_check.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BATON_RUNTIME_CACHE="$WORK/cache"
exec > >(tee "$LOG") 2>&1

step() { echo; echo "=== $(date -u +%T) $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

step "install (no dependencies: the image's torch stays)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . -e plugins/template \
    >"$WORK/install.log" 2>&1 || { echo "install failed: the scheduler entry points will be"\
    "missing"; tail -5 "$WORK/install.log"; }

step "CUDA tests"
timeout 75 python3 -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_architectures_parity.py tests/test_baton_layout.py tests/test_orca.py \
    tests/test_sampler.py tests/test_sdpa_backends.py tests/bench/test_offline_e2e.py

step "SDPA over growing decode widths: torch's backend choice against the engine's"
timeout 40 python3 benchmarks/sdpa_shapes.py --device "$DEVICE" 2>&1 | tail -8

step "the decode step against its GEMMs (issue 11), $DEVICE"
timeout 70 python3 benchmarks/decode_step.py --device "$DEVICE" --iters 10 \
    2>"$WORK/decode_step.stderr.log" | tee "$OUT/decode_step.txt"

step "where BATON's and Orca's time goes on $DEVICE: host ops, GPU busy, launches, syncs"
timeout 60 python3 benchmarks/profile_schedulers.py --model-spec "$SPEC" --device "$DEVICE" \
    --dtype float32 --workload orca-trace --num-requests 32 --all-at-once --threads 2 \
    --schedulers baton,baton-1=baton,orca --scheduler-option baton-1.max_buckets=1 \
    2>"$WORK/profile.stderr.log" | grep -v "^USDT"

# BATON, Orca and the literal Orca on the two traces: `bench_traces NAME SECONDS DTYPE ARGS...`
bench_traces() {
    local name=$1 seconds=$2 dtype=$3
    shift 3
    step "BATON / Orca / literal Orca: $name, $dtype, $DEVICE"
    mkdir -p "$OUT/$name-$dtype"
    timeout "$seconds" python3 -m runtime.cli bench --model-spec "$SPEC" --device "$DEVICE" \
        --dtype "$dtype" --workload orca-trace,short-long-mix \
        --schedulers baton,baton-1=baton,orca,orca-loop=orca \
        --scheduler-option orca-loop.attention=loop --scheduler-option baton-1.max_buckets=1 \
        --baseline orca --repeats 2 --no-progress --no-plots --out "$OUT/$name-$dtype" "$@" \
        2>"$OUT/$name-$dtype/stderr.log" \
        | grep -E "^workload|^metric|Output token throughput +higher|Mean T[TP][FO]T +lower"
    grep -E "Error|error" "$OUT/$name-$dtype/stderr.log" | tail -3
}
# As defined (32 requests at Poisson 4 req/s: arrival-bound, about 8 s a run on any machine
# that keeps up), then saturated (128 requests at once), where the schedulers' capacity shows.
bench_traces defined 95 bfloat16
bench_traces saturated 95 bfloat16 --num-requests 128 --all-at-once
bench_traces saturated 95 float32 --num-requests 128 --all-at-once

step "done"
# The tool brings back 8 files: the log, the step table and each workload's results.json.
find "$OUT" -type f ! -name results.json ! -name device_check.log ! -name decode_step.txt -delete
find "$OUT" -type f | sort
