"""The optimizer's edge of stability on the local quadratic: one ratio, 1.0 at the edge, for every optimizer.

``lambda_max * lr < 2`` is the stability condition of plain gradient descent only. Each optimizer we
offer is, on a quadratic with Hessian ``H`` and with its step sizes and inertia held fixed, a linear
iteration of the EMA-momentum form (per element ``i``)

    m_i <- beta_i m_i + (1 - beta_i) g_i,        x_i <- x_i - L_i m_i,

with a step size ``L_i`` and an inertia ``beta_i``. At its edge an eigenvalue of the iteration
crosses -1: ``m -> -m`` gives ``m = -(1 + B)^-1 (1 - B) H x`` and ``x -> -x`` gives ``L m = -2 x``,
so the iteration loses stability when ``lambda_max(S H S) = 2`` with the diagonal

    S^2 = L (1 - beta) / (1 + beta).

The ratio ``stability_ratio = lambda_max(S H S) / 2`` is therefore 1.0 at the edge for all of them
(for one scalar beta this is heavy ball's ``lambda < 2 (1 + beta) / (L (1 - beta))``; with a
per-element beta it is exact for the crossing at -1, the one that happens for a positive ``H``):

- plain gradient descent (SGD, momentum 0): ``S^2 = lr`` (the familiar ``lr lambda_max / 2``);
- torch's heavy-ball SGD ``b <- mu b + (1 - tau) g; x <- x - lr b``: ``L = lr (1 - tau) / (1 - mu)``,
  ``beta = mu``, so ``S^2 = lr (1 - tau) / (1 + mu)``; Nesterov (``tau = 0``) is not of the EMA form,
  its edge is ``lr lambda = 2 (1 + mu) / (1 + 2 mu)``, so ``S^2 = lr (1 + 2 mu) / (1 + mu)``;
- Adam/AdamW: ``beta = beta1``, ``L = lr / ((1 - beta1^t)(sqrt(vhat) + eps))``: the preconditioned
  sharpness of Cohen et al. (2022) against ``(2 + 2 beta1) / (lr (1 - beta1))``, per element;
- Adai/AdaiW: ``beta`` = the per-element beta1 of the last step, ``L = lr beta0^(1-d) (1 -
  beta1)^(d-1) / (1 - P)`` (``P`` the product of past beta1: Adai's own bias correction).

Coupled (L2) weight decay adds ``wd`` to the Hessian; decoupled decay (AdamW, AdaiW) only shrinks
the weights by ``1 - lr wd`` per step and is left out. The step sizes and inertia are read from the
optimizer's state after its step, with the learning rates the step used (give them explicitly: a
scheduler may already have moved ``param_groups[i]["lr"]``). The analysis holds them fixed: Adam's
and Adai's change with the gradients, so the ratio describes the last step's local iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from adai_lightning.curvature.eigen import EigenPairs, MatVec, lanczos_extremes
from adai_lightning.curvature.vectors import Vector


class LinearisedStep(NamedTuple):
    """Per element, in the layout of the parameters given: ``scale`` = S^2 and the coupled decay;
    ``uniform`` = ``(S^2, wd)`` when both are one number for every element (then no extra products are
    needed), else None."""

    scale: Vector
    decay: Vector
    uniform: tuple[float, float] | None


Rule = Callable[[dict[str, Any], float, Tensor, dict[str, Any]], tuple[Tensor | float, float]]


def _sgd(group: dict[str, Any], lr: float, param: Tensor, state: dict[str, Any]) -> tuple[Tensor | float, float]:
    mu, tau = group["momentum"], group["dampening"]
    if mu == 0:
        scale = lr
    elif group["nesterov"]:
        scale = lr * (1 + 2 * mu) / (1 + mu)
    else:
        scale = lr * (1 - tau) / (1 + mu)
    return scale, group["weight_decay"]


def _adam(group: dict[str, Any], lr: float, param: Tensor, state: dict[str, Any],
          decoupled: bool) -> tuple[Tensor | float, float]:
    if not state:
        return 0.0, 0.0
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    denominator = second.sqrt() / (1 - beta2 ** step) ** 0.5 + group["eps"]
    scale = lr / (1 - beta1 ** step) / denominator * (1 - beta1) / (1 + beta1)
    return scale, 0.0 if decoupled or group.get("decoupled_weight_decay") else group["weight_decay"]


def _adai(group: dict[str, Any], lr: float, param: Tensor, state: dict[str, Any],
          inertia: dict[int, Tensor]) -> tuple[Tensor | float, float]:
    beta1 = inertia.get(id(param))
    if beta1 is None:
        return 0.0, 0.0
    beta0, d = group["betas"][0], group["dampening"]
    step_size = lr * beta0 ** (1 - d) * (1 - beta1) ** (d - 1) / (1 - state["beta1_prod"])
    return step_size * (1 - beta1) / (1 + beta1), 0.0 if group["decoupled"] else group["weight_decay"]


def _rule(optimizer: torch.optim.Optimizer) -> Rule | None:
    from adai_lightning.optim import Adai  # the optimizer package is pure torch too

    if isinstance(optimizer, Adai):
        return partial(_adai, inertia={id(item.param): item.beta1 for item in optimizer.inertia()})
    if isinstance(optimizer, torch.optim.SGD):
        return _sgd
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return partial(_adam, decoupled=isinstance(optimizer, torch.optim.AdamW))
    return None


def linearised_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                    lrs: Sequence[float] | None = None) -> LinearisedStep | None:
    """``S^2`` and the coupled decay of ``optimizer``'s last step for each element of ``params``.

    ``lrs``: the learning rate of each param group at that step (default: the current ones).
    Parameters the optimizer does not hold, or that have no state yet, get 0 (they did not move).
    Returns None for an optimizer whose iteration is not modelled (anything but Adai/AdaiW, SGD,
    Adam, AdamW).
    """
    rule = _rule(optimizer)
    if rule is None:
        return None
    lrs = [float(g["lr"]) for g in optimizer.param_groups] if lrs is None else list(lrs)
    if len(lrs) != len(optimizer.param_groups):
        raise ValueError(f"Invalid lrs: {len(lrs)} values for {len(optimizer.param_groups)} param groups")
    owner = {id(p): (group, lr) for group, lr in zip(optimizer.param_groups, lrs) for p in group["params"]}
    scales, decays, numbers = [], [], set()
    for param in params:
        if id(param) not in owner:
            scale, decay = 0.0, 0.0
        else:
            group, lr = owner[id(param)]
            scale, decay = rule(group, lr, param, optimizer.state.get(param, {}))
        if isinstance(scale, Tensor):
            numbers.add(None)
            scales.append(scale.to(param.dtype).expand_as(param))
        else:
            numbers.add((float(scale), float(decay)))
            scales.append(torch.full_like(param, float(scale)))
        decays.append(torch.full_like(param, float(decay)))
    return LinearisedStep(scales, decays, next(iter(numbers)) if len(numbers) == 1 else None)


def stability_ratio(hessian: MatVec, step: LinearisedStep, generator: torch.Generator, like: Sequence[Tensor],
                    num_iters: int = 20, lambda_max: float | None = None, previous: Sequence[Vector] = (),
                    tol: float | None = None) -> EigenPairs:
    """``lambda_max(S (H + wd) S) / 2``: below 1 the optimizer's local iteration is stable.

    Returned as ``EigenPairs``: the ratio (``values[0]``) and the top eigenvector of ``S (H + wd) S`` to
    start from next time. With a uniform ``S^2`` and decay and a known ``lambda_max`` of ``H`` it is
    arithmetic (no vector, no product); otherwise Lanczos on the scaled operator (at most ``num_iters``
    Hessian-vector products, started from ``previous``, stopping at ``tol``, see
    :func:`~adai_lightning.curvature.eigen.lanczos_extremes`).
    """
    if step.uniform is not None and lambda_max is not None:
        scale, decay = step.uniform
        return EigenPairs(torch.tensor([scale * (lambda_max + decay) / 2], dtype=torch.float64), [], 0)
    roots = [s.clamp(min=0).sqrt().to(p.dtype) for s, p in zip(step.scale, like)]
    decays = [d.to(p.dtype) for d, p in zip(step.decay, like)]

    def scaled(vector: Vector) -> Vector:
        inner = [root * v for root, v in zip(roots, vector)]
        return [root * (hv + decay * v) for root, hv, decay, v in zip(roots, hessian(inner), decays, inner)]

    top = lanczos_extremes(scaled, like, 1, "largest", generator, num_iters, previous, tol)
    return top._replace(values=top.values / 2)
