"""HessianSharpness and SaddleEscapeMonitor under FSDP2 (Lightning's ModelParallelStrategy with fully_shard,
2 gloo CPU ranks) against one process on the same weights and subset.

    python curvature_fsdp_fit.py fsdp OUT_DIR [--plain]   # Lightning launches the second rank itself
    python curvature_fsdp_fit.py reference OUT_DIR        # one process, no process group

``fsdp``: a float64 net (the first layer's 3 rows split 2 + 1: uneven shards) trained 6 steps with Adam; with
the callbacks (default ``hvp="auto"``), every rank writes what it logged, the final parameters, and at each
step the full parameters and Adam state (gathered with ``full_tensor``) to ``OUT_DIR/rank{r}.pt``; with
``--plain`` no callback, only the final parameters (``plain{r}.pt``). ``reference``: the same callbacks,
built anew, measure every recorded step in order on one process from ``rank0.pt`` (the same subset: the
probe chooses it by index from the dataset) with exact products and with finite differences, and
write ``reference.pt``.
"""

import os
import sys
from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning.callbacks import HessianSharpness, SaddleEscapeMonitor

EVERY = 3
STEPS = 6


def dataset():
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(64, 5, generator=generator, dtype=torch.float64),
                         torch.randint(0, 3, (64,), generator=generator))


def callbacks(**kwargs):
    return [HessianSharpness(every_n_train_steps=EVERY, top_k=2, trace_samples=4, lanczos_iters=30, num_samples=16,
                             **kwargs),
            SaddleEscapeMonitor(every_n_train_steps=EVERY, lanczos_iters=20, num_samples=16, **kwargs)]


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double()
        self.head = nn.Linear(3, 3).double()

    def configure_model(self):
        if self.device_mesh is not None:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.body, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, inputs):  # FSDP2 gathers the root's own parameters in its forward hook
        return self.head(self.body(inputs))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


class Recorder(pl.Callback):
    """At every step: the full parameters and Adam state (a collective: every rank calls it)."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        state = [{key: full(value) if torch.is_tensor(value) else value  # a copy: Adam's step counts in place
                  for key, value in optimizer.state[p].items()} for p in pl_module.parameters()]
        self.steps[trainer.global_step] = {"params": [full(p) for p in pl_module.parameters()], "adam": state,
                                           "lrs": [g["lr"] for g in optimizer.param_groups]}


class RecordingLogger(pl.loggers.Logger):
    name, version, experiment = "recording", 0, None

    def __init__(self):
        super().__init__()
        self.logged = {}

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):  # on every rank
        self.logged.setdefault(step, {}).update(metrics)


def run_fsdp(out_dir, plain):
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    recorder, logger = Recorder(), RecordingLogger()
    attached = [] if plain else [*callbacks(), recorder]
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=logger, callbacks=attached,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    module = Net()
    trainer.fit(module, DataLoader(dataset(), batch_size=8))
    final = [full(p) for p in module.parameters()]
    name = f"plain{trainer.global_rank}.pt" if plain else f"rank{trainer.global_rank}.pt"
    torch.save({"final": final, "logged": logger.logged, "steps": recorder.steps,
                "indices": None if plain else attached[0].probe.records[""].indices,
                "hvp": None if plain else [c.probe.hvp_chosen for c in attached[:2]]}, os.path.join(out_dir, name))


def run_reference(out_dir):
    recorded = torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=False)
    loader = DataLoader(dataset(), batch_size=8)
    result = {}
    for hvp in ("exact", "finite_difference"):
        sharpness, saddle = callbacks(hvp=hvp, dataloader=loader, on_error="raise")
        module = Net()
        optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
        values = {}
        for step in sorted(recorded["steps"]):
            if step % EVERY:
                continue
            weights = recorded["steps"][step]
            with torch.no_grad():
                for param, value in zip(module.parameters(), weights["params"]):
                    param.copy_(value)
            for param, state in zip(module.parameters(), weights["adam"]):
                optimizer.state[param] = dict(state)
            sharpness._step_lrs = weights["lrs"]
            trainer = SimpleNamespace(optimizers=[optimizer], global_step=step)
            metrics = sharpness.probe.run(None, module, partial(sharpness._measure, trainer))
            lambda_min, *_ = saddle.probe.run(None, module, saddle._extremes)
            values[step] = {**metrics, "saddle/lambda_min": lambda_min}
        result[hvp] = values
        result["indices"] = sharpness.probe.records[""].indices
    torch.save(result, os.path.join(out_dir, "reference.pt"))


if __name__ == "__main__":
    if sys.argv[1] == "fsdp":
        run_fsdp(sys.argv[2], "--plain" in sys.argv)
    else:
        run_reference(sys.argv[2])
