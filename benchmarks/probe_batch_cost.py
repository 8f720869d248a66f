"""One HessianSharpness cadence point on a loader of batch size 1: the default probe batches (the
loader's, so one batch per sample) against ``probe_batch_size=64``, timed in the same process.

Lightning's BoringModel (Linear 32 -> 2) on 512 random samples, the default 256-sample subset, 20
Lanczos products, no stability ratio. Prints the batches, the seconds per point, lambda_max and the
ratio. Usage: ``PYTHONPATH=. python benchmarks/probe_batch_cost.py``.
"""

from __future__ import annotations

import os
import time
from functools import partial
from types import SimpleNamespace

import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from adai_lightning.callbacks import HessianSharpness


def one_point(module: BoringModel, loader: DataLoader, probe_batch_size: int | None) -> tuple[float, float, int]:
    """(seconds, lambda_max, batches) of one cadence point."""
    callback = HessianSharpness(every_n_train_steps=1, lanczos_iters=20, dataloader=loader,
                                probe_batch_size=probe_batch_size)
    no_optimizer = SimpleNamespace(optimizers=[])  # no stability ratio: the eigenvalues' cost only
    begin = time.perf_counter()
    metrics = callback.probe.run(None, module, partial(callback._measure, no_optimizer))
    return time.perf_counter() - begin, metrics["sharpness/lambda_max"], len(callback.probe._batches)


def main() -> None:
    torch.manual_seed(0)
    module = BoringModel()
    loader = DataLoader(RandomDataset(32, 512), batch_size=1)
    seconds = {}
    for size in (64, None):
        seconds[size], lambda_max, batches = one_point(module, loader, size)
        print(f"probe_batch_size={size}: {batches} batches, {seconds[size]:.2f} s per point, "
              f"lambda_max={lambda_max:.9g}")
    print(f"default / probe_batch_size=64: {seconds[None] / seconds[64]:.1f}x (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
