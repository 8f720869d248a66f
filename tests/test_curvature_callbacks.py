"""HessianSharpness and SaddleEscapeMonitor inside real Trainer fits (CPU)."""

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning import Adai
from adai_lightning.callbacks import HessianSharpness, SaddleEscapeMonitor
from adai_lightning.curvature import HessianOperator, flatten, unflatten


def make_net_class(base):
    """A tiny classifier with BatchNorm and dropout whose training_step logs, on either Lightning."""

    class Net(base):
        def __init__(self, optimizer="adai"):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))
            self.optimizer = optimizer

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            loss = nn.functional.cross_entropy(self.body(inputs), targets)
            self.log("train_loss", loss, on_step=True)
            return {"loss": loss}

        def configure_optimizers(self):
            if self.optimizer == "adai":
                return Adai(self.parameters(), lr=0.5)
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Net


Net = make_net_class(pl.LightningModule)


def seeded(factory, *args):
    torch.manual_seed(0)
    return factory(*args)


def digits_like(n=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def fit(module, callbacks, tmp_path, trainer_module=pl, max_steps=8, accumulate_grad_batches=1, precision="32-true"):
    pl.seed_everything(0, workers=True) if trainer_module is pl else trainer_module.seed_everything(0, workers=True)
    loader = DataLoader(digits_like(), batch_size=16, shuffle=True)
    trainer = trainer_module.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=callbacks,
                                     logger=trainer_module.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                                     enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                                     log_every_n_steps=1, accumulate_grad_batches=accumulate_grad_batches,
                                     precision=precision)
    trainer.fit(module, loader)
    return trainer


def read_metrics(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def column(rows, key):
    return [(int(row["step"]), float(row[key])) for row in rows if row.get(key)]


def snapshot(trainer, module):
    optimizer = trainer.optimizers[0].state_dict()
    return ({k: v.clone() for k, v in module.state_dict().items()},
            {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for i, s in optimizer["state"].items()},
            torch.get_rng_state())


def assert_bitwise_equal(first, second):
    for a, b in zip(first[0].values(), second[0].values()):
        assert torch.equal(a, b)
    assert first[1].keys() == second[1].keys()
    for index in first[1]:
        for key, value in first[1][index].items():
            assert torch.equal(value, second[1][index][key]) if torch.is_tensor(value) else value == second[1][index][key]
    assert torch.equal(first[2], second[2])


@pytest.mark.parametrize("optimizer,train_mode,accumulate", [("adai", False, 1), ("sgd", True, 2)])
def test_callbacks_leave_training_bitwise_unchanged(tmp_path, optimizer, train_mode, accumulate):
    plain = seeded(Net, optimizer)
    reference = fit(plain, [], tmp_path / "plain", accumulate_grad_batches=accumulate)
    watched = seeded(Net, optimizer)
    callbacks = [HessianSharpness(every_n_train_steps=3, top_k=2, trace_samples=3, num_samples=32,
                                  train_mode=train_mode),
                 SaddleEscapeMonitor(every_n_train_steps=2, plateau_window=4, lanczos_iters=6, train_mode=train_mode)]
    trainer = fit(watched, callbacks, tmp_path / "watched", accumulate_grad_batches=accumulate)
    assert_bitwise_equal(snapshot(reference, plain), snapshot(trainer, watched))
    rows = read_metrics(trainer)
    assert column(rows, "train_loss") == column(read_metrics(reference), "train_loss")
    assert [step for step, _ in column(rows, "sharpness/lambda_max")] == [2, 5]
    assert [step for step, _ in column(rows, "saddle/lambda_min")] == [1, 3, 5, 7]
    for key in ("sharpness/lambda_2", "sharpness/trace", "sharpness/trace_stderr", "sharpness/stability_ratio",
                "saddle/grad_norm", "saddle/negative_ratio", "saddle/momentum_drift", "saddle/update_drift",
                "saddle/plateau"):
        assert column(rows, key), key
    assert all(p.grad is not None for p in watched.parameters())  # untouched, still the last step's


def test_lambda_max_matches_direct_lanczos_on_the_given_loader(tmp_path):
    module = Net()
    probe_loader = DataLoader(digits_like(32, seed=5), batch_size=16)
    callback = HessianSharpness(every_n_train_steps=4, top_k=3, lanczos_iters=60, dataloader=probe_loader,
                                num_samples=32, train_mode=False)
    trainer = fit(module, [callback], tmp_path, max_steps=4)
    logged = dict(column(read_metrics(trainer), "sharpness/lambda_max"))[3]
    module.eval()
    indices = callback.probe.records[""].indices
    assert sorted(indices) == list(range(32))  # all 32 samples, in a seeded order, in two batches of 16
    batches = [probe_loader.dataset[indices[:16]], probe_loader.dataset[indices[16:]]]
    operator = HessianOperator(list(module.parameters()),
                               lambda b: nn.functional.cross_entropy(module.body(b[0]), b[1]), batches)
    dense = torch.stack([flatten(operator(unflatten(e, operator.params))) for e in torch.eye(operator.dim)])
    assert logged == pytest.approx(float(torch.linalg.eigvalsh(dense.double())[-1]), rel=1e-3)
    optimizer = trainer.optimizers[0]  # Adai, lr 0.5: S^2 = lr (1 - beta1) / ((1 + beta1)(1 - beta1_prod))
    root = torch.cat([(0.5 * (1 - i.beta1) / (1 + i.beta1) / (1 - optimizer.state[i.param]["beta1_prod"])).reshape(-1)
                      for i in optimizer.inertia()]).double().sqrt()
    expected = float(torch.linalg.eigvalsh(root[:, None] * dense.double() * root[None, :])[-1]) / 2
    assert dict(column(read_metrics(trainer), "sharpness/stability_ratio"))[3] == pytest.approx(expected, rel=1e-3)


class _NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward refuses to build a graph, as extension ops without double backward do."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("derivative for _NoDoubleBackward backward is not implemented")
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh() ** 2)


class NoDoubleBackwardNet(Net):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.body[4](_NoDoubleBackward.apply(self.body[0](batch[0]))), batch[1])


class TanhNet(Net):
    """NoDoubleBackwardNet's function with torch's (twice-differentiable) tanh."""

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.body[4](torch.tanh(self.body[0](batch[0]))), batch[1])


def test_without_double_backward_exact_warns_once_and_training_continues(tmp_path):
    callback = HessianSharpness(every_n_train_steps=2, hvp="exact")
    with pytest.warns(RuntimeWarning, match="disabled itself.*hvp='finite_difference'") as record:
        trainer = fit(NoDoubleBackwardNet(), [callback], tmp_path, max_steps=6)
    assert sum("disabled itself" in str(w.message) for w in record) == 1
    assert trainer.global_step == 6 and callback.probe.disabled
    with pytest.raises(RuntimeError):
        fit(NoDoubleBackwardNet(), [HessianSharpness(every_n_train_steps=2, on_error="raise", hvp="exact")],
            tmp_path / "r")


def test_without_double_backward_auto_measures_by_finite_differences(tmp_path):
    """The default ``hvp="auto"`` says once that it takes finite differences and logs what exact products
    give on the same network with a twice-differentiable tanh."""
    callback = HessianSharpness(every_n_train_steps=2, lanczos_iters=40)
    with pytest.warns(RuntimeWarning, match="finite differences.*not implemented") as record:
        trainer = fit(seeded(NoDoubleBackwardNet), [callback], tmp_path / "fd", max_steps=4)
    assert sum("finite differences" in str(w.message) for w in record) == 1
    assert callback.probe.hvp_chosen == "finite_difference" and not callback.probe.disabled
    reference = HessianSharpness(every_n_train_steps=2, lanczos_iters=40, hvp="exact")
    exact = fit(seeded(TanhNet), [reference], tmp_path / "exact", max_steps=4)
    measured = column(read_metrics(trainer), "sharpness/lambda_max")
    expected = column(read_metrics(exact), "sharpness/lambda_max")
    assert [s for s, _ in measured] == [s for s, _ in expected] and len(measured) == 2
    for (_, value), (_, target) in zip(measured, expected):
        assert value == pytest.approx(target, rel=1e-3)


def test_bf16_mixed_probe_runs_in_float32_and_finite_differences_match_exact(tmp_path):
    """Lightning's bf16-mixed autocasts the training step only: the probe's hooks run outside it, in float32,
    where finite differences agree with exact products (no autocast to turn off, so no warning)."""
    values = {}
    for hvp in ("finite_difference", "exact"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer = fit(seeded(Net), [HessianSharpness(every_n_train_steps=2, hvp=hvp)], tmp_path / hvp,
                          max_steps=4, precision="bf16-mixed")
        assert not [w for w in record if "autocast turned off" in str(w.message)]
        values[hvp] = column(read_metrics(trainer), "sharpness/lambda_max")
    assert [s for s, _ in values["finite_difference"]] == [s for s, _ in values["exact"]] and len(values["exact"]) == 2
    for (_, value), (_, target) in zip(values["finite_difference"], values["exact"]):
        assert value == pytest.approx(target, rel=3e-5)  # measured 6.6e-6 and 1.1e-6


def test_finite_differences_on_a_bf16_model_disable_the_callback_with_one_warning(tmp_path):
    """bf16-true casts the model to bfloat16: no step resolves a product in 16 bits, so nothing is logged."""
    def loss_fn(module, batch):
        return nn.functional.cross_entropy(module.body(batch[0].to(torch.bfloat16)), batch[1])

    callback = HessianSharpness(every_n_train_steps=2, hvp="finite_difference", loss_fn=loss_fn)
    with pytest.warns(RuntimeWarning, match="disabled itself: finite-difference .* got torch.bfloat16") as record:
        trainer = fit(seeded(Net, "sgd"), [callback], tmp_path, max_steps=4, precision="bf16-true")
    assert sum("disabled itself" in str(w.message) for w in record) == 1
    assert trainer.global_step == 4 and callback.probe.disabled
    assert not column(read_metrics(trainer), "sharpness/lambda_max")


@pytest.mark.parametrize("kwargs,name", [({"top_k": 0}, "top_k"), ({"method": "qr"}, "method"),
                                         ({"num_samples": 0}, "num_samples"), ({"on_error": "ignore"}, "on_error"),
                                         ({"keep_graphs": "yes"}, "keep_graphs"), ({"train_mode": 1}, "train_mode"),
                                         ({"trace_samples": -1}, "trace_samples"),
                                         ({"trace_method": "exact"}, "trace_method"),
                                         ({"trace_method": "hutch++", "trace_samples": 2}, "trace_samples"),
                                         ({"hvp": "symbolic"}, "hvp"), ({"tol": 2.0}, "tol"),
                                         ({"warm_start": 1}, "warm_start"), ({"host_basis": "yes"}, "host_basis")])
def test_hessian_sharpness_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HessianSharpness(**kwargs)


@pytest.mark.parametrize("kwargs,name", [({"plateau_window": 0}, "plateau_window"),
                                         ({"escape_fraction": float("nan")}, "escape_fraction"),
                                         ({"lanczos_iters": 1}, "lanczos_iters")])
def test_saddle_monitor_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SaddleEscapeMonitor(**kwargs)


def test_pytorch_lightning_trainer(tmp_path):
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    module = make_net_class(pytorch_lightning.LightningModule)()
    callbacks = [HessianSharpness(every_n_train_steps=2, trace_samples=3, trace_method="hutch++"),
                 SaddleEscapeMonitor(every_n_train_steps=2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(module, callbacks, tmp_path, trainer_module=pytorch_lightning, max_steps=4)
    rows = read_metrics(trainer)
    assert len(column(rows, "sharpness/trace")) == 2
    assert len(column(rows, "sharpness/lambda_max")) == 2 and len(column(rows, "saddle/lambda_min")) == 2
