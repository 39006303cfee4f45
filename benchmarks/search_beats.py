"""Does the search beat the obvious allocations? (issue 17; figures in BENCHMARKS.md)

Stages, each resumable (studies live in one SQLite file under --work, so that every arm reuses one sensitivity
analysis; a re-run adds only the trials an arm still lacks):

  samplers  each arm (sampler x warm start) to --trials trials on the quality baseline, in --lanes processes side
            by side (each with its share of the cores); then hypervolume of (val accuracy, MACs ratio) against
            (0, 1) as trials accrue, with the earlier studies of benchmarks/search_quality.py (TPE, random, NSGA-II
            at population 50, the uniform sweep) as references, and a plot
  budget    budget mode (--budget macs=B) with and without pruning, side by side for --minutes each: trials per
            hour and the best val accuracy found as wall time accrues
  result    the best trial at <= 1/5 and <= 1/10 of the baseline's MACs of the --winner arm, against the uniform
            vector and the sensitivity allocation at the same MACs, each refined alike (export --finetune-epochs)

    python benchmarks/search_beats.py --data-dir /tmp/data/cifar10-jpeg --work /tmp/quality --stage samplers

The quality baseline must be under --work/studies/baselines (benchmarks/search_quality.py --stage baseline, or a
copy of benchmarks/results/quality/*.pt).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from search_quality import hypervolume_curve  # the same hypervolume as issue 10's figures

from ranksearch.objectives import registry as objectives

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "cpu-quality.yaml"
STORAGE = "sqlite:///studies/issue17.db"  # relative to --work: every arm's study and the sensitivity points
ARMS = {  # name -> run flags
    "tpe+sens": ["--sampler", "tpe", "--warm-start", "sensitivity"],
    "mtpe": ["--sampler", "tpe-multivariate", "--warm-start", "none"],
    "mtpe+sens": ["--sampler", "tpe-multivariate", "--warm-start", "sensitivity"],
    "gp": ["--sampler", "gp", "--warm-start", "none"],
    "gp+sens": ["--sampler", "gp", "--warm-start", "sensitivity"],
    "gp+uniform": ["--sampler", "gp", "--warm-start", "uniform"],
    "nsga2-8": ["--sampler", "nsga2", "--warm-start", "none"],
    "nsga2-8+sens": ["--sampler", "nsga2", "--warm-start", "sensitivity"],
}
FIXED = {  # reference vectors: name -> (flags, trials)
    "sensitivity-ladder": (["--warm-start", "sensitivity"], 6),
    "vbmf": (["--warm-start", "vbmf"], 1),
}
EARLIER = {  # studies of benchmarks/search_quality.py (one file each): name -> study
    "tpe (0.5.0, no warm start)": "quality-tpe",
    "random": "quality-random",
    "nsga2 (population 50)": "quality-nsga2",
    "tpe+uniform (0.5.0 default)": "quality-tpe-uniform",
    "uniform sweep": "quality-uniform",
}
ENDED = ("COMPLETE", "FAIL", "PRUNED")


def study_name(arm: str) -> str:
    return "i17-" + arm.replace("+", "-")


def load(work: Path, name: str, storage: str = STORAGE):
    import optuna

    url = storage.replace("sqlite:///", f"sqlite:///{work}/") if storage.startswith("sqlite:///studies") else storage
    return optuna.load_study(study_name=name, storage=url)


def ended(work: Path, name: str) -> int:
    try:
        return sum(t.state.name in ENDED for t in load(work, name).trials)
    except KeyError:  # no such study yet
        return 0


def run_command(args, name: str, trials: int, flags: list[str]) -> list[str] | None:
    """The `ranksearch run` that brings study ``name`` to ``trials`` ended trials (None: it has them)."""
    left = trials - ended(args.work, name)
    if left <= 0:
        return None
    return [sys.executable, "-m", "ranksearch", "run", "--config", str(CONFIG), "--data-dir", args.data_dir,
            "--storage", STORAGE, "--study-name", name, "--trials", str(left), *flags]  # fmt: skip


def run_lanes(commands: list[list[str]], lanes: int, work: Path, tag: str) -> None:
    """Run ``commands`` in ``lanes`` processes at a time, each with its share of the cores (OMP_NUM_THREADS)."""
    threads = max(1, (os.cpu_count() or 1) // lanes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < lanes:
            command = pending.pop(0)
            log = open(work / f"{tag}-{len(commands) - len(pending)}.log", "w")  # noqa: SIM115
            print(" ".join(command), flush=True)
            running.append(subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(2)
        for process in [p for p in running if p.poll() is not None]:
            running.remove(process)
            if process.returncode != 0:
                print(f"failed ({process.returncode}): {' '.join(process.args)}", flush=True)


# ----- samplers ----------------------------------------------------------------------------------------------


def best_within(study, budget: float):
    """The best val accuracy at <= ``budget`` of the baseline's MACs (the package's rule)."""
    return objectives.best_within(study.trials, "macs", budget)


def all_studies(work: Path) -> dict:
    studies = {arm: load(work, study_name(arm)) for arm in [*ARMS, *FIXED] if ended(work, study_name(arm))}
    for label, name in EARLIER.items():
        if (work / "studies" / f"{name}.db").is_file():
            studies[label] = load(work, name, f"sqlite:///studies/{name}.db")
    return studies


def samplers(args) -> None:
    arms = {arm: ARMS[arm] for arm in args.arms.split(",")}
    commands = [run_command(args, study_name(arm), args.trials, flags) for arm, flags in arms.items()]
    commands += [run_command(args, study_name(arm), trials, flags) for arm, (flags, trials) in FIXED.items()]
    run_lanes([c for c in commands if c], args.lanes, args.work, "samplers")
    report_samplers(args.work, all_studies(args.work))


def report_samplers(work: Path, studies: dict) -> None:
    curves = {name: hypervolume_curve(study) for name, study in studies.items()}
    marks = [n for n in (6, 10, 20, 30, 40, 60, 100) if n <= max(len(c) for c in curves.values())]
    print("\n| arm | " + " | ".join(f"HV @ {n}" for n in marks) + " | best val at <= 20 % MACs | at <= 10 % |")
    print("|---|" + "---:|" * len(marks) + "---|---|")
    for name, curve in curves.items():
        cells = [f"{curve[n - 1]:.4f}" if len(curve) >= n else "-" for n in marks]
        best = [best_within(studies[name], b) for b in (0.2, 0.1)]
        texts = [f"{t.values[0]:.2%} ({t.user_attrs['macs_ratio']:.3f}x, {t.user_attrs['ranks']})" if t else "-"
                 for t in best]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + f" | {texts[0]} | {texts[1]} |")
    plot_curves(curves, work / "issue17-hypervolume.png")


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        style = "--" if "sens" not in name and name not in ARMS else "-"
        axes.plot(range(1, len(curve) + 1), curve, style, marker="." if len(curve) > 1 else "o", label=name)
    axes.set(xlabel="trials", ylabel="hypervolume of (val accuracy, MACs ratio) vs (0, 1)",
             title="Samplers and warm starts (quarter-width VGG16-BN, CPU quality config)")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nplot: {path}")


# ----- budget mode, with and without pruning ------------------------------------------------------------------


def budget(args) -> None:
    """Both arms side by side for ``--minutes``: each a `run --budget` with more trials than fit, stopped at the
    time (SIGINT: the running trial is recorded as interrupted, the others are kept)."""
    arms = {"halving": "i17-budget-halving", "none": "i17-budget-none"}
    commands = []
    for pruner, name in arms.items():
        flags = ["--budget", f"macs={args.budget}", "--pruner", pruner, "--warm-start", "none", "--sampler", "tpe"]
        commands.append(run_command(args, name, 10_000, flags))
    threads = max(1, (os.cpu_count() or 1) // len(commands))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not all(ended(args.work, name) for name in arms.values()):
        processes = [subprocess.Popen(c, cwd=args.work, env=env, stdout=open(args.work / f"budget-{i}.log", "w"),  # noqa: SIM115
                                      stderr=subprocess.STDOUT) for i, c in enumerate(commands)]  # fmt: skip
        time.sleep(args.minutes * 60)
        for process in processes:
            process.send_signal(2)
        for process in processes:
            process.wait()
    report_budget(args.work, arms, args.minutes)


def report_budget(work: Path, arms: dict[str, str], minutes: float) -> None:
    for pruner, name in arms.items():
        study = load(work, name)
        trials = [t for t in study.trials if t.state.name in ENDED and t.datetime_start]
        start = min(t.datetime_start for t in trials)
        timeline, best = [], 0.0
        for t in sorted(trials, key=lambda t: t.datetime_complete):
            if t.state.name == "COMPLETE" and t.values[0] > best:
                best = t.values[0]
                minute = (t.datetime_complete - start).total_seconds() / 60
                timeline.append(f"{best:.2%} @ {minute:.1f} min (t{t.number}, {t.user_attrs['ranks']})")
        span = (max(t.datetime_complete for t in trials) - start).total_seconds() / 3600
        counts = {s: sum(t.state.name == s for t in trials) for s in ENDED}
        print(
            f"| {pruner} | {len(trials)} in {span * 60:.1f} min ({len(trials) / span:.0f}/h) | "
            f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned | {best:.2%} | {'; '.join(timeline)} |"
        )


# ----- interactions: single-module curves around the uniform vector at the budget ---------------------------

CONTEXT_STEPS = (2, 3, 4, 5, 6, 8, 10, 12, 16)  # ranks k/32 each module is measured at, the others at the context


def context(args) -> None:
    """Is the additive model's failure at high compression an interaction? Re-measure each module's curve with the
    other modules at the uniform rank u that fits the budget (not undecomposed), allocate from those local curves
    (the same exact knapsack), and measure that allocation beside the uniform vector and the global one."""
    import torch

    from ranksearch.data.datasets import device_data
    from ranksearch.objectives.cost_table import cost_table
    from ranksearch.search.sensitivity import Point, allocate
    from ranksearch.search.trial import trial_bases, trial_model
    from ranksearch.study.config import load_config
    from ranksearch.train.baseline import ensure_baseline
    from ranksearch.train.loops import evaluate

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.lanes))
    os.chdir(args.work)
    config = load_config(CONFIG, {"data_dir": args.data_dir})
    data = device_data(config, torch.device("cpu"))
    baseline = ensure_baseline(config, data)
    bases = trial_bases(config, baseline, data)
    table = cost_table(baseline.model)
    path = args.work / "issue17-context.json"
    done = json.loads(path.read_text()) if path.is_file() else {}

    def measured(vector: list[int]) -> float:
        key = "/".join(map(str, vector))
        if key not in done:
            ranks = dict(zip(table.modules, (k / 32 for k in vector), strict=True))
            model, _ = trial_model(baseline.model, ranks, config, data, config.seed * 1_000_003 + 777, bases)
            done[key] = evaluate(model, data, "val", config.eval_batch_size)
            path.write_text(json.dumps(done, indent=1))
            print(f"{key}: {done[key]:.2%} ({table.ratio('macs', [k / 32 for k in vector]):.3f}x)", flush=True)
        return done[key]

    u = max(k for k in range(1, 33) if table.ratio("macs", [k / 32] * 5) <= args.budget)
    at_u = measured([u] * 5)
    curves = {}
    for index, module in enumerate(table.modules):
        points = []
        for k in sorted(set(CONTEXT_STEPS) | {u}):
            vector = [u] * 5
            vector[index] = k
            points.append(Point(module, k / 32, measured(vector), {}))
        curves[module] = points
    local = full_range(config)
    (allocation,) = allocate(local, table, curves, at_u, "macs", [args.budget])
    steps = [round(r * 32) for r in allocation.ranks]
    print(f"uniform {u}/32 at {table.ratio('macs', [u / 32] * 5):.3f}x: {at_u:.2%}")
    print(
        f"local allocation {steps} at {allocation.ratio:.3f}x: predicted {allocation.predicted:.2%}, "
        f"measured {measured(steps):.2%}"
    )


def full_range(config):
    """The config with the context ladder's range (the allocation may use every measured rank)."""
    import dataclasses

    return dataclasses.replace(config, rank_min=min(CONTEXT_STEPS) / 32, rank_max=1.0)


# ----- result -------------------------------------------------------------------------------------------------


def result(args) -> None:
    """Refine the winner's best at each budget and the references at the same MACs (export --finetune-epochs)."""
    results_path = args.work / "issue17-result.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}
    picks = result_picks(args)
    for key, (name, number, storage) in picks.items():
        if key in done:
            continue
        out = args.work / "exports" / f"i17-{key}.pt"
        command = [sys.executable, "-m", "ranksearch", "export", "--study-name", name, "--storage", storage,
                   "--trial", str(number), "--finetune-epochs", str(args.epochs), "--out", str(out),
                   "--data-dir", args.data_dir, "--device", "cpu"]  # fmt: skip
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=args.work, check=True)
        import torch

        payload = torch.load(out, weights_only=True)
        keys = (
            "study_name",
            "trial_number",
            "ranks",
            "macs_ratio",
            "params_ratio",
            "val_accuracy",
            "test_accuracy",
            "before_finetune",
        )
        done[key] = {k: payload.get(k) for k in keys}
        results_path.write_text(json.dumps(done, indent=1))
    print(json.dumps(done, indent=1))


def result_picks(args) -> dict[str, tuple[str, int, str]]:
    """label -> (study, trial number, storage) of every model the result stage refines."""
    picks = {}
    winner = load(args.work, study_name(args.winner))
    ladder = load(args.work, study_name("sensitivity-ladder"))
    uniform = load(args.work, "quality-uniform", "sqlite:///studies/quality-uniform.db")
    for label, budget in (("5x", 0.2), ("10x", 0.1)):
        best = best_within(winner, budget)
        if best is None:
            continue
        picks[f"{label}-{args.winner}"] = (study_name(args.winner), best.number, STORAGE)
        target = best.user_attrs["macs_ratio"]
        same = lambda study, target=target: min((t for t in study.trials if t.state.name == "COMPLETE"),  # noqa: E731
                                                key=lambda t: abs(t.user_attrs["macs_ratio"] - target))  # fmt: skip
        picks[f"{label}-uniform"] = ("quality-uniform", same(uniform).number, "sqlite:///studies/quality-uniform.db")
        picks[f"{label}-sensitivity"] = (study_name("sensitivity-ladder"), same(ladder).number, STORAGE)
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stage", choices=("samplers", "context", "budget", "result"), required=True)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--arms", default="tpe+sens,mtpe+sens,gp+sens,nsga2-8+sens", help=f"of {', '.join(ARMS)}")
    parser.add_argument("--budget", type=float, default=0.1, help="budget stage: the MACs fraction")
    parser.add_argument("--minutes", type=float, default=12, help="budget stage: wall time of each arm")
    parser.add_argument("--winner", default="mtpe+sens", help="result stage: the arm whose best is refined")
    parser.add_argument("--epochs", type=int, default=2, help="result stage: refine epochs")
    args = parser.parse_args()
    args.work = args.work.resolve()
    {"samplers": samplers, "context": context, "budget": budget, "result": result}[args.stage](args)


if __name__ == "__main__":
    main()
