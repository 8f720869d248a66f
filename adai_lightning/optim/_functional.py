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
"""

from __future__ import annotations

from dataclasses import dataclass

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


def effective_grad(param: Tensor, grad: Tensor, hyper: AdaiHyper, dtype: torch.dtype) -> Tensor:
    """The gradient Adai uses: sign-flipped for ``maximize``, plus ``wd * p`` for L2 decay."""
    g = grad.to(dtype)
    if hyper.maximize:
        g = -g
    if hyper.l2 != 0.0:
        g = g.add(param.to(dtype), alpha=hyper.l2)
    return g


def inertia_from_ratio(ratio: Tensor, hyper: AdaiHyper) -> Tensor:
    """``beta1 = clip(1 - beta0 * ratio**(1 / (3 - 2d)), 0, 1 - eps)``, computed in place on ``ratio``."""
    if hyper.dampening != 1.0:
        ratio.pow_(1.0 / (3.0 - 2.0 * hyper.dampening))
    return ratio.mul_(-hyper.beta0).add_(1.0).clamp_(0.0, 1.0 - hyper.eps)


def safe_mean(total: Tensor, count: int | Tensor) -> Tensor:
    """``total / count``, with 1 where the mean is 0 so that ``vhat / vbar`` stays 0, never NaN.

    ``vhat >= 0`` elementwise and ``vbar`` is their mean, so ``vbar == 0`` means every ``vhat``
    is 0 and ``vhat / 1 == 0`` is the intended ratio (every beta1 becomes ``1 - eps``).
    """
    vbar = total / count
    return torch.where(vbar > 0, vbar, torch.ones_like(vbar))


def second_moment_single_tensor(
    params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int], hyper: AdaiHyper
) -> Tensor:
    """Pass 1, one tensor at a time; returns ``sum(vhat)`` as a 0-dim tensor."""
    total = exp_avg_sqs[0].new_zeros(())
    for param, grad, exp_avg_sq, step in zip(params, grads, exp_avg_sqs, steps):
        if hyper.decoupled and hyper.weight_decay != 0.0:
            param.mul_(1.0 - hyper.lr * hyper.weight_decay)
        g = effective_grad(param, grad, hyper, exp_avg_sq.dtype)
        exp_avg_sq.mul_(hyper.beta2).addcmul_(g, g, value=1.0 - hyper.beta2)
        total += exp_avg_sq.sum() / (1.0 - hyper.beta2**step)
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
) -> None:
    """Pass 2, one tensor at a time: the readable form of the update."""
    for param, grad, exp_avg, exp_avg_sq, beta1_prod, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, beta1_prods, steps
    ):
        g = effective_grad(param, grad, hyper, exp_avg.dtype)
        vhat = exp_avg_sq / (1.0 - hyper.beta2**step)
        beta1 = inertia_from_ratio(vhat / vbar.to(vhat.dtype), hyper)
        beta1_prod.mul_(beta1)
        exp_avg.mul_(beta1).addcmul_((1.0 - beta1).pow_(hyper.dampening), g)
        update = exp_avg / (1.0 - beta1_prod)
        param.add_(update.mul_(-hyper.step_scale).to(param.dtype))


def _effective_grads(params: list[Tensor], grads: list[Tensor], hyper: AdaiHyper, dtype: torch.dtype) -> list[Tensor]:
    """Foreach form of :func:`effective_grad`; returns the gradients themselves when nothing changes."""
    if grads[0].dtype != dtype:
        grads = [g.to(dtype) for g in grads]
    if hyper.maximize:
        grads = torch._foreach_neg(grads)
    if hyper.l2 != 0.0:
        params = params if params[0].dtype == dtype else [p.to(dtype) for p in params]
        grads = torch._foreach_add(grads, params, alpha=hyper.l2)
    return grads


def second_moment_foreach(
    params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int], hyper: AdaiHyper
) -> Tensor:
    """Pass 1 with ``torch._foreach_*`` kernels; ``sum(v)`` per tensor is its L1 norm (``v >= 0``)."""
    if hyper.decoupled and hyper.weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - hyper.lr * hyper.weight_decay)
    g = _effective_grads(params, grads, hyper, exp_avg_sqs[0].dtype)
    torch._foreach_mul_(exp_avg_sqs, hyper.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - hyper.beta2)
    sums = torch._foreach_norm(exp_avg_sqs, 1)
    torch._foreach_div_(sums, [1.0 - hyper.beta2**step for step in steps])
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
) -> None:
    """Pass 2 with ``torch._foreach_*`` kernels; same arithmetic as the single-tensor path."""
    dtype = exp_avgs[0].dtype
    g = _effective_grads(params, grads, hyper, dtype)
    beta1 = torch._foreach_div(exp_avg_sqs, [1.0 - hyper.beta2**step for step in steps])
    torch._foreach_div_(beta1, vbar.to(dtype))
    if hyper.dampening != 1.0:
        torch._foreach_pow_(beta1, 1.0 / (3.0 - 2.0 * hyper.dampening))
    torch._foreach_mul_(beta1, -hyper.beta0)
    torch._foreach_add_(beta1, 1.0)
    torch._foreach_clamp_min_(beta1, 0.0)
    torch._foreach_clamp_max_(beta1, 1.0 - hyper.eps)

    torch._foreach_mul_(beta1_prods, beta1)
    torch._foreach_mul_(exp_avgs, beta1)
    one_minus_beta1 = torch._foreach_neg(beta1)
    torch._foreach_add_(one_minus_beta1, 1.0)
    if hyper.dampening != 1.0:
        torch._foreach_pow_(one_minus_beta1, hyper.dampening)
    torch._foreach_addcmul_(exp_avgs, one_minus_beta1, g)
    del g, one_minus_beta1

    bias_correction = beta1  # reuse the buffer for 1 - prod(beta1)
    torch._foreach_copy_(bias_correction, beta1_prods)
    torch._foreach_neg_(bias_correction)
    torch._foreach_add_(bias_correction, 1.0)
    if params[0].dtype == dtype:
        torch._foreach_addcdiv_(params, exp_avgs, bias_correction, value=-hyper.step_scale)
    else:
        update = torch._foreach_div(exp_avgs, bias_correction)
        torch._foreach_mul_(update, -hyper.step_scale)
        torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(update, params)])
