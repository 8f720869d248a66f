"""Adai through ``adai_lightning.cli`` on 2 CPU processes, compared with the single-process run.

Usage: ``python distributed_lightning.py OUT_JSON STRATEGY`` with STRATEGY ``ddp`` or ``fsdp2``
(``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` in
``configure_model``). Trains the MLP of ``distributed_scenarios`` on the same global batches for one
epoch (``STEPS`` steps, each rank half of every batch) with ``--optimizer Adai``; rank 0 writes
``{STRATEGY: largest relative parameter deviation from the single-process run}``.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import distributed_scenarios as scenarios
from adai_lightning.cli import main

STRATEGIES = {
    "ddp": "ddp",
    "fsdp2": '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", '
             '"init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}',
}


class ShardableMLP(pl.LightningModule):
    """The scenarios' MLP; ``fully_shard`` per layer when the strategy provides a device mesh."""

    def __init__(self, out: str, name: str) -> None:
        super().__init__()
        self.out, self.name = out, name
        self.net = scenarios.make_model()

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        xs, ys = zip(*scenarios.batches())
        data = TensorDataset(torch.cat(xs), torch.cat(ys))
        world, rank = self.trainer.world_size, self.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)  # rank r: items r::world
        return DataLoader(data, batch_size=scenarios.GLOBAL_BATCH // world, sampler=sampler)

    def on_train_end(self) -> None:
        params = scenarios.full_params(self.net)  # collective under FSDP2: every rank calls it
        if self.global_rank == 0:
            with open(self.out, "w") as f:
                json.dump({self.name: scenarios.deviation(params, scenarios.reference())}, f)


if __name__ == "__main__":
    out, name = sys.argv[1], sys.argv[2]
    main([
        "fit", "--model", "distributed_lightning.ShardableMLP", "--model.out", out, "--model.name", name,
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", STRATEGIES[name],
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.use_distributed_sampler", "false",
        "--trainer.default_root_dir", f"{out}.run",
        "--optimizer", "Adai", "--optimizer.lr", str(scenarios.HYPER["lr"]),
        "--optimizer.weight_decay", str(scenarios.HYPER["weight_decay"]),
    ])
