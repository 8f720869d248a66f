"""A data module base for recipes whose data comes as named splits (train / val / test datasets).

The training loader is resumable mid-epoch and its order is reproducible: a torchdata
``StatefulDataLoader`` (Lightning saves its ``state_dict`` in every checkpoint and restores it on
resume) over an :class:`EpochShuffleSampler`, whose order depends only on a seed and the epoch,
never on the global RNG (which Lightning does not restore). A run killed at any step and resumed
from its checkpoint sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from a hash of ``parts`` (torch's CPU generator keeps only 32 bits of a seed, so
    parts cannot simply sit in separate bits)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class SeededItems(Dataset):
    """``dataset`` whose item ``(epoch, index)`` is ``dataset[index]`` drawn with the global torch RNG
    seeded from ``(seed, epoch, index)`` and restored afterwards: random augmentation (torchvision's
    crops and flips draw from it) is then a function of the item, wherever and whenever it is loaded.
    A plain ``index`` is epoch -1 (the Hessian probe's fixed subset reads items that way)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (-1, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]


class _ShuffleIterator:
    """One epoch of an :class:`EpochShuffleSampler`: its order and how far it got (a torchdata ``Stateful``)."""

    def __init__(self, sampler: EpochShuffleSampler, epoch: int, position: int = 0) -> None:
        self.sampler = sampler
        self.load_state_dict({"epoch": epoch, "position": position})

    def __iter__(self) -> _ShuffleIterator:
        return self

    def __next__(self) -> int | tuple[int, int]:
        if self.position >= len(self.order):
            raise StopIteration
        self.position += 1
        index = self.order[self.position - 1]
        return (self.epoch, index) if self.sampler.with_epoch else index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``position`` of ``epoch``'s order; an epoch saved complete continues with the next.

        Lightning resumes a checkpoint saved after an epoch's last batch with the iterator restored
        from it (it does not ask for a new one), so that iterator must yield the next epoch.
        """
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= len(self.sampler):
            self.epoch, self.position = self.epoch + 1, 0
        self.order = self.sampler.order(self.epoch)


class EpochShuffleSampler(DistributedSampler):
    """A random permutation of ``range(size)`` drawn from ``(seed, epoch)`` alone, split across
    ``num_replicas`` processes as ``DistributedSampler`` splits it (padded to a multiple, every
    ``num_replicas``-th index from ``rank``); with ``with_epoch`` it yields ``(epoch, index)`` pairs,
    the keys of :class:`SeededItems`.

    Lightning calls ``set_epoch`` at the start of every epoch. Each iterator remembers its epoch and
    position, and torchdata's ``StatefulDataLoader`` saves and restores them, so a resumed run
    continues the same epoch's order at the same sample. It is a ``DistributedSampler`` so that
    under DDP Lightning uses it as it is, rather than wrapping it in a sampler that would never pass
    the epoch on.
    """

    def __init__(self, size: int, seed: int, with_epoch: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler's attributes, without its process-group lookup (the data module knows the ranks)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"Invalid shuffle seed: {seed!r}; it must be an integer in [0, 2**32)")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank: {rank}; it must lie in [0, num_replicas={num_replicas})")
        self.size, self.seed, self.with_epoch = size, seed, with_epoch
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last, self.epoch = True, False, 0

    def order(self, epoch: int) -> list[int]:
        """This rank's share of the permutation of ``epoch``, drawn with ``derived_seed(seed, epoch)``."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        permutation = torch.randperm(self.size, generator=generator).tolist()
        padded = (permutation * math.ceil(self.total_size / max(self.size, 1)))[: self.total_size]
        return padded[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        return _ShuffleIterator(self, self.epoch)

    def __len__(self) -> int:
        return self.num_samples


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s value (``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) % 2**32


class SplitDataModule(pl.LightningDataModule):
    """Serves ``self.splits["train" | "val" | "test"]`` (filled by a subclass's ``setup``) as loaders.

    ``shuffle_seed`` fixes the training order (``None``: the run's ``seed_everything`` value, so that
    runs with different seeds also see different orders). A subclass whose training transforms are
    random sets ``augmented = True``: its items are then drawn through :class:`SeededItems`.
    """

    augmented = False

    def __init__(self, batch_size: int, num_workers: int, shuffle_seed: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}; it must be >= 1")
        if num_workers < 0:
            raise ValueError(f"Invalid num_workers: {num_workers}; it must be >= 0")
        if shuffle_seed is not None and not 0 <= shuffle_seed < 2**32:
            raise ValueError(f"Invalid shuffle_seed: {shuffle_seed}; it must be None or an integer in [0, 2**32)")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.splits: dict[str, Dataset] = {}

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, num_workers=self.num_workers,
                    persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> StatefulDataLoader:
        train = self.splits["train"]
        seed = run_seed() if self.shuffle_seed is None else self.shuffle_seed
        if self.augmented:
            train = SeededItems(train, seed)
        trainer = self.trainer  # None when the module is used without a Trainer
        ranks = dict(num_replicas=trainer.world_size, rank=trainer.global_rank) if trainer is not None else {}
        sampler = EpochShuffleSampler(len(train), seed, with_epoch=self.augmented, **ranks)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch 2.14
            warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
            return StatefulDataLoader(train, sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], shuffle=False, **self._loader_kwargs())
