"""Adai's two passes on CUDA as one Triton launch each per bucket (device and dtype), whatever the model.

The compiled path of :mod:`_fused` launches one ``torch.compile`` kernel per tensor (or pack of
small tensors) and pass: on ResNet-50's 161 tensors that is 110 calls a step, each paying ~17 µs
of Python wrapper plus a launch, about 2 ms of host time where fused Adam needs a fraction of one. Here each pass over a bucket is a single launch of a kernel from
:mod:`_triton_kernels` that reads a table of ``(data pointers, numel, step row)`` per tensor and a
table of fixed-size chunks, like torch's ``multi_tensor_apply``; the step's device work is

- pass 1: one kernel (a float64 partial sum per chunk) and one ``sum`` of the partials;
- pass 2: one kernel that updates ``v, m, P, p`` in place;
- one host-to-device copy of the step's coefficients (float64, from pinned memory, asynchronous);
  the tables are cached, keyed by their contents (data pointers, sizes, step rows), so they are
  uploaded again only when a tensor moves (autograd usually hands out the same gradient memory
  each step).

No host synchronisation, no write into a gradient, deterministic (no atomics: resumed runs
continue bit for bit). Per step the host still visits every tensor once per pass in Python (data
pointers and layout checks, a few microseconds per tensor), but makes no per-tensor torch or
kernel call. Tensors whose gradient or state is laid out differently from the parameter (only
possible for gradients set by hand: autograd gives gradients the parameter's strides) are copied to
contiguous buffers, and their ``p, m, v, P`` copied back after pass 2: per-tensor work, for those
tensors only.

On CPU tensors the same kernels run under Triton's interpreter (the tests do this); the optimizer
dispatches here for CUDA buckets only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from adai_lightning.optim._functional import AdaiHyper, bias_correction
from adai_lightning.optim import _fused
from adai_lightning.optim._native import _shares_dense_layout

#: Elements per block of the kernels' inner loop, and per chunk (one program).
BLOCK = 1024
CHUNK = 8192
_NUM_WARPS = 4
#: Device types the optimizer sends here (the tests add "cpu", for Triton's interpreter).
DEVICE_TYPES = ("cuda",)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """Whether ``triton`` can be imported (CUDA builds of torch ship it)."""
    return importlib.util.find_spec("triton") is not None


def _kernels() -> Any:
    """The kernels module (imported at first use: importing Triton takes a while).

    Under ``TRITON_INTERPRET=1`` (set before Triton is first imported) its kernels run in Triton's
    CPU interpreter, which also accepts CPU tensors.
    """
    from adai_lightning.optim import _triton_kernels

    return _triton_kernels


@functools.cache
def _triton_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def _upload(values: Tensor, device: torch.device) -> Tensor:
    """``values`` (a new CPU tensor) on ``device``: through pinned memory, so the copy does not block."""
    if device.type == "cpu":
        return values
    return values.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _scalars(hyper: AdaiHyper, distinct_steps: tuple[int, ...], device: torch.device) -> Tensor:
    """The kernels' float64 coefficients (layout in :mod:`_triton_kernels`); cached, so pass 2 reuses pass 1's."""
    decay = 1.0 - hyper.lr * hyper.weight_decay if hyper.decoupled else 1.0
    values = [-1.0 if hyper.maximize else 1.0, hyper.l2, hyper.beta2, 1.0 - hyper.beta2, hyper.beta0,
              1.0 - hyper.eps, decay, -hyper.step_scale, 1.0 / (3.0 - 2.0 * hyper.dampening), hyper.dampening]
    values += [1.0 - hyper.beta2**step for step in distinct_steps]
    return _upload(torch.tensor(values, dtype=torch.float64), device)


@functools.lru_cache(maxsize=32)
def _tensor_table(pointers: tuple[int, ...], numels: tuple[int, ...], rows: tuple[int, ...],
                  device: torch.device) -> Tensor:
    """Per tensor: its operands' data pointers (``pointers`` lists operand by operand), numel, step row.

    A pure function of its arguments, so a cached table is right for any tensors at these addresses.
    """
    table = torch.tensor(pointers, dtype=torch.int64).view(-1, len(numels)).t()
    table = torch.cat([table, torch.tensor([numels, rows], dtype=torch.int64).t()], dim=1)
    return _upload(table.contiguous(), device)


@functools.lru_cache(maxsize=32)
def _chunk_table(numels: tuple[int, ...], chunk: int, device: torch.device) -> tuple[Tensor, int]:
    """``(tensor index, first element)`` of every chunk of ``chunk`` elements, and the chunk count."""
    per_tensor = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    index = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(index.numel()) - first[index]) * chunk
    return _upload(torch.stack([index, starts], dim=1), device), index.numel()


def _regular(lists: list[list[Tensor]], written: tuple[int, ...] = ()) -> tuple[list[list[Tensor]], list]:
    """The operands as the kernels read them (flat from each data pointer), and the ``(original, copy)``
    pairs of the lists at positions ``written`` whose results must be copied back.

    A tensor whose operands do not share one dense layout gets contiguous copies of them all.
    """
    if all(map(Tensor.is_contiguous, chain.from_iterable(lists))):  # the usual case, checked fastest
        return lists, []
    irregular = [i for i, one in enumerate(zip(*lists)) if not _shares_dense_layout(one)]
    if not irregular:
        return lists, []
    lists = [list(lst) for lst in lists]
    pairs = []
    for position, lst in enumerate(lists):
        for i in irregular:
            copy = lst[i].contiguous()
            if position in written and copy is not lst[i]:
                pairs.append((lst[i], copy))
            lst[i] = copy
    return lists, pairs


_last_device_scalars: list = [None, None]  # [key, scalars] of the last call: pass 2 reuses pass 1's


def _device_scalars(hyper: AdaiHyper, steps: list[Tensor], device: torch.device) -> Tensor:
    """The coefficients with one ``1 - beta2**step`` row per step tensor, formed on the device (6 small
    ops); pass 2 reuses pass 1's: the key holds the step tensors and their version counters, which
    every in-place change of a count advances."""
    key = (hyper, device, tuple(map(id, steps)), tuple(step._version for step in steps))
    if _last_device_scalars[0] != key:
        bias = bias_correction(hyper.beta2, torch.stack(steps))
        _last_device_scalars[:] = key, torch.cat([_scalars(hyper, (), device), bias])
    return _last_device_scalars[1]


def _launch_tables(lists: list[list[Tensor]], steps: list[int] | list[Tensor], hyper: AdaiHyper
                   ) -> tuple[Tensor, Tensor, int, Tensor]:
    """Device tables for these operand lists (cached), their chunk count, and the kernels' coefficients.

    Int step counts: one bias-correction row per distinct count (formed on the host, cached). Step
    tensors (a guarded step, ``skip_nonfinite``): one row per tensor, ``1 - beta2**step`` formed on
    the device from the counts, which the host never reads.
    """
    device = lists[0][0].device
    if isinstance(steps[0], Tensor):
        rows = tuple(range(len(steps)))
        scalars = _device_scalars(hyper, steps, device)
    else:
        distinct = sorted(set(steps))
        rows = (0,) * len(steps) if len(distinct) == 1 else tuple(distinct.index(s) for s in steps)
        scalars = _scalars(hyper, tuple(distinct), device)
    numels = tuple(map(Tensor.numel, lists[0]))
    table = _tensor_table(tuple(map(Tensor.data_ptr, chain.from_iterable(lists))), numels, rows, device)
    chunks, count = _chunk_table(numels, CHUNK, device)
    return table, chunks, count, scalars


def _launch(name: str, count: int, device: torch.device, *args: Any, **constexprs: Any) -> None:
    """Launch kernel ``name`` over ``count`` chunks on ``device`` (Triton launches on the current device)."""
    if count:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            getattr(_kernels(), name)[(count,)](*args, **constexprs, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=_NUM_WARPS)


def _types(params: list[Tensor], grads: list[Tensor], state: Tensor) -> dict[str, Any]:
    return dict(G_TYPE=_triton_dtype(grads[0].dtype), S_TYPE=_triton_dtype(state.dtype),
                P_TYPE=_triton_dtype(params[0].dtype))


def vhat_sum_multi_tensor(params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int],
                          hyper: AdaiHyper, found_inf: Tensor | None = None) -> Tensor:
    """Pass 1: ``sum(vhat)`` (float64, 0-dim) of the updated second moment; changes no tensor.

    ``found_inf`` is accepted for the common path signature: this pass writes nothing, so a skipped
    step needs nothing from it (pass 2 is what skips).
    """
    del found_inf
    (grads, exp_avg_sqs, params), _ = _regular([grads, exp_avg_sqs, params])
    table, chunks, count, scalars = _launch_tables([grads, exp_avg_sqs, params], steps, hyper)
    device = exp_avg_sqs[0].device
    partials = torch.empty(count, dtype=torch.float64, device=device)
    _launch("vhat_sum_kernel", count, device, table, chunks, scalars, partials,
            **_types(params, grads, exp_avg_sqs[0]), USE_L2=hyper.l2 != 0.0)
    return partials.sum()


def inertia_update_multi_tensor(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                                exp_avg_sqs: list[Tensor], beta1_prods: list[Tensor], steps: list[int],
                                vbar: Tensor, hyper: AdaiHyper, found_inf: Tensor | None = None) -> None:
    """Pass 2: second moment, inertia, momentum and parameter update, in place; with ``found_inf``
    (0-dim float32 on the device, 1.0 = skip) nonzero, nothing changes."""
    operands, pairs = _regular([params, grads, exp_avgs, exp_avg_sqs, beta1_prods], written=(0, 2, 3, 4))
    table, chunks, count, scalars = _launch_tables(operands, steps, hyper)
    device = exp_avgs[0].device
    _launch("inertia_update_kernel", count, device, table, chunks, scalars, vbar,
            vbar if found_inf is None else found_inf, **_types(params, grads, exp_avgs[0]), USE_L2=hyper.l2 != 0.0,
            DAMPED=hyper.dampening != 1.0, HAS_FOUND_INF=found_inf is not None)
    for original, copy in pairs:  # never a gradient
        original.copy_(copy)


def unsupported_reason(params: list[Tensor], grads: list[Tensor]) -> str | None:
    """Why the multi-tensor kernels cannot run this bucket, or None when they can."""
    if not triton_available():
        return "Triton is not installed"
    if any(type(p) not in (Tensor, torch.nn.Parameter) for p in params):
        return "it needs plain tensors (tensor subclasses such as DTensor are not supported)"
    if params[0].dtype not in _DTYPES or grads[0].dtype not in _DTYPES:
        return f"it supports dtypes {_DTYPES}, not {params[0].dtype}/{grads[0].dtype}"
    if any(g.dtype != grads[0].dtype for g in grads):
        return "the gradients of one bucket have different dtypes"
    return None


@functools.lru_cache(maxsize=None)
def _build_error(device: torch.device, param_dtype: torch.dtype, grad_dtype: torch.dtype, state_dtype: torch.dtype,
                 use_l2: bool, damped: bool) -> str | None:
    """Compile (and run once, on scratch tensors) every kernel variant a step of this kind can launch.

    Cached, failures included. A toolchain failure is caught here, before any optimizer state
    changes, instead of in the middle of a step.
    """
    def scratch(dtype: torch.dtype, fill: float) -> list[Tensor]:
        return [torch.full((n,), fill, dtype=dtype, device=device) for n in (3, 1)]

    params, grads = scratch(param_dtype, 1.0), scratch(grad_dtype, 1.0)
    hyper = AdaiHyper(1.0, 0.1, 0.99, 1e-3, 0.1 if use_l2 else 0.0, False, 0.5 if damped else 1.0, False)
    try:
        total = vhat_sum_multi_tensor(params, grads, scratch(state_dtype, 0.0), [1, 1], hyper)
        for found_inf in (None, torch.ones((), device=device)):
            inertia_update_multi_tensor(params, grads, scratch(state_dtype, 0.0), scratch(state_dtype, 0.0),
                                        scratch(state_dtype, 1.0), [1, 1], total / 4, hyper, found_inf)
    except Exception as error:  # noqa: BLE001  (any toolchain failure means: use another path)
        return f"compiling its Triton kernels failed ({type(error).__name__}: {error})"
    return None


_warned: set[str] = set()


def use_multi_tensor(requested: bool | None, params: list[Tensor], grads: list[Tensor], state_dtype: torch.dtype,
                     hyper: AdaiHyper) -> bool:
    """Whether to run this bucket (one device and dtype) on the multi-tensor Triton kernels.

    CUDA buckets only (CPU has the native kernel). ``requested=None`` takes buckets of at least
    ``_fused.AUTO_MIN_NUMEL`` elements (below that, the first step's compilation does not pay for
    itself); ``True`` any bucket. When the kernels cannot run, warns once per reason and returns
    False: the caller tries the ``torch.compile`` path, which raises for ``fused=True`` if it cannot
    run either. Inside a ``torch.compile``-traced region the eager path is used.
    """
    if requested is False or torch.compiler.is_compiling() or params[0].device.type not in DEVICE_TYPES:
        return False
    if requested is None and sum(p.numel() for p in params) < _fused.AUTO_MIN_NUMEL:
        return False
    reason = unsupported_reason(params, grads) or _build_error(
        params[0].device, params[0].dtype, grads[0].dtype, state_dtype, hyper.l2 != 0.0, hyper.dampening != 1.0)
    if reason is None:
        return True
    _fused.warn_once(_warned, reason,
                     f"Adai's multi-tensor CUDA step is unavailable, trying the compiled path: {reason}")
    return False
