"""Two gloo ranks: InertiaMonitor's statistics under FSDP2 and ZeRO, for tests/test_callbacks_inertia.py.

Usage: ``python callbacks_inertia_dist.py {fsdp2,zero,lightning} PORT OUT_DIR``.

``fsdp2``/``zero``: each rank trains a small MLP for three Adai steps, computes the callback's
statistics (``adai_statistics(param_inertia(...))``) and, independently, every parameter's beta1 in
float64 from ITS OWN shard of the optimizer state by the paper's formula; it writes both to
``OUT_DIR/rank<r>.json``. The test compares ranks with each other and the statistics with the
gathered reference.

``lightning``: a Lightning fit under ``ModelParallelStrategy`` (FSDP2, 2 CPU ranks) with the
callback attached; each rank writes every metric the callback logged (``{"scalars": {step: ...}}``).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def reference_beta1(optimizer, names: dict[int, str]) -> dict[str, list[float]]:
    """This rank's part of every parameter's beta1, in float64 from the raw state (local shards)."""
    out = {}
    vbar = optimizer.last_vbar
    vbar = float(vbar.full_tensor() if hasattr(vbar, "full_tensor") else vbar)
    for group in optimizer.param_groups:
        beta0, beta2 = group["betas"]
        for param in group["params"]:
            state = optimizer.state[param]
            v = state["exp_avg_sq"]
            v = v.to_local() if hasattr(v, "to_local") else v
            vhat = v.double().flatten() / (1 - beta2 ** float(state["step"]))  # an int, or a float32 tensor (guarded)
            out[names[id(param)]] = (1 - beta0 * vhat / vbar).clamp(0, 1 - group["eps"]).tolist()
    return out


def run(rank: int, mode: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from adai_lightning import Adai
    from adai_lightning.callbacks.inertia import adai_statistics, param_inertia, parameter_names

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = Adai(model.parameters(), lr=0.5, betas=(0.3, 0.9))
        local = optimizer
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adai, lr=0.5, betas=(0.3, 0.9))
        local = optimizer.optim
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    names = parameter_names(model, optimizer)
    scalars = adai_statistics(param_inertia(optimizer, names))
    reference = reference_beta1(local, names)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"scalars": scalars, "reference": reference}, f)
    dist.barrier()  # no rank tears gloo down while its peer still talks to it
    dist.destroy_process_group()


def run_lightning(port: int, out_dir: str) -> None:
    """Lightning launches the second rank itself by re-running this script."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from adai_lightning import Adai
    from adai_lightning.callbacks import InertiaMonitor

    class RecordingLogger(pl.loggers.Logger):
        name, version, experiment = "recording", 0, None

        def __init__(self) -> None:
            super().__init__()
            self.logged: dict[int, dict[str, float]] = {}

        def log_hyperparams(self, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:  # on every rank
            self.logged.setdefault(step, {}).update(metrics)

    class ShardedNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Linear(8, 3)

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.body, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return Adai(self.parameters(), lr=0.5, betas=(0.3, 0.9))

    os.environ["MASTER_PORT"] = str(port)
    pl.seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    logger = RecordingLogger()
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=1, logger=logger,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         callbacks=[InertiaMonitor(every_n_train_steps=2, per_parameter=True)],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(ShardedNet(), DataLoader(data, batch_size=8))
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"scalars": logger.logged}, f)


if __name__ == "__main__":
    mode, port, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "lightning":
        run_lightning(port, out_dir)
    else:
        torch.multiprocessing.spawn(run, args=(mode, port, out_dir), nprocs=2)
