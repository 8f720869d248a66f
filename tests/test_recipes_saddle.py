"""The deep linear saddle recipe: the teacher has the requested spectrum, the network starts near the
origin (a saddle), and the recipe trains from its YAML."""

from __future__ import annotations

import pytest
import torch
from recipe_helpers import runnable_recipe

from adai_lightning.cli import AdaiCLI
from adai_lightning.recipes.deep_linear import DeepLinearRegressor, TeacherRegressionDataModule


def test_teacher_has_the_requested_singular_values_and_targets_follow_it():
    data = TeacherRegressionDataModule(dim=6, singular_values=[3.0, 1.0], num_train=32, num_val=8)
    teacher = data.teacher()
    values = torch.linalg.svdvals(teacher)
    assert torch.allclose(values[:2], torch.tensor([3.0, 1.0]), atol=1e-5) and values[2:].abs().max() < 1e-5
    data.setup()
    x, y = data.splits["train"].tensors
    assert torch.allclose(y, x @ teacher.T) and len(data.splits["val"]) == 8
    with pytest.raises(ValueError, match="Invalid singular_values"):
        TeacherRegressionDataModule(dim=2, singular_values=[1.0, 1.0, 1.0])


def test_small_initialisation_starts_next_to_the_origin_saddle():
    model = DeepLinearRegressor(dim=10, width=10, depth=3, init_scale=0.01)
    x = torch.randn(64, 10)
    assert model(x).abs().max() < 1e-3  # the end-to-end map is ~init_scale**3
    with pytest.raises(ValueError, match="Invalid depth: 1"):
        DeepLinearRegressor(depth=1)


def test_saddle_recipe_trains_from_its_yaml(tmp_path):
    recipe = runnable_recipe("saddle_deep_linear.yaml", tmp_path)
    cli = AdaiCLI(args=["--config", str(recipe), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "20",
                        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"], run=False)
    before = [p.detach().clone() for p in cli.model.parameters()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 20 and type(cli.trainer.optimizers[0]).__name__ == "Adai"
    assert all(not torch.equal(a, b) for a, b in zip(before, cli.model.parameters()))
    assert cli.trainer.callback_metrics["train/loss_epoch"] > 1.0  # still on the first plateau
