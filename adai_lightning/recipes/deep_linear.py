"""A deep linear network learning a low-rank linear teacher from small initialisation.

Trained from weights near zero, a deep linear network learns the teacher's singular modes one at a
time, strongest first (Saxe et al. 2014): between two modes the loss sits on a plateau around a saddle
point of the loss surface, then drops. That makes it the standard small testbed for saddle escape,
here for ``SaddleEscapeMonitor``. Synthetic and seeded: offline and fast on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from adai_lightning.recipes._base import SplitDataModule


class TeacherRegressionDataModule(SplitDataModule):
    """Gaussian inputs ``x`` in R^dim and targets ``W x``, ``W`` of rank ``len(singular_values)`` with
    those singular values and random (seeded) singular vectors; no label noise."""

    def __init__(self, dim: int = 10, singular_values: Sequence[float] = (5.0, 2.0, 0.8, 0.3),
                 num_train: int = 4096, num_val: int = 1024, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0, shuffle_seed: int | None = None) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        if not 0 < len(singular_values) <= dim:
            raise ValueError(f"Invalid singular_values: {list(singular_values)}; give 1 to dim={dim} values")
        if min(num_train, num_val) < 1:
            raise ValueError(f"Invalid num_train={num_train}, num_val={num_val}: both must be >= 1")
        self.save_hyperparameters()

    def teacher(self) -> torch.Tensor:
        """The ``(dim, dim)`` teacher matrix (the same for every seed-equal instance and rank)."""
        dim, values = self.hparams.dim, torch.tensor(list(self.hparams.singular_values))
        generator = torch.Generator().manual_seed(self.hparams.seed)
        left, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        right, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        rank = len(values)
        return left[:, :rank] @ torch.diag(values) @ right[:, :rank].T

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        teacher = self.teacher()
        generator = torch.Generator().manual_seed(self.hparams.seed + 1)
        sizes = {"train": self.hparams.num_train, "val": self.hparams.num_val, "test": self.hparams.num_val}
        for split, size in sizes.items():
            inputs = torch.randn(size, self.hparams.dim, generator=generator)
            self.splits[split] = TensorDataset(inputs, inputs @ teacher.T)


class DeepLinearRegressor(pl.LightningModule):
    """``depth`` bias-free linear layers (``dim -> width -> ... -> dim``), weights drawn from
    N(0, init_scale^2), trained on the squared error summed over outputs.

    Logs ``train/loss``, ``val/loss``, ``test/loss``; the CLI's ``--optimizer`` supplies the optimizer.
    """

    def __init__(self, dim: int = 10, width: int = 10, depth: int = 3, init_scale: float = 0.01) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"Invalid depth: {depth}; it must be >= 2 (one layer has no saddles)")
        if init_scale <= 0:
            raise ValueError(f"Invalid init_scale: {init_scale}; it must be > 0")
        self.save_hyperparameters()
        sizes = [dim] + [width] * (depth - 1) + [dim]
        self.layers = nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:])))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def _loss(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        loss = (self(x) - y).pow(2).sum(dim=1).mean()
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True,
                 sync_dist=stage != "train")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._loss(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._loss(batch, "test")
