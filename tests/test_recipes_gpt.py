"""The transformer recipe (``recipes/gpt_tiny.yaml``): the data split by file, the causal model, the recipe
end to end with all three callbacks, and its FSDP2 command line on 2 gloo ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from recipe_helpers import RECIPES, clean_env, runnable_recipe

from adai_lightning import report
from adai_lightning.cli import main
from adai_lightning.recipes import GPTLanguageModel, StdlibTextDataModule
from adai_lightning.recipes.gpt import TinyGPT
from adai_lightning.recipes.text_data import MissingDataError, TokenWindows, stdlib_root

HERE = Path(__file__).parent
MONITORS = ("adai_lightning.callbacks.InertiaMonitor", "adai_lightning.callbacks.HessianSharpness",
            "adai_lightning.callbacks.SaddleEscapeMonitor")
#: The recipe shrunk to seconds: a 2-block width-32 model, windows of 16 bytes from the first 10
#: stdlib files, 8 steps at Adai lr 0.3, every monitor's cadence within them, the CSV logger only.
TINY = {"model.init_args.d_model": 32, "model.init_args.n_layers": 2, "model.init_args.n_heads": 2,
        "data.init_args.block_size": 16, "data.init_args.batch_size": 8, "data.init_args.max_files": 10,
        "data.init_args.max_eval_windows": 16, "trainer.max_epochs": 2, "trainer.limit_train_batches": 4,
        "trainer.log_every_n_steps": 1, "optimizer.init_args.lr": 0.3}
CADENCE = {"adai_lightning.callbacks.InertiaMonitor": {"every_n_train_steps": 2},
           "adai_lightning.callbacks.HessianSharpness": {"every_n_train_steps": 4, "num_samples": 8},
           "adai_lightning.callbacks.SaddleEscapeMonitor": {"every_n_train_steps": 2, "num_samples": 8}}


def tiny_recipe(tmp_path: Path) -> Path:
    """``gpt_tiny.yaml`` with :data:`TINY` and its monitors at :data:`CADENCE` (other settings kept)."""
    path = runnable_recipe("gpt_tiny.yaml", tmp_path, TINY)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["logger"] = config["trainer"]["logger"][:1]  # CSV
    assert config["trainer"]["logger"][0]["class_path"].endswith("CSVLogger")
    for callback in config["trainer"]["callbacks"]:
        callback.setdefault("init_args", {}).update(CADENCE.get(callback["class_path"], {}))
    path.write_text(yaml.safe_dump(config))
    return path


def test_split_is_by_file_deterministic_and_disjoint():
    data = StdlibTextDataModule(block_size=16, max_files=30)
    data.setup()
    files = data.files
    first_30 = sorted(stdlib_root().glob("*.py"), key=lambda p: p.relative_to(stdlib_root()))[:30]
    assert sorted(files["train"] + files["val"] + files["test"]) == sorted(first_30)
    assert set(files["train"]).isdisjoint(files["val"]) and set(files["val"]).isdisjoint(files["test"])
    assert set(files["train"]).isdisjoint(files["test"]) and (len(files["val"]), len(files["test"])) == (3, 3)
    for split in ("train", "val", "test"):  # each split is its own files' bytes, nothing else
        assert data.tokens[split].numpy().tobytes() == b"".join(p.read_bytes() for p in files[split])
    again = StdlibTextDataModule(block_size=16, max_files=30)
    again.setup()
    assert again.files == files and again.corpus_summary() == data.corpus_summary()
    other = StdlibTextDataModule(block_size=16, max_files=30, split_seed=1)
    assert other.split_files()["val"] != files["val"]
    summary = data.corpus_summary()
    assert summary["corpus/train_files"] == 24 and summary["corpus/val_bytes"] == len(data.tokens["val"])


def test_windows_are_next_byte_pairs_and_evaluation_windows_are_evenly_spaced():
    tokens = torch.arange(101, dtype=torch.uint8)
    windows = TokenWindows(tokens, block_size=10)
    assert len(windows) == 10
    inputs, targets = windows[3]
    assert inputs.tolist() == list(range(30, 40)) and targets.tolist() == list(range(31, 41))
    capped = TokenWindows(tokens, block_size=10, max_windows=4)
    assert [int(capped[i][0][0]) for i in range(4)] == [0, 30, 60, 90]


def test_bad_data_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="Invalid max_files: 2"):
        StdlibTextDataModule(max_files=2)
    with pytest.raises(ValueError, match="Invalid max_eval_windows: 0"):
        StdlibTextDataModule(max_eval_windows=0)
    with pytest.raises(MissingDataError, match="Too few files"):
        StdlibTextDataModule(root=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="Invalid d_model: 30"):
        TinyGPT(d_model=30, n_heads=4)


def test_model_is_causal_with_a_tied_head():
    torch.manual_seed(0)
    model = TinyGPT(block_size=16, d_model=32, n_layers=2, n_heads=2).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])
    assert model.head.weight is model.token_embedding.weight
    recipe = yaml.safe_load((RECIPES / "gpt_tiny.yaml").read_text())["model"]["init_args"]
    size = sum(p.numel() for p in GPTLanguageModel(**{k: v for k, v in recipe.items() if k != "block_size"},
                                                   block_size=64).parameters())
    assert 3e5 < size < 3e6, size  # "a few hundred thousand to a few million parameters"


def test_recipe_trains_with_all_three_monitors(tmp_path):
    recipe = tiny_recipe(tmp_path)
    classes = [c["class_path"] for c in yaml.safe_load(recipe.read_text())["trainer"]["callbacks"]]
    assert all(monitor in classes for monitor in MONITORS)
    main(["fit", "--config", str(recipe), "--trainer.enable_progress_bar", "false"])
    metrics = report.Metrics.read(report.find_metrics(tmp_path / "run"))
    losses = metrics.xy("train/loss_step")[1]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3  # from ln(256) = 5.5 toward the bytes' entropy
    for stage in ("val", "test"):
        assert metrics.last(f"{stage}/ppl") == pytest.approx(math.exp(metrics.last(f"{stage}/loss")), rel=1e-5)
    for key in ("inertia/global/mean", "sharpness/lambda_max", "sharpness/stability_ratio", "saddle/lambda_min",
                "saddle/grad_norm"):
        values = metrics.xy(key)[1]
        assert values and all(map(math.isfinite, values)), key
    assert metrics.xy("sharpness/lambda_max")[0] == [3, 7]  # after steps 4 and 8 (logged 0-based)
    hparams = yaml.safe_load(next((tmp_path / "run" / "csv").rglob("hparams.yaml")).read_text())
    assert hparams["corpus/train_files"] + hparams["corpus/val_files"] + hparams["corpus/test_files"] == 10
    assert len(hparams["corpus/sha256"]) == 64


def run_script(config: Path, out: Path, mode: str) -> None:
    proc = subprocess.run([sys.executable, str(HERE / "recipes_gpt_fsdp2.py"), str(config), str(out), mode],
                          env=clean_env(), capture_output=True, text=True, timeout=400, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_fsdp2_command_line_with_all_monitors_matches_one_process_and_leaves_training_unchanged(tmp_path):
    """The recipe's FSDP2 command line (the three monitors, then the test split) on 2 gloo ranks: parameters
    are DTensors held by the optimizer (not stale pre-shard copies); both ranks log the same monitor values,
    within 1e-4 (relative; the drift cosines: absolute) of one process on the same global batch; the mean of the ranks' losses is the one-process
    loss at every step (Adai's vbar is reduced over the shards); training is bitwise the same without them."""
    config = tiny_recipe(tmp_path)
    for mode in ("fsdp2", "fsdp2_plain", "single"):
        run_script(config, tmp_path, mode)
    ranks = [json.loads((tmp_path / f"fsdp2_rank{r}.json").read_text()) for r in (0, 1)]
    plain = [json.loads((tmp_path / f"fsdp2_plain_rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single_rank0.json").read_text())
    assert all(all(r["all_dtensor"]) and all(r["optimizer_holds_module_params"]) for r in ranks)
    assert not any(single["all_dtensor"]) and all(single["optimizer_holds_module_params"])
    for watched, unwatched in zip(ranks, plain):
        assert watched["losses"] == unwatched["losses"] and watched["final"] == unwatched["final"]
        assert watched["test_loss"] == unwatched["test_loss"]
    assert ranks[0]["logged"] == ranks[1]["logged"]
    logged = {step: values for step, values in ranks[0]["logged"] if values}
    reference = {step: values for step, values in single["logged"] if values}
    assert logged.keys() == reference.keys() and len(logged) >= 4
    assert any("sharpness/lambda_max" in v for v in logged.values()) and any("saddle/lambda_min" in v for v in logged.values())
    for step, values in logged.items():
        # The drift cosines use lambda_min's Ritz *vector* from a 10-step float32 finite-difference Lanczos,
        # whose sums run in another order on two shards: a vector is only as accurate as the square root of
        # its value's accuracy (measured up to 1.9e-5 apart in cosine units), so they get 1e-4 in those units.
        drifts = {key for key in values if key.endswith("_drift")}
        assert {k: v for k, v in values.items() if k not in drifts} == pytest.approx(
            {k: v for k, v in reference[step].items() if k not in drifts}, rel=1e-4, abs=1e-6), step
        assert {k: values[k] for k in drifts} == pytest.approx({k: reference[step][k] for k in drifts}, abs=1e-4), step
    sharded = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert len(sharded) == len(single["losses"]) == 8
    assert sharded[0] == pytest.approx(single["losses"][0], rel=1e-6)  # same initial weights, same batch
    assert sharded == pytest.approx(single["losses"], rel=1e-4)
    assert sum(sharded[-3:]) < sum(sharded[:3]) - 0.3  # it trains
    assert ranks[0]["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4)
