"""The starved corner (issue 25, BENCHMARKS.md "The delivered model"): how many sampler-drawn trials put a module at
1-2/32 while the others are high, before and after ``rank_spread``.

1. In real studies on the quality baseline (configs/cpu-quality.yaml): every study of --storage whose trials are
   rank vectors (warm starts and --ranks vectors, which are not the sampler's, left out).
2. The samplers alone, GP and TPE, 40 trials each, on a surrogate of the quality baseline: a vector's val accuracy
   predicted from the 45 measured single-module points (``ranksearch sensitivity``) as the baseline's times each
   module's kept fraction, its MACs exact from the cost table; multi-objective (accuracy, MACs) and budget mode at
   0.2 and 0.1, each with rank_spread 32 (no limit, as before 0.10.0) and 4 (the default). The surrogate is
   cheap, so the samplers' draws can be counted without training; what it predicts for a starved vector is what
   the points measured (a module at 1/32 alone keeps 31-62 % val).

    python benchmarks/wasted_corner.py --data-dir /tmp/data/cifar10-jpeg --work /tmp/quality \
        --storage sqlite:///studies/issue17.db --points vgg16-sensitivity-04885e7b92
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna

from ranksearch.data.datasets import device_data
from ranksearch.models import RANK_STEPS, rank_modules
from ranksearch.objectives.cost_table import cost_table
from ranksearch.search.samplers import fit_to_budget, make_sampler, within_spread
from ranksearch.search.sensitivity import curves
from ranksearch.study.config import load_config
from ranksearch.train.baseline import ensure_baseline
from ranksearch.utils.device import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import CONFIG  # noqa: E402

TRIALS = 40


def starved(ks: list[int]) -> bool:
    """A module at 1-2/32 while the others average 6/32 or more (3x it and up)."""
    low = min(ks)
    others = list(ks)
    others.remove(low)
    return low <= 2 and sum(others) / len(others) >= 6


def real_studies(storage: str) -> None:
    print("| study | sampler-drawn trials | starved | share |\n|---|---:|---:|---:|")
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        drawn = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED") and "fixed_params" not in
                 t.system_attrs and t.params and all(k.startswith("rank_") for k in t.params)]  # fmt: skip
        if not drawn:
            continue
        count = sum(starved([round(v * RANK_STEPS) for v in t.params.values()]) for t in drawn)
        print(f"| {summary.study_name} | {len(drawn)} | {count} | {count / len(drawn):.0%} |")


class Surrogate:
    """Predicted val accuracy of a rank vector: the baseline's times each module's kept fraction at its rank
    (linear between measured ladder ranks)."""

    def __init__(self, points, modules: list[str], baseline_val: float):
        self.baseline_val, self.modules = baseline_val, modules
        self.curves = {m: ([p.rank for p in points[m]] + [1.0], [p.accuracy for p in points[m]] + [baseline_val])
                       for m in modules}  # fmt: skip

    def __call__(self, ranks: list[float]) -> float:
        kept = [np.interp(r, *self.curves[m]) / self.baseline_val for m, r in zip(self.modules, ranks, strict=True)]
        return float(self.baseline_val * np.prod(np.minimum(kept, 1.0)))


def simulate(config, sampler: str, budget: float | None, spread: int, surrogate: Surrogate, table, modules) -> dict:
    names = [f"rank_{m}" for m in modules]
    grid = optuna.distributions.FloatDistribution(1 / RANK_STEPS, 1.0, step=1 / RANK_STEPS)
    space = dict.fromkeys(names, grid)
    macs = lambda ranks: table.ratio("macs", ranks)  # noqa: E731
    if budget is None:
        fit = None if spread >= RANK_STEPS else (lambda r: within_spread(r, spread, 1 / RANK_STEPS, 1.0))
        directions = ["maximize", "minimize"]
    else:
        fit = lambda r: fit_to_budget(r, macs, budget, 1 / RANK_STEPS, 1.0, spread)  # noqa: E731
        directions = ["maximize"]
    chosen = config.__class__(**{**config.to_dict(), "sampler": sampler, "trials": TRIALS, "seed": 0})
    study = optuna.create_study(directions=directions, sampler=make_sampler(chosen, fit, space))

    def objective(trial):
        ranks = [trial.suggest_float(n, 1 / RANK_STEPS, 1.0, step=1 / RANK_STEPS) for n in names]
        value = surrogate(ranks)
        return value if budget is not None else (value, macs(ranks))

    study.optimize(objective, n_trials=TRIALS)
    draws = [[round(v * RANK_STEPS) for v in t.params.values()] for t in study.trials]
    best = max(t.values[0] for t in study.trials) if budget is not None else None
    return {"starved": sum(map(starved, draws)), "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--storage", required=True, help="the studies to count, and the points' study")
    parser.add_argument("--points", required=True, help="the sensitivity study of the quality baseline")
    parser.add_argument("--part", choices=("real", "samplers", "both"), default="both")
    args = parser.parse_args()
    os.chdir(args.work)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.part in ("real", "both"):
        real_studies(args.storage)
    if args.part == "real":
        return
    config = load_config(CONFIG, {"data_dir": args.data_dir, "download": False})
    data = device_data(config, resolve_device("cpu"))
    baseline = ensure_baseline(config, data)
    modules = list(rank_modules(baseline.model))
    table = cost_table(baseline.model, config.search_space, config.decomposition, data.spec.input_size())
    points = curves(optuna.load_study(study_name=args.points, storage=args.storage), modules)
    surrogate = Surrogate(points, modules, baseline.val_accuracy)
    print(f"\nsamplers alone on the surrogate, {TRIALS} trials each: starved draws (share), best predicted val")
    print("| sampler | mode | rank_spread 32 (before) | rank_spread 4 (after) |\n|---|---|---:|---:|")
    for sampler in ("gp", "tpe"):
        for budget in (None, 0.2, 0.1):
            cells = []
            for spread in (RANK_STEPS, 4):
                found = simulate(config, sampler, budget, spread, surrogate, table, modules)
                best = f", best {found['best']:.2%}" if found["best"] is not None else ""
                cells.append(f"{found['starved']} ({found['starved'] / TRIALS:.0%}){best}")
            mode = "accuracy, MACs" if budget is None else f"budget macs={budget}"
            print(f"| {sampler} | {mode} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
