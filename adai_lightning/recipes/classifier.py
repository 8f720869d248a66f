"""A generic image classifier LightningModule and a small CNN for 8x8 inputs."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn


class SmallConvNet(nn.Sequential):
    """Two 3x3 conv blocks and a linear head: enough for 8x8 digits, small enough for a CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes),
        )


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification of ``(image, label)`` batches with any backbone.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.
    It has no ``configure_optimizers``: the CLI's ``--optimizer`` / ``--lr_scheduler`` supply them.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = backbone
        self.accuracy = nn.ModuleDict({
            f"{stage}_acc": torchmetrics.classification.MulticlassAccuracy(num_classes=num_classes)
            for stage in ("train", "val", "test")
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")
