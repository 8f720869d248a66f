"""`adai-lightning compare` on the default recipe with tiny settings (2 optimizers x 1 seed, subprocesses),
and `adai-lightning report` of one of those real runs."""

from __future__ import annotations

import pytest
from recipe_helpers import run_cli, runnable_recipe

from adai_lightning import report
from adai_lightning.compare import mean_std, optimizer_args


def test_baseline_settings_follow_the_papers_correspondence():
    assert optimizer_args("Adai", 1.0) == []
    assert optimizer_args("SGD", 0.5) == ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05",
                                          "--optimizer.momentum", "0.9"]
    assert optimizer_args("Adam", 0.5)[-1] == "0.001"
    assert optimizer_args("AdaiW", 0.5) == ["--optimizer", "AdaiW"]
    assert mean_std([1.0, 3.0, None]) == "2 +- 1.4 (n=2)" and mean_std([None]) == "not logged"


@pytest.mark.slow
def test_compare_two_optimizers_on_the_default_recipe(tmp_path):
    recipe = runnable_recipe("default.yaml", tmp_path)
    proc = run_cli("compare", "--config", str(recipe), "--optimizers", "Adai,SGD", "--seeds", "1",
                   "--out", str(tmp_path / "cmp"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                   "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
                   "--trainer.enable_progress_bar", "false")
    assert "2/2 done" in proc.stdout
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[2].startswith("| Adai | test/acc |") and table[3].startswith("| SGD | test/acc |")
    assert "(n=1)" in table[2]
    for name in ("Adai_seed0", "SGD_seed0"):
        assert len(list((tmp_path / "cmp" / name).rglob("*.ckpt"))) == 1
    sgd_config = next((tmp_path / "cmp" / "SGD_seed0").rglob("config.yaml")).read_text()
    assert "torch.optim.SGD" in sgd_config and "lr: 0.05" in sgd_config
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert "base64," in (tmp_path / "cmp" / "compare.html").read_text()
    run_cli("report", str(tmp_path / "cmp" / "Adai_seed0"))  # the report of a real run: fit + test merged
    metrics = report.Metrics.read(report.find_metrics(tmp_path / "cmp" / "Adai_seed0"))
    assert metrics.has("train/loss_step") and metrics.has("val/acc") and metrics.has("test/acc")
    assert (tmp_path / "cmp" / "Adai_seed0" / "report.png").stat().st_size > 10_000
