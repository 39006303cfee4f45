#!/usr/bin/env bash
# On one NVIDIA GPU (H100/H200 class), offline: install from .gpu/ (made by benchmarks/gpu_wheels.sh), pretrain
# the full-width baseline briefly, run a 20-trial search with the default config, and print the per-trial
# time split, trials per minute, peak GPU memory and the projected time of 200 trials; then two short
# latency-objective studies (batch 1 and 128): MACs ratio against measured GPU latency ratio. Budget: < 10 minutes.
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
# Is decomposed VGG16 faster on this GPU, and by how much? A short latency-objective study (batch 1 and 128): each
# trial's latency is the deployed form's (BatchNorm folded, TorchScript) median on the GPU, timed with CUDA events.
for batch in 1 128; do
  python3 -m ranksearch run --trials 10 --data-dir /tmp/data/cifar10-jpeg --pretrain-epochs "${PRETRAIN_EPOCHS:-8}" \
      --no-download --study-name "gpu-latency-b$batch" --objectives accuracy,macs,latency --latency-batch "$batch" \
      --ranks 4/32,4/32,4/32,4/32,4/32 --ranks 8/32,8/32,8/32,8/32,8/32 --ranks 16/32,16/32,16/32,16/32,16/32
  python3 - "$batch" <<'PY'
import sys, optuna
batch = sys.argv[1]
study = optuna.load_study(study_name=f"gpu-latency-b{batch}", storage=f"sqlite:///studies/gpu-latency-b{batch}.db")
print(f"batch {batch}: baseline {study.user_attrs['baseline_latency_ms']:.3f} ms on {study.user_attrs['latency_device']}")
for t in sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.user_attrs["macs_ratio"]):
    print(f"  trial {t.number}: MACs {t.user_attrs['macs_ratio']:.3f}x  latency {t.user_attrs['latency_ratio']:.3f}x "
          f"({t.user_attrs['latency_ms']:.3f} ms)  val {t.values[0]:.2%}")
PY
done
