"""HessianSharpness's sparser trace cadence (``trace_every_n_train_steps``) inside real Trainer fits (CPU):
where the trace is taken, that it costs its products only there, and that a resume traces where an
uninterrupted run does, with the same values."""

import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader

from adai_lightning.callbacks import HessianSharpness

from test_curvature_callbacks import Net, column, digits_like, read_metrics

TRACE_SAMPLES = 3


class CountingSharpness(HessianSharpness):
    """HessianSharpness recording the Hessian-vector products of each cadence point, by optimizer step."""

    def __init__(self, trace_every):
        super().__init__(every_n_train_steps=3, num_samples=16, top_k=1, lanczos_iters=4, trace_samples=TRACE_SAMPLES,
                         trace_method="hutch++", trace_every_n_train_steps=trace_every)
        self.products = {}

    def _measure(self, trainer, operator):
        metrics = super()._measure(trainer, operator)
        self.products[trainer.global_step] = operator.num_products
        return metrics


def fit(folder, callbacks, ckpt_path=None):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, callbacks=callbacks,
                         logger=pl.loggers.CSVLogger(folder / "logs"), enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, deterministic=True, default_root_dir=folder)
    net = Net()
    net.body[3].p = 0.0  # no dropout: the global RNG (not in the checkpoint) then plays no part in training
    trainer.fit(net, DataLoader(digits_like(), batch_size=16), ckpt_path=ckpt_path)  # 6 batches an epoch
    return read_metrics(trainer)


def test_the_trace_runs_only_n_steps_after_the_last_and_resumes_where_an_uninterrupted_run_traces(tmp_path):
    every, sparse = CountingSharpness(None), CountingSharpness(5)
    rows_every = fit(tmp_path / "every", [every])
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    rows_sparse = fit(tmp_path / "sparse", [sparse, saver])
    # points at optimizer steps 3, 6, 9, 12 (logged at step - 1); N=5: the first trace at the first
    # point at step >= 5 (6), the next at the first point >= 6 + 5 (12)
    assert [s for s, _ in column(rows_every, "sharpness/trace")] == [2, 5, 8, 11]
    assert [s for s, _ in column(rows_sparse, "sharpness/trace")] == [5, 11]
    assert [s for s, _ in column(rows_sparse, "sharpness/trace_stderr")] == [5, 11]
    assert {step: every.products[step] - sparse.products[step] for step in every.products} == \
        {3: TRACE_SAMPLES, 6: 0, 9: TRACE_SAMPLES, 12: 0}
    # the trace does not disturb Lanczos, and draws the same probes wherever it runs
    assert column(rows_sparse, "sharpness/lambda_max") == column(rows_every, "sharpness/lambda_max")
    traced = dict(column(rows_every, "sharpness/trace"))
    assert column(rows_sparse, "sharpness/trace") == [(5, traced[5]), (11, traced[11])]
    # resumed at step 6 (the epoch's end, after the trace at 6): the last trace step comes from the
    # checkpoint, so step 9 (9 - 0 >= 5 for a callback that forgot it) is not traced, and step 12 is
    resumed = CountingSharpness(5)
    rows_resumed = fit(tmp_path / "resumed", [resumed], ckpt_path=next((tmp_path / "ckpt").glob("*step=6.ckpt")))
    assert resumed.products == {step: sparse.products[step] for step in (9, 12)}
    assert column(rows_resumed, "sharpness/trace") == column(rows_sparse, "sharpness/trace")[1:]
    assert column(rows_resumed, "sharpness/lambda_max") == column(rows_sparse, "sharpness/lambda_max")[2:]


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_trace_every_n_train_steps_is_validated(value):
    with pytest.raises(ValueError, match="Invalid trace_every_n_train_steps: .*None or an integer >= 1"):
        HessianSharpness(every_n_train_steps=5, trace_samples=3, trace_every_n_train_steps=value)
