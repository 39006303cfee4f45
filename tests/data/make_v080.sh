#!/usr/bin/env bash
# Regenerates the 0.8.0 fixtures, from the repo root: bash tests/data/make_v080.sh
#   study-v080.db: a smoke study (VGG16 at width 1/16 on the tests' tiny data, tests/conftest.py write_imagefolder)
#     made by ranksearch 0.8.0 (commit d7a376f), 2 trials, the first at ranks 8/32 everywhere;
#   study-v080-weights/: the weights 0.8.0 kept for its Pareto trials (beside the database, as 0.8.0 kept them);
#   export-v4.pt: 0.8.0's export of trial 0 (file version 4), and export-v4-reference.pt: an input batch and the
#     logits 0.8.0's load_model gave for it.
set -euo pipefail
repo=$(pwd)
work=$(mktemp -d)
git worktree add --detach "$work/old" d7a376f
trap 'git -C "$repo" worktree remove --force "$work/old"; rm -rf "$work"' EXIT
export PYTHONPATH="$work/old" OMP_NUM_THREADS=1
cd "$work"
python -c "import sys; sys.path.insert(0, '$repo/tests'); from conftest import write_imagefolder; \
from pathlib import Path; write_imagefolder(Path('cifar'))"
python -m ranksearch run --config old/configs/smoke.yaml --data-dir cifar --trials 2 --ranks 8/32,8/32,8/32,8/32,8/32
python -m ranksearch export --study-name smoke --trial 0 --out "$repo/tests/data/export-v4.pt"
rm -rf "$repo/tests/data/study-v080-weights"
cp studies/smoke.db "$repo/tests/data/study-v080.db"
cp -r studies/smoke-weights "$repo/tests/data/study-v080-weights"
python - "$repo/tests/data" <<'PY'
import sys

import torch

from ranksearch import load_model

torch.manual_seed(0)
images = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    logits = load_model(f"{sys.argv[1]}/export-v4.pt")(images)
torch.save({"images": images, "logits": logits}, f"{sys.argv[1]}/export-v4-reference.pt")
PY
