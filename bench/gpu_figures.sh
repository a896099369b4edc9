#!/bin/bash
# Every GPU figure of BENCHMARKS.md ("GPU figures") in one run on one CUDA machine (about 9 minutes on
# one H100/H200): ResNet-34 -> ResNet-18, 1000 classes, batch 256, 224 px, bf16 + channels_last unless fp32.
#
# Usage: bash bench/gpu_figures.sh [--dry-run] [--reference-dir PATH] [RESULTS_DIR]
#   RESULTS_DIR   where every part writes its JSON and log (default: bench/results/gpu-<date>)
#   --dry-run     the same parts on the CPU with tiny sizes (small models, 32-64 px, a few images; no
#                 torch.compile part), to check the script end to end without a GPU (a few minutes)
#   --reference-dir PATH  a checkout of the reference (bellymonster/Weighted-Soft-Label-Distillation;
#                 absolute, or relative to the repository root like RESULTS_DIR): the step part also
#                 times the reference's own step (bench/step.py --reference-dir), 30 s more for it
# Each part runs under its own timeout; a part that fails or times out is recorded in parts.jsonl and
# the next one starts. Needs wsld's dependencies importable by $PY (default python3; pip install -e .).
#
# Parts: step      (a) the step limit = student step + teacher inference, the wsld step, and the
#                  stored-soft-labels step, fp32 and bf16+cl (cudnn.benchmark on, as wsld train on CUDA)
#                  (and with --reference-dir, the reference's own step, fp32, against them)
#        step_nobench  the same bf16+cl without cudnn.benchmark (what the autotuning gives)
#        loss      the wsld loss as a share of the step
#        decode    data.decode=gpu decode rate on the device and per worker core, pixel differences
#        e2e       (b) wsld train images/s + data-wait: data.decode=cpu at 4/8/14 workers and gpu;
#                  (c) with stored soft labels; (d) model.compile=true; (e) fp32
#        compile   step.py with torch.compile (last: compile time may run past its limit)
cd "$(dirname "$0")/.." || exit 1
DRY=0
REF=()
while [ $# -gt 0 ]; do
    case $1 in
    --dry-run) DRY=1; shift ;;
    --reference-dir)
        [ -n "${2:-}" ] || { echo "gpu_figures.sh: --reference-dir needs a path (a checkout of the reference)" >&2; exit 2; }
        REF=(--reference-dir "$2"); shift 2 ;;
    *) break ;;
    esac
done
PY=${PY:-python3}
R=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$R" || exit 1
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

part() {  # part NAME TIMEOUT_S COMMAND...: run it, log to $R/NAME.log, record its exit status
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "== $name (timeout ${limit} s): $*"
    t0=$(date +%s)
    timeout "$limit" "$@" >"$R/$name.log" 2>&1
    rc=$?
    echo "{\"part\": \"$name\", \"exit\": $rc, \"timed_out\": $([ $rc -eq 124 ] && echo true || echo false), \"seconds\": $(($(date +%s) - t0))}" >>"$R/parts.jsonl"
    tail -n 30 "$R/$name.log"
    [ $rc -eq 0 ] || echo "== $name FAILED (exit $rc), see $R/$name.log"
}

if [ $DRY -eq 1 ]; then
    DEV="--device cpu"
    S="$DEV --teacher cnn_teacher --student cnn_student --classes 10 --batch-size 8 --image-size 32 --iters 2 --warmup 1 --threads 1"
    L="$DEV --batch-size 8 --classes 10 --iters 2 --warmup 1 --threads 1"
    D="$DEV --images 8 --image-size 64 --batch-size 8 --repeats 1 --diff-sizes 64 --threads 1"
    E="$DEV --images 8 --replicate 8 --classes 4 --image-size 32 --batch-size 8 --log-every 2 --threads 1
       --teacher cnn_teacher --student cnn_student --run-timeout 240
       --runs cpu-w0=data.decode=cpu,data.workers=0;gpu-w1=data.decode=gpu,data.workers=1;stored-gpu-w0=stored,data.decode=gpu,data.workers=0;fp32-gpu-w0=fp32,data.decode=gpu,data.workers=0"
    T_STEP=120 T_LOSS=60 T_DECODE=120 T_E2E=600
    [ ${#REF[@]} -eq 0 ] || REF+=(--classes 1000)  # the reference's loss fixes 1000 classes
else
    DEV="--device cuda"
    S="$DEV --batch-size 256 --image-size 224 --iters 30 --warmup 5"
    L="$DEV --iters 100 --warmup 10"
    D="$DEV --images 256 --image-size 224 --batch-size 256 --repeats 3"
    E="$DEV --run-timeout 100"
    T_STEP=120 T_LOSS=40 T_DECODE=90 T_E2E=480
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$R/gpu.txt"
fi
T_STEP_REF=$T_STEP
[ ${#REF[@]} -eq 0 ] || T_STEP_REF=$((T_STEP + 30))
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)" | tee -a "$R/gpu.txt"

# shellcheck disable=SC2086  # the option strings are meant to split into words
{
part step "$T_STEP_REF" $PY bench/step.py $S --configs fp32,bf16+cl --losses wsld,ce --cudnn-benchmark "${REF[@]}" --out "$R/step.json"
part step_nobench "$T_STEP" $PY bench/step.py $S --configs bf16+cl --losses wsld,ce --no-check-variant --out "$R/step.json"
part loss "$T_LOSS" $PY bench/loss.py $L --step-json "$R/step.json" --out "$R/loss.json"
part decode "$T_DECODE" $PY bench/gpu_decode.py $D --out "$R/gpu_decode.json"
part e2e "$T_E2E" $PY bench/gpu_e2e.py $E --out-dir "$R"
if [ $DRY -eq 0 ]; then
    part compile 150 $PY bench/step.py $S --configs bf16+cl+compile --losses wsld,ce --cudnn-benchmark --no-check-variant --out "$R/step.json"
fi
}
echo "== done: $R (parts.jsonl says which parts passed)"
cat "$R/parts.jsonl"
