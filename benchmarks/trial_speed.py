"""Per-trial speed: the plain course-style trial against ranksearch's, same model, ranks, steps and data.

Plain: TensorLy ``partial_tucker`` (HOOI) on every conv each trial, a torchvision DataLoader with PIL
transforms (2 workers) for training and validation, ``loss.item()`` every step.
ranksearch: truncated HOSVD from channel bases computed once, the dataset resident as uint8 tensors with
batched per-image augmentation, evaluation in large batches under ``inference_mode``.
Both: full-width VGG16-BN (random weights: speed does not depend on them), batch 128, SGD, same rank vectors.
The last line is the per-trial speed-up.

    python benchmarks/trial_speed.py --quick --data-dir /tmp/cifar10-jpeg
"""

import argparse
import copy
import dataclasses
import random
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from ranksearch import count_macs, decompose, set_ranks, vgg16_cifar
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.data.inputs import CIFAR_MEAN, CIFAR_STD
from ranksearch.decompose import model_bases
from ranksearch.models import rank_modules
from ranksearch.search.trial import trial_model
from ranksearch.study.config import Config
from ranksearch.train.loops import evaluate


def clock(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def plain_loaders(data_dir: str, config: Config) -> tuple[DataLoader, DataLoader]:
    """torchvision ImageFolder + PIL transforms, on the same train / val split as ranksearch."""
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    train_set = datasets.ImageFolder(f"{data_dir}/train", transform=augment)
    val_set = datasets.ImageFolder(f"{data_dir}/train", transform=plain)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.split_seed))
    val_idx, train_idx = order[: config.val_size].sort().values, order[config.val_size :].sort().values
    train = DataLoader(Subset(train_set, train_idx.tolist()), batch_size=config.batch_size, shuffle=True,
                       num_workers=2, drop_last=True, persistent_workers=True)  # fmt: skip
    val = DataLoader(Subset(val_set, val_idx.tolist()), batch_size=256, num_workers=2, persistent_workers=True)
    return train, val


def plain_trial(baseline: nn.Module, ranks, config: Config, train: DataLoader, val: DataLoader) -> dict:
    model, decompose_s = clock(lambda: decompose(set_ranks(copy.deepcopy(baseline), ranks), method="hooi"))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.finetune_lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)  # fmt: skip
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def fine_tune():
        model.train()
        batches = iter(train)
        for _ in range(config.finetune_steps):
            images, labels = next(batches)
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the usual per-step logging

    def validate():
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val:
                correct += (model(images).argmax(1) == labels).sum().item()
                total += len(labels)
        return correct / total

    _, finetune_s = clock(fine_tune)
    _, eval_s = clock(validate)
    _, count_s = clock(lambda: count_macs(model))
    return {"decompose": decompose_s, "fine-tune": finetune_s, "evaluate": eval_s, "count": count_s}


def ranksearch_trial(baseline, ranks, config, data, bases, seed) -> dict:
    model, parts = trial_model(baseline, ranks, config, data, seed, bases)
    _, eval_s = clock(lambda: evaluate(model, data, "val", config.eval_batch_size))
    _, count_s = clock(lambda: count_macs(model))
    return {"decompose": parts["decompose_s"], "fine-tune": parts["finetune_s"], "evaluate": eval_s, "count": count_s}


def report(label: str, trials: list[dict]) -> float:
    parts = {part: statistics.mean(t[part] for t in trials) for part in trials[0]}
    total = sum(parts.values())
    print(f"{label:11s} " + "  ".join(f"{part} {seconds:6.2f} s" for part, seconds in parts.items())
          + f"  | trial {total:6.2f} s", flush=True)  # fmt: skip
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 ImageFolder tree (train/, test/)")
    parser.add_argument("--quick", action="store_true", help="2 trials, 8 steps, 1,000 val images (< 3 min)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--val-size", type=int, default=5000)
    args = parser.parse_args()
    trials, steps, val_size = (2, 8, 1000) if args.quick else (args.trials, args.steps, args.val_size)
    config = dataclasses.replace(Config(), finetune_steps=steps, val_size=val_size, eval_batch_size=500,
                                 decompose_method="hosvd", data_dir=args.data_dir)  # fmt: skip
    torch.manual_seed(0)
    baseline = vgg16_cifar().eval()
    rng = random.Random(0)
    vectors = [{m: rng.randint(2, 16) / 32 for m in rank_modules(baseline)} for _ in range(trials)]
    print(f"{trials} trials, full-width VGG16-BN, {steps} steps at batch {config.batch_size}, "
          f"{val_size} val images, {torch.get_num_threads()} threads")  # fmt: skip

    dataset, load_s = clock(lambda: load_dataset(args.data_dir))
    data = DeviceData(dataset, val_size, config.split_seed, torch.device("cpu"))
    bases, bases_s = clock(lambda: model_bases(baseline))
    print(f"ranksearch setup, once per run: dataset {load_s:.1f} s, channel bases {bases_s:.1f} s")

    train, val = plain_loaders(args.data_dir, config)
    plain = [plain_trial(baseline, ranks, config, train, val) for ranks in vectors]
    ours = [ranksearch_trial(baseline, ranks, config, data, bases, i) for i, ranks in enumerate(vectors)]
    plain_s, ours_s = report("plain", plain), report("ranksearch", ours)
    decompose_ratio = statistics.mean(t["decompose"] for t in plain) / statistics.mean(t["decompose"] for t in ours)
    print(f"decomposition speed-up: {decompose_ratio:.0f}x")
    print(f"per-trial speed-up: {plain_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
