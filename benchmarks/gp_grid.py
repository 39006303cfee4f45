"""The GP sampler's acquisition optimizer: Optuna's own against ``ranksearch.search.gp_grid`` (issue 27), side by side.

``time``: seconds per suggestion after 50, 100, 200 and 400 told trials of ``sampler_per_trial.py``'s toy history
(5 modules on the 1/32 grid, two objectives), each asked of a new sampler seeded per trial as ``samplers.TrialSeeded``
asks; the two optimizers alternate within each size, on one thread.

``hypervolume``: 40-trial searches on the surrogate of ``wasted_corner.py`` (the quarter-width VGG16's val accuracy
predicted from its 45 measured single-module points, MACs exact from the cost table), as ``run`` searches: the
uniform warm starts queued first, every draw within the default rank spread; hypervolume of (val, MACs ratio)
against (0, 1) after 40 trials, per seed. No data is loaded: the surrogate needs the points' study and the
baseline's recorded val accuracy only.

    OMP_NUM_THREADS=1 python benchmarks/gp_grid.py time [--sizes 50,100,200,400] [--asks 4]
    OMP_NUM_THREADS=1 python benchmarks/gp_grid.py hypervolume [--seeds 0,1,2,3,4]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sampler_per_trial import history  # noqa: E402
from sampler_size import seconds_per_ask  # noqa: E402
from wasted_corner import Surrogate  # noqa: E402

from ranksearch.models import RANK_STEPS, rank_modules  # noqa: E402
from ranksearch.objectives.cost_table import cost_table  # noqa: E402
from ranksearch.search.gp_grid import GridGPSampler  # noqa: E402
from ranksearch.search.samplers import BudgetSampler, TrialSeeded, within_spread  # noqa: E402
from ranksearch.search.sensitivity import curves  # noqa: E402
from ranksearch.study.config import load_config  # noqa: E402
from ranksearch.train.baseline import new_model  # noqa: E402

OPTIMIZERS = {"optuna": optuna.samplers.GPSampler, "grid": GridGPSampler}
QUALITY = HERE / "results" / "quality"
POINTS = "vgg16-sensitivity-0efb658393"  # the 45 single-module points of the quality baseline
BASELINE = QUALITY / "vgg16-w0.25-2f77ea97660e.pt"
TRIALS = 40
UNIFORM = (2, 4, 8, 16)  # the default warm start: every module at these /32


def time_part(sizes: list[int], asks: int) -> None:
    print("| told trials | Optuna's optimizer s/suggestion | grid optimizer s/suggestion | ratio |\n"
          "|---:|---:|---:|---:|")
    for size in sizes:
        told = history(size)
        optuna_s = seconds_per_ask(lambda index: OPTIMIZERS["optuna"](seed=index), told, asks)
        grid_s = seconds_per_ask(lambda index: OPTIMIZERS["grid"](seed=index), told, asks)
        print(f"| {size} | {optuna_s:.3f} | {grid_s:.3f} | {grid_s / optuna_s:.2f}x |", flush=True)


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by (val, MACs ratio) points (maximize val, minimize ratio) within the reference (0, 1): swept
    from the cheapest, each point adds (1 - ratio) x the val it gains over the best cheaper one."""
    area, best_val = 0.0, 0.0
    for ratio, val in sorted((ratio, val) for val, ratio in points if ratio <= 1.0):
        if val > best_val:
            area += (1.0 - ratio) * (val - best_val)
            best_val = val
    return area


def search(sampler_class, seed: int, surrogate: Surrogate, table, modules: list[str]) -> tuple[float, float]:
    """One 40-trial search as ``run`` makes it; its hypervolume and the sampler's mean seconds per draw."""
    names = [f"rank_{m}" for m in modules]
    space = dict.fromkeys(names, optuna.distributions.FloatDistribution(1 / RANK_STEPS, 1.0, step=1 / RANK_STEPS))
    spread = lambda ranks: within_spread(ranks, 4, 1 / RANK_STEPS, 1.0)  # noqa: E731
    sampler = BudgetSampler(TrialSeeded(lambda s: sampler_class(seed=s), seed), space, spread)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for k in UNIFORM:
        study.enqueue_trial(dict.fromkeys(names, k / RANK_STEPS))
    drawn = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        trial = study.ask(space)
        drawn.append(time.perf_counter() - start)
        ranks = [trial.params[n] for n in names]
        study.tell(trial, (surrogate(ranks), table.ratio("macs", ranks)))
    front = [tuple(t.values) for t in study.trials]
    return hypervolume(front), float(np.mean(drawn[len(UNIFORM) :]))


def hypervolume_part(seeds: list[int]) -> None:
    config = load_config(HERE.parent / "configs" / "cpu-quality.yaml", {"download": False})
    model = new_model(config)
    modules = list(rank_modules(model))
    table = cost_table(model, config.search_space, config.decomposition, (1, 3, 32, 32))
    baseline_val = torch.load(BASELINE, weights_only=True)["metrics"]["val_accuracy"]
    storage = f"sqlite:///{QUALITY / 'issue17.db'}"
    points = curves(optuna.load_study(study_name=POINTS, storage=storage), modules)
    surrogate = Surrogate(points, modules, baseline_val)
    print("| seed | hypervolume, Optuna's optimizer | hypervolume, grid optimizer | s/draw, Optuna's | "
          "s/draw, grid |\n|---:|---:|---:|---:|---:|")  # fmt: skip
    totals = {name: [] for name in OPTIMIZERS}
    for seed in seeds:
        found = {name: search(cls, seed, surrogate, table, modules) for name, cls in OPTIMIZERS.items()}
        for name in OPTIMIZERS:
            totals[name].append(found[name])
        print(f"| {seed} | {found['optuna'][0]:.4f} | {found['grid'][0]:.4f} | {found['optuna'][1]:.2f} | "
              f"{found['grid'][1]:.2f} |", flush=True)  # fmt: skip
    mean = {name: np.mean(np.array(totals[name]), axis=0) for name in OPTIMIZERS}
    print(f"| mean | {mean['optuna'][0]:.4f} | {mean['grid'][0]:.4f} | {mean['optuna'][1]:.2f} | "
          f"{mean['grid'][1]:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("time", "hypervolume"))
    parser.add_argument("--sizes", default="50,100,200,400")
    parser.add_argument("--asks", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(1)
    if args.part == "time":
        time_part([int(s) for s in args.sizes.split(",")], args.asks)
    else:
        hypervolume_part([int(s) for s in args.seeds.split(",")])


if __name__ == "__main__":
    main()
