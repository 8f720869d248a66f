"""Resume mismatches are loud (issue 19): another number of processes is refused in one line, and a
configured optimizer value that the checkpoint overrides is named in a warning.

The 2-process versions (saved by DDP, resumed by 1 process; DDP killed and resumed bitwise) are in
``tests/test_resume_ddp.py`` (slow).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from adai_lightning.cli import AdaiCLI, main

DEFAULT = str(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml")


def quick(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", DEFAULT, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false", "--data.batch_size", "256",
            "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]",
            "--trainer.callbacks+=adai_lightning.recipes.checkpointing.PeriodicCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}", "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.callbacks.save_last=true", *extra]


def resume_warnings(tmp_path: Path, *extra: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AdaiCLI(args=quick(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last", *extra))
    return [str(w.message) for w in caught if "does not apply" in str(w.message)]


def test_resuming_with_other_settings_is_loud(tmp_path, capsys):
    """Optimizer values: the recipe's cosine schedule has moved the saved lr; only values that differ
    from the configured ones (``initial_lr`` for lr) warn, one warning per value; the checkpoint's values
    are the ones used. Another number of processes: one line, exit 2 (the checkpoint is made to say 2)."""
    AdaiCLI(args=quick(tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_warnings(tmp_path, "--trainer.limit_train_batches", "3") == []
    messages = resume_warnings(tmp_path, "--trainer.limit_train_batches", "4", "--optimizer.lr", "0.05",
                               "--optimizer.eps", "0.0001")
    assert messages == [
        f"--optimizer.lr 0.05 does not apply: resuming from {last} restores the optimizer's saved lr = 0.5; "
        "start a new run to change it",
        f"--optimizer.eps 0.0001 does not apply: resuming from {last} restores the optimizer's saved eps = 0.001; "
        "start a new run to change it"]
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["eps"] == 0.001 and checkpoint["world_size"] == 1

    checkpoint["world_size"] = 2
    torch.save(checkpoint, last)
    with pytest.raises(SystemExit) as exit_info:
        main(quick(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and lines[-1] == (
        f"error: checkpoint {last} was saved by 2 processes and this run has 1: resuming would skip or repeat "
        "data; resume with 2 processes (--trainer.devices x --trainer.num_nodes = 2)")
