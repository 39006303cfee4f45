"""A sampler kept across trials against a new one per trial (what ``samplers.TrialSeeded`` does), on one history.

Asks GP for ``--asks`` suggestions after ``--history`` told trials of a 5-module, 2-objective toy on the 1/32 grid,
both ways side by side in this process, and prints the mean seconds per suggestion. GP keeps one cache across
trials (its kernel fit's start); a new sampler per trial fits from Optuna's default start.

    python benchmarks/sampler_per_trial.py [--history 30] [--asks 8] [--rounds 2]
"""

import argparse
import time

import numpy as np
import optuna

NAMES = [f"rank_block{i}" for i in range(1, 6)]
GRID = optuna.distributions.FloatDistribution(1 / 32, 1.0, step=1 / 32)
SPACE = dict.fromkeys(NAMES, GRID)


def values(ranks: list[float], rng: np.random.Generator) -> tuple[float, float]:
    """An accuracy-like value (saturating in the ranks, with noise) and a cost-like one."""
    return float(1 - np.exp(-3 * np.array(ranks)).mean() + 0.01 * rng.standard_normal()), float(np.square(ranks).sum())


def history(count: int) -> list[optuna.trial.FrozenTrial]:
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(count):
        ranks = list(rng.integers(1, 33, len(NAMES)) / 32)
        trials.append(optuna.trial.create_trial(params=dict(zip(NAMES, ranks, strict=True)), distributions=SPACE,
                                                values=values(ranks, rng)))  # fmt: skip
    return trials


def seconds_per_ask(per_trial: bool, told: list, asks: int) -> float:
    rng = np.random.default_rng(1)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.GPSampler(seed=0))
    study.add_trials(told)
    seconds = []
    for index in range(asks):
        if per_trial:
            study.sampler = optuna.samplers.GPSampler(seed=index)
        start = time.perf_counter()
        trial = study.ask(SPACE)
        seconds.append(time.perf_counter() - start)
        study.tell(trial, values([trial.params[n] for n in NAMES], rng))
    return float(np.mean(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=30)
    parser.add_argument("--asks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    told = history(args.history)
    for round_ in range(args.rounds):  # alternated, so that a busy spell does not land on one way only
        kept, fresh = seconds_per_ask(False, told, args.asks), seconds_per_ask(True, told, args.asks)
        print(f"round {round_ + 1}: GP kept across trials {kept:.2f} s per suggestion, new per trial {fresh:.2f} s "
              f"(ratio {fresh / kept:.2f}; {args.asks} asks after {args.history} trials)")  # fmt: skip


if __name__ == "__main__":
    main()
