"""MACs against speed: decomposed VGG16-BN timed against its baseline in the form a user ships (BatchNorm folded,
TorchScript), side by side on this machine (``latency.speed_against``, as `export` measures it), at batch 1 and 32.

Speed does not depend on the weights: the full-width model is the default config's architecture with random
weights, the quarter-width one the quality baseline's (``benchmarks/results/quality``).

    python benchmarks/speedup.py [--threads 2]
"""

import argparse
import copy

import torch

from ranksearch.decompose import decompose
from ranksearch.models import build_model, set_ranks
from ranksearch.objectives.cost_table import cost_table
from ranksearch.objectives.latency import speed_against
from ranksearch.study.config import Config

VECTORS = {  # k of k/32 per module
    "uniform 16/32": (16, 16, 16, 16, 16),
    "uniform 8/32": (8, 8, 8, 8, 8),
    "12/12/12/6/3 (issue 25's 0.2x delivery)": (12, 12, 12, 6, 3),
    "uniform 4/32": (4, 4, 4, 4, 4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", default="1,0.25")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads; deployed form; speed-up = baseline's ms / model's ms, timed in turns")
    print("| width | ranks | MACs ratio | batch 1 speed-up | batch 32 speed-up | baseline ms (1 / 32) |")
    print("|---:|---|---:|---:|---:|---|")
    for width in (float(w) for w in args.widths.split(",")):
        baseline = build_model("vgg16", width=width, num_classes=10).eval()
        table = cost_table(baseline, "module", "tucker2", (1, 3, 32, 32))
        for name, steps in VECTORS.items():
            ranks = [k / 32 for k in steps]
            model = decompose(set_ranks(copy.deepcopy(baseline), ranks), inplace=True, factorize=False,
                              decomposition=Config().decomposition)  # fmt: skip
            speed = speed_against(model, baseline, (3, 32, 32), torch.device("cpu"), [1, 32])["batches"]
            print(f"| {width:g} | {name} | {table.ratio('macs', ranks):.3f}x | {speed['1']['speedup']:.2f}x | "
                  f"{speed['32']['speedup']:.2f}x | {speed['1']['baseline_ms']:.2f} / "
                  f"{speed['32']['baseline_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
