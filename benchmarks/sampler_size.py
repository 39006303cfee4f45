"""Seconds per suggestion against the study's size: GP (and TPE beside it) after 50, 100, 200 and 400 told trials.

Each suggestion is asked of a new sampler seeded per trial, as ``samplers.TrialSeeded`` asks, on the toy history of
``sampler_per_trial.py`` (5 modules on the 1/32 grid, two objectives); every size and sampler side by side in this
process, on one thread, each timing the mean of ``--asks`` suggestions.

    OMP_NUM_THREADS=1 python benchmarks/sampler_size.py [--sizes 50,100,200,400] [--asks 4]
"""

import argparse
import time

import numpy as np
import optuna
import torch
from sampler_per_trial import NAMES, SPACE, history, values


def seconds_per_ask(make, told: list, asks: int) -> float:
    rng = np.random.default_rng(1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials(told)
    seconds = []
    for index in range(asks):
        study.sampler = make(index)
        start = time.perf_counter()
        trial = study.ask(SPACE)
        seconds.append(time.perf_counter() - start)
        study.tell(trial, values([trial.params[n] for n in NAMES], rng))
    return float(np.mean(seconds))


SAMPLERS = {
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,100,200,400")
    parser.add_argument("--asks", type=int, default=4)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    print(f"{'told trials':>11} " + " ".join(f"{name + ' s/ask':>10}" for name in SAMPLERS))
    for size in (int(s) for s in args.sizes.split(",")):
        told = history(size)
        times = {name: seconds_per_ask(make, told, args.asks) for name, make in SAMPLERS.items()}
        print(f"{size:>11} " + " ".join(f"{times[name]:>10.3f}" for name in SAMPLERS), flush=True)


if __name__ == "__main__":
    main()
