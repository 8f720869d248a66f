"""Fit a tiny model under 2-process CPU DDP with HessianSharpness; rank 0 writes the logged
lambda_max and the single-process value on the same data (the 16-sample evaluation subset, one
batch of 8 per rank) to argv[1], and whether both ranks recorded the same subset."""

import csv
import json
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning.callbacks import HessianSharpness
from adai_lightning.curvature import HessianOperator, lanczos_extremes


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.body(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main(out_path, tmp_dir):
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(64, 5, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    loader = DataLoader(dataset, batch_size=8, shuffle=False)
    callback = HessianSharpness(every_n_train_steps=3, top_k=1, lanczos_iters=40, num_samples=16)
    module = Net()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", callbacks=[callback],
                         logger=pl.loggers.CSVLogger(tmp_dir), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    subsets = [None, None]
    dist.all_gather_object(subsets, callback.probe.records[""].indices)
    if trainer.is_global_zero:
        with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
            logged = [float(row["sharpness/lambda_max"]) for row in csv.DictReader(handle) if row["sharpness/lambda_max"]]
        batches = [dataset[subsets[0][:8]], dataset[subsets[0][8:]]]
        operator = HessianOperator(list(module.parameters()),
                                   lambda b: nn.functional.cross_entropy(module.body(b[0]), b[1]), batches)
        reference = lanczos_extremes(operator, operator.params, 1, "largest", torch.Generator().manual_seed(0),
                                     40).values[0]
        with open(out_path, "w") as handle:
            json.dump({"logged": logged, "reference": float(reference), "same_subset": subsets[0] == subsets[1]}, handle)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
