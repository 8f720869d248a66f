"""Checkpoints that survive a kill: atomic writes, and a ``last`` that skips files which do not load.

``AtomicCheckpointIO`` (the recipes' ``trainer.plugins``) writes each checkpoint to a temporary file
in the target's own directory, flushes it to disk and renames it over the target (``os.replace``,
atomic on POSIX): a kill at any moment leaves either the old file or the new one, never a truncated
one. Lightning's own writer stages the file in the system temp directory, which is often another
file system, where its final move is a copy that a kill can cut short.

``resolve_checkpoint`` turns ``ckpt_path="last"`` into the newest checkpoint in the
``ModelCheckpoint`` folders that actually loads, warning about each newer one that does not, and
checks that an explicit path loads, raising :class:`CheckpointError` (one line naming the file).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for resuming; the message names the file."""

    @classmethod
    def unreadable(cls, path: str | os.PathLike, error: BaseException) -> CheckpointError:
        reason = " ".join(str(error).split()) or type(error).__name__
        return cls(f"checkpoint {path} cannot be loaded ({reason})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic: temporary file, ``fsync``, ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.write(checkpoint, temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_directory(path.parent)  # make the rename itself durable

    def write(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Write ``checkpoint`` to ``path`` and flush it to the disk."""
        import torch

        with open(path, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_folders(trainer: pl.Trainer) -> list[Path]:
    """The folders the trainer's ``ModelCheckpoint`` callbacks write to (those known before fit)."""
    folders = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.dirpath:
                folders.append(Path(callback.dirpath))
            folders.extend(Path(p).parent for p in callback._find_last_checkpoints(trainer))
    return list(dict.fromkeys(folders))


def newest_first(folders: Iterable[Path]) -> list[Path]:
    """Every ``*.ckpt`` in ``folders``, newest first (``last.ckpt`` first among equally new files)."""
    files = {p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt") if p.is_file()}
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.stem.startswith("last")), reverse=True)


def check_loads(path: Path, load: Callable[[Path], Any]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless ``load(path)`` reads it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        load(path)
    except Exception as error:  # torch raises RuntimeError, pickle/zip errors, EOFError...
        raise CheckpointError.unreadable(path, error) from error


def newest_loadable(candidates: list[Path], load: Callable[[Path], Any]) -> Path | None:
    """The first of ``candidates`` that loads; a warning names each one before it that does not."""
    for path in candidates:
        try:
            check_loads(path, load)
            return path
        except CheckpointError as error:
            warnings.warn(f"{error}; trying the next newest checkpoint", stacklevel=2)
    if candidates:
        raise CheckpointError(f"no checkpoint in {sorted({str(p.parent) for p in candidates})} loads")
    return None


def resolve_checkpoint(trainer: pl.Trainer, ckpt_path: str | os.PathLike | None) -> str | None:
    """The checkpoint to resume from: ``"last"`` becomes the newest one that loads (it stays ``"last"``
    when there is none yet: Lightning then warns and starts a fresh run); a given path must load."""
    def load(path: Path) -> Any:
        return trainer.strategy.checkpoint_io.load_checkpoint(path, map_location="cpu", weights_only=False)

    if ckpt_path == "last":
        found = newest_loadable(newest_first(checkpoint_folders(trainer)), load)
        return ckpt_path if found is None else str(found)
    if ckpt_path is None or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry") \
            or "://" in str(ckpt_path):
        return ckpt_path  # Lightning's own lookups, and remote files, stay Lightning's
    check_loads(Path(ckpt_path), load)
    return str(ckpt_path)


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for periodic saves (``every_n_train_steps``) whose ``last`` checkpoint also
    holds the final state: Lightning writes ``last`` at the end of training only when nothing was saved
    yet, so a fit ending between two periodic saves would otherwise leave an older ``last``."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
