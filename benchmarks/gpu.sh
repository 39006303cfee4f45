#!/usr/bin/env bash
# On one NVIDIA GPU (H100/H200 class), offline: install from .gpu/ (made by benchmarks/gpu_wheels.sh), pretrain
# the full-width baseline briefly, run a 20-trial search with the default config, and print the per-trial
# time split, trials per minute, peak GPU memory and the projected time of 200 trials. Budget: < 8 minutes.
#   device run: carry [".gpu"], command: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site
mkdir -p /tmp/data && tar -xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/data
work=$(mktemp -d) && cd "$work"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, optuna, tensorly; print('torch', torch.__version__, 'optuna', optuna.__version__)"
start=$(date +%s)
python3 -m ranksearch pretrain --data-dir /tmp/data/cifar10-jpeg --pretrain-epochs "${PRETRAIN_EPOCHS:-8}" --no-download
pretrained=$(date +%s)
python3 -m ranksearch run --trials 20 --data-dir /tmp/data/cifar10-jpeg --pretrain-epochs "${PRETRAIN_EPOCHS:-8}" \
    --no-download --study-name gpu-check
done_at=$(date +%s)
python3 "$OLDPWD/benchmarks/study_timing.py" --storage sqlite:///studies/gpu-check.db --study-name gpu-check
python3 - "$((pretrained - start))" "$((done_at - pretrained))" <<'PY'
import sys, optuna
pretrain_s, search_s = int(sys.argv[1]), int(sys.argv[2])
study = optuna.load_study(study_name="gpu-check", storage="sqlite:///studies/gpu-check.db")
done = [t for t in study.trials if t.state.name == "COMPLETE"]
peak = max(t.user_attrs.get("peak_gpu_mib", 0) for t in done)
print(f"pretraining {pretrain_s} s; 20 trials {search_s} s = {60 * len(done) / search_s:.1f} trials/min; "
      f"peak GPU memory {peak:.0f} MiB; projected 200 trials: {200 * search_s / len(done) / 60:.1f} min")
PY
