"""CPU latency with BatchNorm folded into the convs, against unfolded: baseline and decomposed, eager and TorchScript.

    python benchmarks/fold_speed.py --width 0.25
    python benchmarks/fold_speed.py --checkpoint exports/best.pt

All in one process on the CPU (``measure_latency``: median ms per forward pass of the batch); each unfolded /
folded pair is measured alternately ``--repeats`` times and the lowest median of each kept, which discounts
stretches when another process took the cores. The baseline is a VGG16-BN of random weights (speed does not
depend on them), or ``--checkpoint``: an undecomposed export replaces the baseline, a decomposed one the
uniform-rank model.
"""

import argparse
import copy
import warnings

import torch
from torch import nn

from ranksearch import count_macs, decompose, load_model, set_ranks
from ranksearch.decompose import Tucker2Conv
from ranksearch.deliver.load import read_export
from ranksearch.models import build_model, module_names
from ranksearch.models.fold import fold_batchnorm
from ranksearch.objectives.latency import LatencyResult, latency_device, measure_latency

BATCHES = (1, 64)


def models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Name -> eval-mode model: the baseline and a decomposed one."""
    name, width = "vgg16", args.width
    loaded = load_model(args.checkpoint) if args.checkpoint else None
    if loaded is not None:
        config = read_export(args.checkpoint)["config"]
        name, width = config["model"], config["width"]
    baseline = build_model(name, width=width)
    if loaded is not None and not any(isinstance(m, Tucker2Conv) for m in loaded.modules()):
        baseline, loaded = loaded, None
    ranked = set_ranks(copy.deepcopy(baseline), [args.ranks] * len(module_names(baseline)))
    decomposed = loaded if loaded is not None else decompose(ranked)
    label = "checkpoint" if loaded is not None else f"decomposed {args.ranks:g}"
    return {f"{name} width {width:g}": baseline.eval(), label: decomposed.eval()}


def torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        return torch.jit.trace(model, torch.randn(1, 3, 32, 32))


def measure(model: nn.Module, batch: int, args: argparse.Namespace) -> LatencyResult:
    return measure_latency(model, batch=batch, threads=args.threads, round_size=args.round_size,
                           max_seconds=args.max_seconds)  # fmt: skip


def fastest(
    unfolded: nn.Module, folded: nn.Module, batch: int, args: argparse.Namespace
) -> tuple[LatencyResult, LatencyResult]:
    """The lowest-median measurement of each, measured alternately ``args.repeats`` times."""
    pairs = [(measure(unfolded, batch, args), measure(folded, batch, args)) for _ in range(args.repeats)]
    unfolded_runs, folded_runs = zip(*pairs, strict=True)
    return min(unfolded_runs, key=lambda r: r.median_ms), min(folded_runs, key=lambda r: r.median_ms)


def ms(result: LatencyResult) -> str:
    return f"{result.median_ms:.2f}" + ("" if result.stable else "~")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25, help="of the random baseline")
    parser.add_argument("--ranks", type=float, default=0.125, help="normalized rank of every module")
    parser.add_argument("--checkpoint", help="a `ranksearch export` .pt instead of random weights")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--round-size", type=int, default=10, help="timed runs per round")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each pair")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="of timing per measurement")
    args = parser.parse_args()
    print(f"measured on {latency_device(torch.device('cpu'), args.threads)}, torch {torch.__version__}")
    print("| model | batch | MACs | unfolded ms | folded ms | speed-up | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline_ms: dict[tuple[str, int], float] = {}
    for label, model in models(args).items():
        macs = f"{count_macs(model)[0] / 1e6:.1f} M"
        folded = fold_batchnorm(model)
        for form, unfolded_form, folded_form in (
            ("eager", model, folded), ("TorchScript", torchscript(model), torchscript(folded)),
        ):  # fmt: skip
            for batch in BATCHES:
                before, after = fastest(unfolded_form, folded_form, batch, args)
                reference = baseline_ms.setdefault((form, batch), before.median_ms)
                print(f"| {label}, {form} | {batch} | {macs} | {ms(before)} | {ms(after)} | "
                      f"{before.median_ms / after.median_ms:.2f}x | {reference / after.median_ms:.2f}x |")  # fmt: skip
    print("speed-up: unfolded / folded; vs baseline: the baseline's unfolded ms (same form, batch) / folded ms; "
          "~: the median had not settled within 2% when --max-seconds ran out")  # fmt: skip


if __name__ == "__main__":
    main()
