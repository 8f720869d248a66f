"""State that no longer fits its parameter is refused, as torch.optim refuses it, on every path.

Before these checks the native CPU kernel read such state through raw pointers: ``model.double()``
after a float32 step ended in SIGSEGV or "double free or corruption", ``model.float()`` after
float64 steps in garbage parameters, and a state dict of another shape or param-group order in
"munmap_chunk(): invalid pointer". The random sequences of ``tests/test_optim_sequences.py`` run
such cases in subprocesses; here each one is pinned down in-process.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adai_lightning.optim import Adai, _native

#: The paths a CPU step can take: the native kernel (default), foreach, single-tensor.
PATHS = {"native": {}, "foreach": {"foreach": True, "fused": False}, "single": {"foreach": False, "fused": False}}


def stepped(dtype: torch.dtype, path: str, shapes=((6, 6), (4,))) -> tuple[list[nn.Parameter], Adai]:
    """Parameters of ``shapes`` and an Adai on ``path`` that has taken one step."""
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in shapes]
    optimizer = Adai(params, **PATHS[path])
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, dtype=dtype)
    optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("before, after", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["double", "float"])
def test_a_parameter_cast_after_its_first_step_is_refused_before_anything_changes(path, before, after):
    params, optimizer = stepped(before, path)
    params[1].data = params[1].data.to(after)
    params[1].grad = torch.ones_like(params[1])
    snapshot = copy.deepcopy((params, optimizer.state_dict()))
    with pytest.raises(RuntimeError, match=rf"parameter 1 of param group 0: its state 'exp_avg' is \(4,\) "
                                           rf"{before} on cpu, but the parameter needs \(4,\) {after}"):
        optimizer.step()
    for param, kept in zip(params, snapshot[0]):
        assert torch.equal(param, kept.to(param.dtype))  # nothing changed, the other parameter neither
    assert optimizer.state[params[0]]["step"] == 1


@pytest.mark.parametrize("path", PATHS)
def test_a_gradient_left_from_before_a_shape_change_is_refused(path):
    params, optimizer = stepped(torch.float32, path)
    optimizer.state.clear()
    params[0].data = torch.zeros(100, 100)  # the old (6, 6) gradient stays
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0: its gradient is \(6, 6\)"):
        optimizer.step()


@pytest.mark.parametrize("case", ["another shape", "groups reordered"])
def test_load_state_dict_refuses_state_of_another_shape_at_load_time(case):
    big, small = nn.Parameter(torch.randn(100, 100)), nn.Parameter(torch.randn(3))
    source = Adai([{"params": [big]}, {"params": [small]}])
    big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
    source.step()
    if case == "another shape":
        target = Adai([{"params": [nn.Parameter(torch.randn(3, 3))]}, {"params": [nn.Parameter(torch.randn(3))]}])
    else:
        target = Adai([{"params": [small]}, {"params": [big]}])
    with pytest.raises(ValueError, match=r"^Cannot load the Adai state of parameter 0 of param group 0: its "
                                         r"'exp_avg' has shape \(100, 100\) but the parameter has shape"):
        target.load_state_dict(source.state_dict())
    assert not target.state  # refused before anything changed


def test_load_state_dict_still_accepts_the_reference_implementations_step_tensor():
    param = nn.Parameter(torch.randn(3, 2))
    optimizer = Adai([param])
    state = {"step": torch.tensor(4.0), "exp_avg": torch.zeros(3, 2), "exp_avg_sq": torch.ones(3, 2),
             "beta1_prod": torch.full((3, 2), 0.5)}
    optimizer.load_state_dict({"state": {0: state}, "param_groups": [{**optimizer.param_groups[0], "params": [0]}]})
    assert optimizer.state[param]["step"] == 4


def test_the_native_kernel_does_not_take_a_bucket_whose_gradients_differ_in_dtype():
    """A bucket groups by the parameters' dtype; a parameter cast through ``.data`` keeps its old
    gradient, which the kernel would read as the parameter's type (the foreach path converts it)."""
    params = [torch.zeros(4), torch.zeros(4)]
    grads = [torch.ones(4), torch.ones(4, dtype=torch.float64)]
    assert _native.supports(params, grads[:1] * 2, torch.float32)
    assert not _native.supports(params, grads, torch.float32)
