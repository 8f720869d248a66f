"""The three callbacks on LightningModules written in other styles than our recipes (issue 11).

Each case trains a module twice from the same seed, without and with all three callbacks at a fixed
cadence, and requires bitwise identical final parameters, buffers, optimizer states, logged metrics
and torchmetrics states, and (unless the probe must refuse) the Hessian callbacks' keys in the log.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.demos.boring_classes import BoringModel, ManualOptimBoringModel
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from adai_lightning import Adai
from adai_lightning.callbacks import HessianSharpness, InertiaMonitor, SaddleEscapeMonitor
from adai_lightning.callbacks._probe_subset import choose_indices
from adai_lightning.callbacks.inertia import module_keys

CALLBACK_PREFIXES = ("sharpness/", "saddle/", "inertia/")


def dataset(n=48, features=6, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=generator),
                         torch.randint(0, classes, (n,), generator=generator))


def callbacks(on_error="raise", **probe):
    probe = {"num_samples": 16, "on_error": on_error, **probe}
    return [HessianSharpness(every_n_train_steps=3, lanczos_iters=6, **probe),
            SaddleEscapeMonitor(every_n_train_steps=2, lanczos_iters=6, plateau_window=4, **probe),
            InertiaMonitor(every_n_train_steps=2)]


def fit(make_module, make_loaders, attached, tmp_path, max_steps=8):
    pl.seed_everything(0)
    module = make_module()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=attached,
                         logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, deterministic=True)
    trainer.fit(module, make_loaders())
    return trainer, module


def logged(trainer):
    """``{key: [(step, value)]}`` of every logged metric."""
    out = {}
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    if not path.exists():  # nothing logged (BoringModel without callbacks)
        return out
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value and key != "step":
                    out.setdefault(key, []).append((row["step"], value))
    return out


def metric_states(module):
    return {name: ({k: v.clone() if torch.is_tensor(v) else list(v) for k, v in m.metric_state.items()},
                   m.update_count) for name, m in module.named_modules() if isinstance(m, torchmetrics.Metric)}


def assert_same_training(first, second):
    (trainer_a, module_a), (trainer_b, module_b) = first, second
    state_a, state_b = module_a.state_dict(), module_b.state_dict()  # parameters and buffers
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for (name, a), b in zip(module_a.named_parameters(), module_b.parameters(), strict=True):  # .grad untouched
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name
    assert len(trainer_a.optimizers) == len(trainer_b.optimizers)
    for opt_a, opt_b in zip(trainer_a.optimizers, trainer_b.optimizers):
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for index in sa:
            for key, value in sa[index].items():
                assert torch.equal(value, sb[index][key]) if torch.is_tensor(value) else value == sb[index][key]
    own_a = {k: v for k, v in logged(trainer_a).items() if not k.startswith(CALLBACK_PREFIXES)}
    own_b = {k: v for k, v in logged(trainer_b).items() if not k.startswith(CALLBACK_PREFIXES)}
    assert own_a == own_b  # the module's own logged metrics, bitwise (as written)
    metrics_a, metrics_b = metric_states(module_a), metric_states(module_b)
    assert metrics_a.keys() == metrics_b.keys()
    for name, (values, count) in metrics_a.items():
        assert count == metrics_b[name][1], name
        for key, value in values.items():
            other = metrics_b[name][0][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else \
                all(torch.equal(x, y) for x, y in zip(value, other, strict=True)), (name, key)


def check(make_module, make_loaders, tmp_path, hessian_keys=True, **probe):
    plain = fit(make_module, make_loaders, [], tmp_path / "plain")
    watched = fit(make_module, make_loaders, callbacks(**probe), tmp_path / "watched")
    assert_same_training(plain, watched)
    keys = logged(watched[0])
    if hessian_keys:
        for key in ("sharpness/lambda_max", "saddle/lambda_min", "saddle/grad_norm"):
            assert key in keys, key
    assert any(key.startswith("inertia/") for key in keys)
    return watched


# -- modules in other styles -----------------------------------------------------------------------
class MetricClassifier(pl.LightningModule):
    """The lightning-hydra-template style: torchmetrics updated and logged in training_step, BatchNorm, Dropout."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.train_loss = torchmetrics.MeanMetric()
        self.all_logits = torchmetrics.CatMetric()  # a list state
        self.scores = torchmetrics.MetricCollection({  # precision and recall share one compute group
            "precision": torchmetrics.classification.MulticlassPrecision(num_classes=3),
            "recall": torchmetrics.classification.MulticlassRecall(num_classes=3)}, prefix="train/")

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        logits = self.net(inputs)
        loss = F.cross_entropy(logits, targets)
        self.train_loss(loss)
        self.train_acc(logits.argmax(1), targets)
        self.all_logits.update(logits.detach())
        self.log_dict(self.scores(logits, targets), on_step=True)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return Adai(self.parameters(), lr=0.5)


class TinyGAN(pl.LightningModule):
    """Manual optimization, two optimizers, ``training_step(self, batch)`` with no ``batch_idx``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def discriminator_loss(self, real):
        fake = self.generator(torch.randn(real.shape[0], 4)).detach()
        scores = self.discriminator(torch.cat([real, fake]))
        labels = torch.cat([torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)])
        return F.binary_cross_entropy_with_logits(scores, labels)

    def training_step(self, batch):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        self.toggle_optimizer(opt_g)
        scores = self.discriminator(self.generator(torch.randn(real.shape[0], 4)))
        g_loss = F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = self.discriminator_loss(real)
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        self.log_dict({"train/g_loss": g_loss, "train/d_loss": d_loss})

    def configure_optimizers(self):
        return Adai(self.generator.parameters(), lr=0.1), torch.optim.Adam(self.discriminator.parameters(), lr=1e-2)


class SkippingClassifier(MetricClassifier):
    """Returns None (Lightning skips the batch) for every third batch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 3 == 2 else loss


class TwoLoaderClassifier(MetricClassifier):
    """Trained on a dict of loaders (Lightning's CombinedLoader): the batch is ``{"a": ..., "b": ...}``."""

    def training_step(self, batch, batch_idx):
        inputs = torch.cat([batch["a"][0], batch["b"][0]])
        targets = torch.cat([batch["a"][1], batch["b"][1]])
        return super().training_step((inputs, targets), batch_idx)


class TinyAttention(pl.LightningModule):
    """Self-attention with ``F.scaled_dot_product_attention`` (its fused CPU kernel has no double backward)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        tokens = inputs.view(-1, 2, 3).repeat(1, 1, 2)  # 2 tokens of 6 features
        q, k, v = self.qkv(tokens).view(tokens.shape[0], 2, 3, 2, 3).permute(2, 0, 3, 1, 4)  # 2 heads of 3
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(tokens.shape[0], 2, 6)
        loss = F.cross_entropy(self.head(attended.mean(1)), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class OutputsClassifier(pl.LightningModule):
    """Lightning's replacement for ``training_epoch_end``: ``training_step`` appends to
    ``self.training_step_outputs``, ``on_train_epoch_end`` averages and clears it; and a step counter."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.training_step_outputs = []
        self.outputs_at_start = self.training_step_outputs  # a reference held by the user
        self.steps_seen = 0
        self.epoch_sizes = []

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.training_step_outputs.append(loss)
        self.steps_seen += 1
        return loss

    def on_train_epoch_end(self):
        self.epoch_sizes.append(len(self.training_step_outputs))
        self.log("train/epoch_mean", torch.stack(self.training_step_outputs).mean())
        self.training_step_outputs.clear()

    def configure_optimizers(self):
        return Adai(self.parameters(), lr=0.5)


class AlternatingGAN(TinyGAN):
    """A GAN that trains one network per step, chosen by a counter, with an epoch loss from a plain list."""

    def __init__(self):
        super().__init__()
        self.turn = 0
        self.d_losses = []

    def training_step(self, batch):
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        if self.turn % 2 == 0:
            scores = self.discriminator(self.generator(torch.randn(real.shape[0], 4)))
            loss, optimizer = F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores)), opt_g
        else:
            loss, optimizer = self.discriminator_loss(real), opt_d
            self.d_losses.append(loss.detach())
        self.turn += 1
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    def on_train_epoch_end(self):
        self.log("train/d_loss_epoch", torch.stack(self.d_losses).mean())
        self.d_losses.clear()


def compiled_classifier(backend):
    class CompiledClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = torch.compile(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), backend=backend)
            self.head = nn.Linear(8, 3)

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.head(self.encoder(batch[0])), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return Adai(self.parameters(), lr=0.5)

    return CompiledClassifier


def shuffled_loader():
    return DataLoader(dataset(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(42))


# -- the cases ---------------------------------------------------------------------------------------
def test_boring_model(tmp_path):
    check(BoringModel, BoringModel().train_dataloader, tmp_path)


def test_manual_optimization_boring_model_never_moves_the_weights(tmp_path):
    """Before: the probe's training_step stepped the optimizer (final params off by up to 0.53)."""
    watched = check(ManualOptimBoringModel, ManualOptimBoringModel().train_dataloader, tmp_path)
    assert not watched[0].callbacks[0].probe.disabled


def test_torchmetrics_batchnorm_dropout_classifier_and_a_seeded_shuffling_loader(tmp_path):
    """Before: MeanMetric's update count 12 -> 20, train/acc changed, and the loader's generator
    advanced (params off by 0.117)."""
    check(MetricClassifier, shuffled_loader, tmp_path)


def test_training_step_returning_none_for_some_batches(tmp_path):
    """Before: SaddleEscapeMonitor raised KeyError: 'loss'."""
    check(SkippingClassifier, shuffled_loader, tmp_path)


def test_dict_of_loaders_combined_loader(tmp_path):
    """Before: "string indices must be integers, not 'str'"."""
    def loaders():
        return CombinedLoader({"a": DataLoader(dataset(seed=1), batch_size=8, shuffle=True),
                               "b": DataLoader(dataset(seed=2), batch_size=4)}, mode="max_size_cycle")

    watched = check(TwoLoaderClassifier, loaders, tmp_path)
    records = watched[0].callbacks[0].probe.records
    assert records["a"].indices == choose_indices(48, 16, 0) == records["b"].indices


class Stream(IterableDataset):
    """An iterable dataset: the probe takes the first items of a fresh iterator of its own."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(48):
            yield torch.randn(6, generator=generator), torch.randint(0, 3, (), generator=generator)


def test_iterable_dataset(tmp_path):
    watched = check(MetricClassifier, lambda: DataLoader(Stream(), batch_size=8), tmp_path)
    assert watched[0].callbacks[0].probe.records[""].first_items == 16


def test_scaled_dot_product_attention_runs_on_the_math_backend(tmp_path):
    """Before: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"."""
    q = torch.randn(4, 2, 2, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # what exact products avoid: the default kernel
        torch.autograd.grad(grad.sum(), q)
    check(TinyAttention, lambda: DataLoader(dataset(), batch_size=8, shuffle=True), tmp_path, hvp="exact")


@pytest.mark.parametrize("make_module", [TinyAttention, compiled_classifier("aot_eager")], ids=["sdpa", "compiled"])
def test_kernels_without_double_backward_run_as_they_are_by_finite_differences(make_module, tmp_path):
    """``hvp="auto"`` (default): the fused SDPA kernel / compiled code has no double backward, so each
    Hessian callback says so once and takes finite-difference products with the model as it runs;
    training is bitwise unchanged and lambda_max matches exact products (math kernel, eager code)."""
    loaders = shuffled_loader
    plain = fit(make_module, loaders, [], tmp_path / "plain")
    exact = fit(make_module, loaders, callbacks(hvp="exact"), tmp_path / "exact")
    with pytest.warns(RuntimeWarning, match="finite differences") as record:
        auto = fit(make_module, loaders, callbacks(), tmp_path / "auto")
    assert sum("finite differences" in str(w.message) for w in record) == 2  # once per Hessian callback
    assert [c.probe.hvp_chosen for c in auto[0].callbacks[:2]] == ["finite_difference"] * 2
    assert_same_training(plain, auto)
    for key in ("sharpness/lambda_max", "saddle/lambda_min"):
        measured, reference = logged(auto[0])[key], logged(exact[0])[key]
        assert [s for s, _ in measured] == [s for s, _ in reference]
        for (_, value), (_, expected) in zip(measured, reference):
            assert float(value) == pytest.approx(float(expected), rel=1e-3, abs=1e-4), key


def test_a_compiled_submodule_runs_eagerly_in_the_probe(tmp_path):
    """Before: "aot_autograd does not currently support double backward". ``aot_eager`` fails the same
    way as inductor without its compile time (the inductor case is the slow test below)."""
    check(compiled_classifier("aot_eager"), shuffled_loader, tmp_path, hvp="exact")


def test_a_lightning_module_compiled_whole_runs_its_original_training_step(tmp_path):
    """``trainer.fit(torch.compile(module))``: Lightning compiles training_step and forward."""
    check(lambda: torch.compile(BoringModel(), backend="aot_eager"), BoringModel().train_dataloader, tmp_path,
          hvp="exact")


@pytest.mark.slow
def test_an_inductor_compiled_submodule_runs_eagerly_in_the_probe(tmp_path):
    check(compiled_classifier("inductor"), shuffled_loader, tmp_path, hvp="exact")


def test_gan_with_two_optimizers_without_loss_fn_refuses_once_and_never_moves_the_weights(tmp_path):
    plain = fit(TinyGAN, shuffled_loader, [], tmp_path / "plain")
    attached = callbacks(on_error="warn")
    with pytest.warns(RuntimeWarning, match="manual_backward 2 times.*pass loss_fn") as record:
        watched = fit(TinyGAN, shuffled_loader, attached, tmp_path / "watched")
    assert sum("disabled itself" in str(w.message) for w in record) == 2  # once per Hessian callback
    assert_same_training(plain, watched)
    keys = logged(watched[0])
    assert {f"inertia/opt{i}/global/mean" for i in (0, 1)} <= set(keys)  # per-optimizer keys
    assert {"inertia/opt0/module/generator/mean", "inertia/opt1/module/discriminator/mean"} <= set(keys)


def test_gan_with_a_loss_fn(tmp_path):
    check(TinyGAN, shuffled_loader, tmp_path, loss_fn=lambda module, batch: module.discriminator_loss(batch[0]))


def test_training_step_outputs_and_a_step_counter_are_left_as_they_were(tmp_path):
    """Issue 19. Before, with HessianSharpness(every_n_train_steps=4, num_samples=16) on BoringModel:
    648 entries instead of 8 and the epoch mean 2.149 instead of 1.636, nothing warned."""
    plain = fit(OutputsClassifier, shuffled_loader, [], tmp_path / "plain")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        watched = fit(OutputsClassifier, shuffled_loader, callbacks(), tmp_path / "watched")
    assert not [w for w in record if "could not restore" in str(w.message)]
    assert_same_training(plain, watched)
    (_, module_a), (_, module_b) = plain, watched
    assert module_b.epoch_sizes == module_a.epoch_sizes == [6, 2]  # max_steps=8 ends the second epoch
    assert module_b.steps_seen == module_a.steps_seen == 8
    assert module_b.training_step_outputs is module_b.outputs_at_start
    assert "sharpness/lambda_max" in logged(watched[0])


def test_gan_alternating_by_a_counter_keeps_its_turn_and_epoch_loss(tmp_path):
    """Issue 19: the probe's training_step calls advanced the counter (the networks trained out of turn)
    and added to the list behind train/d_loss_epoch."""
    watched = check(AlternatingGAN, shuffled_loader, tmp_path)
    assert watched[1].turn == 8 and "train/d_loss_epoch" in logged(watched[0])


def test_module_keys_group_below_a_single_top_level_child():
    assert module_keys(["body.0.weight", "head.bias", "scale"]) == {
        "body.0.weight": "body", "head.bias": "head", "scale": "scale"}
    assert set(module_keys(["model.net.0.weight", "model.net.0.bias", "model.net.2.weight"]).values()) == {
        "model.net.0", "model.net.2"}
    assert module_keys(["layer.weight", "layer.bias"]) == {"layer.weight": "layer", "layer.bias": "layer"}


def test_without_double_backward_the_message_names_the_cause_and_the_fix(tmp_path):
    class Refusing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if torch.is_grad_enabled():
                raise RuntimeError("derivative for refusing_backward is not implemented")
            return grad

    class Module(MetricClassifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(Refusing.apply(self.net(batch[0])), batch[1])

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Module, shuffled_loader, [HessianSharpness(every_n_train_steps=2, num_samples=16, hvp="exact")], tmp_path)
    (message,) = [str(w.message) for w in record if "disabled itself" in str(w.message)]
    assert "refusing_backward" in message and "no second derivative" in message and "loss_fn" in message


@pytest.mark.slow
def test_lightning_transformer_demo(tmp_path):
    """Lightning's Transformer demo (nn.Transformer: attention through scaled_dot_product_attention),
    on random tokens instead of its WikiText-2 download."""
    from lightning.pytorch.demos.transformer import LightningTransformer

    class Offline(LightningTransformer):
        def prepare_data(self):
            pass

    def loader():
        tokens = torch.randint(0, 33, (48, 12), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens, tokens.roll(1, 1)), batch_size=8, shuffle=True)

    check(lambda: Offline(vocab_size=33), loader, tmp_path)
