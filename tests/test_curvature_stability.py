"""stability_ratio against the real optimizers on quadratics: at ratio 0.95 they converge, at 1.05 they diverge.

The loss is ``x^T H x / 2`` in float64 with a dense ``H`` (eigenvalues spread over a factor 3, random
eigenvectors), so the edge is decided by the top of the scaled spectrum, not by one axis.

Adam's and Adai's step sizes and inertia depend on their second-moment state, which on a quadratic
would follow the shrinking (or growing) gradients, so the iteration would not be one fixed linear
map and "ratio 0.95" would mean nothing after a few steps. We make the state stationary instead of
the loss: the optimizer starts from a state as after 10^14 steps (bias corrections equal to 1),
with a chosen, uneven second moment ``v`` and ``beta2 = 1 - 1e-15``, so that ``v`` moves by less
than 1e-8 relatively over the whole run. The preconditioner (Adam) and the per-element beta1
(Adai: ``1 - 0.1 v / mean(v)``, here 0.985 .. 0.79) then stay put, and the ratio measured from the live
state after the first step must predict convergence (to 1e-6) or divergence (growth past 1e3)
within 3000 steps.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning import Adai
from adai_lightning.callbacks import HessianSharpness
from adai_lightning.curvature.stability import linearised_step, stability_ratio
from test_curvature_callbacks import column, read_metrics

DIM = 6
SECOND_MOMENT = torch.tensor([0.2, 0.5, 1.0, 1.5, 2.0, 2.8], dtype=torch.float64)  # Adai beta1 0.985 .. 0.79
STEPS = 3000


def hessian(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    return basis @ torch.diag(torch.linspace(1.0, 3.0, DIM, dtype=torch.float64)) @ basis.T


def stationary_adam(params, cls, **kwargs):
    optimizer = cls(params, betas=(0.9, 1 - 1e-15), **kwargs)
    for p in params:
        optimizer.state[p] = {"step": torch.tensor(1e14), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": SECOND_MOMENT.clone()}
    return optimizer


def stationary_adai(params, **kwargs):
    optimizer = Adai(params, betas=(0.1, 1 - 1e-15), **kwargs)
    for p in params:
        optimizer.state[p] = {"step": 10 ** 14, "exp_avg": torch.zeros_like(p), "exp_avg_sq": SECOND_MOMENT.clone(),
                              "beta1_prod": torch.zeros_like(p)}
    return optimizer


OPTIMIZERS = {
    "gd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "sgd_dampening": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8, dampening=0.5),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    "sgd_weight_decay": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.5),
    # learning rates that put the edge near the unscaled H: gradients stay O(1), so (1 - beta2) g^2 stays tiny
    "adam": lambda p: stationary_adam(p, torch.optim.Adam, lr=0.5),
    "adamw": lambda p: stationary_adam(p, torch.optim.AdamW, lr=0.5, weight_decay=0.0),
    "adai": lambda p: stationary_adai(p, lr=1.0),
    "adai_l2": lambda p: stationary_adai(p, lr=1.0, weight_decay=0.3),
}


def iterate(make, h: torch.Tensor, steps: int) -> tuple[float, float, torch.optim.Optimizer, torch.Tensor]:
    """Run the optimizer on ``x^T h x / 2`` from a fixed start: the final and the largest ``|x| / |x0|``,
    the optimizer and x. (Adam and Adai eventually stop a divergence: once the gradients are ~1e7
    times larger, even ``1 - beta2 = 1e-15`` lets the second moment grow and shrink the steps.)"""
    x = torch.nn.Parameter(torch.linspace(1.0, -0.5, DIM, dtype=torch.float64))
    start, peak = float(x.detach().norm()), 1.0
    optimizer = make([x])
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * x @ h @ x
        loss.backward()
        optimizer.step()
        growth = float(x.detach().norm()) / start
        peak = max(peak, growth) if math.isfinite(growth) else math.inf
        if peak > 1e3 or growth < 1e-7:
            break
    return growth, peak, optimizer, x


def ratio_of(optimizer, x, h) -> float:
    return float(stability_ratio(lambda v: [h @ v[0]], linearised_step(optimizer, [x]),
                                 torch.Generator().manual_seed(0), [x.detach()], num_iters=DIM).values[0])


def scaled_to(target: float, optimizer, x, h) -> torch.Tensor:
    """``c h`` whose ratio is ``target`` (bisection on c: with weight decay the ratio is not linear in c)."""
    low, high = 0.0, 1.0
    while ratio_of(optimizer, x, high * h) < target:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio_of(optimizer, x, middle * h) < target else (low, middle)
    return h * (low + high) / 2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ratio_095_converges_and_105_diverges(name):
    make, h = OPTIMIZERS[name], hessian()
    *_, optimizer, x = iterate(make, h, 1)  # the ratio comes from the live state after one step
    for target, converges in ((0.95, True), (1.05, False)):
        scaled = scaled_to(target, optimizer, x, h)
        final, peak, optimizer, x = iterate(make, scaled, STEPS)
        if converges:
            assert final < 1e-6 and peak < 10, (name, target, final, peak)
            assert ratio_of(optimizer, x, scaled) == pytest.approx(target, rel=1e-6)  # the state did not move
        else:
            assert peak > 1e3, (name, target, peak)


def test_closed_forms_for_sgd_and_the_uniform_shortcut():
    h = hessian()
    lambda_max = float(torch.linalg.eigvalsh(h)[-1])
    cases = {"gd": 0.1 / 2, "sgd_momentum": 0.01 / (2 * 1.9), "sgd_dampening": 0.01 * 0.5 / (2 * 1.8),
             "sgd_nesterov": 0.01 * 2.8 / (1.9 * 2)}
    for name, per_lambda in cases.items():
        *_, optimizer, x = iterate(OPTIMIZERS[name], h, 1)
        step = linearised_step(optimizer, [x])
        assert step.uniform is not None
        assert ratio_of(optimizer, x, h) == pytest.approx(per_lambda * lambda_max, rel=1e-9)
        shortcut = stability_ratio(lambda v: 1 / 0, step, torch.Generator(), [x.detach()], lambda_max=lambda_max)
        assert float(shortcut.values[0]) == pytest.approx(per_lambda * lambda_max, rel=1e-12)  # no product computed


def test_adai_scale_is_the_inertia_of_the_last_step_and_the_lr_it_used():
    h = hessian()
    *_, optimizer, x = iterate(OPTIMIZERS["adai"], h, 1)
    beta1 = next(optimizer.inertia()).beta1
    assert torch.allclose(beta1, 1 - 0.1 * SECOND_MOMENT / SECOND_MOMENT.mean())  # 0.985 .. 0.79
    expected = 1.0 * (1 - beta1) / (1 + beta1)
    assert torch.allclose(linearised_step(optimizer, [x]).scale[0], expected)
    optimizer.param_groups[0]["lr"] = 0.0  # as a scheduler would after the step: the step's lr is given
    assert torch.allclose(linearised_step(optimizer, [x], lrs=[1.0]).scale[0], expected)
    assert torch.equal(linearised_step(optimizer, [x]).scale[0], torch.zeros(DIM, dtype=torch.float64))


def test_unknown_optimizer_unheld_parameters_and_bad_lrs():
    x, other = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    assert linearised_step(torch.optim.RMSprop([x]), [x]) is None
    step = linearised_step(torch.optim.SGD([x], lr=0.1), [x, other])
    assert torch.cat(step.scale).tolist() == pytest.approx([0.1] * 3 + [0.0] * 2) and step.uniform is None
    with pytest.raises(ValueError, match="Invalid lrs: 2 values for 1 param groups"):
        linearised_step(torch.optim.SGD([x], lr=0.1), [x], lrs=[0.1, 0.2])


class Regression(pl.LightningModule):
    """A linear least-squares model on 32 fixed samples; an epoch-level scheduler zeroes lr after epoch 0."""

    def __init__(self, optimizer: str):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 2)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.mse_loss(self.layer(inputs), targets)

    def configure_optimizers(self):
        optimizer = Adai(self.parameters(), lr=0.5) if self.optimizer == "adai" else \
            torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.0 if epoch >= 1 else 1.0)]


@pytest.mark.parametrize("name", ["sgd", "adai"])
def test_hessian_sharpness_logs_the_ratio_with_the_lr_the_last_step_used(tmp_path, name):
    """Checked against a dense float64 Hessian and the optimizer's own state; the epoch-end scheduler
    step that zeroes lr runs before the epoch-end cadence point, so a ratio read from the current lr
    would be 0."""
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 4, generator=generator), torch.randn(32, 2, generator=generator))
    module = Regression(name)
    callback = HessianSharpness(every_n_epochs=1, num_samples=32, top_k=1)
    captured = {}

    class Capture(pl.Callback):  # the optimizer's state and the model right after the cadence point
        def on_train_epoch_end(self, trainer, pl_module):
            captured["params"] = [p.detach().double().clone() for p in pl_module.parameters()]
            captured["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            if name == "adai":
                optimizer = trainer.optimizers[0]
                captured["scale"] = torch.cat([(0.5 * (1 - i.beta1) / (1 + i.beta1)
                                                / (1 - optimizer.state[i.param]["beta1_prod"])).reshape(-1).double()
                                               for i in optimizer.inertia()])

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=[callback, Capture()],
                         logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert captured["lr"] == 0.0  # the scheduler has already moved lr when the cadence point runs
    (_, ratio), = column(read_metrics(trainer), "sharpness/stability_ratio")
    weight, bias = captured["params"]
    inputs, targets = (t.double() for t in data.tensors)

    def loss(flat):
        w, b = flat[:8].view(2, 4), flat[8:]
        return nn.functional.mse_loss(inputs @ w.T + b, targets)

    dense = torch.autograd.functional.hessian(loss, torch.cat([weight.reshape(-1), bias]))
    scale = captured["scale"] if name == "adai" else torch.full((10,), 0.1 / 1.9, dtype=torch.float64)
    root = scale.sqrt()
    expected = float(torch.linalg.eigvalsh(root[:, None] * dense * root[None, :])[-1]) / 2
    assert ratio == pytest.approx(expected, rel=1e-4) and ratio > 0
