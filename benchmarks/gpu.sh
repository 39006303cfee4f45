#!/usr/bin/env bash
# Issue 27's measurements on one NVIDIA GPU (H100/H200 class), offline, in under 10 minutes of device time:
#   1. the training loop: ranksearch's steps/s against a plain PyTorch loop in the same process, with cuDNN's
#      default, deterministic and autotuned kernels, and with 0.11.0's batches (benchmarks/train_speed.py);
#   2. a short pretraining (the baseline the trials start from; its steps/s from the command's own line);
#   3. trials/min and peak GPU memory with 1, 2, 4 and 8 workers on the GPU (benchmarks/workers_per_device.py),
#      default config, then 4 workers with `deterministic: false`.
# Every table is also written under $OUT (the device tool brings it back).
#   device run: carry [".gpu"] (made here by benchmarks/gpu_wheels.sh), command: bash benchmarks/gpu.sh
# The same steps at a toy size on this machine's CPU (checks the script; measures nothing worth keeping):
#   GPU_SH_DRY=/tmp/data/cifar10-jpeg bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PYTHONUNBUFFERED=1
if [ -z "${GPU_SH_DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH="$repo:/tmp/site"  # this working tree's ranksearch, the carried wheels beside it
  mkdir -p /tmp/data && tar -xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/data
  data=/tmp/data/cifar10-jpeg
  epochs=${PRETRAIN_EPOCHS:-8} speed=(--steps 300 --rounds 2) workers=1,2,4,8 trials=12,16,24,32 fast=(4 24)
  config=() python=python3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  data=$GPU_SH_DRY
  epochs=1 speed=(--steps 10 --rounds 1 --width 0.0625) workers=1,2 trials=2,2 fast=(2 2)
  config=(--config "$repo/configs/smoke.yaml" --val-size 500) python=${PYTHON:-python3}
fi
out=${OUT:-$(mktemp -d)} && mkdir -p "$out"
work=$(mktemp -d) && cd "$work"
$python -c "import torch, optuna, ranksearch, optuna_dashboard, pandas, plotly, tensorly, thop  # all a run imports
print('torch', torch.__version__, 'optuna', optuna.__version__, 'ranksearch', ranksearch.__version__,
      'cores', __import__('os').cpu_count())"
start=$(date +%s)

echo "== 1. the training loop against a plain loop (steps/s, one process)"
$python "$repo/benchmarks/train_speed.py" --data-dir "$data" "${speed[@]}" | tee "$out/train_speed.md"

echo "== 2. pretraining $epochs epochs"
$python -m ranksearch pretrain "${config[@]}" --data-dir "$data" --no-download --pretrain-epochs "$epochs" 2>&1 \
    | grep -E "steps/s|baseline" | tail -3 | tee "$out/pretrain.txt"

echo "== 3. workers on one device: trials/min and memory"
run=("${config[@]}" --data-dir "$data" --no-download --pretrain-epochs "$epochs")
$python "$repo/benchmarks/workers_per_device.py" --workers "$workers" --trials "$trials" -- "${run[@]}" \
    | tee "$out/workers.md"
echo "   the same with autotuned (non-deterministic) cuDNN kernels, ${fast[0]} workers"
printf 'deterministic: false\n' > autotuned.yaml
if [ -n "${GPU_SH_DRY:-}" ]; then cat "$repo/configs/smoke.yaml" >> autotuned.yaml; run=("${run[@]:2}"); fi
$python "$repo/benchmarks/workers_per_device.py" --workers "${fast[0]}" --trials "${fast[1]}" -- --config autotuned.yaml "${run[@]}" \
    | tee "$out/workers_autotuned.md"
echo "== done in $(( $(date +%s) - start )) s"
