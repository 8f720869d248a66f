"""Curvature of a training loss from Hessian-vector products (pure torch, no Lightning).

``HessianOperator`` gives ``v -> H v`` (exact double backward, or finite differences of gradients
for models without a double backward) over a fixed list of batches, on vectors in the parameters'
own layout (:mod:`~adai_lightning.curvature.vectors`: lists of tensors, DTensor shards under FSDP2);
``lanczos_extremes`` / ``power_top_k`` / ``power_smallest`` find extreme eigenpairs (Lanczos can
warm-start from the previous eigenvectors and stop on convergence);
``hutchinson_trace`` / ``hutch_plus_plus_trace`` estimate the trace with a standard error.
"""

from adai_lightning.curvature.eigen import (EigenPairs, default_lanczos_iters, lanczos, lanczos_extremes,
                                            power_iteration, power_smallest, power_top_k)
from adai_lightning.curvature.hvp import HVP_MODES, HessianOperator, finite_difference_step
from adai_lightning.curvature.trace import TraceEstimate, hutch_plus_plus_trace, hutchinson_trace
from adai_lightning.curvature.vectors import flatten, unflatten

__all__ = ["EigenPairs", "HVP_MODES", "HessianOperator", "TraceEstimate", "default_lanczos_iters",
           "finite_difference_step", "flatten", "hutch_plus_plus_trace", "hutchinson_trace", "lanczos",
           "lanczos_extremes", "power_iteration", "power_smallest", "power_top_k", "unflatten"]
