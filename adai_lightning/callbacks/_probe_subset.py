"""The Hessian probe's evaluation subset: which samples, chosen without touching training's data pipeline.

Training draws its order from the train loader's sampler, its generator and the global RNG, and
iterating a loader afresh advances them (a ``DataLoader(..., generator=g)`` then yields another
order for the rest of training). So the subset is never taken by iterating a training loader:

- map-style dataset (``len`` and ``[i]``): ``num_samples`` indices drawn by ``randperm`` from a
  generator seeded with the probe's ``seed`` (the same indices for every optimizer, training seed
  and rank), read as ``dataset[i]`` and collated with the loader's ``collate_fn`` into batches of
  ``probe_batch_size`` samples (default: the loader's ``batch_size``, so batch-dependent layers,
  BatchNorm in train mode, see batches of the size training uses and memory stays that of a
  training batch; the last batch may be smaller);
- iterable dataset: the first ``num_samples`` items of a fresh ``iter(dataset)`` (not the
  loader's iterator), collated the same way;
- a ``dataloader=`` that is not a ``DataLoader`` (any iterable of batches): its first batches
  until they hold ``num_samples`` samples (counted as Lightning does, ``extract_batch_size``);
- a dict, list or tuple of loaders (Lightning's ``CombinedLoader``): each loader's subset as above,
  combined as the ``CombinedLoader`` mode combines them in training (``{"a": batch_a, "b":
  batch_b}``; ``"max_size_cycle"``: as many batches as the longest subset, the shorter ones
  cycled; ``"min_size"``: as many as the shortest; ``"max_size"``: the exhausted ones None).

:class:`SubsetRecord` holds what was chosen (per loader: the dataset indices, or how many leading
items or batches were taken) and goes into the callback's checkpoint, so a resumed run evaluates
exactly the same samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import DataLoader, IterableDataset


class ProbeError(RuntimeError):
    """Why the probe cannot run on this module or data, with the fix, in one line."""


class ProbeBatch(NamedTuple):
    """One batch of the subset, as ``training_step`` receives it, and its weight in the mean loss
    (the weights of the subset sum to 1)."""

    data: Any
    weight: float


@dataclass
class SubsetRecord:
    """What one loader contributed: ``indices`` into its dataset (map-style), or the number of
    leading items (``first_items``, iterable dataset) or batches (``first_batches``) taken."""

    indices: list[int] | None = None
    first_items: int | None = None
    first_batches: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"indices": None if self.indices is None else list(self.indices), "first_items": self.first_items,
                "first_batches": self.first_batches}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SubsetRecord:
        indices = state.get("indices")
        return cls(None if indices is None else [int(i) for i in indices], state.get("first_items"),
                   state.get("first_batches"))


def _is_map_style(dataset: Any) -> bool:
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _loader_batch_size(loader: DataLoader, key: str, batch_size: int | None) -> int | None:
    """``batch_size`` if given, else the loader's; None for a loader whose dataset gives whole batches."""
    if batch_size is not None and loader.batch_size is None and loader.batch_sampler is None:
        raise ProbeError(f"probe_batch_size={batch_size} cannot rebatch the train loader{key}: it has batch_size=None "
                         "(its dataset gives whole batches); leave probe_batch_size=None")
    if batch_size is not None:
        return batch_size
    size = loader.batch_size if loader.batch_size is not None else getattr(loader.batch_sampler, "batch_size", None)
    if size is None and loader.batch_sampler is not None:
        raise ProbeError(f"the train loader{key} has a batch_sampler without a batch_size, so the probe cannot form "
                         "batches like training's; pass dataloader=... (a loader of its own) to the callback")
    return size


def choose_indices(length: int, num_samples: int, seed: int) -> list[int]:
    """``min(num_samples, length)`` distinct indices, from a generator of their own seeded with ``seed``."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()


def _collated(loader: DataLoader, samples: list[Any], key: str, batch_size: int | None) -> list[tuple[Any, int]]:
    """``(batch, sample count)`` for each chunk of ``samples`` of ``batch_size`` (None: the loader's)."""
    size = _loader_batch_size(loader, key, batch_size)
    if size is None:
        return [(sample, extract_batch_size(sample)) for sample in samples]
    return [(loader.collate_fn(samples[i:i + size]), len(samples[i:i + size])) for i in range(0, len(samples), size)]


def _leaf_batches(loader: Any, num_samples: int, seed: int, record: SubsetRecord | None, key: str,
                  batch_size: int | None) -> tuple[list[tuple[Any, int]], SubsetRecord]:
    """One loader's subset as ``(batch, sample count)`` pairs, and its record (``record`` reuses a saved one)."""
    dataset = getattr(loader, "dataset", None) if isinstance(loader, DataLoader) else None
    if dataset is not None and _is_map_style(dataset):
        indices = record.indices if record is not None and record.indices is not None else \
            choose_indices(len(dataset), num_samples, seed)
        if indices and max(indices) >= len(dataset):
            raise ProbeError(f"the saved evaluation subset{key} has index {max(indices)} but the dataset has "
                             f"{len(dataset)} samples; resume with the same data")
        return _collated(loader, [dataset[i] for i in indices], key, batch_size), SubsetRecord(indices=indices)
    if dataset is not None:  # iterable dataset: a fresh iterator of its own
        count = record.first_items if record is not None and record.first_items is not None else num_samples
        items = []
        for item in iter(dataset):
            items.append(item)
            if len(items) == count:
                break
        return _collated(loader, items, key, batch_size), SubsetRecord(first_items=len(items))
    wanted = record.first_batches if record is not None and record.first_batches is not None else None
    taken, total = [], 0
    for batch in loader:  # a loader of the user's own (dataloader=): its first batches
        taken.append((batch, extract_batch_size(batch)))
        total += taken[-1][1]
        if len(taken) == wanted or (wanted is None and total >= num_samples):
            break
    return taken, SubsetRecord(first_batches=len(taken))


def _leaves(loaders: Any) -> tuple[list[tuple[Any, Any]], str]:
    """``[(key, loader)]`` and the container kind ("single", "dict" or "list")."""
    if isinstance(loaders, dict):
        return list(loaders.items()), "dict"
    if isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders):
        return list(enumerate(loaders)), "list"
    return [(None, loaders)], "single"


def evaluation_batches(loaders: Any, mode: str, num_samples: int, seed: int,
                       records: dict[str, SubsetRecord] | None, from_trainer: bool, batch_size: int | None = None
                       ) -> tuple[list[ProbeBatch], dict[str, SubsetRecord]]:
    """The subset of ``loaders`` (one loader, or a dict/list of them combined in ``mode``) as weighted
    batches of ``batch_size`` samples (None: each loader's batch size), and its records keyed by loader
    (``""`` for a single loader). ``records`` reuses saved ones.

    ``from_trainer``: the loaders are the trainer's own, so one that is not a ``DataLoader`` (it could
    only be iterated, which disturbs training) is refused with a request for ``dataloader=``.
    """
    leaves, kind = _leaves(loaders)
    per_leaf, new_records = {}, {}
    for key, loader in leaves:
        name = "" if key is None else str(key)
        if from_trainer and not isinstance(loader, DataLoader):
            raise ProbeError(f"the train loader{'' if key is None else f' {key!r}'} is a {type(loader).__name__}, "
                             "not a DataLoader: taking batches from it would disturb training; pass dataloader=... "
                             "(a loader of its own) to the callback")
        saved = None if records is None else records.get(name)
        per_leaf[key], new_records[name] = _leaf_batches(loader, num_samples, seed, saved,
                                                         "" if key is None else f" {key!r}", batch_size)
        if not per_leaf[key]:
            raise ProbeError(f"the loader{'' if key is None else f' {key!r}'} gave no samples for the evaluation subset")
    if kind == "single":
        pairs = per_leaf[None]
        total = sum(count for _, count in pairs)
        return [ProbeBatch(batch, count / total) for batch, count in pairs], new_records
    lengths = [len(pairs) for pairs in per_leaf.values()]
    length = min(lengths) if mode == "min_size" else max(lengths)
    combined = []
    for i in range(length):
        parts = {key: pairs[i % len(pairs)][0] if mode != "max_size" or i < len(pairs) else None
                 for key, pairs in per_leaf.items()}
        combined.append(parts if kind == "dict" else [parts[k] for k, _ in leaves])
    return [ProbeBatch(batch, 1.0 / length) for batch in combined], new_records


def expected_batches(loaders: Any, num_samples: int, batch_size: int | None = None) -> int:
    """How many batches the subset of ``loaders`` in batches of ``batch_size`` (None: the loaders') will have
    (for cost planning before it is taken)."""
    counts = []
    for _, loader in _leaves(loaders)[0]:
        size = (batch_size or loader.batch_size) if isinstance(loader, DataLoader) else None
        counts.append(math.ceil(num_samples / size) if size else 1)
    return max(counts) if counts else 1
