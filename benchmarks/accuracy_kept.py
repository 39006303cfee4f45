"""Evidence that decomposed models keep their accuracy (issue 16; figures in BENCHMARKS.md), on the quality baseline
(configs/cpu-quality.yaml: quarter-width VGG16-BN, 84.88 % test).

Stages, each resumable (every finished unit of work is saved under --work and skipped on a re-run):

  factors  data-aware factors (decompose_method activation) against hosvd at equal ranks, on rank vectors from 2x to
           12x fewer MACs: val right after decomposition, after BatchNorm re-estimation, after the trial's 30-step
           proxy (+ BN), after a 1-epoch refine (+ BN); each method's proxy Spearman with its 1-epoch refine
  recipes  refine recipes (ranksearch.deliver.refine.RECIPES) at equal epochs, from the trial's model (decomposed, BN
           re-estimated, 30 steps), on a 5x and a 10x vector
  result   at >= 5x and >= 10x fewer MACs: the searched, uniform and VBMF vectors, refined with the default recipe,
           test accuracy next to the from-scratch check (same architecture, random init, same number of steps)

    python benchmarks/accuracy_kept.py --data-dir /tmp/data/cifar10-jpeg --work /tmp/quality --stage factors
"""

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from ranksearch.data.datasets import device_data
from ranksearch.decompose.activation import Tucker2Basis
from ranksearch.deliver.refine import RECIPES, RefineRecipe, from_scratch, refine
from ranksearch.models import RANK_STEPS, rank_modules
from ranksearch.models.measure import count_macs
from ranksearch.search.trial import decomposed_model, trial_bases, trial_model
from ranksearch.search.warmstart import vbmf_ranks
from ranksearch.study.config import load_config
from ranksearch.train.baseline import ensure_baseline
from ranksearch.train.loops import evaluate, steps_per_epoch
from ranksearch.utils.device import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import CONFIG, Results, ranks_text  # noqa: E402

METHODS = ("hosvd", "activation")
# rank vectors in 32nds, one per VGG16 block: uniform ones, the sensitivity allocations of issue 17 at 5x and 10.8x,
# and three random vectors of the proxy study (benchmarks/results/quality/proxy.json: a module starved, as samplers
# propose)
VECTORS = {
    "uniform 16": [16] * 5, "uniform 10": [10] * 5, "uniform 6": [6] * 5,
    "sens 5x": [12, 12, 12, 6, 4], "sens 10x": [10, 6, 6, 4, 3],
    "random a": [12, 2, 30, 17, 13], "random b": [10, 14, 1, 14, 8], "random c": [7, 10, 10, 1, 7],
}  # fmt: skip


def as_ranks(modules: list[str], ks: list[int]) -> dict[str, float]:
    return {m: k / RANK_STEPS for m, k in zip(modules, ks, strict=True)}


def stages_of(config, data) -> dict[str, dict]:
    """The measurement points of ``factors``: config overrides of the trial-time steps after decomposition."""
    epoch = steps_per_epoch(data, config.batch_size)
    bn = config.bn_recalibration_batches
    return {
        "decomposed": {"finetune_steps": 0, "bn_recalibration_batches": 0},
        "BN re-estimated": {"finetune_steps": 0, "bn_recalibration_batches": bn},
        f"proxy ({config.finetune_steps} steps + BN)": {},
        "1-epoch refine (+ BN)": {"finetune_steps": epoch},
    }


def factors(config, data, baseline, work: Path) -> None:
    results = Results(work / "factors.json")
    modules = list(rank_modules(baseline.model))
    points = stages_of(config, data)
    for method in METHODS:
        method_config = dataclasses.replace(config, decompose_method=method)
        start = time.perf_counter()
        bases = trial_bases(method_config, baseline, data)
        print(f"{method}: bases in {time.perf_counter() - start:.1f} s", flush=True)
        for index, (label, ks) in enumerate(VECTORS.items()):
            ranks = as_ranks(modules, ks)
            for point, overrides in points.items():
                variant = dataclasses.replace(method_config, **overrides)

                def measure(variant=variant, ranks=ranks, index=index, bases=bases):
                    begin = time.perf_counter()
                    model, _ = trial_model(baseline.model, ranks, variant, data, seed=index, bases=bases)
                    accuracy = evaluate(model, data, "val", config.eval_batch_size)
                    macs, seconds = count_macs(model)[0], time.perf_counter() - begin
                    return {"val": accuracy, "macs_ratio": macs / baseline.macs, "seconds": seconds}

                row = results.get(f"{method}|{label}|{point}", measure)
                print(f"{method:10s} {label:10s} ({ranks_text(ranks)}) {point}: val {row['val']:.2%}, "
                      f"MACs {row['macs_ratio']:.3f}x, {row['seconds']:.0f} s", flush=True)  # fmt: skip
    print_factors(results.done, list(points))


def print_factors(done: dict, points: list[str]) -> None:
    methods = list(dict.fromkeys(key.split("|")[0] for key in done))  # as run; earlier variants' results included
    rows = [{"method": m, "vector": label, "point": p, **done[f"{m}|{label}|{p}"]}
            for m in methods for label in VECTORS for p in points if f"{m}|{label}|{p}" in done]  # fmt: skip
    table = pd.DataFrame(rows)
    print(f"\nval accuracy (%) at equal ranks, {' -> '.join(methods)}:\n")
    print("| vector | ranks k/32 | MACs | " + " | ".join(points) + " |")
    print("|---|---|---:|" + "---:|" * len(points))
    for label, ks in VECTORS.items():
        cells = []
        for p in points:
            pair = [done.get(f"{m}|{label}|{p}", {}).get("val") for m in methods]
            cells.append(" -> ".join("–" if v is None else f"{v * 100:.1f}" for v in pair))
        macs = table[table["vector"] == label]["macs_ratio"]
        ratio = f"{1 / macs.iloc[0]:.1f}x" if len(macs) else "–"
        print(f"| {label} | {'/'.join(map(str, ks))} | {ratio} | " + " | ".join(cells) + " |")
    accuracy = table.pivot_table(index=["method", "vector"], columns="point", values="val")
    print("\n| method | mean val at each point (%) | proxy Spearman with the 1-epoch refine |")
    print("|---|---|---:|")
    for method in methods:
        if method not in accuracy.index.get_level_values(0):
            continue
        per = accuracy.loc[method]
        means = ", ".join(f"{per[p].mean() * 100:.1f}" for p in points if p in per)
        rho = per[points[2]].corr(per[points[3]], method="spearman") if points[3] in per else float("nan")
        print(f"| {method} | {means} | {rho:.3f} |")


# ----- variants: one side of Tucker-2 data-aware, the other a weight fit ------------------------------------------

VARIANT_VECTORS = ("uniform 16", "uniform 10", "uniform 6")


def one_sided_bases(baseline, data, config, side: str) -> dict:
    """Tucker-2 bases data-aware on one ``side`` ("out": output-response PCA, Zhang et al.; "in": the whitened input
    projection) and HOSVD's weight fit on the other, as ``Tucker2Basis`` (so the trial truncates them alike)."""
    aware = trial_bases(dataclasses.replace(config, decompose_method="activation"), baseline, data)
    plain = trial_bases(dataclasses.replace(config, decompose_method="hosvd"), baseline, data)
    mixed = {}
    for name, basis in aware.items():
        u_out, u_in = plain[name]
        if side == "out":
            mixed[name] = Tucker2Basis(last=basis.last, first=u_in.T, lift=u_in)
        else:
            mixed[name] = Tucker2Basis(last=u_out, first=basis.first, lift=basis.lift)
    return mixed


def variants(config, data, baseline, work: Path) -> None:
    results = Results(work / "factors.json")  # beside the factors stage's methods, same seeds and points
    modules = list(rank_modules(baseline.model))
    points = stages_of(config, data)
    aware = dataclasses.replace(config, decompose_method="activation")
    for side in ("out", "in"):
        bases = one_sided_bases(baseline, data, config, side)
        for label in VARIANT_VECTORS:
            index, ranks = list(VECTORS).index(label), as_ranks(modules, VECTORS[label])
            for point in list(points)[2:]:  # the proxy and the 1-epoch refine
                variant = dataclasses.replace(aware, **points[point])

                def measure(variant=variant, ranks=ranks, index=index, bases=bases):
                    model, _ = trial_model(baseline.model, ranks, variant, data, seed=index, bases=bases)
                    macs = count_macs(model)[0]
                    return {
                        "val": evaluate(model, data, "val", config.eval_batch_size),
                        "macs_ratio": macs / baseline.macs,
                    }

                row = results.get(f"activation-{side}-only|{label}|{point}", measure)
                print(f"activation-{side}-only {label} {point}: val {row['val']:.2%}", flush=True)
    print_factors(results.done, list(points))


# ----- recipes: refine recipes at equal epochs ------------------------------------------------------------------


def trial_state(config, data, baseline, bases, ranks: dict, seed: int):
    """The model a trial would measure (decomposed, BN re-estimated, the 30-step proxy): where a refine starts."""
    model, _ = trial_model(baseline.model, ranks, config, data, seed=seed, bases=bases)
    return model


def scores(model, data, config) -> dict:
    return {f"{split}": evaluate(model, data, split, config.eval_batch_size) for split in ("val", "test")}


def recipes(config, data, baseline, work: Path, labels: list[str], epochs: int, names: list[str]) -> None:
    results = Results(work / "recipes.json")
    modules = list(rank_modules(baseline.model))
    bases = trial_bases(config, baseline, data)
    for label in labels:
        ranks = as_ranks(modules, VECTORS[label])
        for name in names:

            def measure(ranks=ranks, name=name):
                model = trial_state(config, data, baseline, bases, ranks, seed=0)
                begin = time.perf_counter()
                history = refine(model, data, config, epochs, seed=1, recipe=RECIPES[name], teacher=baseline.model)
                return {**scores(model, data, config), "history": history, "seconds": time.perf_counter() - begin}

            row = results.get(f"{config.decompose_method}|{label}|{name}|{epochs}", measure)
            curve = ", ".join(f"{h['val_accuracy'] * 100:.1f}" for h in row["history"])
            print(f"{label:10s} {name:10s} {epochs} epochs: val {row['val']:.2%} test {row['test']:.2%} "
                  f"(val per epoch {curve}), {row['seconds']:.0f} s", flush=True)  # fmt: skip


# ----- result: refined models at 5x and 10x, each beside its from-scratch check ---------------------------------


def macs_ratio(config, baseline, ranks: dict) -> float:
    model = decomposed_model(baseline.model, ranks, dataclasses.replace(config, decompose_method="hosvd"),
                             torch.device("cpu"))  # fmt: skip
    return count_macs(model)[0] / baseline.macs


def vbmf_vector(config, baseline, modules: list[str], target: float) -> tuple[list[int], float]:
    """VBMF's module ranks (``ranks --vbmf``) at the weakening whose MACs ratio is the largest at or under ``target``:
    VBMF's allocation at the uniform vector's cost."""
    best = None
    for weakening in [2.0**e for e in range(-8, 9)] + [1.5**e for e in range(-12, 13)]:
        found = vbmf_ranks(baseline.model, weakening=weakening).modules
        ks = [max(1, round(found[m] * RANK_STEPS)) for m in modules]
        ratio = macs_ratio(config, baseline, as_ranks(modules, ks))
        if ratio <= target and (best is None or ratio > best[1]):
            best = (ks, ratio)
    return best


BUDGETS = {"5x": "uniform 10", "10x": "uniform 6"}  # the searched best at each budget (result.json: uniform) and
EXTRA = {"5x": "sens 5x", "10x": "sens 10x"}  # issue 17's sensitivity allocation at the same MACs


def parse_extra(text: str) -> dict[str, list[list[int]]]:
    """``--extra 5x:12/12/12/6/3,10x:6/8/8/4/2`` as budget -> rank vectors (k of k/32)."""
    extra: dict[str, list[list[int]]] = {}
    for item in filter(None, text.split(",")):
        budget, _, vector = item.partition(":")
        extra.setdefault(budget, []).append([int(k) for k in vector.split("/")])
    return extra


def result(
    config, data, baseline, work: Path, epochs: int, recipe: RefineRecipe, with_scratch: bool, with_sensitivity: bool,
    extra: dict[str, list[list[int]]] | None = None, only_extra: bool = False,
) -> None:  # fmt: skip
    results = Results(work / "accuracy-kept.json")
    modules = list(rank_modules(baseline.model))
    bases = trial_bases(config, baseline, data)
    per_epoch = steps_per_epoch(data, config.batch_size)
    for budget, label in BUDGETS.items():
        target = macs_ratio(config, baseline, as_ranks(modules, VECTORS[label]))
        vbmf = results.get(f"vbmf|{budget}", lambda target=target: vbmf_vector(config, baseline, modules, target))
        vectors = {f"{label} (searched best)": VECTORS[label], f"VBMF {'/'.join(map(str, vbmf[0]))}": vbmf[0]}
        if with_sensitivity:
            vectors[EXTRA[budget]] = VECTORS[EXTRA[budget]]
        if only_extra:
            vectors = {label: VECTORS[label]}  # the reference, cached
        for ks in (extra or {}).get(budget, []):
            vectors["/".join(map(str, ks))] = ks
        for name, ks in vectors.items():
            ranks = as_ranks(modules, ks)

            def refined(ranks=ranks):
                model = trial_state(config, data, baseline, bases, ranks, seed=0)
                trial = scores(model, data, config)
                begin = time.perf_counter()
                history = refine(model, data, config, epochs, seed=1, recipe=recipe, teacher=baseline.model)
                return {
                    "trial": trial,
                    **scores(model, data, config),
                    "history": history,
                    "macs_ratio": count_macs(model)[0] / baseline.macs,
                    "seconds": time.perf_counter() - begin,
                }

            def scratch(ranks=ranks):
                model = decomposed_model(baseline.model, ranks, config, data.device, bases)
                steps = config.finetune_steps + epochs * per_epoch
                return {**scores(from_scratch(model, data, config, steps, seed=2), data, config), "steps": steps}

            key = f"{config.decompose_method}|{budget}|{'/'.join(map(str, ks))}|{epochs}|{recipe}"
            row = results.get(key, refined)
            line = (
                f"{budget} {name:28s} MACs {1 / row['macs_ratio']:.1f}x fewer: trial val {row['trial']['val']:.2%}"
                f" -> refined val {row['val']:.2%}, test {row['test']:.2%}"
            )
            if with_scratch:
                check = results.get(f"scratch|{'/'.join(map(str, ks))}|{config.finetune_steps + epochs * per_epoch}",
                                    scratch)  # fmt: skip
                line += f"; from scratch ({check['steps']} steps) val {check['val']:.2%}, test {check['test']:.2%}"
            print(line, flush=True)


def quality_setup(work: Path, config_path: Path, data_dir: str):
    """The config, data and baseline (cached under ``work``, which becomes the working folder: the config's
    baseline_dir is relative to it) of a quality benchmark; the baseline said in a line."""
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    config = load_config(config_path.resolve(), {"data_dir": data_dir, "download": False})
    data = device_data(config, resolve_device(config.device))
    baseline = ensure_baseline(config, data)
    print(f"baseline: val {baseline.val_accuracy:.2%}, test {baseline.test_accuracy:.2%}, MACs {baseline.macs:,} "
          f"on {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    return config, data, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--work", required=True, type=Path, help="folder of the baseline and results")
    parser.add_argument("--config", type=Path, default=CONFIG, help="default: configs/cpu-quality.yaml")
    parser.add_argument("--stage", required=True, choices=("factors", "variants", "recipes", "result"))
    parser.add_argument("--method", default="hosvd", help="recipes, result: decompose_method (default hosvd)")
    parser.add_argument("--epochs", type=int, default=2, help="recipes, result: epochs of each refine (default 2)")
    parser.add_argument("--vectors", default="sens 5x,uniform 6", help="recipes: which VECTORS, comma-separated")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="recipes: which RECIPES, comma-separated")
    parser.add_argument("--recipe", default="rewind+kd", help="result: the refine recipe (default rewind+kd)")
    parser.add_argument("--no-scratch", action="store_true", help="result: skip the from-scratch checks")
    parser.add_argument("--sensitivity", action="store_true", help="result: also issue 17's sensitivity vectors")
    parser.add_argument("--extra", default="", help="result: more vectors, e.g. 5x:12/12/12/6/3,10x:6/8/8/4/2")
    parser.add_argument("--only-extra", action="store_true", help="result: the --extra vectors and the uniform ones")
    args = parser.parse_args()
    config, data, baseline = quality_setup(args.work, args.config, args.data_dir)
    if args.stage in ("factors", "variants"):
        (factors if args.stage == "factors" else variants)(config, data, baseline, args.work)
        return
    config = dataclasses.replace(config, decompose_method=args.method)
    if args.stage == "recipes":
        recipes(config, data, baseline, args.work, args.vectors.split(","), args.epochs, args.recipes.split(","))
    else:
        recipe = RECIPES[args.recipe]
        result(config, data, baseline, args.work, args.epochs, recipe, not args.no_scratch, args.sensitivity,
               parse_extra(args.extra), args.only_extra)  # fmt: skip


if __name__ == "__main__":
    main()
