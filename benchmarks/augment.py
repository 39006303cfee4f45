"""The training batches' crop and flip: ``data.augment`` against the indexing it replaced, side by side.

    OMP_NUM_THREADS=1 python benchmarks/augment.py

Both draw the same shifts and flips from the same generator and give the same pixels (checked here); the earlier
form indexed with four index tensors broadcast to (B, C, H, W) int64 (8 bytes per pixel each), the current one
gathers rows, then columns, by expanded indices. Prints ms per batch of 128 at 32x32 and 128x128, on one thread.
"""

import time

import torch

from ranksearch.data.datasets import augment


def augment_by_indexing(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """``augment`` as 0.10.0 wrote it."""
    b, c, h, w = images.shape
    device = images.device
    shifts = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(device)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = shifts[0, :, None] + torch.arange(h, device=device)
    cols = shifts[1, :, None] + torch.arange(w, device=device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def ms_per_batch(function, images: torch.Tensor, repeats: int = 30) -> float:
    start = time.perf_counter()
    for seed in range(repeats):
        function(images, torch.Generator().manual_seed(seed))
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    torch.set_num_threads(1)
    for size in (32, 128):
        images = torch.randint(0, 256, (128, 3, size, size), dtype=torch.uint8)
        for seed in range(5):
            same = augment(images, torch.Generator().manual_seed(seed))
            assert torch.equal(same, augment_by_indexing(images, torch.Generator().manual_seed(seed)))
        pairs = [(ms_per_batch(augment_by_indexing, images), ms_per_batch(augment, images)) for _ in range(3)]
        before, after = (min(times) for times in zip(*pairs, strict=True))
        print(f"{size}x{size}, batch 128: indexing {before:.2f} ms, gathers {after:.2f} ms "
              f"({before / after:.2f}x), the same pixels")  # fmt: skip


if __name__ == "__main__":
    main()
