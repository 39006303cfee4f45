#!/usr/bin/env bash
# Regenerates export-v1.pt (a real file-version-1 export, written by ranksearch 0.1.0 = commit 79b83aa) and
# export-v1-reference.pt (an input batch and the logits 0.1.0's load_model gave for it), from the repo root:
#   bash tests/data/make_export_v1.sh
# Trial 0 of a smoke study on the tests' tiny data (tests/conftest.py write_imagefolder), ranks 4/8/4/4/32 /32:
# blocks 1-4 Tucker-2, block 5 kept as plain convs.
set -euo pipefail
repo=$(pwd)
work=$(mktemp -d)
git worktree add --detach "$work/old" 79b83aa
trap 'git -C "$repo" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
export PYTHONPATH="$work/old" OMP_NUM_THREADS=1
cd "$work"
python -c "import sys; sys.path.insert(0, '$repo/tests'); from conftest import write_imagefolder; \
from pathlib import Path; write_imagefolder(Path('cifar'))"
python -m ranksearch run --config old/configs/smoke.yaml --data-dir cifar --trials 3 \
    --ranks 4/32,8/32,4/32,4/32,32/32 --ranks 8/32,8/32,8/32,8/32,8/32
python -m ranksearch export --study-name smoke --trial 0 --out "$repo/tests/data/export-v1.pt"
python - "$repo/tests/data" <<'PY'
import sys

import torch

from ranksearch import load_model

torch.manual_seed(0)
images = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    logits = load_model(f"{sys.argv[1]}/export-v1.pt")(images)
torch.save({"images": images, "logits": logits}, f"{sys.argv[1]}/export-v1-reference.pt")
PY
