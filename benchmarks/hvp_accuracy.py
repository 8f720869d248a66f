"""Finite-difference Hessian-vector products against exact float32 ones: the curves' error, and the step sweep.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/hvp_accuracy.py [--models small gpt resnet18] \
        [--precisions fp32 bf16-mixed] [--iters 20] [--trace-samples 10] [--rel-steps 1e-4 3e-4 1e-3 ...] 2>/dev/null

Models and their one batch come from ``benchmarks/hvp_cost.py`` (train mode): ``small`` the default
recipe's ``SmallConvNet`` (batch 64), ``gpt`` the GPT recipe's ``TinyGPT`` (SDPA, 8 windows of 64
tokens), ``resnet18`` torchvision's ResNet-18 (batch 8 by default: CPU time). The reference is
``hvp="exact"`` in float32 (math SDPA kernel). Each precision then runs ``hvp="exact"`` (math
kernel) and ``hvp="finite_difference"`` (the kernel torch picks) from the same start vector and
probes: ``iters`` Lanczos steps (lambda_max and lambda_min of one run), a ``trace-samples``-probe
Hutchinson trace, and one product ``H v`` with a fixed random ``v``. ``bf16-mixed`` runs all of it
under ``torch.autocast("cpu", torch.bfloat16)`` (what a probe called inside Lightning's ``bf16-mixed``
training step would see; the callbacks' own probe runs outside it, in float32): exact products in
bfloat16 autocast, finite differences with autocast turned off (said in a warning, silenced here).
Printed: the reference values and each computation's relative error against them.

``--rel-steps``: instead, the relative error of one product ``H v`` in float32 for each relative
step ``r`` (see ``finite_difference_step``), with the fixed random ``v`` and with the top eigenvector
of ``iters`` exact Lanczos steps (the direction lambda_max is read along), to fit the error model
``A r^2 + B u / r``; ``default`` marks the library's step.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from adai_lightning.curvature import HessianOperator, flatten, hutchinson_trace, unflatten
from adai_lightning.curvature.eigen import lanczos, warm_start
from adai_lightning.curvature.hvp import STEP_FACTOR
from benchmarks.hvp_cost import DEFAULT_BATCH, MODELS, build, cross_entropy

PRECISIONS = ("fp32", "bf16-mixed")
CURVES = ("lambda_max", "lambda_min", "trace", "product")


def operator_for(name: str, batch: int, hvp: str, rel_step: float | None = None) -> HessianOperator:
    """A fresh (seeded) model's operator on its one batch."""
    model, data = build(name, batch, "train")
    kernel = sdpa_kernel(SDPBackend.MATH) if hvp == "exact" else contextlib.nullcontext()

    def loss_fn(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with kernel:
            return cross_entropy(model, pair)

    params = [p for p in model.parameters() if p.requires_grad]
    return HessianOperator(params, loss_fn, [data], hvp=hvp, rel_step=rel_step)


def fixed_vector(operator: HessianOperator) -> list[torch.Tensor]:
    """The same random unit vector for every computation."""
    flat = torch.randn(operator.dim, generator=torch.Generator().manual_seed(2))
    return unflatten(flat / flat.norm(), operator.params)


def measure(name: str, batch: int, hvp: str, precision: str, iters: int, trace_samples: int) -> dict[str, object]:
    """lambda_max, lambda_min, the trace and one product ``H v`` (flat) with one way of taking products."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with operator_for(name, batch, hvp) as operator, autocast, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "autocast turned off": said in the docstring
        product = flatten(operator(fixed_vector(operator))).double()
        pairs = lanczos(operator, warm_start([], operator.params, torch.Generator().manual_seed(0)), iters, (0, -1))
        trace = hutchinson_trace(operator, operator.params, trace_samples, torch.Generator().manual_seed(1))
    return {"lambda_max": float(pairs.values[-1]), "lambda_min": float(pairs.values[0]), "trace": trace.trace,
            "product": product}


def relative_error(value: object, reference: object) -> float:
    if isinstance(value, torch.Tensor):
        return float((value - reference).norm() / reference.norm())
    return abs(value - reference) / abs(reference)


def accuracy_table(models: list[str], precisions: list[str], iters: int, trace_samples: int,
                   batch: int | None) -> None:
    print("| model | precision | lambda_max | err exact | err FD | lambda_min | err exact | err FD | trace "
          "| err exact | err FD | product err exact | product err FD |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in models:
        size = batch or (8 if name == "resnet18" else DEFAULT_BATCH[name])
        reference = measure(name, size, "exact", "fp32", iters, trace_samples)
        for precision in precisions:
            exact = reference if precision == "fp32" else measure(name, size, "exact", precision, iters, trace_samples)
            fd = measure(name, size, "finite_difference", precision, iters, trace_samples)
            cells = []
            for curve in CURVES:
                if curve != "product":
                    cells.append(f"{reference[curve]:.4g}")
                cells += ["ref" if exact is reference else f"{relative_error(exact[curve], reference[curve]):.1e}",
                          f"{relative_error(fd[curve], reference[curve]):.1e}"]
            print(f"| {name} (batch {size}) | {precision} | " + " | ".join(cells) + " |", flush=True)


def step_sweep(models: list[str], rel_steps: list[float], batch: int | None, iters: int) -> None:
    default = STEP_FACTOR * torch.finfo(torch.float32).eps ** (1 / 3)
    print("| model | relative step r | error of H v, random v | error of H v, top eigenvector v |")
    print("|---|---:|---:|---:|")
    for name in models:
        size = batch or (8 if name == "resnet18" else DEFAULT_BATCH[name])
        with operator_for(name, size, "exact") as operator:
            start = warm_start([], operator.params, torch.Generator().manual_seed(0))
            vectors = [fixed_vector(operator), lanczos(operator, start, iters, (-1,)).vectors[-1]]
            references = [flatten(operator(vector)).double() for vector in vectors]
        for step in sorted(rel_steps + [default]):
            with operator_for(name, size, "finite_difference", step) as operator:
                errors = [relative_error(flatten(operator(vector)).double(), reference)
                          for vector, reference in zip(vectors, references)]
            label = f"{step:.2e}" + (" (default)" if step == default else "")
            print(f"| {name} | {label} | {errors[0]:.2e} | {errors[1]:.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--iters", type=int, default=20, help="Lanczos steps")
    parser.add_argument("--trace-samples", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: as hvp_cost.py, resnet18 8)")
    parser.add_argument("--rel-steps", nargs="+", type=float, default=None,
                        help="sweep these relative steps (float32 product error) instead of the accuracy table")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.rel_steps:
        step_sweep(args.models, args.rel_steps, args.batch, args.iters)
    else:
        accuracy_table(args.models, args.precisions, args.iters, args.trace_samples, args.batch)


if __name__ == "__main__":
    main()
