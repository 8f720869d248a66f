"""The ``adai-lightning`` CLI and a user's own LightningCLI, run in-process for a few steps on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from adai_lightning import Adai, AdaiW
from adai_lightning.cli import AdaiCLI, qualify_optimizer_names

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "recipes" / "default.yaml")


def _quick(tmp_path: Path) -> list[str]:
    return [
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
    ]


def _fit(tmp_path: Path, *extra: str, cli_class=AdaiCLI) -> LightningCLI:
    args = ["fit", "--config", DEFAULT, *_quick(tmp_path), *extra]
    return cli_class(args=qualify_optimizer_names(args))


@pytest.mark.parametrize(
    ("args", "cls", "lr"),
    [
        (["--optimizer", "Adai"], Adai, 0.5),  # same class: the config's lr stays
        (["--optimizer=Adai", "--optimizer.lr", "0.25"], Adai, 0.25),
        (["--optimizer", "AdaiW", "--optimizer.lr", "0.5", "--optimizer.weight_decay", "0.01"], AdaiW, 0.5),
    ],
    ids=["short-name", "equals-form", "adaiw"],
)
def test_short_optimizer_names(tmp_path: Path, args: list[str], cls: type, lr: float) -> None:
    cli = _fit(tmp_path, *args, "--lr_scheduler", "null")
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is cls
    assert optimizer.defaults["lr"] == lr
    assert cli.trainer.global_step == 3
    assert optimizer.last_vbar is not None
    assert "test/acc" in cli.trainer.callback_metrics  # the recipe's test_after_fit ran


def test_test_after_fit_can_be_turned_off(tmp_path: Path) -> None:
    cli = _fit(tmp_path, "--test_after_fit", "false")
    assert cli.trainer.global_step == 3
    assert "test/acc" not in cli.trainer.callback_metrics


def test_yaml_optimizer_and_lr_scheduler(tmp_path: Path) -> None:
    config = tmp_path / "opt.yaml"
    config.write_text(
        "optimizer:\n  class_path: adai_lightning.Adai\n  init_args:\n    lr: 0.5\n    betas: [0.2, 0.95]\n"
        "lr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n  init_args:\n    step_size: 1\n    gamma: 0.5\n"
    )
    cli = _fit(tmp_path, "--config", str(config))
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, Adai) and optimizer.defaults["betas"] == (0.2, 0.95)
    (config_,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config_.scheduler, torch.optim.lr_scheduler.StepLR)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)  # one epoch: one StepLR step


def test_a_users_own_lightning_cli_finds_adai_by_short_name(tmp_path: Path) -> None:
    config = tmp_path / "plain.yaml"  # the recipe without the option only AdaiCLI adds
    config.write_text(Path(DEFAULT).read_text().replace("test_after_fit: true\n", ""))
    cli = LightningCLI(args=["fit", "--config", str(config), *_quick(tmp_path), "--optimizer", "Adai",
                             "--optimizer.lr", "0.5", "--lr_scheduler", "null"],
                       parser_kwargs={"parser_mode": "omegaconf"}, save_config_kwargs={"overwrite": True})
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is Adai and optimizer.defaults["lr"] == 0.5


def test_qualify_optimizer_names_leaves_other_arguments_alone() -> None:
    args = ["fit", "--optimizer", "SGD", "--model", "Adai", "--optimizer=AdaiW"]
    assert qualify_optimizer_names(args) == ["fit", "--optimizer", "SGD", "--model", "Adai",
                                             "--optimizer=adai_lightning.AdaiW"]
