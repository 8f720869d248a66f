"""The overhead budget: its arithmetic, validation, the budgeted cadence in real fits, resume and DDP."""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from adai_lightning.callbacks import HessianSharpness, InertiaMonitor, SaddleEscapeMonitor
from adai_lightning.callbacks._budget import OverheadBudget
from adai_lightning.callbacks._cadence import WARMUP_STEPS
from adai_lightning.callbacks._hessian_probe import HVP_COST_IN_STEPS
from adai_lightning.callbacks.saddle_escape import LOSS_FLUSH_EVERY
from test_curvature_callbacks import Net, column, fit, read_metrics
from test_curvature_ddp import run_ddp_script

DDP_SCRIPT = Path(__file__).parent / "scripts" / "budget_ddp_fit.py"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def no_training_time(callback, clock=None):
    """Give ``callback``'s budget a clock on which training takes no time and each run 1 s, and a
    first run estimated to be free: the first candidate point runs, then the budget allows nothing."""
    callback.estimated_cost = lambda trainer, step_seconds: 0.0
    clock = callback.budget.clock = clock or FakeClock()
    run = callback.on_cadence

    def costly(*args):
        clock.now += 1.0
        run(*args)

    callback.on_cadence = costly
    return clock


def test_budget_arithmetic_with_a_fake_clock():
    clock = FakeClock()
    budget = OverheadBudget(0.015, clock=clock)
    budget.start()
    clock.now += 10.0
    assert budget.allows() and budget.seconds_until_allowed() == 0.0
    with budget.measure():
        clock.now += 0.2
    assert (budget.spent, budget.last_cost, budget.runs) == (pytest.approx(0.2), pytest.approx(0.2), 1)
    assert budget.training == pytest.approx(10.0)  # the callback's own time is not training time
    assert not budget.allows()  # (0.2 + 0.2) / 10 > 0.015
    wait = (0.2 + 0.2) / 0.015 - 10.0
    assert budget.seconds_until_allowed() == pytest.approx(wait)
    assert budget.steps_until_allowed(100) == math.ceil(wait * 100 / 10.0)  # 10 s for 100 steps so far
    clock.now += wait - 1e-6
    assert not budget.allows()
    clock.now += 2e-6
    assert budget.allows()


def test_a_budgeted_loop_stays_within_the_budget_and_keeps_measuring():
    """Steps of 10 ms, runs of 50 ms, 2 % budget, the first run estimated right: the overhead never
    exceeds the budget, and the runs are as many as the budget pays for (not starved)."""
    clock, max_overhead, cost, steps = FakeClock(), 0.02, 0.05, 20_000
    budget = OverheadBudget(max_overhead, clock=clock)
    budget.start()
    budget.last_cost = cost  # the estimate before the first run
    runs_at = []
    for step in range(1, steps + 1):
        clock.now += 0.01
        if step >= WARMUP_STEPS and budget.allows():
            with budget.measure():
                clock.now += cost
            runs_at.append(step)
            assert budget.spent <= max_overhead * budget.training + 1e-9
    assert runs_at[0] == math.ceil(cost / max_overhead / 0.01)  # the first step whose training time pays for it
    assert len(runs_at) >= math.floor(max_overhead * steps * 0.01 / cost) - 1


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_invalid_max_overhead_is_named(value):
    with pytest.raises(ValueError, match=r"max_overhead: .*\(0, 1\]"):
        OverheadBudget(value)
    for callback in (HessianSharpness, SaddleEscapeMonitor):
        with pytest.raises(ValueError, match="max_overhead"):
            callback(max_overhead=value)


def test_no_cadence_and_no_budget_is_refused():
    with pytest.raises(ValueError, match="max_overhead is None"):
        HessianSharpness(max_overhead=None)
    with pytest.raises(ValueError, match="both are None"):
        InertiaMonitor(every_n_train_steps=None)
    assert HessianSharpness(max_overhead=1).budget.max_overhead == 1.0
    assert HessianSharpness(every_n_train_steps=5).budget is None  # an explicit cadence runs at every point


class Strategy:
    """Stands for a rank other than 0: broadcast returns what rank 0 sent, not the local object."""

    def __init__(self, from_rank_zero):
        self.from_rank_zero = list(from_rank_zero)
        self.sent = []

    def broadcast(self, obj, src=0):
        assert src == 0
        self.sent.append(obj)
        return self.from_rank_zero.pop(0)


class FakeTrainer:
    def __init__(self, strategy):
        self.strategy = strategy
        self.estimated_stepping_batches = 1000


def test_the_decision_is_rank_zeros_and_broadcast_only_at_candidate_points():
    callback = HessianSharpness()
    callback.estimated_cost = lambda trainer, step_seconds: 0.0
    callback.budget.clock = FakeClock()  # no training time: locally, only a first run estimated free is allowed
    strategy = Strategy([(True, None), (True, None), (False, 40)])
    trainer = FakeTrainer(strategy)
    callback.on_train_start(trainer, None)
    assert [step for step in range(1, WARMUP_STEPS + 1) if callback.step_is_due(trainer, step)] == [WARMUP_STEPS]
    assert strategy.sent == [(True, None)]  # steps before the first candidate needed no collective
    callback.budget.runs, callback.budget.spent, callback.budget.last_cost = 1, 0.1, 0.1
    callback._next_check = 20  # what the run at step 10 would have planned
    assert [step for step in range(11, 21) if callback.step_is_due(trainer, step)] == [20]  # rank 0 said run
    assert strategy.sent[-1] == (False, 21)  # what this rank would have decided alone
    assert callback.step_is_due(trainer, 20)  # asked again for the same step: cached, no collective
    assert not callback.step_is_due(trainer, 21) and callback._next_check == 40  # rank 0's plan
    assert len(strategy.sent) == 3
    assert not any(callback.step_is_due(trainer, step) for step in range(22, 40)) and len(strategy.sent) == 3


def test_default_cadence_measures_nothing_on_a_fit_too_short_to_pay_for_it_and_says_so(tmp_path):
    """The first measurement is planned from its estimated cost (products x HVP_COST_IN_STEPS x the
    mean step time): 30 steps at a 1.5 % budget cannot pay for 20 products (40 with the stability
    ratio's own Lanczos run, needed unless the optimizer is a one-group SGD)."""
    callbacks = [HessianSharpness(), SaddleEscapeMonitor()]
    assert [callback.products_per_point() for callback in callbacks] == [40, 21]
    assert callbacks[0].estimated_cost(None, 0.01) == pytest.approx(HVP_COST_IN_STEPS * 40 * 0.01)
    with pytest.warns(UserWarning, match="measured nothing in this fit.*every_n_train_steps"):
        rows = read_metrics(fit(Net(), callbacks, tmp_path, max_steps=30))
    assert not column(rows, "sharpness/lambda_max") and not column(rows, "saddle/lambda_min")
    assert all(callback.budget.runs == 0 and callback.budget.spent == 0.0 for callback in callbacks)
    assert callbacks[0]._next_check > 30  # planned past the end of this fit


def test_a_first_run_estimated_free_comes_at_step_10_or_the_last_step_of_a_shorter_fit(tmp_path):
    callbacks = [HessianSharpness(), SaddleEscapeMonitor()]
    for callback in callbacks:
        callback.estimated_cost = lambda trainer, step_seconds: 0.0
    trainer = fit(Net(), callbacks, tmp_path / "short", max_steps=4)
    rows = read_metrics(trainer)
    assert [step for step, _ in column(rows, "sharpness/lambda_max")] == [3]  # the last step of a shorter fit
    assert [step for step, _ in column(rows, "saddle/lambda_min")] == [3]
    assert column(rows, "saddle/update_drift")  # the step before the point was prepared for
    callbacks = [HessianSharpness(), SaddleEscapeMonitor()]
    for callback in callbacks:
        no_training_time(callback)
    rows = read_metrics(fit(Net(), callbacks, tmp_path / "long", max_steps=30))
    assert [step for step, _ in column(rows, "sharpness/lambda_max")] == [WARMUP_STEPS - 1]
    assert [step for step, _ in column(rows, "saddle/lambda_min")] == [WARMUP_STEPS - 1]
    assert all(callback.budget.runs == 1 for callback in callbacks)


def test_budgeted_schedule_on_a_fake_clock(tmp_path):
    """1 s per training step, 1 s per measurement, 25 % budget: after the free-estimated run at step 10 the
    callback measures exactly when (runs + 1) s <= 0.25 x training s, i.e. at steps 11, 12, 16, 20, ..."""
    callback = HessianSharpness(max_overhead=0.25)
    clock = no_training_time(callback)

    class Tick(pl.Callback):
        def on_train_batch_start(self, *args):
            clock.now += 1.0

    rows = read_metrics(fit(Net(), [Tick(), callback], tmp_path, max_steps=40))
    assert [step + 1 for step, _ in column(rows, "sharpness/lambda_max")] == [10, 11, 12, 16, 20, 24, 28, 32, 36, 40]
    assert callback.budget.spent == 10.0 and callback.budget.training == 40.0


def test_budget_state_survives_a_checkpoint_and_resume_is_exact(tmp_path):
    callback = HessianSharpness()
    clock = no_training_time(callback)
    trainer = fit(Net(), [callback], tmp_path / "first", max_steps=12)
    checkpoint = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(checkpoint)
    state = callback.state_dict()
    assert state["budget"]["runs"] == 1 and state["next_check"] > WARMUP_STEPS

    restored = HessianSharpness()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    restored.budget.clock = clock
    restored.budget.start()
    clock.now += 5.0
    assert restored.budget.elapsed == pytest.approx(state["budget"]["elapsed"] + 5.0)  # the clock continues

    resumed = HessianSharpness()
    no_training_time(resumed, clock)
    pl.seed_everything(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(96, 6),
                                                                        torch.randint(0, 3, (96,))), batch_size=16)
    pl.Trainer(max_steps=30, accelerator="cpu", callbacks=[resumed], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(Net(), loader, ckpt_path=checkpoint)
    assert resumed.budget.runs == 1  # the first run is not repeated after a resume


def test_saddle_losses_are_buffered_on_the_device_and_all_reach_the_detector(tmp_path):
    saddle = SaddleEscapeMonitor(every_n_train_steps=1000, plateau_window=100)
    pending = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            pending.append(len(saddle._pending))

    trainer = fit(Net(), [saddle, Watch()], tmp_path, max_steps=70)
    assert pending == [step % LOSS_FLUSH_EVERY for step in range(1, 71)]
    losses = [loss for _, loss in column(read_metrics(trainer), "train_loss")]
    assert saddle.detector.recent == pytest.approx(losses, rel=1e-6) and len(losses) == 70


@pytest.mark.slow
def test_ddp_ranks_take_identical_decisions(tmp_path):
    out = tmp_path / "result.json"
    run_ddp_script(DDP_SCRIPT, out, timeout=300)
    runs = json.loads(out.read_text())
    for name in ("HessianSharpness", "SaddleEscapeMonitor"):
        rank0, rank1 = runs["0"][name], runs["1"][name]
        assert rank0 == rank1, name
        assert len(rank0) >= 3, rank0  # rank 0's generous budget decided, not rank 1's frozen clock
