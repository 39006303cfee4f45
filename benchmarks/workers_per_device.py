"""Trials per minute with 1, 2, 4, 8 workers on one device (issue 27): `run --workers N` on a fresh study each,
the baseline cached beforehand, every other option the command's.

For each N: the wall clock of the command, the trials/min from the first trial's start to the last one's end (the
workers' steady rate, their start-up left out), the 200-trial projection at that rate, the device's peak memory
in use (all processes, sampled every 200 ms by nvidia-smi on a GPU) and the largest per-trial peak of one worker.

    python benchmarks/workers_per_device.py --workers 1,2,4,8 --trials 12,16,24,32 -- \
        --data-dir /tmp/data/cifar10-jpeg --no-download --pretrain-epochs 8
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna


def sample_gpu_memory() -> tuple[subprocess.Popen | None, Path]:
    """nvidia-smi writing the GPU's memory in use (MiB) every 200 ms to a file, or None without one."""
    log = Path(tempfile.mkstemp(suffix=".csv")[1])
    if shutil.which("nvidia-smi") is None:
        return None, log
    command = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.DEVNULL), log


def peak_of(log: Path) -> float | None:
    values = [float(line) for line in log.read_text().split() if line.strip().replace(".", "").isdigit()]
    return max(values) if values else None


def run_with(workers: int, trials: int, extra: list[str]) -> dict:
    name = f"workers-{workers}-{int(time.time())}"
    command = [sys.executable, "-m", "ranksearch", "run", *extra, "--workers", str(workers), "--trials", str(trials),
               "--study-name", name, "--deliver", "none"]  # fmt: skip
    sampler, log = sample_gpu_memory()
    start = time.perf_counter()
    ran = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if sampler is not None:
        sampler.terminate()
        sampler.wait()
    if ran.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed ({ran.returncode}):\n{ran.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///studies/{name}.db")
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    steady = len(done) / max((last - first).total_seconds(), 1e-9) * 60
    per_trial_peak = max((t.user_attrs.get("peak_gpu_mib", 0.0) for t in done), default=0.0)
    return {"workers": workers, "trials": len(done), "wall": wall, "steady": steady, "gpu_peak": peak_of(log),
            "trial_peak": per_trial_peak}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--trials", default="12,16,24,32", help="trials of each run, in the order of --workers")
    parser.add_argument("extra", nargs="*", help="after --: the rest of each `run` command")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    counts = [int(w) for w in args.workers.split(",")]
    trials = [int(t) for t in args.trials.split(",")]
    print("| workers | trials | wall s | trials/min (steady) | 200 trials at that rate | GPU memory in use, peak "
          "| one trial's peak |\n|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for workers, count in zip(counts, trials, strict=True):
        found = run_with(workers, count, args.extra)
        gpu = f"{found['gpu_peak']:,.0f} MiB" if found["gpu_peak"] is not None else "-"
        trial_peak = f"{found['trial_peak']:,.0f} MiB" if found["trial_peak"] else "-"
        print(f"| {workers} | {found['trials']} | {found['wall']:.0f} | {found['steady']:.1f} | "
              f"{200 / found['steady']:.1f} min | {gpu} | {trial_peak} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
