"""Every MACs figure against PyTorch's own count: thop (``count_macs``) beside ``FlopCounterMode`` / 2.

    python benchmarks/flops_check.py
    python benchmarks/flops_check.py --ranks 4/32 --input-size 1 3 32 32

Prints a markdown table: for each registered model the search is tried on, undecomposed and decomposed at one
rank per module (``--ranks``, default 8/32) by Tucker-2 and by CP with the SVD switch on, the MACs thop counts,
FlopCounterMode's FLOPs / 2, whether they are equal, and the params (convs and linear layers). Exits 1 when any pair
differs. Random weights: neither count depends on them (decomposition builds the layer shapes only). Seconds on a
CPU.
"""

import argparse
import sys
from fractions import Fraction

from ranksearch import count_macs, decompose, set_ranks
from ranksearch.models import build_model, module_names
from ranksearch.models.measure import flop_counter_macs

MODELS = [
    ("vgg11", 0.25), ("vgg16", 0.25), ("resnet20", 1.0), ("resnet56", 1.0), ("resnet18", 0.25),
    ("torchvision:resnet18", 1.0), ("torchvision:mobilenet_v2", 1.0),
]  # fmt: skip


def rows(ranks: str, input_size: tuple[int, ...]):
    """(model label, thop MACs, FlopCounterMode / 2, params) for each model, undecomposed then decomposed."""
    rank = float(Fraction(ranks))
    for name, width in MODELS:
        baseline = build_model(name, num_classes=10, width=width).eval()
        tucker2 = decompose(set_ranks(baseline, [rank] * len(module_names(baseline))), factorize=False).eval()
        with_svd = build_model(name, num_classes=10, width=width, svd_layers=True).eval()
        with_svd = set_ranks(with_svd, [rank] * len(module_names(with_svd)))
        cp = decompose(with_svd, factorize=False, decomposition="cp").eval()
        base = f"{name} w{width:g}"
        for label, model in ((base, baseline), (f"{base} tucker2 @ {ranks}", tucker2),
                             (f"{base} cp + svd @ {ranks}", cp)):  # fmt: skip
            macs, params = count_macs(model, input_size)
            yield label, macs, flop_counter_macs(model, input_size), params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="8/32", help="normalized rank of every module when decomposed (k/32)")
    parser.add_argument("--input-size", type=int, nargs="+", default=[1, 3, 32, 32], help="input shape (NCHW)")
    args = parser.parse_args()
    size = tuple(args.input_size)
    print(f"input {'x'.join(map(str, size))}; decomposed: every module at rank {args.ranks}\n")
    print("| model | thop MACs | FlopCounterMode / 2 | equal | params |")
    print("|---|---:|---:|:---:|---:|")
    unequal = 0
    for label, macs, reference, params in rows(args.ranks, size):
        unequal += macs != reference
        equal = "yes" if macs == reference else "NO"
        print(f"| {label} | {macs:,} | {reference:,} | {equal} | {params:,} |", flush=True)
    print(f"\n{'all equal' if not unequal else f'{unequal} differ'}")
    return 1 if unequal else 0


if __name__ == "__main__":
    sys.exit(main())
