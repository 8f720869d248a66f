"""HessianOperator's kept first-order graph: same products as rebuilding it, rebuilt when stale, freed on release."""

import gc
import weakref

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from adai_lightning.callbacks._hessian_probe import HessianProbe
from adai_lightning.curvature import HessianOperator, flatten, unflatten


def _model(seed=0):
    """Conv + BatchNorm (training mode: batch statistics) + Tanh, float64: a non-trivial Hessian."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()


def _batches(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 4, (5,), generator=gen))
            for _ in range(count)]


def _operator(model, batches, **kwargs):
    def loss_fn(batch):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets)

    return HessianOperator(model.parameters(), loss_fn, batches, **kwargs)


def _vectors(operator, count=4):
    """Random vectors in the layout of the operator's parameters."""
    gen = torch.Generator().manual_seed(7)
    return [unflatten(torch.randn(operator.dim, generator=gen, dtype=torch.float64), operator.params)
            for _ in range(count)]


def _assert_same(actual, expected):
    torch.testing.assert_close(flatten(actual), flatten(expected), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_batches", [1, 3])
def test_reused_products_equal_fresh_ones_and_the_graph_is_built_once(num_batches):
    model, batches = _model(), _batches(num_batches)
    reused, fresh = _operator(model, batches, reuse_graph=True), _operator(model, batches, reuse_graph=False)
    vectors = _vectors(reused)
    for vector in vectors:
        _assert_same(reused(vector), fresh(vector))
    assert reused.num_graph_builds == num_batches  # once per batch for all products
    assert fresh.num_graph_builds == num_batches * len(vectors)
    assert reused.num_products == fresh.num_products == len(vectors)
    assert all(p.grad is None for p in model.parameters())


def test_automatic_choice_reuses_only_a_single_batch():
    model = _model()
    assert _operator(model, _batches(1)).reuse_graph is True
    assert _operator(model, _batches(2)).reuse_graph is False
    with pytest.raises(ValueError, match="reuse_graph"):
        _operator(model, _batches(1), reuse_graph="yes")


def test_in_place_parameter_update_rebuilds_the_graph():
    model, batches = _model(), _batches(2)
    operator = _operator(model, batches, reuse_graph=True)
    vector = _vectors(operator, 1)[0]
    before = operator(vector)
    with torch.no_grad():
        next(model.parameters()).add_(0.3)  # an optimizer-style in-place update
    after = operator(vector)
    assert operator.num_graph_builds == 4
    _assert_same(after, _operator(model, batches, reuse_graph=False)(vector))
    assert not torch.allclose(flatten(after), flatten(before))


def _saved_activation(model):
    """A weak reference to the Tanh output of the next forward (the graph saves it for backward)."""
    refs = []
    handle = model[2].register_forward_hook(lambda module, args, output: refs.append(weakref.ref(output)))
    return refs, handle


def test_release_and_context_exit_free_the_graph():
    model, batches = _model(), _batches(1)
    vector = _vectors(_operator(model, batches), 1)[0]
    refs, handle = _saved_activation(model)
    operator = _operator(model, batches)
    operator(vector)
    gc.collect()
    assert operator.holds_graph and refs[0]() is not None
    operator.release()
    gc.collect()
    assert not operator.holds_graph and refs[0]() is None
    with _operator(model, batches) as scoped:
        scoped(vector)
        scoped(vector)
        assert scoped.num_graph_builds == 1 and refs[1]() is not None
    gc.collect()
    assert not scoped.holds_graph and refs[1]() is None and len(refs) == 2
    handle.remove()


def test_gradient_from_the_kept_graph_equals_a_fresh_gradient():
    model, batches = _model(), _batches(3)
    reused = _operator(model, batches, reuse_graph=True)
    fresh = _operator(model, batches, reuse_graph=False)
    _assert_same(reused.gradient(), fresh.gradient())  # no graph kept yet: plain backward
    reused(_vectors(reused, 1)[0])
    _assert_same(reused.gradient(), fresh.gradient())  # read from the kept graphs
    assert reused.num_graph_builds == 3


@pytest.mark.parametrize("reuse_graph", [True, False])
def test_unused_and_linear_parameters_give_zero_rows_and_reduce_sees_the_sum(reuse_graph):
    model, batches = _model(), _batches(2)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))  # never reaches the loss
    linear = nn.Parameter(torch.ones(2, dtype=torch.float64))  # its gradient is a constant
    params = [*model.parameters(), unused, linear]
    calls = []

    def loss_fn(batch):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets) + (linear * 2.0).sum()

    def reduce(vector):
        calls.append([v.clone() for v in vector])
        return [2 * v for v in vector]

    def make(**kwargs):
        return HessianOperator(params, loss_fn, batches, reuse_graph=reuse_graph, **kwargs)

    vector = _vectors(make(), 1)[0]
    local = make()(vector)
    assert torch.count_nonzero(flatten(local)[-5:]) == 0
    _assert_same(make(reduce=reduce)(vector), [2 * v for v in local])
    assert len(calls) == 1  # one reduction per product, after summing the batches
    _assert_same(calls[0], local)


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = _model()

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.body(batch[0]), batch[1])


def test_probe_frees_the_graph_after_each_cadence_point():
    module = _Tiny()
    probe = HessianProbe("test", 1, _batches(1), None, train_mode=True, on_error="raise", seed=0)
    operators = []

    def compute(operator):
        operators.append(operator)
        return operator(_vectors(operator, 1)[0]), operator(_vectors(operator, 1)[0])

    first, second = probe.run(None, module, compute)
    _assert_same(first, second)
    assert operators[0].num_graph_builds == 1 and not operators[0].holds_graph
