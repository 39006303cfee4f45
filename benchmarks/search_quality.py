"""Evidence that the search finds what it should, on a real CPU baseline (issue 10; figures in BENCHMARKS.md).

Stages, each resumable (every finished unit of work is saved under --work and skipped on a re-run):

  baseline  the quality config's baseline (configs/cpu-quality.yaml: quarter-width VGG16-BN), its val/test accuracy
  proxy     is the brief fine-tune a faithful proxy? For --vectors rank vectors spread over the MACs range: val
            accuracy after each cheap variant (fine-tune steps, BatchNorm re-estimation, distillation, learning
            rate) and after a long refine; Spearman correlation of each variant with the long refine
  samplers  TPE, NSGA-II, random and the uniform-rank sweep at equal budget (--trials each, one baseline):
            hypervolume of (val accuracy, MACs ratio) against (0, 1) as trials accrue, plotted
  result    the best Pareto trial at >= 5x and >= 10x fewer MACs, refined (export --finetune-epochs): test accuracy,
            params, and CPU latency (deployed form) at batch 1 and 64 against the baseline, side by side
  latency   a latency-objective study (objectives accuracy,latency) on the same baseline, against the MACs front

    python benchmarks/search_quality.py --data-dir /tmp/data/cifar10-jpeg --work /tmp/quality --stage proxy

Run it from the working folder's parent or anywhere: the studies and the baseline live under --work.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from ranksearch.data.datasets import device_data
from ranksearch.deliver.load import load_model, read_export
from ranksearch.models import RANK_STEPS, rank_modules
from ranksearch.models import ranks_text as models_ranks_text
from ranksearch.models.measure import count_macs
from ranksearch.objectives.latency import deployed_form, measure_latency
from ranksearch.objectives.registry import dominated_flags
from ranksearch.search.trial import decomposed_model, trial_bases, trial_model
from ranksearch.study.config import load_config
from ranksearch.train.baseline import ensure_baseline
from ranksearch.train.loops import evaluate, steps_per_epoch
from ranksearch.utils.device import resolve_device

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "cpu-quality.yaml"

# ----- results on disk: one JSON file per stage, a dict of finished units --------------------------------------


class Results:
    """A stage's finished units (key -> JSON value), saved after each one so that a killed run loses one unit."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.done:
            found = compute()
            self.done = {**(json.loads(self.path.read_text()) if self.path.is_file() else {}), **self.done}
            self.done[key] = found  # merged with what other processes saved meanwhile
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.done, indent=1))
            temporary.replace(self.path)
        return self.done[key]


# ----- proxy: cheap variants against a long refine -------------------------------------------------------------

# variant -> config overrides of the trial-time fine-tune (the config's own values elsewhere)
VARIANTS = {
    "decomposed only": {"finetune_steps": 0},
    "BN re-estimated (20 batches)": {"finetune_steps": 0, "bn_recalibration_batches": 20},
    "30 steps": {"finetune_steps": 30},
    "30 steps + BN": {"finetune_steps": 30, "bn_recalibration_batches": 20},
    "30 steps + KD 0.5": {"finetune_steps": 30, "distill_weight": 0.5},
    "30 steps, lr 0.03": {"finetune_steps": 30, "finetune_lr": 0.03},
    "100 steps": {"finetune_steps": 100},
    "100 steps + BN": {"finetune_steps": 100, "bn_recalibration_batches": 20},
}


def spread_vectors(config, baseline, bases, modules: list[str], count: int, seed: int = 0) -> list[dict[str, float]]:
    """``count`` random rank vectors whose MACs ratios are nearest to ``count`` targets spaced evenly in log scale
    between 1/40 and 1/2 of the baseline's (random per module, not uniform: what a sampler proposes)."""
    rng = random.Random(seed)
    candidates = []
    for _ in range(300):
        ranks = {m: rng.randint(1, RANK_STEPS) / RANK_STEPS for m in modules}
        model = decomposed_model(baseline.model, ranks, config, torch.device("cpu"), bases)
        candidates.append((count_macs(model)[0] / baseline.macs, ranks))
    low, high = math.log(1 / 40), math.log(1 / 2)
    targets = [math.exp(low + i * (high - low) / (count - 1)) for i in range(count)]
    chosen = []
    for target in targets:
        ratio, ranks = min((c for c in candidates if c[1] not in chosen), key=lambda c: abs(math.log(c[0] / target)))
        chosen.append(ranks)
    return chosen


def measure_variant(config, data, baseline, bases, ranks: dict, seed: int, overrides: dict) -> dict:
    """Val accuracy of ``ranks`` after the trial-time steps that ``overrides`` configure."""
    variant = dataclasses.replace(config, **overrides)
    start = time.perf_counter()
    model, _ = trial_model(baseline.model, ranks, variant, data, seed=seed, bases=bases)
    accuracy = evaluate(model, data, "val", config.eval_batch_size)
    macs, _ = count_macs(model)
    return {"val": accuracy, "macs_ratio": macs / baseline.macs, "seconds": time.perf_counter() - start}


def proxy(config, data, baseline, work: Path, vector_count: int, long_epochs: int) -> None:
    results = Results(work / "proxy.json")
    modules = list(rank_modules(baseline.model))
    bases = trial_bases(config, baseline)
    vectors = results.get("vectors", lambda: spread_vectors(config, baseline, bases, modules, vector_count))
    long_steps = long_epochs * steps_per_epoch(data, config.batch_size)
    variants = {**VARIANTS, f"long refine ({long_epochs} epochs)": {"finetune_steps": long_steps}}
    for index, ranks in enumerate(vectors):
        for name, overrides in variants.items():
            measure = functools.partial(measure_variant, config, data, baseline, bases, ranks, index, overrides)
            row = results.get(f"{index}|{name}", measure)
            print(
                f"vector {index} ({ranks_text(ranks)}): {name}: val {row['val']:.2%}, "
                f"MACs {row['macs_ratio']:.3f}x, {row['seconds']:.0f} s",
                flush=True,
            )
    print_proxy(results.done, vectors, variants)


def ranks_text(ranks: dict[str, float]) -> str:
    """A vector by module as ``8/8/4/2/2 /32`` (the package's text)."""
    return models_ranks_text(ranks.values())


def print_proxy(done: dict, vectors: list, variants: dict) -> None:
    rows = [
        {"vector": i, "variant": name, **done[f"{i}|{name}"]}
        for i in range(len(vectors))
        for name in variants
        if f"{i}|{name}" in done
    ]
    table = pd.DataFrame(rows)
    accuracy = table.pivot(index="vector", columns="variant", values="val")[list(variants)]
    reference = accuracy.columns[-1]
    macs = table[table["variant"] == reference].set_index("vector")["macs_ratio"]
    print("\nval accuracy (%) per rank vector and variant:\n")
    print("| ranks k/32 | MACs ratio | " + " | ".join(accuracy.columns) + " |")
    print("|---|---:|" + "---:|" * len(accuracy.columns))
    for i, row in accuracy.iterrows():
        cells = " | ".join(f"{v * 100:.2f}" for v in row)
        print(f"| {ranks_text(vectors[i])} | {macs[i]:.3f} | {cells} |")
    seconds = table.pivot(index="vector", columns="variant", values="seconds")[list(variants)].mean()
    print(f"\nSpearman correlation with the {reference} ({len(accuracy)} vectors):\n")
    print("| variant | Spearman rho | mean val | mean gap to long refine (pp) | s per vector |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        rho = accuracy[name].corr(accuracy[reference], method="spearman")
        gap = (accuracy[reference] - accuracy[name]).mean() * 100
        print(f"| {name} | {rho:.3f} | {accuracy[name].mean():.2%} | {gap:.2f} | {seconds[name]:.1f} |")


# ----- samplers at equal budget -------------------------------------------------------------------------------

SAMPLERS = ("tpe", "nsga2", "random", "uniform", "tpe+uniform")  # tpe+uniform: TPE after `--warm-start uniform`


def run_study(work: Path, config: Path, data_dir: str, study: str, trials: int, extra: list[str]) -> None:
    """Add trials to ``study`` (under ``work``) until it holds ``trials`` finished ones (resumable)."""
    done = finished_trials(work, study)
    if done >= trials:
        return
    command = [sys.executable, "-m", "ranksearch", "run", "--config", str(config), "--data-dir", data_dir,
               "--study-name", study, "--trials", str(trials - done), *extra]  # fmt: skip
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=work, check=True)


def load_study(work: Path, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{work}/studies/{study}.db")


def finished_trials(work: Path, study: str) -> int:
    if not (work / "studies" / f"{study}.db").is_file():
        return 0
    try:
        return sum(t.state.name in ("COMPLETE", "FAIL") for t in load_study(work, study).trials)
    except KeyError:  # the file exists, the study not yet
        return 0


def uniform_ranks(module_count: int, trials: int) -> list[str]:
    """The uniform sweep: every module at k/32, k spread over 1..32 (all 32 when the budget allows)."""
    ks = sorted(
        {max(1, round(RANK_STEPS * (i + 1) / min(trials, RANK_STEPS))) for i in range(min(trials, RANK_STEPS))}
    )
    return [",".join([f"{k}/{RANK_STEPS}"] * module_count) for k in ks]


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by (val accuracy, MACs ratio) points (maximise, minimise) within the reference (0, 1)."""
    area, best = 0.0, 0.0
    for ratio, accuracy in sorted((r, a) for a, r in points if r < 1 and a > 0):  # cheapest first
        if accuracy > best:
            area += (accuracy - best) * (1 - ratio)
            best = accuracy
    return area


def hypervolume_curve(study) -> list[float]:
    trials = sorted((t for t in study.trials if t.state.name in ("COMPLETE", "FAIL")), key=lambda t: t.number)
    points, curve = [], []
    for t in trials:
        if t.state.name == "COMPLETE":
            points.append((t.values[0], t.user_attrs["macs_ratio"]))
        curve.append(hypervolume(points))
    return curve


def samplers(work: Path, config: Path, data_dir: str, trials: int, finetune_steps: int, arms: list[str]) -> None:
    modules = 5
    for arm in arms:
        study = f"quality-{arm.replace('+', '-')}"
        extra = ["--finetune-steps", str(finetune_steps)]
        if arm == "tpe+uniform":
            run_study(work, config, data_dir, study, trials, extra + ["--sampler", "tpe", "--warm-start", "uniform"])
        elif arm == "uniform":
            vectors = uniform_ranks(modules, trials)
            extra += [item for ranks in vectors for item in ("--ranks", ranks)]
            run_study(work, config, data_dir, study, len(vectors), extra)
        else:
            run_study(work, config, data_dir, study, trials, extra + ["--sampler", arm])
    curves = {arm: hypervolume_curve(load_study(work, f"quality-{arm.replace('+', '-')}")) for arm in arms}
    print_samplers(curves, work)


def print_samplers(curves: dict[str, list[float]], work: Path) -> None:
    longest = max(len(c) for c in curves.values())
    checkpoints = sorted({n for n in (10, 20, 30, 32, 40) if n <= longest} | {longest})
    print("\n| sampler | " + " | ".join(f"HV @ {n}" for n in checkpoints) + " |")
    print("|---|" + "---:|" * len(checkpoints))
    for arm, curve in curves.items():
        cells = [f"{curve[n - 1]:.4f}" if len(curve) >= n else "-" for n in checkpoints]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm, curve in curves.items():
        axes.plot(range(1, len(curve) + 1), curve, marker=".", label=arm)
    axes.set_xlabel("trials")
    axes.set_ylabel("hypervolume of (val accuracy, MACs ratio) vs (0, 1)")
    axes.set_title("Samplers at equal budget (quarter-width VGG16-BN, CPU quality config)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = work / "samplers-hypervolume.png"
    figure.savefig(path, dpi=120)
    print(f"\nplot: {path}")


# ----- result: the refined best trial at >= 5x and >= 10x fewer MACs ------------------------------------------

BUDGETS = {"5x": 1 / 5, "10x": 1 / 10}


def best_under(studies: dict, budget: float):
    """(study name, trial): the COMPLETE trial with the best val accuracy at <= ``budget`` of the baseline's MACs,
    over ``studies`` (name -> study; all on one baseline)."""
    fits = [(name, t) for name, study in studies.items() for t in study.trials
            if t.state.name == "COMPLETE" and t.user_attrs["macs_ratio"] <= budget]  # fmt: skip
    return max(fits, key=lambda pair: (pair[1].values[0], -pair[1].user_attrs["macs_ratio"]), default=(None, None))


def paired_latency(models: dict, batch: int, repeats: int = 3) -> dict[str, float]:
    """Median ms of each model's deployed form at ``batch``, measured in turns (``repeats`` times each, the lowest
    median kept): side by side in one process, so that the ratios survive a noisy machine."""
    deployed = {name: deployed_form(model) for name, model in models.items()}
    best = dict.fromkeys(models, math.inf)
    for _ in range(repeats):
        for name, model in deployed.items():
            best[name] = min(best[name], measure_latency(model, batch=batch, max_seconds=20).median_ms)
    return best


def result(work: Path, baseline, study_names: list[str], epochs: int) -> None:
    results = Results(work / "result.json")
    studies = {name: load_study(work, name) for name in study_names}
    for label, budget in BUDGETS.items():
        study_name, trial = best_under(studies, budget)
        if trial is None:
            print(f"{label}: no trial of {', '.join(study_names)} at <= {budget:.2f} of the baseline's MACs")
            continue
        out = work / "exports" / f"{study_name}-{label}.pt"

        def refine(trial=trial, out=out, study_name=study_name) -> dict:
            command = [sys.executable, "-m", "ranksearch", "export", "--study-name", study_name, "--trial",
                       str(trial.number), "--finetune-epochs", str(epochs), "--format", "pt,torchscript",
                       "--out", str(out)]  # fmt: skip
            print(" ".join(command), flush=True)
            subprocess.run(command, cwd=work, check=True)
            meta = read_export(out)
            measured = ("val_accuracy", "test_accuracy", "macs", "params", "macs_ratio", "params_ratio")
            return {"study": study_name, "trial": trial.number, "ranks": meta["ranks"],
                    "val_at_trial": trial.values[0], **{k: meta[k] for k in measured}}  # fmt: skip

        row = results.get(f"{study_name}|{trial.number}|{label}|{epochs}", refine)
        models = {"baseline": baseline.model, label: load_model(out)}
        for batch in (1, 64):
            row[f"latency_b{batch}"] = paired_latency(models, batch)
        print_result(label, row, baseline, epochs)


def print_result(label: str, row: dict, baseline, epochs: int) -> None:
    ranks = "/".join(str(round(v * RANK_STEPS)) for v in row["ranks"].values())
    print(f"\n{label}: {row['study']} trial {row['trial']} (ranks {ranks}), refined {epochs} epochs")
    print("| | baseline | decomposed | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| test accuracy | {baseline.test_accuracy:.2%} | {row['test_accuracy']:.2%} | "
          f"{(row['test_accuracy'] - baseline.test_accuracy) * 100:+.2f} pp |")  # fmt: skip
    print(f"| val accuracy (trial -> refined) | {baseline.val_accuracy:.2%} | {row['val_at_trial']:.2%} -> "
          f"{row['val_accuracy']:.2%} | |")  # fmt: skip
    print(f"| MACs | {baseline.macs:,} | {row['macs']:,} | {baseline.macs / row['macs']:.1f}x fewer |")
    print(f"| params | {baseline.params:,} | {row['params']:,} | {baseline.params / row['params']:.1f}x fewer |")
    for batch in (1, 64):
        ms = row[f"latency_b{batch}"]
        print(f"| CPU latency, batch {batch} (ms, TorchScript, BN folded) | {ms['baseline']:.2f} | {ms[label]:.2f} | "
              f"{ms['baseline'] / ms[label]:.2f}x faster |")  # fmt: skip


# ----- latency: a latency-objective study against the MACs front --------------------------------------------


def latency_stage(work: Path, config_path: Path, data_dir: str, trials: int, steps: int, macs_study: str, study: str):
    extra = ["--objectives", "accuracy,latency", "--finetune-steps", str(steps)]
    run_study(work, config_path, data_dir, study, trials, extra)
    fronts = {name: load_study(work, name).best_trials for name in (macs_study, study)}
    modules = [m.removeprefix("rank_") for m in sorted(fronts[study][0].params)]
    print("\n| front | trials | mean rank k/32 per module (" + ", ".join(modules) + ") | MACs ratio range |")
    print("|---|---:|---|---|")
    for name, front in fronts.items():
        means = [statistics.mean(t.params[f"rank_{m}"] * RANK_STEPS for t in front) for m in modules]
        ratios = [t.user_attrs["macs_ratio"] for t in front]
        print(f"| {name} | {len(front)} | {' / '.join(f'{v:.1f}' for v in means)} | "
              f"{min(ratios):.3f}-{max(ratios):.3f} |")  # fmt: skip
    latency_front = {t.number for t in fronts[study]}
    latencies = load_study(work, study).trials
    on_macs_front = [t for t in latencies if t.state.name == "COMPLETE" and is_macs_pareto(t, latencies)]
    both = sorted(latency_front & {t.number for t in on_macs_front})
    print(
        f"\nwithin {study}: {len(latency_front)} trials on the latency front, {len(on_macs_front)} on the "
        f"(accuracy, MACs) front of the same trials, {len(both)} on both: {both}"
    )


def is_macs_pareto(trial, trials) -> bool:
    """No COMPLETE trial has at least ``trial``'s val accuracy at fewer MACs, or more accuracy at as few."""
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.number != trial.number] + [trial]
    points = [(t.values[0], t.user_attrs["macs"]) for t in complete]
    return not dominated_flags(points, [False, True])[-1]


# ----- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", required=True, type=Path, help="folder of the studies, baseline and results")
    parser.add_argument("--config", type=Path, default=CONFIG, help="default: configs/cpu-quality.yaml")
    parser.add_argument("--stage", required=True, choices=("baseline", "proxy", "samplers", "result", "latency"))
    parser.add_argument("--vectors", type=int, default=8, help="proxy: rank vectors (default 8)")
    parser.add_argument("--long-epochs", type=int, default=2, help="proxy: epochs of the long refine (default 2)")
    parser.add_argument("--trials", type=int, default=40, help="samplers: trials per sampler (default 40)")
    parser.add_argument("--finetune-steps", type=int, help="samplers: fine-tune steps per trial (default: config)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="samplers: which arms, comma-separated")
    parser.add_argument("--study", default="quality-tpe", help="result: the MACs studies to take the best trial "
                        "from (comma-separated); latency: the MACs study to compare with")  # fmt: skip
    parser.add_argument("--latency-study", default="quality-latency", help="latency: the study to add trials to")
    parser.add_argument("--refine-epochs", type=int, default=10, help="result: epochs of the refine (default 10)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # the config's baseline_dir and studies/ are relative to the working folder
    config = load_config(args.config.resolve(), {"data_dir": args.data_dir, "download": False})
    if args.stage == "samplers":
        steps = args.finetune_steps or config.finetune_steps
        samplers(args.work, args.config.resolve(), args.data_dir, args.trials, steps, args.samplers.split(","))
        return
    data = device_data(config, resolve_device(config.device))
    baseline = ensure_baseline(config, data)
    print(f"baseline: val {baseline.val_accuracy:.2%}, test {baseline.test_accuracy:.2%}, MACs {baseline.macs:,}, "
          f"params {baseline.params:,}, pretrained in {baseline.pretrain_seconds:.0f} s "
          f"({config.pretrain_epochs} epochs) on {torch.get_num_threads()} threads")  # fmt: skip
    if args.stage == "proxy":
        proxy(config, data, baseline, args.work, args.vectors, args.long_epochs)
    elif args.stage == "result":
        result(args.work, baseline, args.study.split(","), args.refine_epochs)
    elif args.stage == "latency":
        steps = args.finetune_steps or config.finetune_steps
        latency_stage(args.work, args.config.resolve(), args.data_dir, args.trials, steps, args.study,
                      args.latency_study)  # fmt: skip


if __name__ == "__main__":
    main()
