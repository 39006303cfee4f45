"""Start-up time of a fresh interpreter: ``import ranksearch``, ``from ranksearch import load_model`` and
``python -m ranksearch --help``, for this tree and, side by side in turns, another checkout of ranksearch
(``--other PATH``, e.g. a worktree of an earlier commit), so that a busy machine moves both alike.

    git worktree add /tmp/before 35dd854
    python benchmarks/import_time.py --other /tmp/before --rounds 10
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PROBES = {
    "import ranksearch": ["-c", "import ranksearch"],
    "from ranksearch import load_model": ["-c", "from ranksearch import load_model"],
    "python -m ranksearch --help": ["-m", "ranksearch", "--help"],
}


def seconds(tree: Path, args: list[str]) -> float:
    """One fresh interpreter's wall time, with ``tree`` first on the path (its ranksearch is the one imported)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=tree, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="another ranksearch checkout to compare with")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    trees = {"this tree": HERE, "other": args.other.resolve()}
    print(f"median wall seconds of {args.rounds} fresh interpreters each, taken in turns")
    print("| probe | this tree | other | this / other |\n|---|---:|---:|---:|")
    for name, probe in PROBES.items():
        times = {label: [] for label in trees}
        for _ in range(args.rounds):  # in turns
            for label, tree in trees.items():
                times[label].append(seconds(tree, probe))
        mine, theirs = (statistics.median(times[label]) for label in trees)
        print(f"| {name} | {mine:.2f} | {theirs:.2f} | {mine / theirs:.2f}x |")


if __name__ == "__main__":
    main()
