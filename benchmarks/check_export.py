"""Load a `ranksearch export` .pt with `ranksearch.load_model` alone and re-measure it against what the file records.

    python benchmarks/check_export.py exports/best.pt --data-dir /tmp/data/cifar10-jpeg

Prints the val/test accuracy, MACs and params measured on the rebuilt model next to the recorded ones.
"""

import argparse

import torch

from ranksearch import count_macs, load_model
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.deliver.load import read_export
from ranksearch.train.loops import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    payload = read_export(args.export)
    config = payload["config"]
    model = load_model(args.export)
    macs, params = count_macs(model, (1, *model.input_spec["size"]))  # at the input it records
    data = DeviceData(load_dataset(args.data_dir, download=False), config["val_size"], config["split_seed"],
                      torch.device("cpu"))  # fmt: skip
    print(f"{args.export}: study {payload['study_name']!r}, trial {payload['trial_number']}, "
          f"{payload['finetune_epochs']} extra epochs")  # fmt: skip
    for split in ("val", "test"):
        measured = evaluate(model, data, split, config["eval_batch_size"])
        recorded = payload[f"{split}_accuracy"]
        print(f"  {split:4s} accuracy: load_model {measured:.2%}, recorded {recorded:.2%}, "
              f"difference {100 * (measured - recorded):+.2f} pp")  # fmt: skip
    print(f"  MACs {macs:,} (recorded {payload['macs']:,}), params {params:,} (recorded {payload['params']:,})")


if __name__ == "__main__":
    main()
