#!/bin/bash
# Every GPU figure of BENCHMARKS.md ("GPU figures") in one run of at most 9 minutes on one CUDA machine
# (the parts' timeouts add up to 530 s): ResNet-34 -> ResNet-18, 1000 classes, batch 256, 224 px,
# bf16 + channels_last unless fp32.
#
# Usage: bash bench/gpu_figures.sh [--dry-run] [--reference-dir PATH] [RESULTS_DIR]
#   RESULTS_DIR   where the results go, 7 files (default: bench/results/gpu-<date>; with --dry-run a
#                 new /tmp/wsld-gpu-dry-run.* folder): gpu.txt (machine),
#                 parts.jsonl (each part's exit status and seconds), logs.txt (every part's output),
#                 step.json, loss.json, gpu_decode.json, gpu_e2e.json
#   --dry-run     every part on the CPU with tiny sizes (small models, 32-64 px, a few images;
#                 torch.compile with its eager backend), to check the script end to end without a GPU
#   --reference-dir PATH  a checkout of the reference (bellymonster/Weighted-Soft-Label-Distillation;
#                 absolute, or relative to the repository root like RESULTS_DIR): the step part also
#                 times the reference's own step (bench/step.py --reference-dir), 30 s more for it
# Each part runs under its own timeout; a part that fails or times out is recorded in parts.jsonl and
# the next one starts.
#
# Dependencies: $PY (default python3) needs torch and torchvision; wsld's own code comes from src/.
# A GPU machine without omegaconf, lmdb or simplejpeg (and no package index) gets them from cp312
# manylinux wheels in wheels/ (git-ignored), installed with pip --no-index into wheels/site. Fetch
# them where an index is reachable, from the repository root:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels omegaconf lmdb simplejpeg
#
# Parts: step      (a) the step limit = student step + teacher inference, (c) the wsld step and the
#                  stored-soft-labels step, fp32 and bf16+cl (cudnn.benchmark on, as wsld train on CUDA)
#                  (and with --reference-dir, the reference's own step, fp32, against them)
#        loss      the wsld loss as a share of the step (of the step part's record: before compile)
#        compile   the step with torch.compile, bf16+cl (the limit of the compiled e2e run)
#        decode    data.decode=gpu decode rate on the device and per worker core, pixel differences
#        e2e       wsld train in its steady state (>= 300 timed steps after a warm-up), images/s as a
#                  fraction of the step limit measured above, loader wait, GPU busy (CUDA events):
#                  data.decode=gpu at 8 and 4 workers, cpu at 14 and 8, stored soft labels, fp32, compile
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
if [ $DRY -eq 1 ]; then  # a CPU check of the script, not figures: kept out of bench/results
    R=${1:-$(mktemp -d /tmp/wsld-gpu-dry-run.XXXXXX)}
else
    R=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
fi
mkdir -p "$R" || exit 1
export PYTHONPATH=$PWD/src:$PWD/wheels/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if ! $PY -c "import omegaconf, lmdb, simplejpeg, yaml" 2>/dev/null; then
    MISSING=()
    for m in omegaconf:omegaconf lmdb:lmdb simplejpeg:simplejpeg yaml:pyyaml; do
        $PY -c "import ${m%%:*}" 2>/dev/null || MISSING+=("${m#*:}")
    done
    if ls wheels/*.whl >/dev/null 2>&1; then  # --no-deps: never shadow the machine's numpy or torch
        echo "== installing ${MISSING[*]} from wheels/ into wheels/site"
        $PY -m pip install --quiet --no-index --no-deps --find-links wheels --target wheels/site "${MISSING[@]}"
    fi
    $PY -c "import omegaconf, lmdb, simplejpeg, yaml" 2>/dev/null || {
        echo "gpu_figures.sh: $PY cannot import omegaconf, lmdb and simplejpeg, and wheels/ does not provide them; fetch them with:" \
             "pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels omegaconf lmdb simplejpeg" >&2
        exit 2
    }
fi

part() {  # part NAME TIMEOUT_S COMMAND...: run it, its output appended to $R/logs.txt, its exit status to parts.jsonl
    local name=$1 limit=$2 t0 rc log
    shift 2
    echo "== $name (timeout ${limit} s): $*"
    log=$(mktemp)
    t0=$(date +%s)
    timeout "$limit" "$@" >"$log" 2>&1
    rc=$?
    { echo "===== $name (exit $rc): $*"; cat "$log"; } >>"$R/logs.txt"
    echo "{\"part\": \"$name\", \"exit\": $rc, \"timed_out\": $([ $rc -eq 124 ] && echo true || echo false), \"seconds\": $(($(date +%s) - t0))}" >>"$R/parts.jsonl"
    tail -n 25 "$log"
    rm -f "$log"
    [ $rc -eq 0 ] || echo "== $name FAILED (exit $rc), see $R/logs.txt"
}

if [ $DRY -eq 1 ]; then
    export WSLD_COMPILE_BACKEND=eager  # no C compiler needed, seconds instead of minutes
    DEV="--device cpu"
    M="--teacher cnn_teacher --student cnn_student"
    S="$DEV $M --classes 10 --batch-size 8 --image-size 32 --iters 2 --warmup 1 --threads 1"
    L="$DEV --batch-size 8 --classes 10 --iters 2 --warmup 1 --threads 1"
    D="$DEV --images 8 --image-size 64 --batch-size 8 --repeats 1 --diff-sizes 64 --threads 1"
    E="$DEV $M --images 8 --classes 4 --image-size 32 --batch-size 8 --warmup-steps 2 --timed-steps 4 --log-every 2 --threads 1
       --run-timeout 240 --budget-s 1500
       --runs gpu-w1=data.decode=gpu,data.workers=1;cpu-w0=data.decode=cpu,data.workers=0;stored-gpu-w0=stored,data.decode=gpu,data.workers=0;fp32-gpu-w0=fp32,data.decode=gpu,data.workers=0;compile-gpu-w0=model.compile=true,data.decode=gpu,data.workers=0"
    T_STEP=240 T_COMPILE=240 T_LOSS=120 T_DECODE=240 T_E2E=1600
    COMPILED=fp32+compile  # what wsld train runs on a CPU (no amp, no channels_last), compiled
    [ ${#REF[@]} -eq 0 ] || REF+=(--classes 1000)  # the reference's loss fixes 1000 classes
    echo "dry run on the CPU" | tee "$R/gpu.txt"
else
    DEV="--device cuda"
    S="$DEV --batch-size 256 --image-size 224 --iters 30 --warmup 5"
    L="$DEV --iters 60 --warmup 10"
    D="$DEV --images 256 --image-size 224 --batch-size 256 --repeats 3"
    E="$DEV --budget-s 265 --run-timeout 90"
    T_STEP=75 T_COMPILE=110 T_LOSS=25 T_DECODE=40 T_E2E=280
    COMPILED=bf16+cl+compile
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$R/gpu.txt"
fi
T_STEP_REF=$T_STEP
[ ${#REF[@]} -eq 0 ] || T_STEP_REF=$((T_STEP + 30))
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)" | tee -a "$R/gpu.txt"

# shellcheck disable=SC2086  # the option strings are meant to split into words
{
part step "$T_STEP_REF" $PY bench/step.py $S --configs fp32,bf16+cl --losses wsld,ce --cudnn-benchmark "${REF[@]}" --out "$R/step.json"
part loss "$T_LOSS" $PY bench/loss.py $L --step-json "$R/step.json" --out "$R/loss.json"
part compile "$T_COMPILE" $PY bench/step.py $S --configs "$COMPILED" --losses wsld,ce --cudnn-benchmark --no-check-variant --out "$R/step.json"
part decode "$T_DECODE" $PY bench/gpu_decode.py $D --out "$R/gpu_decode.json"
part e2e "$T_E2E" $PY bench/gpu_e2e.py $E --step-json "$R/step.json" --out-dir "$R"
}
echo "== done: $R (parts.jsonl says which parts passed)"
cat "$R/parts.jsonl"
