"""What `compile: true` (torch.compile) costs and gains per trial: one process, same ranks, seeds and steps.

    python benchmarks/compile_cost.py --config configs/cpu.yaml --data-dir /tmp/data/cifar10-jpeg --trials 2

For each of ``--trials`` random rank vectors: the fine-tune eager, then compiled (a new model, so a new graph,
as in a search), then that compiled model's fine-tune again (the graph is cached: the steady-state speed).
Needs the config's baseline (run `python -m ranksearch pretrain` with the same config first).
"""

import argparse
import dataclasses
import random
import time

import torch

from ranksearch.data.datasets import device_data
from ranksearch.decompose import model_bases
from ranksearch.models import rank_modules
from ranksearch.search.trial import decomposed_model
from ranksearch.study.config import load_config
from ranksearch.train.baseline import baseline_path, load_baseline
from ranksearch.train.loops import finetune
from ranksearch.utils.device import resolve_device, synchronize


def timed_finetune(model, data, config, seed: int) -> float:
    start = time.perf_counter()
    finetune(model, data, config, seed)
    synchronize(data.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config, {"data_dir": args.data_dir})
    device = resolve_device(config.device)
    data = device_data(config, device)
    baseline = load_baseline(baseline_path(config, data.identity), config, device, data.identity).model
    bases = model_bases(baseline)
    eager_config = dataclasses.replace(config, compile=False)
    compiled_config = dataclasses.replace(config, compile=True)
    rng = random.Random(0)
    rows = []
    for trial in range(args.trials):
        ranks = {module: rng.randint(2, 16) / 32 for module in rank_modules(baseline)}
        eager = timed_finetune(decomposed_model(baseline, ranks, config, device, bases), data, eager_config, trial)
        model = decomposed_model(baseline, ranks, config, device, bases)
        first = timed_finetune(model, data, compiled_config, trial)
        warm = timed_finetune(model, data, compiled_config, trial)
        rows.append((eager, first, warm))
        print(f"trial {trial}: eager {eager:.2f} s, compiled: new graph {first:.2f} s, cached graph {warm:.2f} s")
    eager, first, warm = (sum(column) / len(rows) for column in zip(*rows, strict=True))
    steps = config.finetune_steps
    print(f"{steps} steps, {torch.get_num_threads()} threads, {device}")
    print(f"compile time per new graph: {first - warm:.1f} s; steady-state speed-up {eager / warm:.2f}x")
    print(f"per trial with compile: {first / eager:.2f}x the eager trial's fine-tune time")


if __name__ == "__main__":
    main()
