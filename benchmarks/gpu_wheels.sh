#!/usr/bin/env bash
# Run HERE (with internet to PyPI) before benchmarks/gpu.sh: gathers into .gpu/ what the GPU machine lacks
# (Python 3.12, torch 2.11, no tensorly / optuna / thop / plotly) and the dataset; gpu.sh runs this working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu/whl && mkdir -p .gpu/whl  # this list only: the carry is limited to 64 MiB with the working tree
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform any)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .gpu/whl \
    tensorly==0.10.0 optuna==5.1.0 alembic sqlalchemy mako colorlog greenlet ultralytics-thop plotly \
    optuna-dashboard bottle  # a run's end saves its Pareto plot (pandas, narwhals: in the image, KINDS.md)
cp ../shared/datasets/cifar10-jpeg.tar.gz .gpu/
du -sh .gpu
