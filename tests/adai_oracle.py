"""A deliberately plain float64 loop implementation of Adai, straight from the paper's algorithm.

It is the reference every optimizer path is tested against: no vectorisation, no shared code
with the package, one element at a time where the paper says "per element".
"""

from __future__ import annotations

import torch


class OracleAdai:
    """Adai on float64 copies of the parameters; ``groups`` is a list of dicts with ``params`` and options."""

    def __init__(self, groups, lr=1.0, betas=(0.1, 0.99), eps=1e-3, weight_decay=0.0, decoupled=False,
                 dampening=1.0, maximize=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                        dampening=dampening, maximize=maximize)
        self.groups = [{**defaults, **group} for group in groups]
        self.state = {}

    def step(self):
        """One step; each parameter is a float64 tensor with ``.grad`` set (or None)."""
        active = []
        vhat_sum, numel = 0.0, 0
        for group in self.groups:
            beta0, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                                                   "P": torch.ones_like(p)})
                st["step"] += 1
                g = p.grad.clone()
                if group["maximize"]:
                    g = -g
                wd = group["weight_decay"]
                if wd != 0 and not group["decoupled"]:
                    g = g + wd * p.data
                if wd != 0 and group["decoupled"]:
                    p.data.mul_(1 - group["lr"] * wd)
                flat_v = st["v"].view(-1)
                flat_g = g.reshape(-1)
                vhat = torch.empty_like(flat_v)
                for i in range(flat_v.numel()):
                    flat_v[i] = beta2 * flat_v[i] + (1 - beta2) * flat_g[i] * flat_g[i]
                    vhat[i] = flat_v[i] / (1 - beta2 ** st["step"])
                    vhat_sum += float(vhat[i])
                numel += flat_v.numel()
                active.append((group, p, g, vhat, st))
        if not active:
            return
        vbar = vhat_sum / numel
        for group, p, g, vhat, st in active:
            beta0 = group["betas"][0]
            d = group["dampening"]
            flat_p, flat_g = p.data.view(-1), g.reshape(-1)
            m, P = st["m"].view(-1), st["P"].view(-1)
            for i in range(flat_p.numel()):
                ratio = float(vhat[i]) / vbar if vbar > 0 else 0.0
                beta1 = min(max(1 - beta0 * ratio ** (1 / (3 - 2 * d)), 0.0), 1 - group["eps"])
                P[i] = P[i] * beta1
                m[i] = beta1 * m[i] + (1 - beta1) ** d * flat_g[i]
                flat_p[i] = flat_p[i] - group["lr"] * beta0 ** (1 - d) * m[i] / (1 - P[i])
