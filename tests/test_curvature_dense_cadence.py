"""HessianSharpness's dense first steps and its weight-norm key, inside real Trainer fits (CPU)."""

import lightning.pytorch as pl
import pytest
import torch

from adai_lightning.callbacks import HessianSharpness

from test_curvature_callbacks import Net, column, fit, read_metrics


class NormRecorder(pl.Callback):
    """The parameters' L2 norm after every optimizer step, by the step Lightning logs at."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.norms[step] = float(torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).double().norm())


def test_dense_first_steps_measures_every_early_step_then_the_cadence_and_logs_the_weight_norm(tmp_path):
    recorder = NormRecorder()
    callback = HessianSharpness(every_n_train_steps=5, dense_first_steps=3, num_samples=16, top_k=1, lanczos_iters=4)
    trainer = fit(Net(), [callback, recorder], tmp_path, max_steps=8)
    rows = read_metrics(trainer)
    # optimizer steps 1, 2, 3 (dense) and 5 (the cadence); Lightning logs step t at t - 1
    assert [step for step, _ in column(rows, "sharpness/lambda_max")] == [0, 1, 2, 4]
    logged = column(rows, "sharpness/weight_norm")
    assert [step for step, _ in logged] == [0, 1, 2, 4]
    for step, norm in logged:
        assert norm == pytest.approx(recorder.norms[step], rel=1e-6)
    assert len({norm for _, norm in logged}) == 4  # the weights moved between the points


def test_dense_first_steps_also_runs_under_the_overhead_budget(tmp_path):
    callback = HessianSharpness(max_overhead=1e-9, dense_first_steps=2, num_samples=16, top_k=1, lanczos_iters=4)
    trainer = fit(Net(), [callback], tmp_path, max_steps=6)
    assert [step for step, _ in column(read_metrics(trainer), "sharpness/lambda_max")] == [0, 1]


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_dense_first_steps_is_validated(value):
    with pytest.raises(ValueError, match="dense_first_steps"):
        HessianSharpness(every_n_train_steps=5, dense_first_steps=value)
