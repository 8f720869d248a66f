"""SIGTERM / SIGINT mid-fit checkpoint the step and exit 128 + signal; run-time I/O errors are one line;
stale temporaries of killed writes are removed (issue 19, "Signals and run-time I/O").

The fast tests run a tiny model in this process: a callback sends the signal to this very process in
the middle of a step (before its ``training_step``), as a scheduler or Ctrl+C would. The end-to-end
``adai-lightning fit`` subprocess versions are in ``tests/test_resume_kill.py`` (slow).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import TensorDataset

from adai_lightning import Adai
from adai_lightning.recipes._base import SplitDataModule
from adai_lightning.recipes.checkpointing import (AtomicCheckpointIO, OutputWriteError, PeriodicCheckpoint,
                                                  remove_stale_temporaries)
from adai_lightning.recipes.interrupts import STOP_SIGNALS, Interrupted

STEPS_PER_EPOCH, EPOCHS = 6, 2


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return Adai(self.parameters(), lr=0.1)


class TinyData(SplitDataModule):
    def __init__(self) -> None:
        super().__init__(batch_size=8, num_workers=0, shuffle_seed=3)

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        self.splits["train"] = TensorDataset(torch.randn(8 * STEPS_PER_EPOCH, 4, generator=generator),
                                             torch.randint(0, 3, (8 * STEPS_PER_EPOCH,), generator=generator))


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process at the start of the step that makes ``global_step`` ``step``."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


class EpochValues(pl.Callback):
    """The logged ``train/loss_epoch`` of each epoch this trainer ends."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if "train/loss_epoch" in trainer.callback_metrics:
            self.values.append(trainer.callback_metrics["train/loss_epoch"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        self.on_train_epoch_start(trainer, pl_module)


def fit(folder: Path, *callbacks: pl.Callback, ckpt_path: str | None = None) -> tuple[Tiny, pl.Trainer]:
    torch.manual_seed(0)
    model = Tiny()
    checkpoint = PeriodicCheckpoint(dirpath=folder / "checkpoints", every_n_train_steps=4, save_last=True,
                                    enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoint, *callbacks], plugins=[AtomicCheckpointIO()],
                         default_root_dir=folder)
    trainer.fit(model, TinyData(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    epochs = EpochValues()
    model, trainer = fit(tmp_path_factory.mktemp("reference"), epochs)
    return {"weights": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(), "epochs": epochs.values}


def assert_equal_states(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_states(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_states(x, y)
    else:
        assert a == b


CASES = [(signum, step, name) for signum in STOP_SIGNALS
         for step, name in ((3, "mid-epoch"), (6, "epoch-end"), (12, "last-step"))]
FAST_CASES = {(signal.SIGTERM, 3), (signal.SIGINT, 6), (signal.SIGTERM, 12)}  # the others: slow


@pytest.mark.parametrize(("signum", "step"), [
    pytest.param(signum, step, id=f"{signal.Signals(signum).name}-{name}",
                 marks=() if (signum, step) in FAST_CASES else pytest.mark.slow) for signum, step, name in CASES])
def test_a_signal_checkpoints_the_step_exits_128_plus_signal_and_resumes_bitwise(tmp_path, reference, capfd,
                                                                                  signum, step):
    """Mid-epoch (no periodic save due), at the epoch's last batch, and at the run's last step: the
    run stops with status 128 + signal, ``last.ckpt`` holds that step, the handlers are put back, and
    the resumed run ends bitwise equal to the uninterrupted one."""
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with pytest.raises(Interrupted) as stopped:
        fit(tmp_path, SignalAt(signum, step))
    assert stopped.value.code == 128 + signum
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == handlers
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == step
    assert f"{signal.Signals(signum).name} received: stopped after step {step}, checkpoint {last}" in capfd.readouterr().err
    model, trainer = fit(tmp_path, ckpt_path=str(last))
    assert trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    assert_equal_states(model.state_dict(), reference["weights"])
    assert_equal_states(trainer.optimizers[0].state_dict(), reference["optimizer"])


def test_a_mid_epoch_resume_logs_the_whole_epochs_mean(tmp_path, reference):
    """``train/loss_epoch`` of the epoch a run stopped in (after 3 of its 6 batches) equals the
    uninterrupted run's bit for bit: the checkpoint holds the epoch's running sum and count."""
    with pytest.raises(Interrupted):
        fit(tmp_path, SignalAt(signal.SIGTERM, 3))
    epochs = EpochValues()
    fit(tmp_path, epochs, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert len(reference["epochs"]) == EPOCHS and epochs.values == reference["epochs"]


def test_a_second_signal_changes_nothing(tmp_path):
    class Twice(SignalAt):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            if trainer.global_step == self.step - 1:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stopped:
        fit(tmp_path, Twice(signal.SIGTERM, 2))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


# --- run-time I/O ---------------------------------------------------------------------------------------

class FullDisk(AtomicCheckpointIO):
    """Writes half a checkpoint, then fails as ``write(2)`` does on a full disk."""

    def write(self, checkpoint, path):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_old_checkpoint_and_names_the_file(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    with pytest.raises(OutputWriteError) as raised:
        FullDisk().save_checkpoint({"step": 2}, target)
    assert str(raised.value) == (f"checkpoint {target}: No space left on device; free space there or point "
                                 "--trainer.default_root_dir at another disk (the checkpoints written before are intact)")
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_output_errors_are_found_behind_the_errors_that_carry_them():
    """torch's zip writer turns a failed write into a RuntimeError raised while handling the OSError;
    a read-only folder is a PermissionError / EROFS naming the path; other errors are not output errors."""
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/runs/x/csv")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 250816 vs 250704")
    except RuntimeError as error:
        found = OutputWriteError.found_in(error)
    assert str(found) == ("path /runs/x/csv: Read-only file system; make the folder writable or point "
                          "--trainer.default_root_dir at a writable one")
    assert OutputWriteError.found_in(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None
    assert OutputWriteError.found_in(RuntimeError("shape mismatch")) is None


def test_cli_prints_one_line_when_the_disk_fills_during_training(tmp_path, capsys, monkeypatch):
    from adai_lightning.cli import main

    monkeypatch.setattr(AtomicCheckpointIO, "write", FullDisk.write)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(__file__).parents[1] / "recipes" / "default.yaml"),
              "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false", "--data.batch_size", "256",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]", "--trainer.callbacks+=adai_lightning.recipes.checkpointing.PeriodicCheckpoint",
              f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}", "--trainer.callbacks.every_n_train_steps=1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and lines[-1].startswith(f"error: checkpoint {tmp_path / 'checkpoints'}")
    assert not any("Traceback" in line for line in lines)


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.{int(dead.stdout)}.tmp"
    live = tmp_path / f".last.ckpt.{os.getpid()}.tmp"
    other = tmp_path / ".notes.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_fit_start_removes_stale_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "checkpoints" / f".epoch=0-step=4.ckpt.{int(dead.stdout)}.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    fit(tmp_path)
    assert not stale.exists()


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted at ``tmp_path / "mnt"`` (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fit_cli(root: Path) -> subprocess.CompletedProcess:
    """The default recipe, 1 epoch (20 steps), CSV log and a checkpoint every 10 steps (no monitoring
    callbacks) under ``root``, in a subprocess."""
    from recipe_helpers import ROOT, clean_env

    return subprocess.run([
        sys.executable, "-m", "adai_lightning", "fit", "--config", str(ROOT / "recipes" / "default.yaml"),
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root), "--test_after_fit", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "[]",
        "--trainer.logger+=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}",
        "--trainer.callbacks", "[]", "--trainer.callbacks+=adai_lightning.recipes.checkpointing.PeriodicCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'checkpoints'}", "--trainer.callbacks.every_n_train_steps=10",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks.enable_version_counter=false",
    ], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=280)


@pytest.mark.slow
def test_a_full_tmpfs_ends_in_one_line_and_keeps_the_checkpoints_written(tmpfs):
    """Checkpoints of 363 KB on a 1 MiB tmpfs: the first two fit, the next write fails."""
    proc = fit_cli(tmpfs / "run")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: checkpoint {tmpfs / 'run' / 'checkpoints'}/") and "No space left" in errors[0]
    last = torch.load(tmpfs / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 10 and not list((tmpfs / "run" / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_a_read_only_output_folder_ends_in_one_line(tmpfs):
    (tmpfs / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = fit_cli(tmpfs / "run")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert proc.returncode == 2 and errors == [
        f"error: path {tmpfs / 'run' / 'lightning_logs'}: Read-only file system; make the folder writable or "
        "point --trainer.default_root_dir at a writable one"], proc.stderr[-3000:]
