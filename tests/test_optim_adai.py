"""The Adai optimizers against the float64 oracle, their edge cases, state and argument checks."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from adai_lightning import Adai, AdaiW
from adai_oracle import OracleAdai

SHAPES = [(4, 3), (5,), (2, 3)]
CONFIGS = {
    "defaults": dict(),
    "l2": dict(weight_decay=0.05),
    "decoupled": dict(weight_decay=0.05, decoupled=True),
    "custom_betas_eps": dict(betas=(0.2, 0.9), eps=0.05),
    "dampening_half": dict(dampening=0.5, weight_decay=0.01),
    "maximize": dict(maximize=True, weight_decay=0.01),
}


def _grad(step: int, index: int, param: torch.Tensor) -> torch.Tensor | None:
    """A deterministic gradient: noise plus a pull towards 0, with parameter 1 skipped every third step."""
    if index == 1 and step % 3 == 0:
        return None
    noise = torch.randn(param.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 * step + index))
    return (noise * (index + 1) + param.detach().double()).to(param.dtype)


def _run_pair(config: dict, dtype: torch.dtype, foreach: bool, steps: int) -> tuple[list, list]:
    init = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    ref = [p.clone() for p in init]
    ours = [p.to(dtype, copy=True).requires_grad_() for p in init]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.3}]  # noqa: E731
    opt = Adai(groups(ours), lr=0.5, foreach=foreach, **config)
    oracle = OracleAdai(groups(ref), lr=0.5, **config)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(ours, ref)):
            p.grad = _grad(step, i, p)
            q.grad = _grad(step, i, q)
        opt.step()
        oracle.step()
    return ours, ref


def _max_rel_dev(ours: list, ref: list) -> float:
    return max(((a.detach().double() - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_matches_oracle(name: str, foreach: bool) -> None:
    ours, ref = _run_pair(CONFIGS[name], torch.float64, foreach, steps=120)
    assert _max_rel_dev(ours, ref) <= 1e-9


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("name", ["defaults", "decoupled", "dampening_half"])
def test_float32_matches_oracle(name: str, foreach: bool) -> None:
    ours, ref = _run_pair(CONFIGS[name], torch.float32, foreach, steps=100)
    assert _max_rel_dev(ours, ref) <= 1e-5


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite_and_close(dtype: torch.dtype, foreach: bool) -> None:
    ours, ref = _run_pair(CONFIGS["l2"], dtype, foreach, steps=30)
    assert all(torch.isfinite(p).all() for p in ours)
    assert _max_rel_dev(ours, ref) <= 3e-2


def test_half_precision_state_is_float32_and_survives_a_checkpoint() -> None:
    param = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = Adai([param])
    param.grad = torch.randn(8, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[param]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "beta1_prod")} == {torch.float32}
    fresh = Adai([param])
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
        assert fresh.state[param][key].dtype == torch.float32
        assert torch.equal(fresh.state[param][key], state[key])


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_paths_agree_on_a_real_model(foreach: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    twin = copy.deepcopy(model)
    a, b = Adai(model.parameters(), foreach=foreach), Adai(twin.parameters(), foreach=not foreach)
    x = torch.randn(32, 6, dtype=torch.float64)
    for _ in range(20):
        for net, opt in ((model, a), (twin, b)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_adaiw_is_adai_with_decoupled_decay() -> None:
    ours, ref = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    a, b = AdaiW([ours], weight_decay=0.1), Adai([ref], weight_decay=0.1, decoupled=True)
    for step in range(5):
        ours.grad = ref.grad = torch.full((3,), float(step))
        a.step()
        b.step()
    assert torch.equal(ours, ref)
    assert a.defaults["decoupled"] is True


def test_step_without_any_gradient_changes_nothing() -> None:
    param = torch.nn.Parameter(torch.randn(4))
    before = param.detach().clone()
    opt = Adai([param])
    assert opt.step() is None
    assert torch.equal(param, before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_all_zero_gradients_give_no_nan(foreach: bool) -> None:
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    before = [p.detach().clone() for p in params]
    opt = Adai(params, foreach=foreach)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for state in opt.state.values():
        assert all(torch.isfinite(state[k]).all() for k in ("exp_avg", "exp_avg_sq", "beta1_prod"))
    beta1 = torch.cat([i.beta1.flatten() for i in opt.inertia()])
    assert torch.allclose(beta1, torch.full_like(beta1, 1 - 1e-3))


@pytest.mark.parametrize("fused", [False, None], ids=["eager", "default"])
def test_only_empty_parameters_with_gradients_give_a_finite_vbar(fused: bool | None) -> None:
    """0 elements in the mean (0 / 0) is the all-zero case, not a non-finite state."""
    empty, other = torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(torch.randn(3))
    opt = Adai([empty, other], fused=fused)
    empty.grad, other.grad = torch.zeros(0), torch.ones(3)
    opt.step()
    other.grad = None
    opt.step()
    assert opt.last_vbar.item() == 1.0
    assert torch.isfinite(other).all()


def test_sparse_gradients_are_rejected() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = Adai(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


def test_complex_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="complex parameters"):
        Adai([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-0.1), r"lr: -0.1; it must lie in \[0, inf\)"),
        (dict(lr=float("nan")), "Invalid lr"),
        (dict(betas=(0.0, 0.99)), r"beta0 \(betas\[0\]\): 0.0; it must lie in \(0, 1\]"),
        (dict(betas=(1.5, 0.99)), r"beta0 \(betas\[0\]\): 1.5"),
        (dict(betas=(0.1, 1.0)), r"beta2 \(betas\[1\]\): 1.0; it must lie in \[0, 1\)"),
        (dict(betas=(0.1,)), "must be a pair"),
        (dict(eps=0.0), r"eps: 0.0; it must lie in \(0, 1\)"),
        (dict(eps=1.0), "Invalid eps"),
        (dict(weight_decay=-1e-4), r"weight_decay: -0.0001; it must lie in \[0, inf\)"),
        (dict(dampening=1.5), r"dampening: 1.5; it must lie in \[0, 1\]"),
    ],
)
def test_invalid_arguments_name_the_argument_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Adai([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_invalid_param_group_options_are_rejected() -> None:
    opt = Adai([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="Invalid eps"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "eps": 2.0})


def test_closure_is_called_with_grad_enabled_and_its_loss_returned() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Adai([param])

    def closure() -> torch.Tensor:
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert not torch.equal(param.detach(), torch.tensor([1.0, -2.0]))


def _train(opt_params: list, opt: Adai, steps: range) -> None:
    for step in steps:
        for i, p in enumerate(opt_params):
            p.grad = _grad(step, i, p)
        opt.step()


@pytest.mark.parametrize("paths", [dict(foreach=False), dict(foreach=True, fused=False), dict(fused=True)],
                         ids=["single", "foreach", "fused"])
def test_state_dict_round_trip_resumes_bitwise(paths: dict) -> None:
    make = lambda: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(SHAPES)]  # noqa: E731
    straight = make()
    opt = Adai(straight, **paths, weight_decay=1e-2)
    _train(straight, opt, range(40))

    resumed = make()
    first = Adai(resumed, **paths, weight_decay=1e-2)
    _train(resumed, first, range(20))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in resumed], "optim": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    restored = [torch.nn.Parameter(p) for p in checkpoint["params"]]
    second = Adai(restored, **paths, weight_decay=1e-2)
    second.load_state_dict(checkpoint["optim"])
    _train(restored, second, range(20, 40))
    for a, b in zip(straight, restored):
        assert torch.equal(a, b)


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_state_keys_match_the_reference_implementation(skip_nonfinite: bool) -> None:
    """The step count is a float32 0-dim tensor under the default non-finite guard (as torch's Adam keeps
    it: a skipped step takes it back on the device), a Python int without the guard."""
    param = torch.nn.Parameter(torch.randn(3))
    opt = Adai([param], skip_nonfinite=skip_nonfinite)
    param.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()["state"][0]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "beta1_prod"}
    assert state["step"] == 1
    assert isinstance(state["step"], torch.Tensor if skip_nonfinite else int)


def test_reference_style_checkpoint_with_tensor_step_loads() -> None:
    param = torch.nn.Parameter(torch.randn(3))
    opt = Adai([param])
    param.grad = torch.ones(3)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = torch.tensor(1.0)
    fresh = Adai([param])
    fresh.load_state_dict(saved)
    assert fresh.state[param]["step"] == 1 and isinstance(fresh.state[param]["step"], int)


def test_lr_scheduler_changes_reach_the_update() -> None:
    ours = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    ref = [p.detach().clone() for p in ours]
    opt = Adai(ours, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    oracle = OracleAdai([{"params": ref}], lr=1.0)
    for step in range(8):
        for i, (p, q) in enumerate(zip(ours, ref)):
            p.grad, q.grad = _grad(step, i, p), _grad(step, i, q)
        oracle.groups[0]["lr"] = opt.param_groups[0]["lr"]
        opt.step()
        oracle.step()
        sched.step()
    assert _max_rel_dev(ours, ref) <= 1e-12


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10, cycle_momentum=False),
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
            milestones=[2]),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    ],
    ids=["cosine", "onecycle", "sequential", "plateau"],
)
def test_works_with_torch_lr_schedulers(make_scheduler) -> None:
    param = torch.nn.Parameter(torch.randn(4))
    opt = Adai([param])
    scheduler = make_scheduler(opt)
    for step in range(6):
        param.grad = torch.randn(4)
        opt.step()
        scheduler.step(1.0) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()
    assert torch.isfinite(param).all()
    sd = copy.deepcopy(scheduler.state_dict())
    scheduler.load_state_dict(sd)


def test_inertia_matches_the_formula_in_float64() -> None:
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    opt = Adai(params, betas=(0.2, 0.9), eps=0.01)
    assert list(opt.inertia()) == []
    _train(params, opt, range(4))
    vhats = {p: opt.state[p]["exp_avg_sq"] / (1 - 0.9 ** opt.state[p]["step"]) for p in params}
    stepped = [p for p in params if p.grad is not None]
    vbar = torch.cat([vhats[p].flatten() for p in stepped]).mean()
    for item in opt.inertia():
        ratio = vhats[item.param] / vbar
        torch.testing.assert_close(item.ratio, ratio)
        torch.testing.assert_close(item.beta1, (1 - 0.2 * ratio).clamp(0, 0.99))


def test_step_never_reads_device_values_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """No .item()/float()/bool() inside step(): on CUDA each would stall the stream."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opts = [Adai(params, foreach=False), Adai(params, foreach=True, weight_decay=0.1)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside step()")

    for p in params:
        p.grad = torch.randn_like(p)
    for opt in opts:  # the skip watch reads its CPU counters on the host (free on CPU; asynchronous on CUDA)
        monkeypatch.setattr(opt._skip_watch, "after_step", lambda skipped, run: None)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for opt in opts:
        opt.step()


@pytest.mark.parametrize("case", ["sparse_last", "fused_on_meta"])
def test_a_refused_step_changes_nothing(case: str) -> None:
    """Every parameter is checked before the first change: a step that raises leaves params and state as they were."""
    dense = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Adai([{"params": dense}], fused=True if case == "fused_on_meta" else None)
    for p in dense:
        p.grad = torch.randn_like(p)
    opt.step()
    if case == "sparse_last":
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt.add_param_group({"params": list(emb.parameters())})
        emb(torch.tensor([1, 2])).sum().backward()
        error = ValueError
    else:
        meta = torch.nn.Parameter(torch.randn(4, device="meta"))
        meta.grad = torch.randn(4, device="meta")
        opt.add_param_group({"params": [meta]})
        error = RuntimeError
    before = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in dense]
    with pytest.raises(error):
        opt.step()
    after = opt.state_dict()
    assert [s["step"] for s in after["state"].values()] == [s["step"] for s in before["state"].values()]
    for key, state in before["state"].items():
        assert all(torch.equal(state[k], after["state"][key][k]) for k in ("exp_avg", "exp_avg_sq", "beta1_prod"))
    assert all(torch.equal(p, q) for p, q in zip(dense, params_before))


def test_torch_distributed_checkpoint_round_trip_with_int_steps(tmp_path) -> None:
    """``step`` stays a Python int (see docs/performance.md): torch.distributed.checkpoint's state-dict API and
    its save/load handle it, and resuming through them is bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def make() -> tuple[torch.nn.Module, Adai]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        return model, Adai(model.parameters(), weight_decay=1e-2)

    def train(model, opt, steps) -> None:
        for step in steps:
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    straight, straight_opt = make()
    train(straight, straight_opt, range(10))
    first, first_opt = make()
    train(first, first_opt, range(5))
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": first.state_dict(), "optim": get_optimizer_state_dict(first, first_opt)},
                 checkpoint_id=tmp_path)
    resumed, resumed_opt = make()
    target = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(target, checkpoint_id=tmp_path)
    resumed.load_state_dict(target["model"])
    set_optimizer_state_dict(resumed, resumed_opt, target["optim"])
    assert [s["step"] for s in resumed_opt.state.values()] == [5] * 4
    train(resumed, resumed_opt, range(5, 10))
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


def test_swa_utils_average_an_adai_run() -> None:
    from torch.optim.swa_utils import SWALR, AveragedModel

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = Adai(model.parameters(), lr=0.5)
    averaged, scheduler = AveragedModel(model), SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    snapshots = []
    for step in range(4):
        opt.zero_grad()
        model(torch.randn(5, 3, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
        averaged.update_parameters(model)
        snapshots.append(model.weight.detach().clone())
        scheduler.step()
    torch.testing.assert_close(averaged.module.weight, torch.stack(snapshots).mean(0))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_single_tensor_path_sums_vbar_in_float64_when_any_state_is_float64() -> None:
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = Adai([a, b], foreach=False)  # the float32 parameter first: it used to set the accumulator's dtype
    a.grad, b.grad = torch.full((3,), 1e-4), torch.full((3,), 1.0 + 1e-12, dtype=torch.float64)
    opt.step()
    assert opt.last_vbar.dtype == torch.float64
    expected = (3 * 1e-4**2 + 3 * (1.0 + 1e-12) ** 2) / 6  # the float32 gradient is 1e-4 rounded to float32
    assert opt.last_vbar.item() == pytest.approx(expected, rel=1e-9)
