#!/usr/bin/env bash
# Regenerates export-v2.pt (a real file-version-2 export, written by ranksearch 0.4.0 = commit bc4e385, before
# the per-layer decomposition record) and export-v2-reference.pt (an input batch and the logits 0.4.0's
# load_model gave for it), from the repo root:
#   bash tests/data/make_export_v2.sh
# Trial 0 of a smoke study of ResNet-20 at width 0.5 on the tests' tiny data (tests/conftest.py write_imagefolder),
# ranks 32/32 (stem, kept), 4/32, 8/32, 4/32 (stages 1-3, Tucker-2).
set -euo pipefail
repo=$(pwd)
work=$(mktemp -d)
git worktree add --detach "$work/old" bc4e385
trap 'git -C "$repo" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
export PYTHONPATH="$work/old" OMP_NUM_THREADS=1
cd "$work"
python -c "import sys; sys.path.insert(0, '$repo/tests'); from conftest import write_imagefolder; \
from pathlib import Path; write_imagefolder(Path('cifar'))"
python -m ranksearch run --config old/configs/smoke.yaml --data-dir cifar --trials 1 --model resnet20 --width 0.5 \
    --study-name smoke-resnet20 --ranks 32/32,4/32,8/32,4/32
python -m ranksearch export --study-name smoke-resnet20 --trial 0 --out "$repo/tests/data/export-v2.pt"
python - "$repo/tests/data" <<'PY'
import sys

import torch

from ranksearch import load_model

torch.manual_seed(0)
images = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    logits = load_model(f"{sys.argv[1]}/export-v2.pt")(images)
torch.save({"images": images, "logits": logits}, f"{sys.argv[1]}/export-v2-reference.pt")
PY
