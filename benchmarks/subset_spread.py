"""How much lambda_max depends on which samples the Hessian probe evaluates, by subset size.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/subset_spread.py [--sizes 64 256 1024] [--subsets 10] 2>/dev/null

Trains the default recipe (SmallConvNet on digits, Adai lr 0.5, cosine schedule over 15 epochs,
batch 64, seed 0) and keeps its weights after epoch 1 and after epoch 15. For each, and each
subset size N, it measures lambda_max as ``HessianSharpness`` does by default (train mode, Lanczos
with 20 products) on ``--subsets`` different seeded subsets of N training samples (probe seeds
0, 1, ...) and prints their mean, standard deviation, relative spread (std / mean) and range.
The spread is what two runs (or two optimizers) that differ only in the chosen subset would see.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import lightning.pytorch as pl
import torch

from adai_lightning import Adai
from adai_lightning.callbacks import HessianSharpness
from adai_lightning.recipes import DigitsDataModule, ImageClassifier, SmallConvNet

EPOCHS = 15


class DefaultRecipe(ImageClassifier):
    """The default recipe's model with its optimizer and schedule (the CLI supplies them there)."""

    def configure_optimizers(self):
        optimizer = Adai(self.parameters(), lr=0.5)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)]


class KeepWeights(pl.Callback):
    def __init__(self, epochs: tuple[int, ...]) -> None:
        self.epochs, self.kept = epochs, {}

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 in self.epochs:
            self.kept[trainer.current_epoch + 1] = copy.deepcopy(pl_module.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--subsets", type=int, default=10)
    args = parser.parse_args()
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    module = DefaultRecipe(SmallConvNet(in_channels=1, num_classes=10), num_classes=10)
    keep = KeepWeights((1, EPOCHS))
    pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[keep]).fit(module, data)
    loader = data.train_dataloader()
    print(f"train split: {len(loader.dataset)} samples, batch size {loader.batch_size}")
    print("epoch  N     mean lambda_max  std     std/mean  min     max")
    for epoch, weights in keep.kept.items():
        module.load_state_dict(weights)
        module.train()
        for size in args.sizes:
            values = []
            for seed in range(args.subsets):
                callback = HessianSharpness(num_samples=size, dataloader=loader, seed=seed, on_error="raise")
                values.append(callback.probe.run(None, module, callback._measure)["sharpness/lambda_max"])
            mean, std = statistics.fmean(values), statistics.stdev(values)
            print(f"{epoch:5d}  {size:4d}  {mean:15.3f}  {std:6.3f}  {std / mean:8.1%}  {min(values):6.3f}  "
                  f"{max(values):6.3f}", flush=True)


if __name__ == "__main__":
    main()
