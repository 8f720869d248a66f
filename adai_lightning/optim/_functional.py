"""Functional core of Adai: the two passes of one step, as a single-tensor and a foreach path.

One Adai step needs a global scalar between its two passes:

1. ``second_moment_*`` updates ``v = beta2 * v + (1 - beta2) * g**2`` for every parameter and
   returns the sum of ``vhat = v / (1 - beta2**step)`` over the given tensors;
2. the caller adds those sums over every param group (and, when sharded, over ranks) and divides
   by the element count: ``vbar``;
3. ``inertia_update_*`` forms ``beta1 = clip(1 - beta0 * (vhat / vbar)**(1 / (3 - 2d)), 0, 1 - eps)``
   per element and applies the momentum step.

The gradient ``g`` (with ``maximize`` and L2 weight decay applied) is formed again in pass 2
instead of being kept from pass 1, so no full-model temporary lives between the passes.
``vbar`` stays a device tensor: nothing here synchronises with the host.

Skipping a step on the device (``Adai(skip_nonfinite=True)``): every pass takes ``found_inf``, a
0-dim float32 device tensor (1.0: the gradients hold a non-finite value, change nothing). The eager
paths below cannot branch on it without reading it on the host, so they make the step an exact
identity instead: the gradient becomes 0 (``torch.where``), the coefficients that would move ``v``
and ``p`` become 1 (decay, ``beta2``, ``beta1``) and the denominator of the update becomes
infinite, so every in-place operation writes back the value it read (``x * 1 + 0 == x`` exactly). The step counts are then
0-dim device tensors (see :func:`bias_correction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdaiHyper:
    """The hyperparameters of one param group, as the functional core uses them."""

    lr: float
    beta0: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    dampening: float
    maximize: bool

    @property
    def l2(self) -> float:
        """Coefficient of the L2 term added to the gradient (0 for decoupled decay)."""
        return 0.0 if self.decoupled else self.weight_decay

    @property
    def step_scale(self) -> float:
        """``lr * beta0**(1 - d)``: the factor in front of the bias-corrected momentum."""
        return self.lr * self.beta0 ** (1.0 - self.dampening)


class Guard(NamedTuple):
    """``found_inf`` of a guarded step as the masks the eager paths apply (float64, on the bucket's device)."""

    skip: Tensor  # bool: this step changes nothing
    found: Tensor  # 1.0 when skipped, else 0.0
    keep: Tensor  # 0.0 when skipped, else 1.0

    @classmethod
    def of(cls, found_inf: Tensor | None, device: torch.device) -> Guard | None:
        if found_inf is None:
            return None
        found = found_inf.to(device=device, dtype=torch.float64)
        return cls(found > 0, found, 1.0 - found)

    def pick(self, value: float, skipped: float) -> Tensor:
        """``value``, or ``skipped`` in a skipped step (both endpoints exact: ``x * 1 + y * 0``)."""
        return self.keep * value + self.found * skipped


def _add_scalar_tensor(tensors: list[Tensor], value: Tensor) -> None:
    """``tensors[i] += value`` (a 0-dim tensor): one foreach kernel eagerly; under ``torch.compile`` tracing
    as a list of the value, which dynamo traces without reading it (its scalar-tensor ``_foreach_add_``
    reads it on the host: a graph break)."""
    torch._foreach_add_(tensors, [value] * len(tensors) if torch.compiler.is_compiling() else value)


def _pick(guard: Guard | None, value: float, skipped: float) -> float | Tensor:
    return value if guard is None else guard.pick(value, skipped)


def nonfinite_flag(grads: list[Tensor], device: torch.device) -> Tensor:
    """1.0 (0-dim float32 on ``device``) when any gradient holds a NaN or an infinity, else 0.0.

    One read of every gradient, no host synchronisation: their 2-norms propagate NaN and inf (and
    overflow, also flagging a gradient whose squared norm exceeds the dtype's range, 1.8e19**2 in
    float32, where ``v`` would overflow as well). The inf-norm would not overflow, but on CPU it
    costs 20x as much (82 ms against 4 ms for ResNet-18's gradients on one thread).
    """
    norms = [torch.zeros((), dtype=torch.float32, device=device)]
    if not grads:  # a rank without gradients joins the verdict's all-reduce with 0
        return norms[0]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype([grads])
    for (bucket,), _ in grouped.values():
        norms.append(torch.stack(torch._foreach_norm(bucket, 2)).float().sum().to(device, non_blocking=True))
    return 1.0 - torch.isfinite(torch.stack(norms)).all().float()


def bias_correction(beta2: float, step: int | Tensor) -> float | Tensor:
    """``1 - beta2**step``: a Python float for an int step, a float64 device scalar for a step tensor.

    Step tensors (guarded steps) are clamped at 1: a parameter whose first step was skipped still
    has ``step = 0`` when :meth:`Adai.inertia` reads it, which must not divide by zero.
    """
    if not isinstance(step, Tensor):
        return 1.0 - beta2**step
    return 1.0 - torch.pow(beta2, step.to(torch.float64).clamp_min(1.0))


def effective_grad(param: Tensor, grad: Tensor, hyper: AdaiHyper, dtype: torch.dtype,
                   guard: Guard | None = None) -> Tensor:
    """The gradient Adai uses: sign-flipped for ``maximize``, plus ``wd * p`` for L2 decay; 0 in a skipped step."""
    g = grad.to(dtype)
    if hyper.maximize:
        g = -g
    if hyper.l2 != 0.0:
        g = g.add(param.to(dtype), alpha=hyper.l2)
    if guard is not None:
        g = torch.where(guard.skip, 0.0, g)
    return g


def inertia_from_ratio(ratio: Tensor, hyper: AdaiHyper) -> Tensor:
    """``beta1 = clip(1 - beta0 * ratio**(1 / (3 - 2d)), 0, 1 - eps)``, computed in place on ``ratio``."""
    if hyper.dampening != 1.0:
        ratio.pow_(1.0 / (3.0 - 2.0 * hyper.dampening))
    return ratio.mul_(-hyper.beta0).add_(1.0).clamp_(0.0, 1.0 - hyper.eps)


def safe_mean(total: Tensor, count: int | Tensor) -> Tensor:
    """``total / count``, with 1 where the mean is 0 so that ``vhat / vbar`` stays 0, never NaN.

    ``vhat >= 0`` elementwise and ``vbar`` is their mean, so a zero mean means every ``vhat`` is 0
    (or there is no element at all: only 0-element parameters had gradients, taken as ``0 / 1``), and
    ``vhat / 1 == 0`` is the intended ratio (every beta1 becomes ``1 - eps``). A NaN or infinite
    sum (a non-finite gradient reached ``v``) stays as it is: such a state must show.
    """
    vbar = total / (count.clamp(min=1) if isinstance(count, Tensor) else max(count, 1))  # no element: 0 / 1
    return torch.where(vbar == 0, torch.ones_like(vbar), vbar)


def _sum_dtype(exp_avg_sqs: list[Tensor]) -> torch.dtype:
    """float64 when any state is float64, else float32: the precision ``vbar`` is accumulated in."""
    return torch.float64 if any(v.dtype == torch.float64 for v in exp_avg_sqs) else torch.float32


def second_moment_single_tensor(
    params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int], hyper: AdaiHyper,
    found_inf: Tensor | None = None,
) -> Tensor:
    """Pass 1, one tensor at a time; returns ``sum(vhat)`` as a 0-dim tensor."""
    total = exp_avg_sqs[0].new_zeros((), dtype=_sum_dtype(exp_avg_sqs))
    guard = Guard.of(found_inf, exp_avg_sqs[0].device)
    for param, grad, exp_avg_sq, step in zip(params, grads, exp_avg_sqs, steps):
        if hyper.decoupled and hyper.weight_decay != 0.0:
            param.mul_(_pick(guard, 1.0 - hyper.lr * hyper.weight_decay, 1.0))
        g = effective_grad(param, grad, hyper, exp_avg_sq.dtype, guard)
        exp_avg_sq.mul_(_pick(guard, hyper.beta2, 1.0)).addcmul_(g, g, value=1.0 - hyper.beta2)
        total += exp_avg_sq.sum() / bias_correction(hyper.beta2, step)
    return total


def inertia_update_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    beta1_prods: list[Tensor],
    steps: list[int],
    vbar: Tensor,
    hyper: AdaiHyper,
    found_inf: Tensor | None = None,
) -> None:
    """Pass 2, one tensor at a time: the readable form of the update."""
    guard = Guard.of(found_inf, exp_avgs[0].device)
    for param, grad, exp_avg, exp_avg_sq, beta1_prod, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, beta1_prods, steps
    ):
        g = effective_grad(param, grad, hyper, exp_avg.dtype, guard)
        vhat = exp_avg_sq / bias_correction(hyper.beta2, step)
        beta1 = inertia_from_ratio(vhat / vbar.to(vhat.dtype), hyper)
        if guard is not None:
            beta1 = beta1 * guard.keep + guard.found  # 1 in a skipped step: P and m keep their values
        beta1_prod.mul_(beta1)
        exp_avg.mul_(beta1).addcmul_((1.0 - beta1).pow_(hyper.dampening), g)
        denominator = 1.0 - beta1_prod
        if guard is not None:  # infinite in a skipped step (also where P = 1 still): the update is 0
            denominator = (denominator + guard.found) / guard.keep
        update = exp_avg / denominator
        param.add_(update.mul_(-hyper.step_scale).to(param.dtype))


def _effective_grads(params: list[Tensor], grads: list[Tensor], hyper: AdaiHyper, dtype: torch.dtype,
                     guard: Guard | None = None) -> list[Tensor]:
    """Foreach form of :func:`effective_grad`; returns the gradients themselves when nothing changes."""
    if grads[0].dtype != dtype:
        grads = [g.to(dtype) for g in grads]
    if hyper.maximize:
        grads = torch._foreach_neg(grads)
    if hyper.l2 != 0.0:
        params = params if params[0].dtype == dtype else [p.to(dtype) for p in params]
        grads = torch._foreach_add(grads, params, alpha=hyper.l2)
    if guard is not None:
        grads = [torch.where(guard.skip, 0.0, g) for g in grads]
    return grads


def second_moment_foreach(
    params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int], hyper: AdaiHyper,
    found_inf: Tensor | None = None,
) -> Tensor:
    """Pass 1 with ``torch._foreach_*`` kernels; ``sum(v)`` per tensor is its L1 norm (``v >= 0``)."""
    guard = Guard.of(found_inf, exp_avg_sqs[0].device)
    if hyper.decoupled and hyper.weight_decay != 0.0:
        decay = _pick(guard, 1.0 - hyper.lr * hyper.weight_decay, 1.0)
        if not isinstance(decay, Tensor) and params[0].dtype != exp_avg_sqs[0].dtype:
            # torch._foreach_mul_ rounds a Python scalar to a bfloat16/float16 list's dtype (1 - 1e-4
            # becomes 1.0); a 0-dim float32 tensor is applied in float32, as the single-tensor mul_ does.
            decay = torch.full((), decay, dtype=exp_avg_sqs[0].dtype, device=params[0].device)
        torch._foreach_mul_(params, decay)
    g = _effective_grads(params, grads, hyper, exp_avg_sqs[0].dtype, guard)
    torch._foreach_mul_(exp_avg_sqs, _pick(guard, hyper.beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - hyper.beta2)
    sums = torch._foreach_norm(exp_avg_sqs, 1)
    torch._foreach_div_(sums, [bias_correction(hyper.beta2, step) for step in steps])
    return torch.stack(sums).sum()


def inertia_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    beta1_prods: list[Tensor],
    steps: list[int],
    vbar: Tensor,
    hyper: AdaiHyper,
    found_inf: Tensor | None = None,
) -> None:
    """Pass 2 with ``torch._foreach_*`` kernels; same arithmetic as the single-tensor path."""
    dtype = exp_avgs[0].dtype
    guard = Guard.of(found_inf, exp_avgs[0].device)
    g = _effective_grads(params, grads, hyper, dtype, guard)
    beta1 = torch._foreach_div(exp_avg_sqs, [bias_correction(hyper.beta2, step) for step in steps])
    torch._foreach_div_(beta1, vbar.to(dtype))
    if hyper.dampening != 1.0:
        torch._foreach_pow_(beta1, 1.0 / (3.0 - 2.0 * hyper.dampening))
    torch._foreach_mul_(beta1, -hyper.beta0)
    torch._foreach_add_(beta1, 1.0)
    torch._foreach_clamp_min_(beta1, 0.0)
    torch._foreach_clamp_max_(beta1, 1.0 - hyper.eps)
    if guard is not None:  # beta1 = 1 in a skipped step: P and m keep their values
        torch._foreach_mul_(beta1, guard.keep)
        _add_scalar_tensor(beta1, guard.found)

    torch._foreach_mul_(beta1_prods, beta1)
    torch._foreach_mul_(exp_avgs, beta1)
    one_minus_beta1 = torch._foreach_neg(beta1)
    torch._foreach_add_(one_minus_beta1, 1.0)
    if hyper.dampening != 1.0:
        torch._foreach_pow_(one_minus_beta1, hyper.dampening)
    torch._foreach_addcmul_(exp_avgs, one_minus_beta1, g)
    del g, one_minus_beta1

    denominator = beta1  # reuse the buffer for 1 - prod(beta1)
    torch._foreach_copy_(denominator, beta1_prods)
    torch._foreach_neg_(denominator)
    torch._foreach_add_(denominator, 1.0)
    if guard is not None:  # infinite in a skipped step (also where P = 1 still): the update is 0
        _add_scalar_tensor(denominator, guard.found)
        torch._foreach_div_(denominator, guard.keep)
    if params[0].dtype == dtype:
        torch._foreach_addcdiv_(params, exp_avgs, denominator, value=-hyper.step_scale)
    else:
        update = torch._foreach_div(exp_avgs, denominator)
        torch._foreach_mul_(update, -hyper.step_scale)
        torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(update, params)])
