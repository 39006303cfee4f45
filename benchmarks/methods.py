"""Decomposition methods and distillation, compared on the same rank vectors (evidence for the defaults).

For each of N random rank vectors: every method's weight reconstruction error and decomposition time, and the
validation accuracy after the config's fine-tune; then the fine-tune with and without distillation.

    python benchmarks/methods.py --config configs/cpu.yaml --data-dir /tmp/cifar10-jpeg --vectors 6
"""

import argparse
import dataclasses
import random
import statistics
import time

import torch
from torch import nn

from ranksearch.data.datasets import device_data
from ranksearch.decompose import Tucker2Conv, reconstruction_error
from ranksearch.models import rank_modules
from ranksearch.search.trial import trial_model
from ranksearch.study.config import load_config
from ranksearch.train.baseline import cached_bases, ensure_baseline
from ranksearch.train.loops import evaluate
from ranksearch.utils.device import resolve_device

METHODS = ("hooi", "hosvd", "hosvd+refine")


def mean_error(baseline: nn.Module, model: nn.Module) -> float:
    originals = {name: layer for layers in rank_modules(baseline).values() for name, layer in layers}
    errors = [
        reconstruction_error(originals[name], layer)
        for layers in rank_modules(model).values()
        for name, layer in layers
        if isinstance(layer, Tucker2Conv)
    ]
    return statistics.mean(errors) if errors else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--vectors", type=int, default=6, help="random rank vectors to compare on")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    args = parser.parse_args()
    config = load_config(args.config, {"data_dir": args.data_dir})
    data = device_data(config, resolve_device(config.device))
    baseline = ensure_baseline(config, data)
    start = time.perf_counter()
    bases = cached_bases(baseline.model, baseline.path)
    print(f"channel bases of the baseline: {time.perf_counter() - start:.2f} s (once per baseline)")
    rng = random.Random(0)
    modules = list(rank_modules(baseline.model))
    vectors = [{m: rng.randint(2, 16) / 32 for m in modules} for _ in range(args.vectors)]

    def run(label: str, cfg) -> None:
        errors, seconds, accuracies = [], [], []
        for index, ranks in enumerate(vectors):
            model, parts = trial_model(baseline.model, ranks, cfg, data, seed=index, bases=bases)
            errors.append(mean_error(baseline.model, model))
            seconds.append(parts["decompose_s"])
            accuracies.append(evaluate(model, data, "val", cfg.eval_batch_size))
        per_vector = " ".join(f"{a:.1%}" for a in accuracies)
        print(f"| {label} | {statistics.mean(errors):.4f} | {statistics.mean(seconds):.3f} | "
              f"{statistics.mean(accuracies):.2%} | {per_vector} |", flush=True)  # fmt: skip

    print(f"{len(vectors)} rank vectors, each module k/32 with k uniform in 2..16; "
          f"{config.finetune_steps} fine-tune steps; val {config.val_size} images")  # fmt: skip
    print("| variant | mean rel. reconstruction error | decompose s | mean val acc after fine-tune | per vector |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        run(method, dataclasses.replace(config, decompose_method=method, distill_weight=0.0))
    # the same fine-tunes with distillation: compare with the row of the config's method above
    cfg = dataclasses.replace(config, distill_weight=args.distill_weight)
    run(f"{cfg.decompose_method} + distillation (weight {args.distill_weight})", cfg)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
