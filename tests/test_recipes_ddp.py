"""The default recipe as a 2-process DDP fit on CPU (gloo), launched like a user would, to completion."""

from __future__ import annotations

import pytest
import torch
from recipe_helpers import run_cli, runnable_recipe

from adai_lightning import report


@pytest.mark.slow
def test_default_recipe_fits_with_ddp_on_two_cpu_processes(tmp_path):
    recipe = runnable_recipe("default.yaml", tmp_path)
    run_cli("fit", "--config", str(recipe), "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", timeout=240)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"  # the recipe's PeriodicCheckpoint: the final state
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6 and checkpoint["epoch"] == 2  # written as training ended, 2 epochs done
    optimizer_state = checkpoint["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 6 for s in optimizer_state.values())  # every rank-0 parameter stepped 6 times
    metrics = report.Metrics.read(report.find_metrics(tmp_path / "run"))  # rank 0 logged, once per step
    assert [step for step, _ in metrics.series["val/acc"]] == [2, 5]
