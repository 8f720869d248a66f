"""Every check on Adai's arguments, in one place: numbers, flags, ``sharding``, and the parameters themselves.

The constructor (:func:`options`, :func:`sharding`, :func:`process_group`),
:meth:`~adai_lightning.optim.Adai.add_param_group` and ``load_state_dict`` (:func:`check_group`, before
anything changes) and the betas watch before each step (:func:`betas`) call these, so a value is
accepted or refused the same way wherever it enters. Each failure is one line naming the argument,
the value and what is allowed:
``TypeError`` for the wrong kind of value (a string, ``None``, a bool where a number belongs, a
number where a bool belongs), ``ValueError`` for a value out of range.

Numbers may be Python/NumPy reals or one-element real tensors (torch accepts a tensor ``lr``; a
tensor is read once here, on the host, never inside ``step()``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor

INF = math.inf

# name -> (low, high, low excluded, high excluded)
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, INF, False, True),
    "betas[0]": (0.0, 1.0, True, False),
    "betas[1]": (0.0, 1.0, False, True),
    "eps": (0.0, 1.0, True, True),
    "weight_decay": (0.0, INF, False, True),
    "dampening": (0.0, 1.0, False, False),
}
ROLES = {"betas[0]": "beta0", "betas[1]": "beta2"}

# Boolean options: name -> whether None is allowed (None: "choose for me"). A new param-group flag is one
# line here; a constructor-only flag (an attribute, not a default) also needs its ``flag(name, value)`` call.
FLAGS: dict[str, bool] = {
    "decoupled": False,
    "maximize": False,
    "foreach": True,
    "fused": True,
    "skip_nonfinite": False,
}

SHARDING_MODES = ("auto", "partitioned", "replicated")


def _interval(name: str) -> str:
    low, high, low_open, high_open = RANGES[name]
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _label(name: str) -> str:
    role = ROLES.get(name)
    return f"{role} ({name})" if role else name


def number(name: str, value: Any) -> float:
    """``value`` as a float after checking its kind and range (``name`` is a key of :data:`RANGES`)."""
    label = _label(name)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"Invalid {label}: a {value.dtype} tensor; it must be a real number in {_interval(name)}")
        as_float = float(value.detach().cpu().item())
    elif isinstance(value, bool) or not isinstance(value, Real):
        kind = type(value).__name__
        raise TypeError(f"Invalid {label}: {value!r} ({kind}); it must be a real number in {_interval(name)}")
    else:
        as_float = float(value)
    low, high, low_open, high_open = RANGES[name]
    above = as_float > low if low_open else as_float >= low
    below = as_float < high if high_open else as_float <= high
    if not (above and below):  # also refuses NaN
        raise ValueError(f"Invalid {label}: {value!r}; it must lie in {_interval(name)}")
    return as_float


def flag(name: str, value: Any) -> None:
    """Refuse anything but ``True``/``False`` (and ``None`` where :data:`FLAGS` allows it) for ``name``."""
    allowed = "True, False or None" if FLAGS[name] else "True or False"
    if not (isinstance(value, bool) or (value is None and FLAGS[name])):
        raise TypeError(f"Invalid {name}: {value!r} ({type(value).__name__}); it must be {allowed}")


def count_or_none(name: str, value: Any) -> None:
    """Refuse anything but ``None`` or an int of at least 1 for ``name``."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise (ValueError if isinstance(value, int) and not isinstance(value, bool) else TypeError)(
        f"Invalid {name}: {value!r}; it must be an int of at least 1, or None")


def sharding(mode: Any) -> None:
    """Refuse a ``sharding`` that is not one of :data:`SHARDING_MODES`."""
    if not (isinstance(mode, str) and mode in SHARDING_MODES):
        raise ValueError(f"Invalid sharding: {mode!r}; it must be one of {', '.join(SHARDING_MODES)}")


def process_group(group: Any) -> None:
    """Refuse a ``process_group`` that is neither ``None`` nor a ``torch.distributed.ProcessGroup``."""
    if group is None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"Invalid process_group: {group!r}; it must be None or a torch.distributed.ProcessGroup")


def betas(value: Any) -> None:
    """Refuse betas that are not a pair of numbers in beta0's and beta2's ranges."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"Invalid betas: {value!r}; it must be a pair (beta0, beta2)")
    number("betas[0]", value[0])
    number("betas[1]", value[1])


def options(group: Mapping[str, Any]) -> None:
    """Check every hyperparameter and flag of a param group (or of the constructor's defaults)."""
    for name in ("lr", "eps", "weight_decay", "dampening"):
        number(name, group[name])
    betas(group["betas"])
    for name in FLAGS.keys() & group.keys():
        flag(name, group[name])
    if group["fused"] and group["foreach"]:
        raise ValueError("Invalid fused=True with foreach=True: choose at most one of them")


def state_dtype(param: Tensor) -> torch.dtype:
    """Precision of Adai's state for ``param``: float32 for 16-bit parameters, else the parameter's own."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


def smallest_eps(dtype: torch.dtype) -> float:
    """The smallest ``eps`` allowed for state of ``dtype``: its machine epsilon.

    ``beta1 <= 1 - eps`` is formed in the state's dtype; below half its spacing under 1, ``1 - eps``
    rounds to 1, beta1 reaches 1, the bias correction ``1 - prod(beta1)`` is 0 and the update NaN.
    The machine epsilon keeps a factor of 4 from that edge.
    """
    return torch.finfo(dtype).eps


def parameters(params: Iterable[Tensor], eps: Any) -> None:
    """Refuse complex or non-floating parameters, and an ``eps`` below their state dtype's resolution."""
    tensors = [p for p in params if isinstance(p, Tensor)]  # torch names any non-tensor itself
    for param in tensors:
        if param.is_complex():
            raise ValueError(
                "Adai does not support complex parameters: vhat / vbar has no ordering over complex "
                "numbers; optimise torch.view_as_real(param) instead"
            )
        if not param.is_floating_point():
            raise ValueError(f"Adai needs floating-point parameters, got one of dtype {param.dtype}")
    dtypes = {state_dtype(p) for p in tensors}
    if not dtypes:
        return
    coarsest = max(dtypes, key=smallest_eps)
    floor = smallest_eps(coarsest)
    if number("eps", eps) < floor:
        raise ValueError(
            f"Invalid eps: {eps!r} for Adai state in {coarsest} (parameters of dtype "
            f"{', '.join(sorted({str(p.dtype) for p in tensors}))}); it must be at least {floor:.3g} "
            f"(torch.finfo({coarsest}).eps): 1 - eps rounds to 1 below that and the update becomes NaN"
        )


def loaded_state(saved: Mapping[str, Any] | None, param: Tensor, where: str) -> None:
    """Refuse loaded state whose tensors (all but the step count) have another shape than ``param``
    (``where`` names it)."""
    for key, value in (saved or {}).items():
        if key != "step" and isinstance(value, Tensor) and value.shape != param.shape:
            raise ValueError(
                f"Cannot load the Adai state of {where}: its {key!r} has shape {tuple(value.shape)} but the "
                f"parameter has shape {tuple(param.shape)}; the state dict belongs to another model or to "
                f"param groups in another order"
            )


def check_group(group: Mapping[str, Any], params: Iterable[Tensor]) -> None:
    """Everything about one param group: its options, then its parameters against them."""
    options(group)
    parameters(params, group["eps"])
