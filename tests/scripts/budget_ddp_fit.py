"""Fit under 2-process CPU DDP with the budgeted HessianSharpness and SaddleEscapeMonitor, where the
ranks' own budgets disagree (rank 0: a clock on which every training step takes 1 s, generous and
deterministic; rank 1: a clock on which training takes no time; measurements take 1 s on both); rank 0 writes every rank's list of steps each callback measured at to argv[1]."""

import json
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning.callbacks import HessianSharpness, SaddleEscapeMonitor
from curvature_ddp_fit import Net  # this script's folder is on sys.path


class FrozenClock:
    """Training takes no time on it (unless a step advances it); the wrapped measurements advance it by 1 s each."""

    now = 0.0

    def __call__(self):
        return self.now


class Recorded(pl.Callback):
    """Records the steps each budgeted callback measured at and replaces their clocks (rank 0: each training
    step advances it by 1 s; rank 1: frozen); the first measurement is estimated free on both ranks (so it
    comes at the first candidate point). The real clock is not used: under load it made rank 0's budget
    as tight as rank 1's, and the test could not tell which rank decided."""

    def __init__(self, callbacks):
        self.callbacks = callbacks
        self.steps = {type(c).__name__: [] for c in callbacks}
        self.clocks = []

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == 0:
            for clock in self.clocks:
                clock.now += 1.0

    def setup(self, trainer, pl_module, stage):
        for callback in self.callbacks:
            clock = FrozenClock()
            self.clocks.append(clock)
            callback.estimated_cost = lambda trainer, step_seconds: 0.0
            callback.budget.clock = clock
            run, steps = callback.on_cadence, self.steps[type(callback).__name__]

            def recorded(trainer, *args, run=run, steps=steps, clock=clock):
                clock.now += 1.0
                steps.append(trainer.global_step)
                run(trainer, *args)

            callback.on_cadence = recorded


def main(out_path):
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(320, 5, generator=generator), torch.randint(0, 3, (320,), generator=generator))
    callbacks = [HessianSharpness(max_overhead=1.0, top_k=1, num_samples=16),
                 SaddleEscapeMonitor(max_overhead=1.0, num_samples=16)]
    recorder = Recorded(callbacks)
    trainer = pl.Trainer(max_steps=40, accelerator="cpu", devices=2, strategy="ddp", callbacks=[*callbacks, recorder],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Net(), DataLoader(dataset, batch_size=8, shuffle=False))
    gathered = [None, None]
    dist.all_gather_object(gathered, recorder.steps)
    if trainer.is_global_zero:
        with open(out_path, "w") as handle:
            json.dump({str(rank): steps for rank, steps in enumerate(gathered)}, handle)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
