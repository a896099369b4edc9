#!/bin/bash
# The GPU figures of BENCHMARKS.md ("Not yet measured on GPU"), in one go on one CUDA machine.
# Usage: bash bench/gpu_figures.sh [RESULTS_DIR]   (default: bench/results; PY=python3 by default)
# Needs wsld's dependencies importable by $PY (pip install -e . or PYTHONPATH=src plus omegaconf,
# lmdb, simplejpeg, msgpack, safetensors, tensorboard, scikit-learn). About 6 minutes on one H100/H200.
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
R=${1:-bench/results}; mkdir -p "$R"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
S="--device cuda --batch-size 256 --image-size 224"
TP="--device cuda --images 512 --replicate 12 --classes 100 --image-size 224 --batch-size 256 --pairs resnet34:resnet18"
# 1. waste ratio and overhead, fp32 vs the engine's CUDA defaults (bf16 autocast + channels_last)
timeout 110 $PY bench/step.py $S --iters 30 --warmup 5 --configs fp32,bf16+cl --out "$R/step.json"
# 2. the loss as a share of those steps (reads the record just written), fp32 and bf16 logits
timeout 40 $PY bench/loss.py --device cuda --iters 100 --warmup 10 --step-json "$R/step.json" --out "$R/loss.json"
# 3. what cudnn.benchmark (off in the engine) would change
timeout 60 $PY bench/step.py $S --iters 30 --warmup 5 --configs fp32,bf16+cl --cudnn-benchmark --no-check-variant \
    --losses wsld,ce --out "$R/step.json"
# 4. end-to-end wsld train images/s and data-wait fraction vs loader workers; then fp32 at the most workers
timeout 160 $PY bench/train_throughput.py $TP --workers 0,4,8,14 --configs default --out "$R/train_throughput.json"
timeout 50 $PY bench/train_throughput.py $TP --workers 14 --configs fp32 --out "$R/train_throughput.json"
# 5. torch.compile (model.compile=true) last: its compile time may run past the limit
timeout 150 $PY bench/step.py $S --iters 30 --warmup 5 --configs bf16+cl+compile --losses wsld,ce --out "$R/step.json"
