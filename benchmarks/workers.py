"""Completed trials per hour with 1 and with 2 workers on this machine, side by side in one run.

    python benchmarks/workers.py --config configs/cpu.yaml --data-dir /tmp/data/cifar10-jpeg --trials 8

Pretrains (or reuses) the config's baseline first, so that only trials are timed; then runs
`ranksearch run --workers W --trials N` into a fresh study for each W, alternating W=1 and W=2 ``--rounds``
times, and prints each run's wall time and the trials per hour.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ranksearch(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ranksearch", *args], check=True, stdout=subprocess.DEVNULL)


def timed_run(common: list[str], folder: Path, name: str, workers: int, trials: int) -> float:
    start = time.perf_counter()
    ranksearch("run", *common, "--study-name", name, "--storage", f"sqlite:///{folder / name}.db",
               "--workers", str(workers), "--trials", str(trials))  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--trials", type=int, default=8, help="trials per run")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of (1 worker, 2 workers) runs")
    args = parser.parse_args()
    common = ["--config", args.config, "--data-dir", args.data_dir]
    ranksearch("pretrain", *common)  # cached after the first time: only trials are timed below
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for workers in (1, 2):
                name = f"bench-w{workers}-r{round_}"
                seconds = timed_run(common, Path(folder), name, workers, args.trials)
                results[workers].append(seconds)
                print(f"{workers} worker(s): {args.trials} trials in {seconds:.1f} s = "
                      f"{3600 * args.trials / seconds:.0f} trials/hour", flush=True)  # fmt: skip
    one, two = (sum(results[w]) for w in (1, 2))
    print(f"2 workers / 1 worker: {one / two:.2f}x the trials per hour")


if __name__ == "__main__":
    main()
