"""Byte-level language modelling on text every machine has offline: the Python standard library's own source.

The corpus is read from the running interpreter's installation (``sysconfig.get_paths()["stdlib"]``),
so nothing is downloaded and no tokenizer is needed (tokens are bytes, vocabulary 256). It differs
slightly between Python builds: :meth:`StdlibTextDataModule.corpus_summary` says what a run used
(files and bytes per split, a SHA-256 of them, the Python version), and the module logs it as
hyperparameters (``hparams.yaml`` of the CSV logger) when a trainer with loggers sets it up.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from adai_lightning.recipes._base import SplitDataModule
from adai_lightning.recipes.vision_data import MissingDataError

SPLITS = ("train", "val", "test")


class TokenWindows(Dataset):
    """Consecutive, non-overlapping windows of a token sequence: item ``i`` is
    ``(tokens[i*L : i*L+L], tokens[i*L+1 : i*L+L+1])`` (inputs and next-token targets, ``L = block_size``);
    ``max_windows`` keeps that many, evenly spaced over the sequence (all when None)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, max_windows: int | None = None) -> None:
        self.tokens, self.block_size = tokens, block_size
        count = (len(tokens) - 1) // block_size
        if max_windows is not None and max_windows < count:
            self.starts = torch.linspace(0, count - 1, max_windows).round().long() * block_size
        else:
            self.starts = torch.arange(count) * block_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        chunk = self.tokens[start:start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


class StdlibTextDataModule(SplitDataModule):
    """Bytes of the text files matching ``pattern`` in ``root`` (default: the top-level ``*.py`` modules
    of this interpreter's standard library), split by file into train / val / test, as windows of
    ``block_size`` tokens.

    The split is by file (no file contributes to two splits): the files, sorted by relative path
    (the first ``max_files`` of them if given), are permuted with ``split_seed``; the first
    ``val_fraction`` of them (at least one) are the validation files, the next ``test_fraction`` the test
    files, the rest training. Each split is its files' bytes concatenated in that order.
    ``max_eval_windows`` evenly spaced windows of the validation and test splits are kept (all when None),
    so that an evaluation costs a known number of forward passes.
    """

    vocab_size = 256

    def __init__(self, block_size: int = 64, batch_size: int = 32, root: str | None = None, pattern: str = "*.py",
                 max_files: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 split_seed: int = 0, max_eval_windows: int | None = None, num_workers: int = 0,
                 shuffle_seed: int | None = None) -> None:
        super().__init__(batch_size, num_workers, shuffle_seed)
        if block_size < 1:
            raise ValueError(f"Invalid block_size: {block_size}; it must be >= 1")
        if max_files is not None and max_files < 3:
            raise ValueError(f"Invalid max_files: {max_files}; it must be None or >= 3 (one file per split)")
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(f"Invalid val_fraction={val_fraction}, test_fraction={test_fraction}: both must be "
                             "> 0 and their sum < 1")
        if max_eval_windows is not None and max_eval_windows < 1:
            raise ValueError(f"Invalid max_eval_windows: {max_eval_windows}; it must be None or >= 1")
        self.save_hyperparameters()
        self.files: dict[str, list[Path]] = {}
        self.tokens: dict[str, torch.Tensor] = {}

    @property
    def root(self) -> Path:
        return Path(self.hparams.root) if self.hparams.root is not None else stdlib_root()

    def split_files(self) -> dict[str, list[Path]]:
        """The files of each split (deterministic for a given file list, ``max_files`` and ``split_seed``)."""
        root = self.root
        files = sorted((p for p in root.glob(self.hparams.pattern) if p.is_file()), key=lambda p: p.relative_to(root))
        if self.hparams.max_files is not None:
            files = files[:self.hparams.max_files]
        if len(files) < 3:
            raise MissingDataError(f"Too few files for a train / val / test split: {len(files)} match "
                                   f"{self.hparams.pattern!r} in {root}; give data.root a folder with at least 3")
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.hparams.split_seed)).tolist()
        n_val = max(1, int(len(files) * self.hparams.val_fraction))
        n_test = max(1, int(len(files) * self.hparams.test_fraction))
        chosen = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        return {split: [files[i] for i in chosen[split]] for split in SPLITS}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.files = self.split_files()
        for split in SPLITS:
            data = b"".join(path.read_bytes() for path in self.files[split])
            self.tokens[split] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        block = self.hparams.block_size
        self.splits = {"train": TokenWindows(self.tokens["train"], block),
                       **{split: TokenWindows(self.tokens[split], block, self.hparams.max_eval_windows)
                          for split in ("val", "test")}}
        summary = self.corpus_summary()
        rank_zero_info("text data: " + ", ".join(f"{s} {summary[f'corpus/{s}_files']} files "
                                                 f"{summary[f'corpus/{s}_bytes']} bytes" for s in SPLITS)
                       + f" from {summary['corpus/root']} (sha256 {summary['corpus/sha256'][:12]})")
        for logger in getattr(self.trainer, "loggers", None) or []:
            logger.log_hyperparams(summary)

    def corpus_summary(self) -> dict[str, Any]:
        """What the run trains and evaluates on: files, bytes and windows per split, a SHA-256 over the
        splits' file names and contents, the folder and the Python build that supplied them."""
        digest = hashlib.sha256()
        summary: dict[str, Any] = {"corpus/root": str(self.root), "corpus/pattern": self.hparams.pattern,
                                   "corpus/python": f"{platform.python_implementation()} {platform.python_version()}"}
        for split in SPLITS:
            for path in self.files[split]:
                digest.update(f"{split}:{path.relative_to(self.root)}\0".encode())
            digest.update(self.tokens[split].numpy().tobytes())
            summary[f"corpus/{split}_files"] = len(self.files[split])
            summary[f"corpus/{split}_bytes"] = len(self.tokens[split])
            summary[f"corpus/{split}_windows"] = len(self.splits[split])
        summary["corpus/sha256"] = digest.hexdigest()
        return summary
