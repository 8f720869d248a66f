"""scikit-learn's handwritten digits (1797 8x8 images, shipped with the package): real data, no download."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from adai_lightning.recipes._base import SplitDataModule


class DigitsDataModule(SplitDataModule):
    """The UCI handwritten digits as ``(N, 1, 8, 8)`` float images in [0, 1] with labels 0..9.

    A fixed, seeded split into train / val / test (``val_fraction`` and ``test_fraction`` of the
    1797 images), so that every run and every rank sees the same split.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, num_workers: int = 0, shuffle_seed: int | None = None) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"Invalid val_fraction={val_fraction}, test_fraction={test_fraction}: both must be > 0 "
                "and their sum < 1"
            )
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        n_val = int(len(labels) * self.hparams.val_fraction)
        n_test = int(len(labels) * self.hparams.test_fraction)
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        self.splits = {name: TensorDataset(images[idx], labels[idx]) for name, idx in parts.items()}
