#!/usr/bin/env bash
# Issue 25 at full width on one NVIDIA GPU (H100/H200 class), offline, installed from .gpu/ as benchmarks/gpu.sh is:
# pretrain the default config's baseline (30 epochs: ~95 s on an H200), `run --budget macs=0.2` with its rungs
# (200/600/1800 steps) and its delivery (the best 2 refined 5 epochs each), then the references at equal refine:
# uniform 10/32, VBMF fitted to the budget and the testbed's sensitivity allocation 12/12/12/6/3, each the trial's
# model refined 5 epochs (benchmarks/delivered.py). Prints the refined val and test of each. Budget: < 10 minutes.
#   device run: carry [".gpu"], command: bash benchmarks/gpu_delivered.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$repo
mkdir -p /tmp/data && tar -xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/data
work=$(mktemp -d) && cd "$work"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m ranksearch pretrain --data-dir /tmp/data/cifar10-jpeg --no-download
python3 -m ranksearch run --budget macs=0.2 --trials 24 --data-dir /tmp/data/cifar10-jpeg --no-download \
    --study-name gpu-delivered --warm-start uniform --ranks 12/32,12/32,12/32,6/32,3/32 --out delivered/macs0.2.pt
python3 "$repo/benchmarks/delivered.py" --config "$repo/configs/default.yaml" --data-dir /tmp/data/cifar10-jpeg \
    --work "$work" --stage refs --epochs 5 --budgets 5x
python3 - <<'PY'
import optuna
study = optuna.load_study(study_name="gpu-delivered", storage="sqlite:///studies/gpu-delivered.db")
steps = sum(t.user_attrs.get("trained_steps", 0) for t in study.trials)
print(f"search: {len(study.trials)} trials, {steps:,} fine-tune steps; delivered: {study.user_attrs['delivered']}")
PY
