"""Print a finished study's per-trial time split, its overhead, and its Pareto front (figures for BENCHMARKS.md).

    python benchmarks/study_timing.py --storage sqlite:///studies/vgg16-cifar10-cpu.db \
        --study-name vgg16-cifar10-cpu --data-dir /tmp/data/cifar10-jpeg

Overhead is everything in a trial except the fine-tune's forward/backward/optimizer arithmetic and the evaluation
forward: decomposition, MAC counting, Optuna and weight-artifact bookkeeping (trial wall time minus the timed
parts), and the fine-tune's batch preparation (index, crop/flip, normalize). With ``--data-dir`` the batch
preparation's share of a fine-tune step is measured here, side by side with whole steps, on the study's config.
"""

import argparse
import statistics
import time

import optuna
import torch

PARTS = ("decompose_s", "finetune_s", "eval_s", "count_s")


def batch_prep_share(study: optuna.Study, data_dir: str, steps: int) -> float:
    """Fraction of a fine-tune step's time spent preparing its batch (same process, same data, CPU)."""
    from ranksearch.data.datasets import device_data
    from ranksearch.deliver.export import study_config
    from ranksearch.models import rank_modules
    from ranksearch.search.trial import trial_model
    from ranksearch.study.config import Config
    from ranksearch.train.baseline import baseline_path, load_baseline

    device = torch.device("cpu")
    fields = {**study_config(study).to_dict(), "data_dir": data_dir, "device": "cpu", "finetune_steps": steps}
    config = Config(**fields)
    data = device_data(config, device)
    generator = torch.Generator().manual_seed(0)
    batches = data.train_batches(config.batch_size, generator)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    prep = (time.perf_counter() - start) / steps

    baseline = load_baseline(baseline_path(config, data.identity), config, device, data.identity)
    ranks = {module: 8 / 32 for module in rank_modules(baseline.model)}
    _, seconds = trial_model(baseline.model, ranks, config, data, seed=0)
    step = seconds["finetune_s"] / steps
    print(f"batch preparation {prep * 1e3:.1f} ms of a {step * 1e3:.1f} ms fine-tune step ({prep / step:.1%})")
    return prep / step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study-name", required=True)
    parser.add_argument("--data-dir", help="the study's dataset: also measure the batch-preparation share")
    parser.add_argument("--prep-steps", type=int, default=20, help="steps for the batch-preparation measurement")
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study_name, storage=args.storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    total = sum(walls)
    print(f"{len(done)} complete trials; wall per trial: mean {statistics.mean(walls):.2f} s")
    sums = {part: sum(t.user_attrs[part] for t in done) for part in PARTS}
    for part in PARTS:
        print(f"  {part:12s} mean {sums[part] / len(done):6.2f} s  ({sums[part] / total:.1%} of trial wall time)")
    untimed = total - sum(sums.values())
    print(f"  {'untimed':12s} mean {untimed / len(done):6.2f} s  ({untimed / total:.1%}: Optuna, weights artifacts)")
    overhead = sums["decompose_s"] + sums["count_s"] + untimed
    if args.data_dir:
        overhead += batch_prep_share(study, args.data_dir, args.prep_steps) * sums["finetune_s"]
    what = "" if args.data_dir else " (without batch preparation: pass --data-dir)"
    print(f"overhead per trial: {overhead / len(done):.2f} s = {overhead / total:.1%} of trial wall time{what}")
    base = study.user_attrs["baseline"]
    print(f"baseline: val {base['val_accuracy']:.2%} test {base['test_accuracy']:.2%} MACs {base['macs']:,}")
    print("| trial | ranks (k/32, block1..5) | val acc | MACs ratio | params ratio |")
    print("|---|---|---|---|---|")
    for t in sorted(study.best_trials, key=lambda t: t.values[1]):
        ranks = "/".join(str(round(v * 32)) for _, v in sorted(t.params.items()))
        a = t.user_attrs
        print(f"| {t.number} | {ranks} | {t.values[0]:.2%} | {a['macs_ratio']:.3f} | {a['params_ratio']:.3f} |")


if __name__ == "__main__":
    main()
