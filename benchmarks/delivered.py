"""Evidence for issue 25 (BENCHMARKS.md, "The delivered model"): the model `run --budget ... --out` delivers against
uniform, VBMF and the sensitivity allocation, at equal refine and at equal compute, on the quality baseline
(configs/cpu-quality.yaml: quarter-width VGG16-BN, 84.88 % test). Every finished unit is saved under --work (JSON)
and skipped on a re-run, so each stage resumes.

Stages:
  refs     the references at equal refine: each vector (uniform, VBMF fitted to the budget, the sensitivity
           allocation) as a trial makes it (seed 0), then --epochs of the default refine (rewind+kd, seed 1): the
           recipe and seeds of accuracy_kept.py's result stage, whose cached rows it reuses
  compute  the references at equal compute: the same, refined --epochs (the search's and delivery's steps, in
           epochs) instead
  search   `run --budget macs=F --out ...` per budget (its own study), trials and delivery; the steps it trained
  wasted   how many sampler-drawn trials of the budget studies land in the starved corner
  table    the tables of BENCHMARKS.md from what is saved

    python benchmarks/delivered.py --data-dir /tmp/data/cifar10-jpeg --work /tmp/quality --stage refs --epochs 5
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ranksearch.deliver.refine import RECIPES
from ranksearch.deliver.refine import refine as run_refine
from ranksearch.models import RANK_STEPS, rank_modules
from ranksearch.models.measure import count_macs
from ranksearch.objectives.cost_table import cost_table
from ranksearch.search.samplers import fit_to_budget
from ranksearch.search.trial import trial_bases
from ranksearch.search.warmstart import vbmf_ranks
from ranksearch.train.loops import steps_per_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_kept import as_ranks, quality_setup, scores, trial_state  # noqa: E402
from search_quality import CONFIG, Results  # noqa: E402

BUDGETS = {"5x": 0.2, "10x": 0.1}
# the references: uniform (the largest uniform vector within the budget) and issue 17's sensitivity allocations
UNIFORM = {"5x": [10] * 5, "10x": [6] * 5}
SENSITIVITY = {"5x": [12, 12, 12, 6, 3], "10x": [6, 8, 8, 4, 2]}
RECIPE = RECIPES["rewind+kd"]  # the default refine (RefineRecipe()), as export and run's delivery use it


def vbmf_fitted(config, baseline, table, modules: list[str], budget: float) -> list[int]:
    """VBMF's module ranks (weakening 1) as a direction, scaled to the budget as budget mode fits every vector."""
    found = vbmf_ranks(baseline.model, config.search_space).modules
    ranks = fit_to_budget([found[m] for m in modules], lambda r: table.ratio("macs", r), budget,
                          config.rank_min, config.rank_max)  # fmt: skip
    return [round(r * RANK_STEPS) for r in ranks]


def references(config, baseline, table, modules: list[str]) -> dict[str, dict[str, list[int]]]:
    return {budget: {"uniform": UNIFORM[budget], "VBMF (fitted)": vbmf_fitted(config, baseline, table, modules, ratio),
                     "sensitivity": SENSITIVITY[budget]} for budget, ratio in BUDGETS.items()}  # fmt: skip


def refined_row(config, data, baseline, bases, modules, budget: str, ks: list[int], epochs: int, results: Results):
    """A reference refined ``epochs`` epochs (the key of accuracy_kept.py's result stage: its rows are reused)."""
    key = f"{config.decompose_method}|{budget}|{'/'.join(map(str, ks))}|{epochs}|{RECIPE}"

    def measure():
        model = trial_state(config, data, baseline, bases, as_ranks(modules, ks), seed=0)
        trial = scores(model, data, config)
        begin = time.perf_counter()
        history = run_refine(model, data, config, epochs, seed=1, recipe=RECIPE, teacher=baseline.model)
        return {
            "trial": trial, **scores(model, data, config), "history": history,
            "macs_ratio": count_macs(model)[0] / baseline.macs, "seconds": time.perf_counter() - begin,
        }  # fmt: skip

    return results.get(key, measure)


def refine_references(config, data, baseline, results: Results, epochs: int, which: list[str],
                      budgets: list[str]) -> None:  # fmt: skip
    modules = list(rank_modules(baseline.model))
    table = cost_table(baseline.model, config.search_space, config.decomposition, data.spec.input_size())
    bases = trial_bases(config, baseline, data)
    steps = config.finetune_steps + epochs * steps_per_epoch(data, config.batch_size)
    for budget, vectors in references(config, baseline, table, modules).items():
        if budget not in budgets:
            continue
        for name, ks in vectors.items():
            if name not in which:
                continue
            row = refined_row(config, data, baseline, bases, modules, budget, ks, epochs, results)
            print(f"{budget} {name:14s} {'/'.join(map(str, ks)):14s} MACs {row['macs_ratio']:.3f}x: trial val "
                  f"{row['trial']['val']:.2%} -> {epochs} epochs ({steps:,} steps): val {row['val']:.2%}, "
                  f"test {row['test']:.2%}  ({row['seconds']:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", required=True, type=Path, help="folder of the baseline and results")
    parser.add_argument("--config", type=Path, default=CONFIG, help="default: configs/cpu-quality.yaml")
    parser.add_argument("--stage", required=True, choices=("refs", "compute"))
    parser.add_argument("--epochs", type=int, default=5, help="refs, compute: epochs of each reference's refine")
    parser.add_argument("--which", default="uniform,VBMF (fitted),sensitivity", help="refs, compute: references")
    parser.add_argument("--budgets", default="5x,10x", help="which budgets (5x, 10x)")
    parser.add_argument("--results", default="accuracy-kept.json", help="refs, compute: the JSON file under --work "
                        "(accuracy_kept.py's result stage's by default, whose rows are reused)")  # fmt: skip
    args = parser.parse_args()
    config, data, baseline = quality_setup(args.work, args.config, args.data_dir)
    config = dataclasses.replace(config, decompose_method="hosvd")
    refine_references(config, data, baseline, Results(args.work / args.results), args.epochs, args.which.split(","),
                      args.budgets.split(","))  # fmt: skip


if __name__ == "__main__":
    main()
