"""Non-finite gradients: an exact no-op step with ``skip_nonfinite=True`` (the default), visible without it."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning import Adai, AdaiW
from adai_lightning.callbacks import InertiaMonitor
from adai_oracle import OracleAdai
from test_optim_adai import SHAPES, _grad, _max_rel_dev

PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True, fused=False), "native": dict(fused=None)}
POISONS = {"nan": float("nan"), "inf": float("inf")}
BAD_STEP = 7  # a step in which every parameter has a gradient (parameter 1 misses every third one)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "beta1_prod")


def _params(dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, generator=torch.Generator().manual_seed(i)))
            for i, s in enumerate(SHAPES)]


def _set_grads(params: list, step: int, poison: float | None = None) -> None:
    for i, p in enumerate(params):
        p.grad = _grad(step, i, p)
    if poison is not None:
        params[0].grad[1, 2] = poison


def _snapshot(opt: Adai, params: list) -> list[torch.Tensor]:
    state = [opt.state[p][k] for p in params if p in opt.state for k in STATE_KEYS]
    steps = [torch.as_tensor(opt.state[p]["step"], dtype=torch.float64) for p in params if p in opt.state]
    return [p.detach().clone() for p in params] + [t.clone() for t in state] + steps


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("path", list(PATHS))
def test_without_the_guard_a_non_finite_gradient_shows_in_vbar(path: str, poison: str) -> None:
    """Before: ``safe_mean`` turned a NaN vbar into 1.0 for good. Now it stays NaN/inf, step after step."""
    params = _params(torch.float32)
    opt = Adai(params, lr=0.5, skip_nonfinite=False, **PATHS[path])
    for step in range(BAD_STEP + 5):
        _set_grads(params, step, POISONS[poison] if step == BAD_STEP else None)
        opt.step()
        assert torch.isfinite(opt.last_vbar).item() == (step < BAD_STEP)
    if poison == "nan":  # a NaN mean reaches every parameter: nothing silently carries on with a made-up vbar
        assert not any(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("path", list(PATHS))
def test_guard_skips_the_step_and_the_rest_follows_the_oracle(path: str, poison: str) -> None:
    """The guarded run equals the float64 oracle run on the step sequence without the bad step, and the
    bad step itself changes no parameter, state tensor or step count."""
    params = _params()
    reference = [p.detach().clone() for p in params]
    opt = Adai([{"params": params[:2]}, {"params": params[2:], "lr": 0.3}], lr=0.5, weight_decay=0.01,
               skip_nonfinite=True, **PATHS[path])
    oracle = OracleAdai([{"params": reference[:2]}, {"params": reference[2:], "lr": 0.3}], lr=0.5, weight_decay=0.01)
    for step in range(20):
        if step == BAD_STEP:
            before = _snapshot(opt, params)
            _set_grads(params, step, POISONS[poison])
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(opt, params)))
            assert opt.skipped_steps.item() == 1.0
            continue
        _set_grads(params, step)
        _set_grads(reference, step)
        opt.step()
        oracle.step()
    assert _max_rel_dev(params, reference) <= 1e-12
    for p, q in zip(params, reference):
        assert opt.state[p]["step"].item() == oracle.state[id(q)]["step"]
    assert opt.skipped_steps.item() == 1.0


@pytest.mark.parametrize("path", list(PATHS))
def test_a_skipped_first_step_leaves_no_trace(path: str) -> None:
    params = _params()
    opt = Adai(params, skip_nonfinite=True, **PATHS[path])
    _set_grads(params, 0, float("nan"))
    opt.step()
    assert [opt.state[p]["step"].item() for p in params if p in opt.state] == [0.0, 0.0]
    assert torch.isnan(opt.last_vbar)  # no step applied yet: inertia() has no vbar to report
    reference = _params()
    twin = Adai(reference, skip_nonfinite=True, **PATHS[path])
    for step in range(1, 6):
        _set_grads(params, step)
        _set_grads(reference, step)
        opt.step()
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


@pytest.mark.parametrize("path", list(PATHS))
def test_guard_without_a_bad_step_changes_nothing(path: str) -> None:
    guarded, plain = _params(), _params()
    a, b = Adai(guarded, **PATHS[path]), Adai(plain, skip_nonfinite=False, **PATHS[path])
    for step in range(15):
        _set_grads(guarded, step)
        _set_grads(plain, step)
        a.step()
        b.step()
    assert _max_rel_dev(guarded, [p.detach() for p in plain]) <= 1e-13
    assert a.skipped_steps.item() == 0.0


def test_skipped_steps_survive_a_checkpoint_and_resume_bitwise() -> None:
    straight = _params()
    opt = AdaiW(straight, weight_decay=0.01, skip_nonfinite=True)
    for step in range(12):
        _set_grads(straight, step, float("inf") if step in (3, 9) else None)
        opt.step()

    resumed = _params()
    first = AdaiW(resumed, weight_decay=0.01, skip_nonfinite=True)
    for step in range(6):
        _set_grads(resumed, step, float("inf") if step == 3 else None)
        first.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in resumed], "optim": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    restored = [torch.nn.Parameter(p) for p in checkpoint["params"]]
    second = AdaiW(restored, weight_decay=0.01, skip_nonfinite=True)
    second.load_state_dict(checkpoint["optim"])
    assert second.skipped_steps.item() == 1.0
    for step in range(6, 12):
        _set_grads(restored, step, float("inf") if step == 9 else None)
        second.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, restored))
    assert second.skipped_steps.item() == opt.skipped_steps.item() == 2.0


def test_copies_keep_the_guard_and_its_count() -> None:
    params = _params()
    opt = Adai(params, skip_nonfinite=True)
    for step in range(4):
        _set_grads(params, step, float("nan") if step == 2 else None)
        opt.step()
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.skip_nonfinite is True
        assert copied.skipped_steps.item() == 1.0


@pytest.mark.parametrize("path", list(PATHS))
def test_the_guard_never_reads_device_values_on_the_host(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(torch.float32)
    opt = Adai(params, weight_decay=0.1, skip_nonfinite=True, **PATHS[path])
    _set_grads(params, 1)
    opt.step()  # converts the int step counts to device tensors

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    seen = []  # the skip watch reads the (CPU) counters on the host, which synchronises nothing on CPU
    monkeypatch.setattr(opt._skip_watch, "after_step", lambda skipped, run: seen.append(skipped))
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for poison in (None, float("nan")):
        _set_grads(params, 2, poison)
        opt.step()
    monkeypatch.undo()
    assert opt.skipped_steps.item() == 1.0 and len(seen) == 2


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_skip_nonfinite_must_be_a_bool(value) -> None:
    with pytest.raises(TypeError, match="skip_nonfinite"):
        Adai([torch.nn.Parameter(torch.zeros(1))], skip_nonfinite=value)


class PoisonedNet(LightningModule):
    """A tiny classifier whose loss is NaN at one batch (``poison_batch``), or whose step is left out there."""

    def __init__(self, poison_batch: int, leave_out: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.poison_batch, self.leave_out = poison_batch, leave_out

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if batch_idx == self.poison_batch:
            return None if self.leave_out else loss * float("nan")  # None: Lightning takes no optimizer step
        return loss

    def configure_optimizers(self):
        return Adai(self.parameters(), lr=0.5, skip_nonfinite=True)


def _fit_bf16(poison_batch: int, leave_out: bool, callbacks: list, logger=False) -> tuple[LightningModule, Trainer]:
    seed_everything(0)
    model = PoisonedNet(poison_batch, leave_out)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 4, generator=generator), torch.randint(0, 3, (48,), generator=generator))
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, precision="bf16-mixed", logger=logger,
                      callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, deterministic=True)
    trainer.fit(model, DataLoader(data, batch_size=6))
    return model, trainer


def test_bf16_mixed_lightning_fit_skips_the_nan_step_exactly() -> None:
    """``precision="bf16-mixed"`` has no GradScaler: the guard is what keeps a NaN loss out of the model."""
    from test_callbacks_inertia import RecordingLogger

    logger = RecordingLogger()
    monitor = InertiaMonitor(every_n_train_steps=1, per_parameter=False, histograms=False)
    guarded, trainer = _fit_bf16(3, False, [monitor], logger)
    reference, _ = _fit_bf16(3, True, [])
    assert trainer.optimizers[0].skipped_steps.item() == 1.0
    assert logger.logged[max(logger.logged)]["inertia/skipped_steps"] == 1.0
    for p, q in zip(guarded.parameters(), reference.parameters()):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q)


@pytest.mark.slow
def test_sharded_ranks_agree_on_skipping(tmp_path) -> None:
    """ZeRO (foreach and native paths) and FSDP2 on 2 gloo processes: a NaN that only one rank sees still
    skips the step everywhere, and the result equals one process that never took that step."""
    from test_distributed_vbar import TOLERANCE, run_script

    results = run_script("distributed_nonfinite.py", tmp_path, timeout=300)
    for name, result in results.items():
        assert result["skipped_steps"] == 1.0, name
        assert result["deviation"] <= TOLERANCE, (name, result)


@pytest.mark.parametrize("path", list(PATHS))
def test_by_default_a_non_finite_gradient_skips_the_step_and_warns_once(path: str) -> None:
    params = _params(torch.float32)
    opt = Adai(params, lr=0.5, **PATHS[path])
    for step in range(BAD_STEP):
        _set_grads(params, step)
        opt.step()
    before = _snapshot(opt, params)
    for step, poison in ((BAD_STEP, float("nan")), (BAD_STEP + 1, float("inf"))):
        _set_grads(params, step, poison)
        if poison != poison:  # the NaN, first
            with pytest.warns(RuntimeWarning, match=r"^Adai skipped a step: a gradient held a NaN or infinity \(1 skipped"):
                opt.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # only the first skip warns
                opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(opt, params), before))
    assert opt.skipped_steps.item() == 2.0 and opt.consecutive_skips.item() == 2.0
    _set_grads(params, BAD_STEP + 2)
    opt.step()
    assert opt.consecutive_skips.item() == 0.0 and all(torch.isfinite(p).all() for p in params)


def test_a_run_of_max_consecutive_skips_raises_and_an_applied_step_resets_it() -> None:
    params = _params()
    opt = Adai(params, max_consecutive_skips=3)
    warnings.simplefilter("ignore", RuntimeWarning)
    for step, poison in enumerate([float("nan")] * 2 + [None] + [float("nan")] * 2):
        _set_grads(params, step, poison)
        opt.step()
    _set_grads(params, 5, float("nan"))
    with pytest.raises(RuntimeError, match=r"^Adai skipped 3 steps in a row \(max_consecutive_skips=3\)"):
        opt.step()
    assert opt.skipped_steps.item() == 5.0  # the step that raised was skipped like the others
    unlimited = Adai(_params(), max_consecutive_skips=None)
    for step in range(120):
        _set_grads(unlimited.param_groups[0]["params"], step, float("nan"))
        unlimited.step()
    assert unlimited.skipped_steps.item() == 120.0


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_max_consecutive_skips_must_be_a_positive_int_or_none(value, error) -> None:
    with pytest.raises(error, match=r"^Invalid max_consecutive_skips: .*; it must be an int of at least 1, or None$"):
        Adai([torch.nn.Parameter(torch.zeros(1))], max_consecutive_skips=value)


def test_fused_true_refuses_a_guarded_bucket_only_the_compiled_kernels_could_run() -> None:
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    param.grad = torch.ones_like(param)
    with pytest.raises(RuntimeError, match=r"fused=True\) cannot run torch.bfloat16 parameters on cpu with "
                                           r"skip_nonfinite=True \(the default\)"):
        Adai([param], fused=True).step()
    assert torch.equal(param, torch.zeros_like(param))


def test_a_rank_without_gradients_gives_a_finite_verdict() -> None:
    """Such a rank (a ZeRO partition of frozen weights) still joins the verdict's all-reduce, with 0."""
    from adai_lightning.optim import _functional

    assert _functional.nonfinite_flag([], torch.device("cpu")).item() == 0.0
