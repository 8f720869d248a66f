"""The ``adai-lightning`` console-script entry point, ``adai_lightning.cli.main``, run in-process.

``main`` returns nothing, so each run writes its checkpoint and the test reads back what the trainer
really optimised with: Adai's param-group keys (``dampening``, ``decoupled``) and per-element state
(``beta1_prod``), the learning rate the optimizer was built with (``initial_lr``, kept by every
scheduler), and the scheduler's own arguments.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adai_lightning.cli import main

DEFAULT = str(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml")


def _main_checkpoint(tmp_path: Path, *extra: str) -> dict:
    main(["fit", "--config", DEFAULT, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
          "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", *extra])
    (path,) = tmp_path.glob("checkpoints/*.ckpt")
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize(("args", "lr", "decoupled"), [
    (["--optimizer", "AdaiW", "--optimizer.lr", "0.25"], 0.25, True),
    (["--optimizer=Adai"], 0.5, False),  # the recipe's own class: its lr stays
], ids=["adaiw-with-lr", "equals-form"])
def test_main_trains_with_the_named_adai(tmp_path: Path, args: list[str], lr: float, decoupled: bool) -> None:
    checkpoint = _main_checkpoint(tmp_path, *args)
    (optimizer_state,) = checkpoint["optimizer_states"]
    (group,) = optimizer_state["param_groups"]
    assert group["initial_lr"] == lr and group["decoupled"] is decoupled and group["dampening"] == 1.0
    assert all("beta1_prod" in state and state["step"] == 3 for state in optimizer_state["state"].values())


def test_main_takes_an_lr_scheduler_from_the_command_line(tmp_path: Path) -> None:
    checkpoint = _main_checkpoint(tmp_path, "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1",
                                  "--lr_scheduler.gamma", "0.1")
    (scheduler,) = checkpoint["lr_schedulers"]
    assert scheduler["step_size"] == 1 and scheduler["gamma"] == 0.1
    (group,) = checkpoint["optimizer_states"][0]["param_groups"]
    assert group["initial_lr"] == 0.5 and group["lr"] == pytest.approx(0.05)  # the recipe's lr, one epoch stepped
