"""`adai-lightning compare` on the default recipe with tiny settings (2 optimizers x 1 seed, subprocesses),
and `adai-lightning report` of one of those real runs."""

from __future__ import annotations

import pytest
from recipe_helpers import run_cli, runnable_recipe

from recipe_helpers import RECIPES

from adai_lightning import report
from adai_lightning.compare import final_values, mean_std, optimizer_args, verdict_tables

CONFIGS = RECIPES / "optimizers"


def test_optimizers_come_from_the_recipes_optimizer_configs():
    default, saddle = RECIPES / "default.yaml", RECIPES / "saddle_deep_linear.yaml"
    assert optimizer_args("Adai", default, CONFIGS) == []
    assert optimizer_args("SGD", default, CONFIGS) == ["--config", str(CONFIGS / "sgd.yaml")]
    assert optimizer_args("SGD", saddle, CONFIGS) == ["--config", str(CONFIGS / "saddle_deep_linear" / "sgd.yaml")]
    assert optimizer_args("Adam", saddle, CONFIGS) == ["--config", str(CONFIGS / "adam.yaml")]
    assert optimizer_args("AdaiW", default, CONFIGS) == ["--optimizer", "AdaiW"]
    assert mean_std([1.0, 3.0, None]) == "2 +- 1.4 (n=2)" and mean_std([None]) == "not logged"


def test_verdict_tables_from_logged_runs(tmp_path):
    """Final values read from CSV logs (escape events in order as plateaus), then means and paired differences."""
    runs = {}
    for name, loss, escapes in (("Adai", [0.5, 0.1], [(300, 280.0), (500, 190.0)]), ("SGD", [0.6, 0.3], [(320, 310.0)])):
        for seed in range(2):
            folder = tmp_path / f"{name}_{seed}" / "csv" / "version_0"
            folder.mkdir(parents=True)
            lines = ["step,train/loss_epoch,saddle/escape_steps,sharpness/stability_ratio"]
            lines += [f"{step},,{length + seed},," for step, length in escapes]
            lines += [f"1000,{loss[seed]},,{0.5 + seed}"]
            (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
            runs.setdefault(name, []).append(final_values(tmp_path / f"{name}_{seed}")[1])
    labels, rows, diffs = verdict_tables(runs)
    assert labels == ["final train loss", "stability ratio", "plateau 1 steps", "plateau 2 steps"]
    assert rows[0] == ["Adai", "0.3 +- 0.28 (n=2)", "1 +- 0.71 (n=2)", "280.5 +- 0.71 (n=2)", "190.5 +- 0.71 (n=2)"]
    assert rows[1][4] == "not logged"  # SGD never left its second plateau
    assert diffs == [["Adai - SGD", "-0.15 +- 0.071 (n=2); Adai lower in 2/2, higher in 0/2",
                      "0 +- 0 (n=2); Adai lower in 0/2, higher in 0/2",
                      "-30 +- 0 (n=2); Adai lower in 2/2, higher in 0/2", "-"]]


@pytest.mark.slow
def test_compare_two_optimizers_on_the_default_recipe(tmp_path):
    recipe = runnable_recipe("default.yaml", tmp_path)
    proc = run_cli("compare", "--config", str(recipe), "--optimizers", "Adai,SGD", "--seeds", "1",
                   "--out", str(tmp_path / "cmp"), "--optimizer-configs", str(CONFIGS), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                   "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
                   "--trainer.enable_progress_bar", "false")
    assert "2/2 done" in proc.stdout
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[2].startswith("| optimizer | final train loss | test acc | test loss |")  # 3 steps: no lambda_max yet
    assert table[4].startswith("| Adai | ") and table[5].startswith("| SGD | ") and "(n=1)" in table[4]
    assert any(line.startswith("| Adai - SGD | ") and "Adai lower in" in line for line in table)
    for name in ("Adai_seed0", "SGD_seed0"):
        assert len(list((tmp_path / "cmp" / name).rglob("*.ckpt"))) == 1
    sgd_config = next((tmp_path / "cmp" / "SGD_seed0").rglob("config.yaml")).read_text()
    assert "torch.optim.SGD" in sgd_config and "lr: 0.1" in sgd_config  # recipes/optimizers/sgd.yaml
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert "base64," in (tmp_path / "cmp" / "compare.html").read_text()
    run_cli("report", str(tmp_path / "cmp" / "Adai_seed0"))  # the report of a real run: fit + test merged
    metrics = report.Metrics.read(report.find_metrics(tmp_path / "cmp" / "Adai_seed0"))
    assert metrics.has("train/loss_step") and metrics.has("val/acc") and metrics.has("test/acc")
    assert (tmp_path / "cmp" / "Adai_seed0" / "report.png").stat().st_size > 10_000
