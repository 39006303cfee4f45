#!/bin/bash
# A new user's walk (issue 19): a fresh clone of this repository, a new venv, then the README's commands in order
# on real data, each timed. Usage: bash benchmarks/new_user_walk.sh DATA_DIR [WORK_DIR]
#   DATA_DIR: the CIFAR-10 JPEG copy (tar -xzf ../shared/datasets/cifar10-jpeg.tar.gz -C /tmp/data: /tmp/data/cifar10-jpeg)
#   WORK_DIR: where the clone goes (default /tmp/ranksearch-walk; emptied first)
# Then look at the study yourself: cd WORK_DIR && .venv/bin/python -m ranksearch dashboard --study-name vgg16-cifar10-cpu
set -euo pipefail
data=$(realpath "${1:?usage: new_user_walk.sh DATA_DIR [WORK_DIR]}")
work=${2:-/tmp/ranksearch-walk}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
step() { echo "== $*"; local start=$SECONDS; "$@"; echo "== took $(( SECONDS - start )) s"; }

rm -rf "$work" && git clone -q "$repo" "$work" && cd "$work"
python3 -m venv .venv && . .venv/bin/activate
step pip install -q -e .
step python -m ranksearch run --trials 12 --config configs/cpu.yaml --data-dir "$data"
step python -m ranksearch report --study-name vgg16-cifar10-cpu --out report/
step python -m ranksearch export --study-name vgg16-cifar10-cpu --trial best --max-drop 5 --format pt,onnx \
    --out exports/best.pt
sed -n '/^from pathlib import Path/,/^print(f"test accuracy/p' README.md \
    | sed "s#\"/tmp/cifar10-jpeg/test\"#\"$data/test\"#" > snippet.py
step python snippet.py
step python -m ranksearch ranks --vbmf --config configs/cpu.yaml --data-dir "$data"
step python -m ranksearch run --trials 4 --workers 2 --warm-start vbmf --config configs/cpu.yaml --data-dir "$data"
step python -m ranksearch run --trials 6 --config configs/resnet20-cpu.yaml --data-dir "$data"
