"""ranksearch's training loop against a plain PyTorch loop, in one process, on the same model, data and batch
(issue 27): steps/s of pretraining's one-cycle loop, each variant timed in turn, rounds alternated.

Variants:
- ``plain``: a loop written as a practitioner writes one on a GPU: crop and flip drawn on the device with a device
  generator, SGD (Nesterov, foreach), OneCycle, label smoothing, bf16 autocast and channels_last on CUDA; no host sync.
- ``ranksearch``: ``train.one_cycle`` as pretraining runs it (cuDNN's default algorithm choice).
- ``deterministic``: the same under the trials' deterministic cuDNN kernels (``config.deterministic: true``).
- ``autotuned``: the same under cuDNN's autotuner (``config.deterministic: false``).
- ``0.11.0 batches``: ``ranksearch`` with 0.11.0's batches (crops and flips drawn batch by batch on the CPU, copied
  to the device each step: a plain copy to a GPU makes the CPU wait for the queue to drain).

    python benchmarks/train_speed.py --data-dir /tmp/data/cifar10-jpeg [--steps 300] [--rounds 2] [--width 1]
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ranksearch.data.datasets import DeviceData, augment, device_data
from ranksearch.study.config import Config
from ranksearch.train.baseline import new_model
from ranksearch.train.loops import one_cycle, prepare
from ranksearch.utils.device import autocast, resolve_device, synchronize, use_deterministic_kernels


def plain_loop(model: nn.Module, data: DeviceData, config: Config, steps: int, seed: int) -> float:
    """A plain GPU training loop over ``data``'s resident uint8 training images."""
    device = data.device
    images_all, labels_all = data.splits["train"].images, data.splits["train"].labels
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.pretrain_lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.pretrain_lr, total_steps=steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    n, b, pad = len(labels_all), config.batch_size, 4
    h, w = images_all.shape[-2:]
    rows_base, cols_base = torch.arange(h, device=device), torch.arange(w, device=device)
    model.train()
    order, position = torch.randperm(n, device=device, generator=generator), 0
    for _ in range(steps):
        if position + b > n:
            order, position = torch.randperm(n, device=device, generator=generator), 0
        index = order[position : position + b]
        position += b
        padded = F.pad(images_all[index], (pad,) * 4)
        shifts = torch.randint(0, 2 * pad + 1, (2, b), device=device, generator=generator)
        flips = torch.rand(b, device=device, generator=generator) < 0.5
        rows = shifts[0, :, None] + rows_base
        cols = torch.where(flips[:, None], (shifts[1, :, None] + cols_base).flip(1), shifts[1, :, None] + cols_base)
        c = padded.shape[1]
        picked = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
        images = data.normalize(picked.gather(3, cols[:, None, None, :].expand(b, c, h, w)))
        with autocast(device):
            loss = criterion(model(images), labels_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return float(loss.detach())


def old_batches(self, batch_size: int, generator: torch.Generator):
    """0.11.0's ``DeviceData.train_batches``: each batch's crops and flips drawn and copied to the device in turn."""
    n = self.size("train")
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator).to(self.index_device)
        chunks = [order[start : start + batch_size] for start in range(0, n - batch_size + 1, batch_size)]
        for images, labels in self._batches("train", chunks):
            yield self.normalize(augment(images, generator)), labels


def ranksearch_loop(deterministic: bool | None, batches=None):
    def run(model, data, config, steps, seed):
        if deterministic is not None:
            use_deterministic_kernels(data.device, deterministic)
        if batches is not None:
            kept, DeviceData.train_batches = DeviceData.train_batches, batches
        try:
            return one_cycle(model, data, config, steps, seed)
        finally:
            if batches is not None:
                DeviceData.train_batches = kept

    return run


VARIANTS = {
    "plain": plain_loop,
    "ranksearch": ranksearch_loop(None),
    "deterministic": ranksearch_loop(True),
    "autotuned": ranksearch_loop(False),
    "0.11.0 batches": ranksearch_loop(None, old_batches),
}


def parts(data: DeviceData, config: Config, steps: int) -> dict[str, float]:
    """Milliseconds per step of a step's host-side parts alone: drawing and augmenting a batch (synchronized: on a
    GPU its kernels included), and the scheduler's step."""
    batches = data.train_batches(config.batch_size, torch.Generator().manual_seed(3))
    next(batches)
    synchronize(data.device)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    synchronize(data.device)
    batch_ms = (time.perf_counter() - start) / steps * 1000
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.pretrain_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.pretrain_lr, total_steps=steps + 1)
    optimizer.step()  # no gradient, nothing updated: the order the scheduler expects
    start = time.perf_counter()
    for _ in range(steps):
        scheduler.step()
    return {"batch": batch_ms, "scheduler": (time.perf_counter() - start) / steps * 1000}


def cudnn_default() -> None:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    config = Config(data_dir=args.data_dir, download=False, width=args.width)
    device = resolve_device("auto")
    data = device_data(config, device)
    names = args.variants.split(",")
    rates: dict[str, list[float]] = {name: [] for name in names}
    warm = prepare(new_model(config), device)
    VARIANTS["plain"](warm, data, config, 20, 0)  # CUDA context, allocator, cuDNN handles
    for _ in range(args.rounds):
        for name in names:
            cudnn_default()
            torch.manual_seed(0)
            model = prepare(new_model(config), device)
            VARIANTS[name](model, data, config, 10, 1)  # warm: kernels chosen, autotuner run
            synchronize(device)
            start = time.perf_counter()
            loss = VARIANTS[name](model, data, config, args.steps, 2)
            synchronize(device)
            rates[name].append(args.steps / (time.perf_counter() - start))
            assert math.isfinite(loss), name
    cudnn_default()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; VGG16-BN width {args.width}, batch {config.batch_size}, {args.steps} steps x {args.rounds} "
          "rounds")
    plain = max(rates["plain"]) if "plain" in rates else None
    print("| loop | steps/s (best of rounds) | rounds | vs plain |\n|---|---:|---|---:|")
    for name in names:
        best = max(rates[name])
        versus = f"{best / plain:.2f}x" if plain else "-"
        print(f"| {name} | {best:.1f} | {', '.join(f'{r:.1f}' for r in rates[name])} | {versus} |", flush=True)
    if "ranksearch" in rates:
        shares = parts(data, config, args.steps)
        step_ms = 1000 / max(rates["ranksearch"])
        print(f"per step of ranksearch's loop ({step_ms:.2f} ms): batch drawn and augmented {shares['batch']:.3f} ms "
              f"({shares['batch'] / step_ms:.1%}), scheduler {shares['scheduler']:.3f} ms "
              f"({shares['scheduler'] / step_ms:.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
