"""Print a finished study's per-trial time split and Pareto front (figures for BENCHMARKS.md).

    python benchmarks/study_timing.py --storage sqlite:///studies/vgg16-cifar10-cpu.db --study-name vgg16-cifar10-cpu
"""

import argparse
import statistics

import optuna

PARTS = ("decompose_s", "finetune_s", "eval_s", "count_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study-name", required=True)
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study_name, storage=args.storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    print(f"{len(done)} complete trials; wall per trial: mean {statistics.mean(walls):.2f} s")
    for part in PARTS:
        values = [t.user_attrs[part] for t in done]
        share = sum(values) / sum(walls)
        print(f"  {part:12s} mean {statistics.mean(values):6.2f} s  ({share:.1%} of trial wall time)")
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
