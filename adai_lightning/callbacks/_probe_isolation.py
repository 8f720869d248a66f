"""Running a user's ``training_step`` for the Hessian probe without changing the training run.

:func:`isolated` is the context the probe evaluates losses in. Inside it, and undone on exit:

- ``module.log`` / ``module.log_dict`` are no-ops (the probe's losses never reach the logs);
- ``module.optimizers()`` and ``module.lr_schedulers()`` return stand-ins whose ``step`` /
  ``zero_grad`` do nothing (a ``step(closure)`` runs the closure), ``manual_backward(loss)``
  records the loss without a backward, and ``toggle_optimizer`` / ``untoggle_optimizer`` /
  ``toggled_optimizer`` / ``clip_gradients`` do nothing: no optimizer step, no ``.grad`` change,
  no ``requires_grad`` change, whatever the optimization style;
- every torchmetrics ``Metric`` (and ``MetricCollection``) among the module's submodules keeps its
  state: the values of its state tensors and lists and its bookkeeping (``update_count``, cached
  results, compute-group flags) are restored in place, so shared states (``MetricCollection``
  compute groups) stay shared;
- the global RNGs (torch CPU and CUDA, Python's ``random``, NumPy's) are restored;
- every module's train/eval flag and every buffer (BatchNorm running statistics; a rebound buffer gets its
  tensor back) are restored;
- every module's plain Python state (lists, dicts, sets, counters, rebound or added attributes, on
  every submodule: :mod:`~adai_lightning.callbacks._python_state`) is put back after every
  ``training_step`` call, so each call sees the state of the cadence point and none changes the run;
  containers are restored in place. What cannot be restored is named in one warning per attribute;
- with ``twice_differentiable=True`` (exact Hessian-vector products), ``scaled_dot_product_attention``
  runs its math backend (the fused kernels have no double backward), and ``torch.compile``'d code
  runs eagerly (compiled modules run their ``_orig_mod``, and ``torch.compiler.set_stance("force_eager")``
  where available; aot_autograd has no double backward); with False (finite-difference products),
  the model runs its kernels and compiled code as in training.

:func:`step_loss` calls ``training_step`` with the arguments its signature takes, as Lightning does.
"""

from __future__ import annotations

import contextlib
import random
import sys
import warnings
from typing import Any, Iterator

import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from adai_lightning.callbacks._probe_subset import ProbeError
from adai_lightning.callbacks._python_state import PythonState, restore_mapping


def _inert_step(self: Any, closure: Any = None, *args: Any, **kwargs: Any) -> Any:
    return closure() if callable(closure) else None


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _inert_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``step`` and ``zero_grad`` do nothing (``step(closure)`` runs the closure).
    Not cached: Lightning makes a class per optimizer instance, and a cache would keep them all alive."""
    return type(f"Inert{cls.__name__}", (cls,), {"step": _inert_step, "zero_grad": _nothing, "__del__": _nothing})


def inert(real: Any) -> Any:
    """A stand-in for an optimizer or scheduler (or a list of them): an instance of a subclass of its class
    (``isinstance`` checks pass) with a copy of its attributes (reads see the real values), whose
    ``step`` and ``zero_grad`` do nothing; its own attribute writes do not reach the real object."""
    if real is None:
        return None
    if isinstance(real, (list, tuple)):
        return type(real)(inert(r) for r in real)
    stand_in = object.__new__(_inert_class(type(real)))
    stand_in.__dict__.update(real.__dict__)
    return stand_in


@contextlib.contextmanager
def _nothing_context(*args: Any, **kwargs: Any) -> Iterator[None]:
    yield


@contextlib.contextmanager
def _shadowed(obj: Any, attributes: dict[str, Any]) -> Iterator[None]:
    """Set ``attributes`` on the instance (shadowing its methods), then put back what was there."""
    missing = object()
    saved = {name: obj.__dict__.get(name, missing) for name in attributes}
    for name, value in attributes.items():
        object.__setattr__(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, value)


class StepRecorder:
    """The losses ``manual_backward`` received during one ``training_step`` call, and the module's Python
    state to put back after each call (None outside the isolation context)."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.state: PythonState | None = None
        self._warned: set[str] = set()  # the attributes already named in a warning

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        self.losses.append(loss)

    def restore_state(self) -> None:
        """Put the module's Python state back; warn once per attribute that could not be."""
        problems = {} if self.state is None else self.state.restore()
        for path, why in problems.items():
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"The Hessian probe could not restore {path} after calling training_step ({why}), so "
                              "it differs from a run without the callback. Pass loss_fn=... to compute the loss "
                              "without training_step's side effects", RuntimeWarning, stacklevel=2)


def _module_shadows(module: Any, recorder: StepRecorder) -> dict[str, Any]:
    real_optimizers, real_schedulers = module.optimizers, module.lr_schedulers

    def optimizers(use_pl_optimizer: bool = True) -> Any:
        return inert(real_optimizers(use_pl_optimizer))

    def lr_schedulers() -> Any:
        return inert(real_schedulers())

    return {"log": _nothing, "log_dict": _nothing, "optimizers": optimizers, "lr_schedulers": lr_schedulers,
            "manual_backward": recorder.manual_backward, "toggle_optimizer": _nothing,
            "untoggle_optimizer": _nothing, "toggled_optimizer": _nothing_context, "clip_gradients": _nothing}


def _metric_snapshot(metric: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metric's attributes (shallow) and copies of the contents of its tensors and lists."""
    attributes = dict(metric.__dict__)
    contents = {name: value.detach().clone() if isinstance(value, Tensor) else list(value)
                for name, value in attributes.items() if isinstance(value, (Tensor, list))}
    return attributes, contents


def _metric_restore(metric: Any, attributes: dict[str, Any], contents: dict[str, Any]) -> None:
    for name in set(metric.__dict__) - set(attributes):
        del metric.__dict__[name]
    metric.__dict__.update(attributes)
    for name, saved in contents.items():
        value = attributes[name]
        if isinstance(value, Tensor):
            with torch.inference_mode(value.is_inference()), torch.no_grad():
                value.copy_(saved)
        else:
            value[:] = saved


@contextlib.contextmanager
def _metrics_kept(module: torch.nn.Module) -> Iterator[None]:
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError:  # no torchmetrics, no metric to keep
        yield
        return
    kept = (Metric, MetricCollection)  # a collection's own flags (compute groups, state copies) too
    snapshots = [(m, *_metric_snapshot(m)) for m in module.modules() if isinstance(m, kept)]
    try:
        yield
    finally:
        for metric, attributes, contents in snapshots:
            _metric_restore(metric, attributes, contents)


@contextlib.contextmanager
def _python_state_kept(module: torch.nn.Module, recorder: StepRecorder) -> Iterator[None]:
    """The module tree's Python state as it is inside the isolation (shadows, modes): put back after every
    ``training_step`` call (:func:`step_loss`) and on exit. torchmetrics metrics are left to :func:`_metrics_kept`."""
    try:
        from torchmetrics import Metric, MetricCollection
        metrics: tuple[type, ...] = (Metric, MetricCollection)
    except ImportError:
        metrics = ()
    recorder.state = PythonState(module, skip=metrics)
    try:
        yield
    finally:
        recorder.restore_state()
        recorder.state = None


@contextlib.contextmanager
def _host_rngs_kept() -> Iterator[None]:
    """Python's and (if imported) NumPy's global RNG states, restored on exit."""
    numpy = sys.modules.get("numpy")
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


@contextlib.contextmanager
def _modes_and_buffers_kept(module: torch.nn.Module) -> Iterator[None]:
    """Modes, and buffers: their values, and which tensor each name holds (``self.ema = 0.9 * self.ema + ...``
    rebinds a buffer)."""
    modes = [(m, m.training) for m in module.modules()]
    bindings = [(m, dict(m._buffers)) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training
        for submodule, names in bindings:
            restore_mapping(submodule._buffers, names)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


@contextlib.contextmanager
def _twice_differentiable(module: torch.nn.Module) -> Iterator[None]:
    """Math SDPA backend, and compiled code run eagerly: every ``torch.compile``'d submodule
    (``OptimizedModule``) calls its ``_orig_mod``, ``nn.Module.compile()`` is bypassed, and (torch
    >= 2.6) ``set_stance("force_eager")`` covers compiled functions too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        for submodule in module.modules():
            original = getattr(submodule, "_orig_mod", None)
            if isinstance(original, torch.nn.Module):
                stack.enter_context(_shadowed(submodule, {"forward": original.__call__}))
            if getattr(submodule, "_compiled_call_impl", None) is not None:
                stack.enter_context(_shadowed(submodule, {"_compiled_call_impl": None}))
        if hasattr(torch.compiler, "set_stance"):
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        yield


@contextlib.contextmanager
def isolated(module: torch.nn.Module, train_mode: bool, recorder: StepRecorder,
             twice_differentiable: bool = True) -> Iterator[None]:
    """The probe's isolation context (see the module docstring); ``train_mode=False`` puts modules in eval mode,
    ``True`` leaves them as training runs them; ``twice_differentiable`` forces math SDPA and eager code."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(_host_rngs_kept())
        stack.enter_context(_modes_and_buffers_kept(module))
        stack.enter_context(_metrics_kept(module))
        stack.enter_context(_shadowed(module, _module_shadows(module, recorder)))
        if twice_differentiable:
            stack.enter_context(_twice_differentiable(module))
        stack.enter_context(torch.enable_grad())
        if not train_mode:
            module.eval()
        stack.enter_context(_python_state_kept(module, recorder))  # last: it keeps the state set up above
        yield


def step_loss(module: Any, batch: Any, recorder: StepRecorder) -> Tensor:
    """The loss of ``training_step`` on ``batch`` (``batch_idx=0``), called with the arguments its
    signature takes. Under manual optimization it is the loss given to ``manual_backward``."""
    compiled = getattr(module, "_compiler_ctx", None) or {}  # a LightningModule compiled through Lightning
    step = compiled.get("original_training_step", module.training_step)
    args: list[Any] = [batch]
    if is_param_in_hook_signature(step, "batch_idx", min_args=2):  # as Lightning's training loop decides
        args.append(0)
    recorder.losses = []
    try:
        output = step(*args)
    finally:
        recorder.restore_state()
    if len(recorder.losses) > 1:
        raise ProbeError(f"training_step calls manual_backward {len(recorder.losses)} times per step (several "
                         "optimizers?), so the loss to differentiate is ambiguous; pass loss_fn=... to the callback")
    loss = recorder.losses[0] if recorder.losses else output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise ProbeError(f"training_step returned {type(output).__name__} and called no manual_backward on the "
                         "evaluation batch; pass loss_fn=... to the callback")
    return loss
