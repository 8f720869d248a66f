"""SaddleEscapeMonitor on saddles with known curvature: x^2 - y^2 and a deep linear network."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning.callbacks import SaddleEscapeMonitor
from test_curvature_callbacks import column, read_metrics


class Saddle(pl.LightningModule):
    """loss = x^2 - c y^2 at (x, y) = point; the Hessian is diag(2, -2c)."""

    def __init__(self, point, optimizer, c):
        super().__init__()
        self.point = nn.Parameter(torch.tensor(point))
        self.optimizer = optimizer
        self.c = c

    def training_step(self, batch, batch_idx):
        return self.point[0] ** 2 - self.c * self.point[1] ** 2

    def configure_optimizers(self):
        return self.optimizer(self.parameters())


class DeepLinear(pl.LightningModule):
    """Three 4x4 linear layers from small initialisation fitting a rank-one map: a saddle plateau, then a drop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(3)])
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=0.1)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.layers(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(module, callback, tmp_path, loader, max_steps):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=[callback], logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    trainer.fit(module, loader)
    return read_metrics(trainer)


def dummy_loader():
    return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


# Power iteration cannot separate eigenvalues of equal magnitude (+2, -2): it gets c = 0.5.
@pytest.mark.parametrize("method,c", [("lanczos", 1.0), ("power", 0.5)])
@pytest.mark.parametrize("optimizer", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                       lambda p: torch.optim.Adam(p, lr=0.01)], ids=["sgd", "adam"])
def test_saddle_lambda_min_and_drift_sign(tmp_path, method, c, optimizer):
    callback = SaddleEscapeMonitor(every_n_train_steps=3, method=method, plateau_window=4)
    rows = run(Saddle([1.0, 0.01], optimizer, c), callback, tmp_path, dummy_loader(), max_steps=3)
    assert column(rows, "saddle/lambda_min")[0][1] == pytest.approx(-2.0 * c, rel=1e-3)
    assert column(rows, "saddle/negative_ratio")[0][1] == pytest.approx(c, rel=1e-3)
    assert column(rows, "saddle/momentum_drift")[0][1] > 0  # -m points to growing |y|, the escape
    assert column(rows, "saddle/update_drift")[0][1] > 0
    grad_norm = column(rows, "saddle/grad_norm")[0][1]
    assert 0 < grad_norm < 2.5  # |(2x, -2y)| at the point before the third step


def test_deep_linear_plateau_escape_detected_near_the_drop(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    targets = inputs @ torch.diag(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=64)
    callback = SaddleEscapeMonitor(every_n_train_steps=50, plateau_window=5, plateau_min_steps=20)
    rows = run(DeepLinear(), callback, tmp_path, loader, max_steps=160)
    losses = column(rows, "train_loss")
    start, final = losses[0][1], losses[-1][1]
    drop_step = next(step for step, loss in losses if loss < (start * final) ** 0.5)  # the log-midpoint
    escapes = column(rows, "saddle/escape_steps")
    assert len(escapes) == 1 and len(callback.detector.escapes) == 1
    event = callback.detector.escapes[0]
    assert event["start"] <= 1 and abs(event["end"] - drop_step) <= 0.25 * drop_step, (event, drop_step)
    assert escapes[0][1] == event["length"] and column(rows, "saddle/escapes")[0][1] == 1.0
    assert column(rows, "saddle/escape_start")[0][1] == event["start"]
    assert column(rows, "saddle/escape_end")[0][1] == event["end"] < escapes[0][0]  # logged once confirmed
    assert dict(column(rows, "saddle/plateau"))[49] == 1.0  # on the plateau at the first cadence point
    lambda_min = dict(column(rows, "saddle/lambda_min"))
    assert lambda_min[49] < 0  # on the plateau: a saddle, negative curvature


def test_epoch_cadence_and_state_round_trip(tmp_path):
    loader = DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=1)
    callback = SaddleEscapeMonitor(every_n_train_steps=None, every_n_epochs=1, plateau_window=2)
    module = Saddle([1.0, 0.01], lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 1.0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", callbacks=[callback], logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    rows = read_metrics(trainer)
    assert len(column(rows, "saddle/update_drift")) == 2 and column(rows, "saddle/update_drift")[-1][1] > 0
    restored = SaddleEscapeMonitor(every_n_train_steps=None, every_n_epochs=1, plateau_window=2)
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == callback.state_dict() and restored.state_dict()["last_step"] == 6


@pytest.mark.slow
def test_full_length_recipe_runs_meet_the_escape_acceptance():
    """benchmarks/saddle_escapes.py: 9 saddle_deep_linear fits (>= 90 % of the real drops, no false or
    duplicate events, escape_steps within 25 %) and 9 default-recipe fits (no event after convergence)."""
    import subprocess
    import sys
    from pathlib import Path

    from recipe_helpers import clean_env

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "saddle_escapes.py")], capture_output=True,
                          text=True, timeout=1800, env=clean_env(), cwd=root)
    assert proc.returncode == 0 and "-> PASS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
