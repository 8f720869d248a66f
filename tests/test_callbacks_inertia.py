"""InertiaMonitor: exact statistics against the paper's formula in float64, keys, constant momentum,
validation, state, side effects, both Lightning packages, TensorBoard histograms."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning import Adai
from adai_lightning.callbacks import InertiaMonitor
from adai_lightning.callbacks import inertia as inertia_module
from adai_lightning.callbacks.inertia import STATS, ParamInertia, adai_statistics, constant_summary

QUANTILE_STATS = dict(zip(("q05", "q25", "q50", "q75", "q95"), (0.05, 0.25, 0.5, 0.75, 0.95)))


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory: ``self.logged[step][key] = value``."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    name = "recording"
    version = 0
    experiment = None

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.setdefault(step, {}).update(metrics)

    def inertia(self) -> dict[int, dict[str, float]]:
        return {step: {k: v for k, v in m.items() if k.startswith("inertia/")} for step, m in self.logged.items()
                if any(k.startswith("inertia/") for k in m)}


def _loader(features: int = 4, n: int = 24, batch_size: int = 6) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    x[:, 0] = 0.0  # the first column of body.0.weight never gets a gradient: its beta1 stays at 1 - eps
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class TinyNet(LightningModule):
    """Two top-level modules, a parameter of its own and one the optimizer holds but the module does not name.

    Two param groups with different ``eps`` and a large ``beta0`` so that both clips occur.
    """

    def __init__(self, optimizer: str = "adai", batchnorm: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5) if batchnorm else nn.Identity(), nn.Tanh(),
                                  nn.Dropout(0.2))
        self.head = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.hidden = [nn.Parameter(torch.zeros(3))]  # a list: not registered, so named_parameters() skips it
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(self.body(x)) * self.scale + self.hidden[0]
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        groups = [{"params": [*self.body.parameters(), self.scale]},
                  {"params": [*self.head.parameters(), self.hidden[0]], "eps": 0.05}]
        if self.optimizer == "adai":
            return Adai(groups, lr=0.3, betas=(0.5, 0.9))
        if self.optimizer == "sgd":
            groups[1]["momentum"] = 0.0
            return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        if self.optimizer == "adam":
            groups[1]["betas"] = (0.5, 0.999)
            return torch.optim.Adam(groups, lr=0.01, betas=(0.8, 0.99))
        return torch.optim.RMSprop(groups, lr=0.01)


def _fit(model: LightningModule, callbacks: list, logger=None, max_epochs: int = 1, tmp_path: Path | None = None,
         **trainer_kwargs) -> Trainer:
    seed_everything(0)
    trainer = Trainer(max_epochs=max_epochs, logger=logger if logger is not None else False, callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu", devices=1, deterministic=True, default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(model, _loader())
    return trainer


def _expected(values: np.ndarray, n_zero: int, n_max: int, ratio_sum: float) -> dict[str, float]:
    out = {"mean": values.mean(), "std": values.std(), "frac_zero": n_zero / values.size,
           "frac_max": n_max / values.size, "ratio_mean": ratio_sum / values.size}
    out.update({key: np.quantile(values, q) for key, q in QUANTILE_STATS.items()})
    return out


def test_statistics_equal_the_papers_formula_in_float64() -> None:
    logger = RecordingLogger()
    model = TinyNet()
    trainer = _fit(model, [InertiaMonitor(every_n_train_steps=4, per_parameter=True)], logger)  # 4 batches: logs after the last one
    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in model.named_parameters()} | {id(model.hidden[0]): "_unnamed.1.2"}

    vhats, eps = {}, {}
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for param in group["params"]:
            state = optimizer.state[param]
            vhats[names[id(param)]] = state["exp_avg_sq"].double().flatten() / (1 - beta2 ** state["step"])
            eps[names[id(param)]] = group["eps"]
    vbar = torch.cat(list(vhats.values())).mean()
    beta0 = optimizer.param_groups[0]["betas"][0]
    per_param = {}
    for name, vhat in vhats.items():
        ratio = vhat / vbar
        beta1 = (1 - beta0 * ratio).clamp(0, 1 - eps[name])
        per_param[name] = (beta1.numpy(), int((beta1 == 0).sum()), int((beta1 == 1 - eps[name]).sum()),
                           float(ratio.sum()))

    def merged(members):
        return (np.concatenate([per_param[m][0] for m in members]), *(sum(per_param[m][i] for m in members)
                                                                     for i in (1, 2, 3)))

    modules = {"body": ["body.0.weight", "body.0.bias"], "head": ["head.weight", "head.bias"],
               "scale": ["scale"], "_unnamed": ["_unnamed.1.2"]}
    expected = {f"inertia/param/{name}/": _expected(*merged([name])) for name in per_param}
    expected |= {f"inertia/module/{module}/": _expected(*merged(members)) for module, members in modules.items()}
    expected["inertia/global/"] = _expected(*merged(list(per_param)))

    ((step, logged),) = logger.inertia().items()
    assert step == 3  # the step Lightning logs the 4th batch's metrics at
    # skipped_steps: logged because Adai skips non-finite steps by default (none here)
    assert set(logged) == {prefix + stat for prefix in expected for stat in STATS} | {"inertia/skipped_steps"}
    assert logged["inertia/skipped_steps"] == 0.0
    for prefix, stats in expected.items():
        for stat, value in stats.items():
            assert logged[prefix + stat] == pytest.approx(value, abs=2e-6, rel=1e-5), prefix + stat
    fractions = {stat: logged["inertia/global/" + stat] for stat in ("frac_zero", "frac_max")}
    assert all(0 < f < 1 for f in fractions.values()), fractions  # both clips really occurred
    assert logged["inertia/param/head.weight/frac_max"] != logged["inertia/param/body.0.weight/frac_max"]


def test_quantiles_of_large_tensors_come_from_a_strided_subsample(monkeypatch) -> None:
    monkeypatch.setattr(inertia_module, "QUANTILE_SAMPLE_SIZE", 10)
    values = torch.rand(95, generator=torch.Generator().manual_seed(1))
    entry = ParamInertia("m", values, torch.tensor(0), torch.tensor(0), values.sum())
    samples = {}
    scalars = adai_statistics({"m": entry}, per_parameter=False, histogram=samples.__setitem__)
    sample = values[::10].double().numpy()
    assert [scalars[f"global/{q}"] for q in QUANTILE_STATS] == pytest.approx(
        np.quantile(sample, list(QUANTILE_STATS.values())), abs=1e-6)
    assert samples.keys() == {"module/m/beta1", "global/beta1"}
    assert scalars["global/mean"] == pytest.approx(values.double().mean().item(), abs=1e-6)  # every element
    histogram = samples["global/beta1"]  # every element too, not the quantiles' subsample
    reference = values.double().numpy()
    counts, edges = np.histogram(reference, bins=inertia_module.HISTOGRAM_BINS, range=(reference.min(), reference.max()))
    assert histogram.num == 95 and histogram.bucket_counts == counts.tolist()
    assert histogram.bucket_limits == pytest.approx(edges[1:].tolist(), abs=1e-6)
    assert (histogram.min, histogram.max) == pytest.approx((reference.min(), reference.max()), abs=1e-7)
    assert (histogram.sum, histogram.sum_squares) == pytest.approx((reference.sum(), (reference ** 2).sum()), rel=1e-6)


def test_histogram_of_one_repeated_value_is_a_single_bucket() -> None:
    values = torch.full((7,), 0.9)
    entry = ParamInertia("m", values, torch.tensor(0), torch.tensor(0), values.sum())
    samples = {}
    adai_statistics({"m": entry}, per_parameter=False, histogram=samples.__setitem__)
    histogram = samples["global/beta1"]
    assert histogram.bucket_counts == [7.0] and histogram.bucket_limits == [pytest.approx(0.9)]


def test_csv_logger_shows_every_key_at_the_cadence(tmp_path: Path) -> None:
    _fit(TinyNet(), [InertiaMonitor(every_n_train_steps=2)], CSVLogger(tmp_path), max_epochs=2)
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("inertia/global/mean")]
    assert [int(row["step"]) for row in rows] == [1, 3, 5, 7]
    assert not any(key.startswith("inertia/param/") for key in rows[0])  # per module by default
    for key in ("inertia/module/body/", "inertia/module/head/", "inertia/global/"):
        for stat in STATS:
            assert all(math.isfinite(float(row[key + stat])) for row in rows), key + stat


@pytest.mark.parametrize(("optimizer", "momenta"), [("sgd", (0.9, 0.0)), ("adam", (0.8, 0.5))])
def test_constant_momentum_under_the_same_keys(optimizer: str, momenta: tuple[float, float]) -> None:
    logger = RecordingLogger()
    model = TinyNet(optimizer)
    _fit(model, [InertiaMonitor(every_n_train_steps=4, per_parameter=True)], logger)
    ((_, logged),) = logger.inertia().items()
    first, second = momenta
    assert not any(key.endswith("ratio_mean") for key in logged)
    for key, momentum in (("param/body.0.weight", first), ("module/body", first), ("param/head.bias", second),
                          ("param/_unnamed.1.2", second)):
        stats = {stat: logged[f"inertia/{key}/{stat}"] for stat in STATS[:-1]}
        assert stats == {"mean": momentum, "std": 0.0, **{q: momentum for q in QUANTILE_STATS},
                         "frac_zero": float(momentum == 0), "frac_max": 0.0}
    n_first = sum(p.numel() for p in [*model.body.parameters(), model.scale])
    values = np.array([first] * n_first + [second] * (18 + 3))  # head: 15 + 3, hidden: 3
    expected = _expected(values, int((values == 0).sum()), 0, 0.0)
    for stat in STATS[:-1]:
        assert logged[f"inertia/global/{stat}"] == pytest.approx(expected[stat], abs=1e-12), stat


def test_constant_summary_matches_numpy_on_the_materialised_values() -> None:
    momenta = [(0.9, 7), (0.0, 3), (0.5, 11), (0.9, 2)]
    values = np.concatenate([np.full(n, m) for m, n in momenta])
    expected = _expected(values, 3, 0, 0.0)
    summary = constant_summary(momenta)
    assert summary == pytest.approx({k: v for k, v in expected.items() if k != "ratio_mean"}, abs=1e-12)


def test_an_unknown_optimizer_warns_once_and_logs_nothing() -> None:
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="does not know the momentum of RMSprop") as record:
        _fit(TinyNet("rmsprop"), [InertiaMonitor(every_n_train_steps=1)], logger)
    assert sum("InertiaMonitor" in str(w.message) for w in record) == 1
    assert logger.inertia() == {}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every_n_train_steps": 0}, "every_n_train_steps: 0"),
    ({"every_n_train_steps": 2.5}, "every_n_train_steps: 2.5"),
    ({"every_n_train_steps": True}, "every_n_train_steps: True"),
    ({"every_n_epochs": -1}, "every_n_epochs: -1"),
    ({"every_n_train_steps": None}, "both are None"),
    ({"per_parameter": "yes"}, "per_parameter: 'yes'"),
    ({"histograms": 1}, "histograms: 1"),
])
def test_invalid_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InertiaMonitor(**kwargs)


def test_state_survives_a_checkpoint_and_two_instances_coexist(tmp_path: Path) -> None:
    every_step, every_epoch = InertiaMonitor(every_n_train_steps=3), InertiaMonitor(None, every_n_epochs=1)
    assert every_step.state_key != every_epoch.state_key
    logger = RecordingLogger()
    trainer = _fit(TinyNet(), [every_step, every_epoch], logger)
    assert every_step.state_dict() == {"last_step": 3} and every_epoch.state_dict() == {"last_step": 4}
    # Lightning's step index: global_step - 1 inside a batch (as training_step's own logs), global_step at an epoch end
    assert sorted(logger.inertia()) == [2, 4]
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["callbacks"][every_step.state_key] == {"last_step": 3}

    restored = InertiaMonitor(every_n_train_steps=3)
    restored.load_state_dict(every_step.state_dict())
    assert restored.state_dict() == every_step.state_dict()
    resumed_logger = RecordingLogger()
    seed_everything(0)
    resumed = InertiaMonitor(every_n_train_steps=3)
    Trainer(max_epochs=2, logger=resumed_logger, callbacks=[resumed], enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False).fit(TinyNet(), _loader(), ckpt_path=path)
    assert resumed.state_dict() == {"last_step": 6}
    assert sorted(resumed_logger.inertia()) == [5]  # the series goes on at step 6, nothing repeated


def _snapshot(model: nn.Module, trainer: Trainer) -> list[torch.Tensor]:
    optimizer_state = trainer.optimizers[0].state_dict()["state"]
    return [*model.state_dict().values(), *model.hidden, torch.get_rng_state(),
            *(torch.as_tensor(value) for state in optimizer_state.values() for value in state.values())]


def test_training_is_bitwise_identical_with_the_callback() -> None:
    runs = []
    for callbacks in ([], [InertiaMonitor(every_n_train_steps=1, every_n_epochs=1)]):
        seed_everything(0)
        model = TinyNet(batchnorm=True)
        trainer = _fit(model, callbacks, RecordingLogger(), max_epochs=2)
        runs.append((_snapshot(model, trainer), model.training))
    (before, mode_before), (after, mode_after) = runs
    assert mode_before == mode_after
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


def test_works_in_a_pytorch_lightning_trainer() -> None:
    pytorch_lightning = pytest.importorskip("pytorch_lightning")

    class PlainNet(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return Adai(self.parameters(), lr=0.5)

    logger = RecordingLogger()
    trainer = pytorch_lightning.Trainer(max_epochs=1, logger=logger,
                                        callbacks=[InertiaMonitor(every_n_train_steps=2, per_parameter=True)],
                                        enable_progress_bar=False, enable_checkpointing=False,
                                        enable_model_summary=False)
    trainer.fit(PlainNet(), _loader())
    logged = logger.inertia()
    assert sorted(logged) == [1, 3]
    assert {"inertia/param/layer.weight/q50", "inertia/module/layer/mean", "inertia/global/ratio_mean"} <= set(logged[3])


def test_tensorboard_gets_beta1_histograms(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit(TinyNet(), [InertiaMonitor(every_n_train_steps=2)], TensorBoardLogger(tmp_path, name="tb"))
    (events,) = tmp_path.glob("tb/version_0/events.out.tfevents.*")
    tags = EventAccumulator(str(events), size_guidance={"histograms": 0}).Reload().Tags()
    expected = {f"inertia/module/{m}/beta1" for m in ("body", "head", "scale", "_unnamed")} | {"inertia/global/beta1"}
    assert expected <= set(tags["histograms"])
    assert "inertia/global/q50" in tags["scalars"]


class TwoOptimizers(LightningModule):
    """Manual optimisation with Adai for one layer and SGD for the other."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.second(self.first(batch[0])), batch[1]))
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self):
        return Adai(self.first.parameters()), torch.optim.SGD(self.second.parameters(), lr=0.1, momentum=0.7)


def test_several_optimizers_get_their_own_prefix() -> None:
    logger = RecordingLogger()
    _fit(TwoOptimizers(), [InertiaMonitor(every_n_train_steps=2, per_parameter=False)], logger)
    logged = logger.inertia()
    keys = set().union(*logged.values())
    assert {"inertia/opt0/module/first/ratio_mean", "inertia/opt0/global/q95"} <= keys
    assert not any(key.startswith("inertia/opt0/param/") for key in keys)
    last = logged[max(logged)]
    assert last["inertia/opt1/global/mean"] == 0.7 and "inertia/opt1/global/ratio_mean" not in last


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(mode: str, out_dir: Path) -> list[dict]:
    """Run tests/callbacks_inertia_dist.py in a clean environment; each rank's JSON output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    script = Path(__file__).with_name("callbacks_inertia_dist.py")
    result = subprocess.run([sys.executable, str(script), mode, str(_free_port()), str(out_dir)], env=env,
                            timeout=120, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["fsdp2", "zero"])
def test_sharded_statistics_are_global_and_identical_on_every_rank(tmp_path: Path, mode: str) -> None:
    ranks = _run_two_ranks(mode, tmp_path)
    assert ranks[0]["scalars"] == ranks[1]["scalars"]
    beta1 = {}  # each parameter's beta1, its ranks' parts in rank order (FSDP2 shards dim 0)
    for rank in ranks:
        for name, part in rank["reference"].items():
            beta1.setdefault(name, []).extend(part)
    assert mode == "fsdp2" or all(len(rank["reference"]) < len(beta1) for rank in ranks)  # ZeRO: split by param
    scalars = ranks[0]["scalars"]
    everything = np.concatenate([np.array(v) for v in beta1.values()])
    for prefix, values in [*((f"param/{n}/", np.array(v)) for n, v in beta1.items()), ("global/", everything)]:
        expected = _expected(values, int((values == 0).sum()), 0, 0.0)
        for stat in ("mean", "std", "frac_zero", *QUANTILE_STATS):
            assert scalars[prefix + stat] == pytest.approx(expected[stat], abs=2e-6), prefix + stat
    assert scalars["global/frac_zero"] > 0



@pytest.mark.slow
def test_lightning_model_parallel_strategy_logs_the_same_values_on_both_ranks(tmp_path: Path) -> None:
    ranks = _run_two_ranks("lightning", tmp_path)
    assert ranks[0] == ranks[1]
    (logged,) = ranks[0]["scalars"].values()  # 2 steps per rank, every 2 steps: one cadence point
    assert {f"inertia/{scope}/{stat}" for scope in ("param/body.0.weight", "module/head", "global")
            for stat in STATS} <= set(logged)
    assert 0 < logged["inertia/global/frac_zero"] < 1


def test_attached_from_the_command_line_to_the_default_recipe(tmp_path: Path) -> None:
    from adai_lightning.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
    main(["fit", "--config", str(recipe), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
          "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
          "--trainer.callbacks+=adai_lightning.callbacks.InertiaMonitor",
          "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.per_parameter", "false"])
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("inertia/global/mean")]
    assert [int(row["step"]) for row in rows] == [1, 3]
    # the classifier keeps everything in self.backbone: its layers are the modules
    modules = ("backbone.0", "backbone.1", "backbone.3", "backbone.4", "backbone.8")
    assert {f"inertia/{scope}/{stat}" for scope in (*(f"module/{m}" for m in modules), "global")
            for stat in STATS} <= set(rows[0])
    assert not any(key.startswith(("inertia/param/", "inertia/module/backbone/")) for key in rows[0])


@pytest.mark.parametrize("optimizer_class", [Adai, torch.optim.SGD])
def test_empty_parameters_are_left_out(optimizer_class) -> None:
    model = nn.Module()
    model.empty, model.weight = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.ones(3))
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    (model.weight.sum() + model.empty.sum()).backward()
    optimizer.step()
    names = inertia_module.parameter_names(model, optimizer)
    if optimizer_class is Adai:
        scalars = adai_statistics(inertia_module.param_inertia(optimizer, names))
        assert scalars["global/ratio_mean"] == pytest.approx(1.0)
    else:
        scalars = inertia_module.constant_statistics(optimizer, inertia_module.momentum_reader(optimizer), names)
    assert not any("empty" in key for key in scalars) and scalars["global/mean"] == scalars["param/weight/mean"]
