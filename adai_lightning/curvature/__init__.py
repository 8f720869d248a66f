"""Curvature of a training loss from Hessian-vector products (pure torch, no Lightning).

``HessianOperator`` gives ``v -> H v`` by double backward over a fixed list of batches (keeping
the first-order graph across products when asked or when there is a single batch);
``lanczos_extremes`` / ``power_top_k`` / ``power_smallest`` find extreme eigenpairs;
``hutchinson_trace`` / ``hutch_plus_plus_trace`` estimate the trace with a standard error.
"""

from adai_lightning.curvature.eigen import (EigenPairs, default_lanczos_iters, lanczos, lanczos_extremes,
                                            power_iteration, power_smallest, power_top_k)
from adai_lightning.curvature.hvp import HessianOperator, flatten, unflatten
from adai_lightning.curvature.trace import TraceEstimate, hutch_plus_plus_trace, hutchinson_trace

__all__ = ["EigenPairs", "HessianOperator", "TraceEstimate", "default_lanczos_iters", "flatten", "hutch_plus_plus_trace", "hutchinson_trace",
           "lanczos", "lanczos_extremes", "power_iteration", "power_smallest", "power_top_k", "unflatten"]
