"""Adai's two passes on CPU as two calls into a small C library (``adai_cpu.c``), whatever the model.

The compiled path of :mod:`_fused` generates fast loops but launches them once per tensor (or pack
of small tensors), and each launch through ``torch.compile``'s Python wrappers costs about 17 µs:
on ResNet-18's 62 tensors that overhead and the packing bookkeeping are a third of the step. Here a
pass over a whole device/dtype bucket is one ``ctypes`` call that receives arrays of data pointers,
so the per-step overhead is a few microseconds per tensor of Python (collecting pointers).

The library is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``; the same requirement as inductor's CPU backend) with ``-O3 -march=native -fopenmp``
(without OpenMP where the compiler lacks it), about 0.3 s, and
cached on disk under ``$ADAI_LIGHTNING_CACHE`` (default ``~/.cache/adai_lightning``), keyed by the
source, the compiler, the flags and this CPU's feature flags; concurrent processes (DDP ranks)
publish it with an atomic rename. Without a compiler the optimizer warns once and uses the compiled
or foreach path.

Pass 1 reads ``g`` and ``v`` (8 bytes per fp32 element), pass 2 reads ``g, p, m, v, P`` and writes
``p, m, v, P`` (36 bytes): 44 bytes per element against fused Adam's 28. Pass 1 could carry
``sum(v)`` from step to step and skip reading ``v``, but then a run resumed from a checkpoint would
round differently from the uninterrupted one; this way it continues bit for bit.

Supported buckets: CPU, plain tensors, parameter, gradient and state all float32 or all float64.
Tensors whose gradient or state is laid out differently from the parameter are copied to
contiguous buffers one tensor at a time (and copied back after pass 2).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from adai_lightning.optim._functional import AdaiHyper, bias_correction
from adai_lightning.optim._fused import _flat, warn_once

SOURCE = Path(__file__).with_name("adai_cpu.c")
#: Compiler flags to try in order: a compiler without OpenMP (Apple's clang) gets a one-thread build.
FLAG_SETS = (("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"),
             ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11"))
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class _Hyper(ctypes.Structure):
    """``adai_hyper`` of ``adai_cpu.c``."""

    _fields_ = [(name, ctypes.c_double) for name in
                ("sign", "l2", "beta2", "beta0", "max_beta1", "decay", "step_scale", "exponent", "dampening")] + \
               [("use_l2", ctypes.c_int32), ("damped", ctypes.c_int32)]

    @classmethod
    def of(cls, hyper: AdaiHyper) -> _Hyper:
        return cls(-1.0 if hyper.maximize else 1.0, hyper.l2, hyper.beta2, hyper.beta0, 1.0 - hyper.eps,
                   1.0 - hyper.lr * hyper.weight_decay if hyper.decoupled else 1.0, hyper.step_scale,
                   1.0 / (3.0 - 2.0 * hyper.dampening), hyper.dampening, int(hyper.l2 != 0.0),
                   int(hyper.dampening != 1.0))


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adai_lightning"
    return Path(os.environ.get("ADAI_LIGHTNING_CACHE", default))


def _cpu_features() -> str:
    """This CPU's feature flags (``-march=native`` code must not run on a CPU that lacks them)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile the library to ``target`` (written elsewhere first, then renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        output = Path(scratch) / target.name
        result = subprocess.run([compiler, *flags, "-o", str(output), str(SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} {' '.join(flags)} failed: {result.stderr.strip()[-300:]}")
        os.replace(output, target)


def _load(compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """The library built with ``flags``, from the cache or freshly compiled into it."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode(), _cpu_features().encode(),
                 platform.machine().encode()):
        key.update(part)
    target = _cache_dir() / f"adai_cpu_{key.hexdigest()[:16]}.so"
    if not target.exists():
        _build(compiler, flags, target)
    return ctypes.CDLL(str(target))


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Give the library's functions their C signatures (ctypes then checks every call's arguments)."""
    pointer, i64, hyper = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(_Hyper)
    for suffix in _SUFFIX.values():
        sums = getattr(library, f"adai_sums_{suffix}")
        sums.argtypes = [i64, pointer, pointer, pointer, pointer, pointer, hyper, pointer, ctypes.c_int]
        update = getattr(library, f"adai_update_{suffix}")
        update.argtypes = [i64, pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer,
                           hyper, ctypes.c_int]
        sums.restype = update.restype = ctypes.c_int
    return library


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library, or why it cannot be had (no compiler, failed build); built once per machine."""
    compiler = _compiler()
    if compiler is None:
        return "no C compiler found (set $CC)"
    errors = []
    for flags in FLAG_SETS:
        try:
            return _declare(_load(compiler, flags))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(f"{type(error).__name__}: {error}")
    return "building its CPU kernel failed (" + "; ".join(errors) + ")"


def supports(params: list[Tensor], grads: list[Tensor], state_dtype: torch.dtype) -> bool:
    """Whether the kernel handles this bucket (one device and dtype): CPU, plain tensors, and
    parameters, gradients and state all float32 or all float64.

    Every gradient's dtype is checked (a bucket groups by the parameters' dtype; a parameter cast
    through ``.data`` keeps its old gradient). The state is checked against each parameter by
    ``Adai._check_operands`` (shape, dtype, device), before any path runs.
    """
    param = params[0]
    dtype = param.dtype
    return (param.device.type == "cpu" and dtype in _SUFFIX and state_dtype == dtype
            and all(g.dtype == dtype for g in grads) and all(type(p) in (Tensor, torch.nn.Parameter) for p in params))


_warned: set[str] = set()


def use_native(params: list[Tensor], grads: list[Tensor], state_dtype: torch.dtype) -> bool:
    """Whether the native kernel runs this bucket (asked for ``fused`` None or True).

    Outside ``torch.compile`` tracing, on buckets it :func:`supports`, when the library can be
    built; otherwise the caller uses the compiled or foreach path (with one warning per reason when
    the library cannot be built).
    """
    if torch.compiler.is_compiling() or not supports(params, grads, state_dtype):
        return False
    library = _library()
    if not isinstance(library, str):
        return True
    warn_once(_warned, library, f"Adai's native CPU step is unavailable, using the compiled or foreach path: {library}")
    return False


def _array(values: list, kind: type = ctypes.c_void_p) -> ctypes.Array:
    """A C array of ``values`` (data pointers by default)."""
    return (kind * len(values))(*values)


def _shares_dense_layout(tensors: tuple[Tensor, ...]) -> bool:
    """Whether the tensors are laid out alike and densely (then element i of each is at the same offset
    from its ``data_ptr()``, the lowest address of its elements)."""
    first = tensors[0]
    if all(t.is_contiguous() for t in tensors):
        return True
    stride = first.stride()
    return all(t.stride() == stride for t in tensors) and _flat(first) is not None


def _runs(lists: list[list[Tensor]]) -> list[tuple[list[list[Tensor]], list[int], bool]]:
    """Split parallel tensor lists into calls: all tensors that share a dense layout together (as they
    are), then each other one alone, as contiguous copies. Each call: (operand lists, indices, copied)."""
    dense_indices, runs = [], []
    for i, one in enumerate(zip(*lists)):
        if _shares_dense_layout(one):
            dense_indices.append(i)
        else:
            runs.append(([[t.contiguous()] for t in one], [i], True))
    if dense_indices:
        runs.insert(0, ([[lst[i] for i in dense_indices] for lst in lists], dense_indices, False))
    return runs


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("Adai's native CPU step could not allocate its work list")


def _bias_corrections(hyper: AdaiHyper, steps: list[int] | list[Tensor], indices: list[int]
                      ) -> ctypes.Array | Tensor:
    """``1 - beta2**step`` of the tensors at ``indices``, for the library's ``bias2`` argument: a C array
    for int steps, a float64 tensor (computed without reading the counts on the host) for step tensors."""
    if isinstance(steps[0], Tensor):
        return bias_correction(hyper.beta2, torch.stack([steps[i] for i in indices])).contiguous()
    return _array([1.0 - hyper.beta2 ** steps[i] for i in indices], ctypes.c_double)


def _address(values: ctypes.Array | Tensor) -> ctypes.Array | int:
    return values.data_ptr() if isinstance(values, Tensor) else values


def vhat_sum_native(params: list[Tensor], grads: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int],
                    hyper: AdaiHyper, found_inf: Tensor | None = None) -> Tensor:
    """Pass 1: ``sum(vhat)`` (float64, 0-dim) of the updated second moment; changes no tensor (so
    ``found_inf`` is not needed: a skipped step's sum may be NaN, and pass 2 then writes nothing)."""
    library, suffix = _library(), _SUFFIX[params[0].dtype]
    threads, c_hyper, total = torch.get_num_threads(), _Hyper.of(hyper), 0.0
    for (p, g, v), indices, _ in _runs([params, grads, exp_avg_sqs]):
        out = ctypes.c_double()
        bias2 = _bias_corrections(hyper, steps, indices)
        status = getattr(library, f"adai_sums_{suffix}")(
            len(indices), *(_array([t.data_ptr() for t in lst]) for lst in (p, g, v)),
            _array([t.numel() for t in p], ctypes.c_int64), _address(bias2),
            ctypes.byref(c_hyper), ctypes.byref(out), threads)
        _check(status)
        total += out.value
    return torch.tensor(total, dtype=torch.float64)


def inertia_update_native(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                          exp_avg_sqs: list[Tensor], beta1_prods: list[Tensor], steps: list[int], vbar: Tensor,
                          hyper: AdaiHyper, found_inf: Tensor | None = None) -> None:
    """Pass 2: second moment, inertia, momentum and parameter update, in place; nothing at all when
    ``found_inf`` (a CPU float32 scalar, read by the kernel itself) is nonzero."""
    library, suffix = _library(), _SUFFIX[params[0].dtype]
    threads, c_hyper = torch.get_num_threads(), _Hyper.of(hyper)
    mean = vbar.to(torch.float64)  # kept alive for the call, which reads it through its pointer
    skip = None if found_inf is None else found_inf.to(torch.float32).contiguous()  # likewise
    originals = [params, grads, exp_avgs, exp_avg_sqs, beta1_prods]
    for operands, indices, copied in _runs(originals):
        bias2 = _bias_corrections(hyper, steps, indices)
        status = getattr(library, f"adai_update_{suffix}")(
            len(indices), *(_array([t.data_ptr() for t in lst]) for lst in operands),
            _array([t.numel() for t in operands[0]], ctypes.c_int64), _address(bias2), mean.data_ptr(),
            None if skip is None else skip.data_ptr(), ctypes.byref(c_hyper), threads)
        _check(status)
        if copied:
            for lst, flat in zip(originals, operands):
                if lst is not grads:
                    lst[indices[0]].copy_(flat[0])
