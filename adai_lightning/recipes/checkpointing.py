"""Checkpoints that survive a kill: atomic writes, and a ``last`` that skips files which do not load.

``AtomicCheckpointIO`` (the recipes' ``trainer.plugins``) writes each checkpoint to a temporary file
in the target's own directory, flushes it to disk and renames it over the target (``os.replace``,
atomic on POSIX): a kill at any moment leaves either the old file or the new one, never a truncated
one. Lightning's own writer stages the file in the system temp directory, which is often another
file system, where its final move is a copy that a kill can cut short.

``resolve_checkpoint`` turns ``ckpt_path="last"`` into the newest checkpoint in the
``ModelCheckpoint`` folders that actually loads, warning about each newer one that does not, and
checks that an explicit path loads, raising :class:`CheckpointError` (one line naming the file).

``PeriodicCheckpoint`` also checkpoints the current step and stops the run on SIGTERM / SIGINT (see
``adai_lightning.recipes.interrupts``), keeps the epoch's training aggregates across a resume (see
``adai_lightning.recipes.epoch_metrics``), refuses a checkpoint saved by another number of processes,
and removes the temporary files a kill inside a write left behind. A write that fails for lack of space
or permission raises :class:`OutputWriteError` (one line naming the file and what to do).
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from adai_lightning.recipes.epoch_metrics import PendingAggregates, saved_aggregates
from adai_lightning.recipes.interrupts import Interrupted, StopSignals, announce

#: ``AtomicCheckpointIO``'s temporary files: ``.NAME.PID.tmp`` next to the target ``NAME``.
TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for resuming; the message names the file."""

    @classmethod
    def unreadable(cls, path: str | os.PathLike, error: BaseException) -> CheckpointError:
        reason = " ".join(str(error).split()) or type(error).__name__
        return cls(f"checkpoint {path} cannot be loaded ({reason})")


class OutputWriteError(OSError):
    """An output file (a checkpoint, a log) that could not be written: a full disk, a read-only folder.
    The message names the file and what to do; the CLI prints it as one ``error:`` line."""

    #: The ``errno`` values that mean "this place cannot take the run's output".
    ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

    @classmethod
    def failed(cls, path: str | os.PathLike, error: OSError, what: str = "path") -> OutputWriteError:
        advice = ("free space there or point --trainer.default_root_dir at another disk"
                  if error.errno in (errno.ENOSPC, errno.EDQUOT) else
                  "make the folder writable or point --trainer.default_root_dir at a writable one")
        kept = " (the checkpoints written before are intact)" if what == "checkpoint" else ""
        reason = error.strerror or str(error)
        return cls(error.errno, f"{what} {path}: {reason}; {advice}{kept}", str(path))

    @classmethod
    def found_in(cls, error: BaseException) -> OutputWriteError | None:
        """The :class:`OutputWriteError` that ``error`` is or was caused by, if it is about writing a file."""
        cause = os_error_in(error)
        if isinstance(cause, cls) or cause is None:
            return cause
        return cls.failed(cause.filename, cause) if cause.errno in cls.ERRNOS and cause.filename else None

    def __str__(self) -> str:
        return self.strerror


def os_error_in(error: BaseException) -> OSError | None:
    """``error`` or the first ``OSError`` among its causes and contexts (torch's zip writer reports a
    failed write as a ``RuntimeError`` raised while handling the ``OSError``)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic: temporary file, ``fsync``, ``os.replace``.

    A failed write (``ENOSPC``, a read-only folder) leaves the previous file in place and raises
    :class:`OutputWriteError` naming the target, which the CLI prints as one ``error:`` line.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.write(checkpoint, temporary)
                os.replace(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
            _fsync_directory(path.parent)  # make the rename itself durable
        except (OSError, RuntimeError) as error:
            cause = os_error_in(error)
            if cause is None:
                raise
            raise OutputWriteError.failed(path, cause, "checkpoint") from error

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


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` that a killed writer left (``.NAME.PID.tmp`` whose PID
    is no running process; a live PID's file may be a write in progress and stays). Returns them."""
    removed = []
    for path in folder.glob(".*.tmp") if folder.is_dir() else ():
        match = TEMPORARY.fullmatch(path.name)
        if match and not _process_exists(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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
    yet, so a fit ending between two periodic saves would otherwise leave an older ``last``.

    On SIGTERM or SIGINT it saves the step in progress once it completes, as a periodic save would (so
    ``--ckpt_path last`` resumes it exactly), and stops the run at the start of the next step or
    validation (that step's metrics are logged first) with :class:`Interrupted`: exit status 128 + the
    signal. At the start of a fit, rank 0 removes the stale temporary files of killed writes. Its
    checkpoints record the number of processes (resuming one with another number is refused) and the
    epoch's running training aggregates (``on_epoch=True`` values), which a mid-epoch resume folds back
    in (``adai_lightning.recipes.epoch_metrics``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_signals = StopSignals()
        self._stop_after = 0  # the signal whose checkpoint is saved: stop at the next chance
        self._aggregates = PendingAggregates()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            for path in remove_stale_temporaries(Path(self.dirpath)):
                rank_zero_info(f"removed {path}, left by a checkpoint write that was killed")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._stop_after = 0
        self.stop_signals.install(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._aggregates.merge(trainer)  # the resumed epoch's values, whole again before anything is saved
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if not self._stop_after:
            self._stop_after = self.stop_signals.agreed(trainer)
            if self._stop_after:
                self._save_now(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop_if_saved(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._aggregates.merge(trainer, final=True)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
        self._stop_after = self._stop_after or self.stop_signals.agreed(trainer)
        self._stop_if_saved(trainer)  # a signal during the last step or validation: no test after fit

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint["world_size"] = trainer.world_size
        checkpoint["epoch_aggregates"] = saved_aggregates(trainer)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint saved by another number of processes: its loader position counts batches
        of each process's share, so the run would skip or repeat data with another batch per step."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        saved = checkpoint.get("world_size", trainer.world_size)
        if saved != trainer.world_size:
            raise CheckpointError(
                f"checkpoint {trainer.ckpt_path} was saved by {saved} processes and this run has "
                f"{trainer.world_size}: resuming would skip or repeat data; resume with {saved} processes "
                f"(--trainer.devices x --trainer.num_nodes = {saved})")
        self._aggregates.load(checkpoint.pop("epoch_aggregates", None))  # popped: merged by one callback only

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.stop_signals.restore()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stop_signals.restore()
        super().teardown(trainer, pl_module, stage)

    def _save_now(self, trainer: pl.Trainer) -> None:
        """The periodic save, at this step."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def _stop_if_saved(self, trainer: pl.Trainer) -> None:
        if self._stop_after:
            self.stop_signals.restore()
            announce(trainer, self._stop_after, self.last_model_path or self._last_checkpoint_saved)
            raise Interrupted(self._stop_after)
