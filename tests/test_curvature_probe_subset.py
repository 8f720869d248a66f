"""The Hessian probe's evaluation subset and train-mode default, against exact references."""

from __future__ import annotations

import csv
import math
from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning.callbacks import HessianSharpness
from adai_lightning.callbacks import _probe_subset
from adai_lightning.callbacks._hessian_probe import HVP_COST_IN_STEPS, REBUILT_GRAPH_FACTOR, HessianProbe
from adai_lightning.callbacks._probe_subset import choose_indices
from adai_lightning.curvature import flatten, unflatten


class BatchNormNet(pl.LightningModule):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class PlainNet(BatchNormNet):
    """Without BatchNorm: it trains on batches of one sample."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def data(n, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, generator=generator).to(dtype), torch.randint(0, 2, (n,), generator=generator))


def dense_hessian(operator):
    return torch.stack([flatten(operator(unflatten(e, operator.params)))
                        for e in torch.eye(operator.dim, dtype=torch.float64)])


def exact_hessian(module, batches, train):
    """``torch.autograd.functional.hessian`` of the weighted mean of the batch losses, modules in
    train (batch statistics) or eval mode."""
    names = [name for name, _ in module.net.named_parameters()]
    params = [p.detach() for p in module.net.parameters()]
    buffers = {name: b.clone() for name, b in module.net.named_buffers()}
    module.net.train(train)

    def loss(flat):
        weights = dict(zip(names, unflatten(flat, params)))
        return sum(w * F.cross_entropy(torch.func.functional_call(module.net, {**weights, **buffers}, (x,)), y)
                   for (x, y), w in batches)

    return torch.autograd.functional.hessian(loss, flatten(params))


@pytest.mark.parametrize("train_mode,keep_graphs", [(True, None), (False, None), (True, True)])
def test_probe_hessian_equals_the_exact_hessian_in_float64(train_mode, keep_graphs):
    """Default train mode: BatchNorm normalises each subset batch with its own statistics, the
    objective training optimizes; 10 samples in batches of 4, 4 and 2 weigh 0.4, 0.4 and 0.2.
    ``keep_graphs=True`` builds each batch's first-order graph once for all products."""
    module = BatchNormNet(torch.float64).train()
    dataset = data(20, torch.float64)
    probe = HessianProbe("test", 10, DataLoader(dataset, batch_size=4), None, train_mode, "raise", seed=1,
                         keep_graphs=keep_graphs)
    running = [b.clone() for b in module.buffers()]
    operators = []
    dense = probe.run(None, module, lambda operator: operators.append(operator) or dense_hessian(operator))
    assert operators[0].num_graph_builds == (3 if keep_graphs else 3 * operators[0].dim)
    assert all(torch.equal(a, b) for a, b in zip(running, module.buffers())) and module.training
    indices = probe.records[""].indices
    assert indices == choose_indices(20, 10, 1) and len(set(indices)) == 10
    batches = [(dataset[indices[i:i + 4]], len(indices[i:i + 4]) / 10) for i in range(0, 10, 4)]
    exact = exact_hessian(module, batches, train_mode)
    torch.testing.assert_close(dense, exact, rtol=1e-9, atol=1e-11)
    other = exact_hessian(module, batches, not train_mode)
    assert not torch.allclose(other, exact, rtol=1e-3)  # train and eval mode are different objectives


def test_estimated_cost_counts_the_batches_of_the_subset():
    trainer = SimpleNamespace(train_dataloader=DataLoader(data(100), batch_size=8), fit_loop=SimpleNamespace(
        _combined_loader=None))
    callback = HessianSharpness(num_samples=30)  # 4 batches of 8 (the last of 6)
    products = callback.products_per_point()  # 20 Lanczos + 20 for the scaled stability ratio
    assert products == 40
    assert callback.estimated_cost(trainer, 0.01) == pytest.approx(
        HVP_COST_IN_STEPS * REBUILT_GRAPH_FACTOR * products * 4 * 0.01)
    assert HessianSharpness(num_samples=8).estimated_cost(trainer, 0.01) == pytest.approx(
        HVP_COST_IN_STEPS * products * 0.01)


def _fit(tmp_path, callback, ckpt_path=None, extra=()):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=1, callbacks=[callback, *extra],
                         logger=pl.loggers.CSVLogger(tmp_path / "logs"), enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, deterministic=True,
                         default_root_dir=tmp_path)
    module = BatchNormNet()
    trainer.fit(module, DataLoader(data(64), batch_size=16), ckpt_path=ckpt_path)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return module, {int(r["step"]): float(r["sharpness/lambda_max"]) for r in rows if r.get("sharpness/lambda_max")}


def test_the_subset_survives_a_checkpoint_and_gives_the_same_lambda_max_after_resume(tmp_path, monkeypatch):
    """The indices go into the checkpoint; the resumed callback reuses them (choosing new ones would
    raise here) and, on the checkpoint's weights, measures exactly the lambda_max logged before it
    (started cold, as that point was); the tracked eigenvectors go into the checkpoint too, so the next
    point (warm-started from them) logs bitwise what the uninterrupted run logged."""
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = HessianSharpness(every_n_train_steps=4, num_samples=24, lanczos_iters=12, seed=3)
    _, uninterrupted = _fit(tmp_path / "first", first, extra=[saver])
    assert sorted(uninterrupted) == [3, 7]
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    (state,) = [s for key, s in saved.items() if key.startswith("HessianSharpness")]
    assert state["probe"]["subset"][""]["indices"] == choose_indices(64, 24, 3)

    def no_new_choice(*args):
        raise AssertionError("the resumed probe chose a new subset")

    monkeypatch.setattr(_probe_subset, "choose_indices", no_new_choice)
    resumed = HessianSharpness(every_n_train_steps=4, num_samples=24, lanczos_iters=12, seed=3)
    at_resume = {}

    class MeasureAtResume(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # the checkpoint's weights, before any step
            tracked, resumed.tracked = resumed.tracked, {}
            at_resume.update(resumed.probe.run(trainer, pl_module, partial(resumed._measure, trainer)))
            assert all(torch.equal(a, b) for a, b in zip(tracked["top"][0], resumed.tracked["top"][0]))

    _, after_resume = _fit(tmp_path / "resumed", resumed, ckpt_path=checkpoint, extra=[MeasureAtResume()])
    assert resumed.probe.records[""].indices == state["probe"]["subset"][""]["indices"]
    assert at_resume["sharpness/lambda_max"] == uninterrupted[3]
    assert after_resume[7] == uninterrupted[7]


@pytest.mark.parametrize("mode,expected", [("max_size_cycle", [(0, 0), (1, 1), (2, 0)]),
                                           ("min_size", [(0, 0), (1, 1)]), ("max_size", [(0, 0), (1, 1), (2, None)])])
def test_a_dict_of_loaders_is_combined_as_the_combined_loader_mode_does(mode, expected):
    """12 samples per loader: 3 batches of 4 from "a", 2 batches (6 + 6) from "b"."""
    loaders = {"a": DataLoader(data(20, seed=1), batch_size=4), "b": DataLoader(data(30, seed=2), batch_size=6)}
    batches, records = _probe_subset.evaluation_batches(loaders, mode, 12, 0, None, from_trainer=True)
    assert [len(records[k].indices) for k in "ab"] == [12, 12]
    a, b = (loaders[k].dataset for k in "ab")
    for batch, (i, j) in zip(batches, expected, strict=True):
        torch.testing.assert_close(batch.data["a"][0], a[records["a"].indices[4 * i:4 * i + 4]][0])
        if j is None:
            assert batch.data["b"] is None
        else:
            torch.testing.assert_close(batch.data["b"][0], b[records["b"].indices[6 * j:6 * j + 6]][0])
    assert sum(batch.weight for batch in batches) == pytest.approx(1.0)


def test_a_train_loader_that_is_not_a_dataloader_is_refused_with_the_fix():
    with pytest.raises(_probe_subset.ProbeError, match="pass dataloader="):
        _probe_subset.evaluation_batches([[torch.zeros(2)]], "max_size_cycle", 4, 0, None, from_trainer=True)


def test_probe_batch_size_rebatches_a_batch_size_1_loader_without_changing_the_hessian():
    """Issue 18 item 5: a loader of batch size 1 made one batch per sample (10 here, 256 by default),
    each product a forward and backward per batch. ``probe_batch_size=4``: ceil(10 / 4) = 3 batches
    of 4, 4 and 2 samples, and in eval mode the same Hessian as one batch of all 10, to float64 precision."""
    module = BatchNormNet(torch.float64)
    loader = DataLoader(data(20, torch.float64), batch_size=1)
    hessians, sizes = {}, {}
    for probe_batch_size in (None, 4, 10):
        probe = HessianProbe("test", 10, loader, None, False, "raise", seed=1, keep_graphs=True,
                             probe_batch_size=probe_batch_size)
        assert probe.expected_batches(None) == math.ceil(10 / (probe_batch_size or 1))
        hessians[probe_batch_size] = probe.run(None, module, dense_hessian if probe_batch_size else lambda _: None)
        sizes[probe_batch_size] = [len(batch.data[0]) for batch in probe._batches]
        assert [batch.weight for batch in probe._batches] == [size / 10 for size in sizes[probe_batch_size]]
    assert sizes == {None: [1] * 10, 4: [4, 4, 2], 10: [10]}
    torch.testing.assert_close(hessians[4], hessians[10], rtol=1e-12, atol=1e-14)


def test_probe_batch_size_enters_the_estimated_cost_and_the_warning_of_a_fit_too_short(tmp_path):
    trainer = SimpleNamespace(train_dataloader=DataLoader(data(100), batch_size=1), fit_loop=SimpleNamespace(
        _combined_loader=None))
    per_sample, batched = (HessianSharpness(num_samples=30, probe_batch_size=size) for size in (None, 8))
    assert per_sample.probe.expected_batches(trainer) == 30 and batched.probe.expected_batches(trainer) == 4
    assert per_sample.estimated_cost(trainer, 0.01) == pytest.approx(30 / 4 * batched.estimated_cost(trainer, 0.01))
    assert batched.describe_cost(trainer) == ("40 Hessian-vector products x 4 batches of the 30-sample subset; "
                                              "a larger probe_batch_size makes fewer batches")
    with pytest.warns(UserWarning, match=r"about .* s \(20 Hessian-vector products x 30 batches of the 30-sample "
                                         r"subset; a larger probe_batch_size makes fewer batches\), more than"):
        trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, callbacks=[per_sample], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(PlainNet(), DataLoader(data(64), batch_size=1))
    assert per_sample.budget.runs == 0  # 20 products: a one-group SGD needs no scaled Lanczos run


@pytest.mark.parametrize("value,dataloader,match", [
    (0, None, "probe_batch_size: 0; it must be an integer >= 1"),
    (2.5, None, "probe_batch_size: 2.5; it must be an integer >= 1"),
    (4, [[torch.zeros(2)]], "dataloader= is a list, not a DataLoader"),
])
def test_invalid_probe_batch_size_is_refused_in_one_line(value, dataloader, match):
    with pytest.raises(ValueError, match=match):
        HessianSharpness(probe_batch_size=value, dataloader=dataloader)


def test_probe_batch_size_cannot_rebatch_a_loader_of_whole_batches():
    loader = DataLoader(data(20), batch_size=None)  # each dataset item is used as it is
    with pytest.raises(_probe_subset.ProbeError, match="cannot rebatch the train loader.*probe_batch_size=None"):
        _probe_subset.evaluation_batches(loader, "max_size_cycle", 4, 0, None, from_trainer=True, batch_size=2)
