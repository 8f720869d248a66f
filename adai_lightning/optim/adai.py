"""The Adai optimizer (Adaptive Inertia; Xie et al., ICML 2022) and AdaiW, its decoupled-decay form."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from adai_lightning.optim import _functional as F
from adai_lightning.optim import _fused, _multi_tensor, _native
from adai_lightning.optim import _skips, _validation, distributed
from adai_lightning.optim._validation import state_dtype

_STATE_TENSORS = ("exp_avg", "exp_avg_sq", "beta1_prod")
#: Pass-1 functions that write state (``v``, and ``p`` under decoupled decay) before ``vbar`` is known.
_WRITING_PASS1 = (F.second_moment_single_tensor, F.second_moment_foreach)
_FOREACH_TYPES = (Tensor, torch.nn.Parameter)


def _unchanged(betas: Any, seen: tuple | None) -> bool:
    """Whether ``betas`` still holds the values ``seen`` at the last check (tensors compare by identity,
    so that no device value is read)."""
    if seen is None or not isinstance(betas, (tuple, list)) or len(betas) != len(seen):
        return False
    return all(a is b or not (isinstance(a, Tensor) or isinstance(b, Tensor)) and a == b for a, b in zip(betas, seen))


class Inertia(NamedTuple):
    """One parameter's adaptive inertia at the last step: ``ratio = vhat / vbar`` and ``beta1``."""

    param: Tensor
    ratio: Tensor
    beta1: Tensor


@dataclass
class _GroupWork:
    """The parameters of one param group that take part in this step, and (once counted) their state."""

    hyper: F.AdaiHyper
    members: list[Tensor]  # the parameters themselves (the keys of ``Adai.state``)
    params: list[Tensor]  # their local parts (a DTensor's own shard), as the passes see them
    grads: list[Tensor]
    foreach: bool
    fused: bool | None
    guarded: bool  # skip_nonfinite: the steps are device tensors, the passes get ``found_inf``
    states: list[dict[str, Any]] = field(default_factory=list)

    def passes(self, params: list[Tensor], grads: list[Tensor]) -> tuple[Callable[..., Tensor], Callable[..., None]]:
        """The pass-1 and pass-2 functions for one bucket: native (CPU), multi-tensor Triton (CUDA),
        compiled, foreach or single-tensor.

        A guarded step runs the paths that take ``found_inf`` and step tensors (native, Triton, foreach,
        single-tensor); the compiled kernels take Python int steps, so such a bucket runs foreach
        (``fused=None``) or is refused (``fused=True``).
        """
        dtype = state_dtype(params[0])
        if self.fused is not False:
            if _native.use_native(params, grads, dtype):
                return _native.vhat_sum_native, _native.inertia_update_native
            if _multi_tensor.use_multi_tensor(self.fused, params, grads, dtype, self.hyper):
                return _multi_tensor.vhat_sum_multi_tensor, _multi_tensor.inertia_update_multi_tensor
            if not self.guarded and _fused.use_fused(self.fused, params, grads, dtype, self.hyper):
                return _fused.vhat_sum_fused, _fused.inertia_update_fused
            if self.guarded and self.fused:
                raise RuntimeError(
                    f"Adai(fused=True) cannot run {params[0].dtype} parameters on {params[0].device.type} with "
                    f"skip_nonfinite=True (the default): only the compiled kernels take them, and they cannot skip a "
                    f"step on the device; pass skip_nonfinite=False to use them, or fused=None for the foreach path")
        if self.foreach:
            return F.second_moment_foreach, F.inertia_update_foreach
        return F.second_moment_single_tensor, F.inertia_update_single_tensor

    def buckets(self) -> list[tuple[list[int], tuple[Callable[..., Tensor], Callable[..., None]]]]:
        """Index lists of one device and dtype each (what the foreach kernels need; one list otherwise),
        with the passes that will run them: chosen, and any refusal raised, before anything changes."""
        if not (self.foreach or self.fused):
            groups = [list(range(len(self.params)))]
        else:
            grouped = Optimizer._group_tensors_by_device_and_dtype([self.params, self.grads], with_indices=True)
            groups = [indices for _, indices in grouped.values()]
        return [(indices, self.passes([self.params[i] for i in indices], [self.grads[i] for i in indices]))
                for indices in groups]

    def operands(self, indices: list[int]) -> tuple[list[Tensor], ...]:
        """``params, grads, exp_avgs, exp_avg_sqs, beta1_prods, steps`` of the tensors at ``indices``."""
        local = distributed.local_part
        states = [self.states[i] for i in indices]
        return ([self.params[i] for i in indices], [self.grads[i] for i in indices],
                *([local(state[key]) for state in states] for key in _STATE_TENSORS),
                [state["step"] for state in states])


class Adai(Optimizer):
    r"""Adaptive Inertia: SGD with a per-element momentum chosen from the gradient's second moment.

    One step, for every parameter ``p`` with a gradient ``g`` (``d`` = ``dampening``)::

        v     = beta2 * v + (1 - beta2) * g**2;      vhat = v / (1 - beta2**step)
        vbar  = mean of vhat over EVERY element of every parameter with a gradient, all groups
        beta1 = clip(1 - beta0 * (vhat / vbar)**(1 / (3 - 2d)), 0, 1 - eps)
        P     = P * beta1;   m = beta1 * m + (1 - beta1)**d * g
        p     = p - lr * beta0**(1 - d) * m / (1 - P)

    With ``d = 1`` (the default) this is the paper's Adai: an element whose ``vhat`` equals the
    mean gets inertia 0.9, noisier or steeper elements less, flat ones up to ``1 - eps``.
    Unlike Adam there is no division by ``sqrt(v)``: the learning rate is SGD's (the paper uses
    ``lr = 1.0`` or ``0.5`` where momentum SGD uses 0.1).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate, ``>= 0``.
        betas: ``(beta0, beta2)``; ``beta0`` in ``(0, 1]`` scales the inertia, ``beta2`` in
            ``[0, 1)`` is the second-moment EMA coefficient.
        eps: inertia bound, in ``(0, 1)``: beta1 never exceeds ``1 - eps``.
        weight_decay: decay coefficient, ``>= 0``.
        decoupled: apply the decay as ``p *= 1 - lr * wd`` (AdaiW) instead of adding ``wd * p``
            to the gradient (L2, which then enters ``v`` and ``m``).
        dampening: ``d`` in ``[0, 1]``; ``d != 1`` is the AdaiV2 generalisation.
        maximize: ascend instead of descend.
        foreach: use the multi-tensor ``torch._foreach_*`` path; ``None`` picks it whenever every
            parameter is a plain tensor.
        fused: run each pass as one kernel over the whole bucket (device and dtype) instead of the
            eager paths. On CPU with float32 or float64 parameters, gradients and state, that is a
            small C library compiled once per machine and cached (``adai_lightning.optim._native``);
            on CUDA two Triton kernels launched once per pass over the whole bucket
            (``adai_lightning.optim._multi_tensor``); elsewhere (bfloat16/float16 on CPU)
            ``torch.compile``-generated kernels, one per tensor (``adai_lightning.optim._fused``),
            compiled once per process. ``None`` (the default, when foreach is not turned off) picks
            the native CPU kernel for every supported bucket and the Triton or compiled kernels for
            buckets of at least 2**20 elements, and warns once and falls back to foreach when one
            cannot be built; ``True`` requires a fused path
            (error if none can run); ``False`` never uses them.
        sharding: how ``vbar`` (a mean over the WHOLE model) is formed across processes; see
            :mod:`adai_lightning.optim.distributed`. ``"auto"`` (default) all-reduces the local
            ``(sum, count)`` whenever ``process_group`` has more than one rank: right for DDP,
            ZeRO (``ZeroRedundancyOptimizer(..., optimizer_class=Adai)``), FSDP2 and hybrids alike,
            and refuses DTensors of mixed placements; ``"partitioned"`` reduces without that check;
            ``"replicated"`` never communicates (the opt-out where every rank holds every parameter,
            and required for an optimizer that steps on some ranks only, which would otherwise wait
            for the others to join the all-reduce).
        process_group: the ranks ``vbar`` is reduced over (``None``: the default group). Cost: one
            all-reduce of 16 bytes per step, issued on the device, without host synchronisation.
            ``copy.deepcopy`` shares it; pickling an optimizer that holds one raises ``TypeError``.
        skip_nonfinite: when a gradient holds a NaN or an infinity, change nothing in this step
            (parameters, state, step counts) and add 1 to :attr:`skipped_steps`; decided on the
            device, without host synchronisation (like fused Adam's ``found_inf``). On by default:
            ``vbar`` is one mean over the whole model, so without it one NaN element makes every
            parameter NaN in one step, and one inf pins every beta1 at ``1 - eps`` for good. The
            first skip warns (``RuntimeWarning``, once per optimizer). ``False`` turns it off.
        max_consecutive_skips: raise ``RuntimeError`` once this many steps in a row were skipped
            (a run whose every step has a non-finite gradient is broken: without the error it would
            silently train nothing); ``None`` never raises. The counters are read on the host
            without synchronisation (:mod:`adai_lightning.optim._skips`): on CPU right after each
            step, so the warning and the error come from the step that skipped; on CUDA from a
            later step, once the asynchronous copy of the counters has arrived (usually the next
            step), so the error may come a step or more after the limit was reached.

    State per parameter (keys as in the authors' reference implementation, whose checkpoints load):
    ``step`` (int; with ``skip_nonfinite`` a float32 0-dim tensor on the parameter's device, as in
    torch's fused Adam), ``exp_avg`` (m), ``exp_avg_sq`` (v), ``beta1_prod`` (P, per element). The three
    tensors are kept in float32 for float16/bfloat16 parameters and in the parameter's dtype
    otherwise; sums behind ``vbar`` accumulate in float32 (float64 when any state is float64).

    Edge cases: a step in which no parameter has a gradient changes nothing; when every ``vhat`` is 0
    (all gradients zero so far) the ratio ``vhat / vbar`` is taken as 0, so beta1 is ``1 - eps`` and
    nothing becomes NaN. Sparse gradients and complex parameters raise ``ValueError``.

    ``step()`` never synchronises with the host: ``vbar`` stays a device tensor. It is kept as
    :attr:`last_vbar` after each step, which makes :meth:`inertia` (beta1 of every parameter at the
    last step, for monitoring callbacks) cost nothing unless somebody calls it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.1, 0.99),
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        dampening: float = 1.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        sharding: str = "auto",
        process_group: Any = None,
        skip_nonfinite: bool = True,
        max_consecutive_skips: int | None = 100,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled=decoupled,
            dampening=dampening,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        _validation.options(defaults)
        _validation.sharding(sharding)
        _validation.process_group(process_group)
        _validation.flag("skip_nonfinite", skip_nonfinite)
        _validation.count_or_none("max_consecutive_skips", max_consecutive_skips)
        defaults["betas"] = tuple(betas)
        # Attributes, not defaults: a process group must not end up in the state dict's param_groups.
        self.sharding = sharding
        self.process_group = process_group
        self.skip_nonfinite = skip_nonfinite
        #: Steps skipped for a non-finite gradient (float32 0-dim, on the parameters' device once stepped).
        self.skipped_steps = torch.zeros(())
        #: The current run of consecutive skipped steps (like :attr:`skipped_steps`; 0 after an applied step).
        self.consecutive_skips = torch.zeros(())
        self.max_consecutive_skips = max_consecutive_skips
        self._skip_watch = _skips.SkipWatch(max_consecutive_skips)
        self.last_vbar: Tensor | None = None
        self._checked_betas: list[tuple | None] = []  # per group: the betas last validated
        super().__init__(params, defaults)
        self._watch_betas()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group only if its options and parameters pass every check: a refused group is not added."""
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), set):  # else torch's TypeError
            params = param_group["params"]
            param_group["params"] = [params] if isinstance(params, Tensor) else list(params)  # a generator reads once
            tensors = [p[1] if isinstance(p, tuple) else p for p in param_group["params"]]  # (name, param) pairs too
            _validation.check_group({**self.defaults, **param_group}, tensors)
        super().add_param_group(param_group)
        self._checked_betas.append(tuple(self.param_groups[-1]["betas"]))

    def _watch_betas(self) -> None:
        """Check ``betas`` again before a step whenever something replaced them since the last check."""
        self._betas_watch = self.register_step_pre_hook(type(self)._check_betas_before_step)

    def _check_betas_before_step(self, args: Any, kwargs: Any) -> None:
        """Refuse betas that changed into invalid values, or that a momentum-cycling scheduler wrote.

        ``OneCycleLR`` and ``CyclicLR`` with their default ``cycle_momentum=True`` write a momentum
        (0.8 to 0.95) into ``betas[0]``, which for Adai is ``beta0`` (mean inertia ``1 - beta0``): the
        algorithm would silently change. They mark the group with ``max_momentum``. Host-side
        comparisons of Python numbers only (tensors by identity): no device synchronisation.
        """
        checked = self._checked_betas
        if len(checked) != len(self.param_groups):  # groups replaced (load_state_dict) or removed
            checked[:] = [None] * len(self.param_groups)
        for index, group in enumerate(self.param_groups):
            betas = group["betas"]
            if _unchanged(betas, checked[index]):
                continue
            if "max_momentum" in group:
                raise ValueError(
                    f"betas[0] of param group {index} is now {betas[0]!r}, written by OneCycleLR or CyclicLR "
                    f"(cycle_momentum=True cycles a momentum through betas[0]); for Adai betas[0] is beta0, whose "
                    f"mean inertia is 1 - beta0: create the scheduler with cycle_momentum=False (and a new Adai)"
                )
            _validation.betas(betas)
            checked[index] = tuple(betas)

    def __getstate__(self) -> dict[str, Any]:
        """torch's optimizer state plus how ``vbar`` is formed (``sharding``, ``process_group``), the last
        vbar and the non-finite guard (``skip_nonfinite``, its counters and limit)."""
        return {**super().__getstate__(), "sharding": self.sharding, "process_group": self.process_group,
                "last_vbar": self.last_vbar, "skip_nonfinite": self.skip_nonfinite,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "max_consecutive_skips": self.max_consecutive_skips}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("last_vbar", None)
        self.__dict__.setdefault("sharding", "auto")  # pickles from before these attributes existed
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("skipped_steps", torch.zeros(()))
        self.__dict__.setdefault("consecutive_skips", torch.zeros(()))
        self.__dict__.setdefault("max_consecutive_skips", None)
        self._skip_watch = _skips.SkipWatch(self.max_consecutive_skips)
        self.__dict__.setdefault("_checked_betas", [])
        if "_betas_watch" not in self.__dict__:  # unpickled or copied: torch dropped every hook
            self._watch_betas()
        for group in self.param_groups:
            for key in ("decoupled", "maximize"):
                group.setdefault(key, False)
            group.setdefault("dampening", 1.0)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``skipped_steps``."""
        state_dict = super().state_dict()
        state_dict["skipped_steps"] = self.skipped_steps
        return state_dict

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.process_group is not None:
            raise TypeError(
                "Cannot pickle an Adai built with process_group=<a ProcessGroup>: a process group belongs to the "
                "process that created it. Pickle optimizer.state_dict() instead, or build the optimizer with "
                "process_group=None (the default group, which pickles; copy.deepcopy keeps the group)"
            )
        return super().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> Adai:
        """A deep copy that shares the process group (a communicator of this process, not data)."""
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, honouring its hooks, with the state kept in Adai's own precision.

        torch casts floating state to each parameter's dtype (bfloat16 state would lose Adai's float32
        precision). Adai re-reads it at full precision from the dict the load-state-dict pre-hooks
        returned (not the argument), before any post-hook runs: both kinds of hooks work as for torch's
        optimizers. The loaded hyperparameters, and the shape of every loaded state tensor against its
        parameter (a state dict of another model, or of param groups in another order), are checked
        before anything changes.
        """
        loaded: dict[str, Any] = {}

        def capture(optimizer: Adai, final: dict[str, Any]) -> None:  # runs after every other pre-hook
            for index, (saved, group) in enumerate(zip(final["param_groups"], self.param_groups)):
                _validation.check_group({**self.defaults, **saved}, group["params"])
                if len(saved["params"]) == len(group["params"]):  # else torch's ValueError follows
                    for position, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                        _validation.loaded_state(final["state"].get(saved_id), param,
                                                 f"parameter {position} of param group {index}")
            loaded["state_dict"] = final

        def restore(optimizer: Adai) -> None:  # runs before every other post-hook
            self._restore_state(loaded["state_dict"])

        handles = [self.register_load_state_dict_pre_hook(capture),
                   self.register_load_state_dict_post_hook(restore, prepend=True)]
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _restore_state(self, state_dict: dict[str, Any]) -> None:
        """Per-parameter state from ``state_dict`` (ids as saved), copied in :func:`state_dtype` precision,
        and ``skipped_steps``."""
        skipped = torch.as_tensor(state_dict.get("skipped_steps", 0.0), dtype=torch.float32)
        self.skipped_steps = skipped.to(self.skipped_steps.device, copy=True)
        self.consecutive_skips = torch.zeros_like(self.skipped_steps)  # a run of skips is counted afresh
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[param]
            state["step"] = self._loaded_step(saved["step"])
            for key in _STATE_TENSORS:
                state[key] = saved[key].to(device=param.device, dtype=state_dtype(param), copy=True)
        self.last_vbar = None
        self._checked_betas = []

    @staticmethod
    def _loaded_step(saved: int | Tensor) -> int:
        """The step counter in this optimizer's layout from a saved one (an int, or the reference's tensor)."""
        return int(saved)

    def _init_state(self, param: Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            dtype = state_dtype(param)
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["beta1_prod"] = torch.ones_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _hyper(group: dict[str, Any]) -> F.AdaiHyper:
        beta0, beta2 = group["betas"]
        return F.AdaiHyper(
            lr=float(group["lr"]),
            beta0=beta0,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=group["decoupled"],
            dampening=group["dampening"],
            maximize=group["maximize"],
        )

    def _gather(self, group: dict[str, Any]) -> _GroupWork:
        """Collect the group's parameters that have a gradient, and check them; changes nothing."""
        members = [param for param in group["params"] if param.grad is not None]
        if any(param.grad.is_sparse for param in members):
            raise ValueError("Adai does not support sparse gradients; use dense gradients (e.g. sparse=False)")
        local = distributed.local_part  # a DTensor's own shard; plain tensors pass through
        params = [local(param) for param in members]
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(type(p) in _FOREACH_TYPES for p in params)
        fused = group["fused"] if foreach or group["fused"] else False
        return _GroupWork(self._hyper(group), members, params, [local(param.grad) for param in members],
                          foreach, fused, self.skip_nonfinite)

    def _check_operands(self, works: list[_GroupWork]) -> None:
        """Refuse a gradient or state tensor that does not fit its parameter, before anything changes.

        The native and Triton kernels read every operand through raw pointers for the parameter's
        element count, in the state's dtype: a state tensor of another shape (loaded from another model,
        or param groups in another order) or dtype (the parameter moved by ``model.double()`` after
        its state was created), or on another device, would make them read or write out of bounds.
        Raised here on every path, as the ``RuntimeError`` torch.optim's optimizers raise, naming the
        parameter. Host-side metadata comparisons only (no device synchronisation).
        """
        states = self.state
        for work in works:
            for member, param, grad in zip(work.members, work.params, work.grads):
                if grad.shape != param.shape or grad.device != param.device:  # local parts, for a DTensor
                    self._refuse(member, "its gradient", grad, param)
                state = states.get(member)
                if not state:  # created in the right layout by _count_steps
                    continue
                shape, device, dtype = member.shape, member.device, state_dtype(member)
                for key in _STATE_TENSORS:
                    tensor = state[key]
                    if tensor.shape != shape or tensor.dtype is not dtype or tensor.device != device:
                        self._refuse(member, f"its state {key!r}", tensor, member)

    def _refuse(self, member: Tensor, what: str, tensor: Tensor, reference: Tensor) -> None:
        """Raise the error for ``tensor`` (``what`` of parameter ``member``) not fitting ``reference``
        (the parameter, or its local part)."""
        where = next((f"parameter {i} of param group {g}" for g, group in enumerate(self.param_groups)
                      for i, candidate in enumerate(group["params"]) if candidate is member), "a parameter")
        dtype = reference.dtype if what == "its gradient" else state_dtype(reference)
        raise RuntimeError(
            f"Adai cannot step {where}: {what} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, but "
            f"the parameter needs {tuple(reference.shape)} {dtype} on {reference.device}; was the parameter cast or "
            f"moved after its state was created (e.g. model.double()), or the state loaded from another model or "
            f"param-group order? Create the optimizer anew, or load a state dict that matches"
        )

    def _count_steps(self, works: list[_GroupWork]) -> dict[torch.device, list[Tensor]]:
        """Create the state of first-time parameters and add 1 to every step count.

        Unguarded counts are Python ints. Guarded ones are float32 device tensors (an int count, e.g.
        from a checkpoint, is converted once), returned by device so that a skipped step can take
        its 1 back on the device (as torch's fused Adam does with ``found_inf``).
        """
        counters: dict[torch.device, list[Tensor]] = defaultdict(list)
        for work in works:
            work.states = [self._init_state(param) for param in work.members]
            for param, state in zip(work.params, work.states):
                step = state["step"]
                if not work.guarded:
                    state["step"] = int(step) + 1  # int() reads a guarded count back once, if the mode changed
                    continue
                if not isinstance(step, Tensor) or step.device != param.device:
                    step = state["step"] = torch.full((), float(step), dtype=torch.float32, device=param.device)
                counters[step.device].append(step)
        for steps in counters.values():
            torch._foreach_add_(steps, 1.0)
        return counters

    def _reduces(self) -> bool:
        """Whether ``vbar`` (and the non-finite verdict) is reduced over :attr:`process_group` this step:
        whenever it has several ranks, unless ``sharding="replicated"``. Asked before anything changes,
        so a layout that ``sharding="auto"`` refuses leaves the optimizer as it was."""
        params = (p for group in self.param_groups for p in group["params"])
        return distributed.needs_reduction(self.sharding, params, self.process_group)

    def _found_inf(self, works: list[_GroupWork], device: torch.device, reduce: bool) -> Tensor:
        """1.0 when any gradient of this step is non-finite (0-dim float32 on ``device``), agreed by all ranks
        that share ``vbar`` (each holds only its part of the gradients when they are sharded; a rank with
        none joins with 0)."""
        grads = [grad for work in works for grad in work.grads]
        found_inf = F.nonfinite_flag(grads, device)
        if reduce:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.process_group)
        return found_inf

    def _global_mean(self, total: Tensor, count: int, reduce: bool) -> Tensor:
        """``vbar`` from this rank's sum of vhat and element count (DTensors: their local shards)."""
        if reduce:
            return distributed.global_mean(total, count, self.process_group)
        return F.safe_mean(total, count)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one Adai step; calls ``closure`` (with gradients enabled) first and returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Every check that can refuse the step (sparse gradients, a path that cannot run) comes before
        # the first change, so a refused step leaves the optimizer as it was.
        works = [work for work in map(self._gather, self.param_groups) if work.params]
        self._check_operands(works)
        reduce = self._reduces()
        if not works:  # still join the other ranks' reductions (verdict, vbar), if there are any
            anchor = self.param_groups[0]["params"][0]
            if self.skip_nonfinite and reduce:
                self._found_inf([], anchor.device, reduce)
            self._global_mean(anchor.new_zeros((), dtype=state_dtype(anchor)), 0, reduce)
            return loss
        plan = [(work, indices, passes) for work in works for indices, passes in work.buckets()]
        # skip_nonfinite: the eager paths write v (and decay p) in pass 1, so they need the verdict
        # first, from a separate read of the gradients; when every bucket's pass 1 writes nothing
        # (native kernel) in a single process, the pass-1 sums themselves are the check (a NaN or inf
        # gradient makes them non-finite), at no cost. Across ranks the verdict is always reduced
        # first, so that every rank (one without gradients, one on another path) joins the same collectives.
        found_inf = None
        if self.skip_nonfinite and (reduce or any(passes[0] in _WRITING_PASS1 for _, _, passes in plan)):
            found_inf = self._found_inf(works, works[0].grads[0].device, reduce)
        counters = self._count_steps(works)

        def guard(device: torch.device) -> dict[str, Tensor]:
            return {} if found_inf is None else {"found_inf": found_inf.to(device, non_blocking=True)}

        sums = []
        for work, indices, (second_moment, _) in plan:
            params, grads, _, exp_avg_sqs, _, steps = work.operands(indices)
            sums.append(second_moment(params, grads, exp_avg_sqs, steps, work.hyper, **guard(params[0].device)))
        acc_dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
        total = torch.stack([s.to(device=sums[0].device, dtype=acc_dtype) for s in sums]).sum()
        count = sum(p.numel() for work in works for p in work.params)
        vbar = self._global_mean(total, count, reduce)
        if self.skip_nonfinite:
            if found_inf is None:
                found_inf = 1.0 - torch.isfinite(vbar).float()
            vbar = self._guard_vbar(vbar, found_inf)
        else:
            self.last_vbar = vbar

        for work, indices, (_, update) in plan:
            params, grads, exp_avgs, exp_avg_sqs, beta1_prods, steps = work.operands(indices)
            device = exp_avgs[0].device
            update(params, grads, exp_avgs, exp_avg_sqs, beta1_prods, steps, vbar.to(device), work.hyper,
                   **guard(device))
        for device, steps in counters.items():  # a skipped step takes back its count
            torch._foreach_add_(steps, found_inf.to(device, non_blocking=True), alpha=-1.0)
        if self.skip_nonfinite and not torch.compiler.is_compiling():  # a compiled step only counts
            self._skip_watch.after_step(self.skipped_steps, self.consecutive_skips)
        return loss

    def _guard_vbar(self, vbar: Tensor, found_inf: Tensor) -> Tensor:
        """Count a skipped step, keep :attr:`last_vbar` of the last applied step, and return the ``vbar``
        the passes get: 1 in a skipped step, where the sum over a NaN gradient may be non-finite."""
        skip = found_inf.to(vbar.device) > 0
        previous = self.last_vbar if self.last_vbar is not None else torch.full_like(vbar, float("nan"))
        self.last_vbar = torch.where(skip, previous.to(device=vbar.device, dtype=vbar.dtype), vbar)
        self.skipped_steps = self.skipped_steps.to(found_inf.device, non_blocking=True)
        self.skipped_steps.add_(found_inf)
        self.consecutive_skips = self.consecutive_skips.to(found_inf.device, non_blocking=True)
        self.consecutive_skips.add_(found_inf).mul_(found_inf)  # +1 when skipped, else back to 0
        return torch.where(skip, torch.ones_like(vbar), vbar)

    @torch.no_grad()
    def inertia(self) -> Iterator[Inertia]:
        """Yield ``(param, vhat / vbar, beta1)`` for every parameter with state, as of the last step.

        Computed on demand from the state and :attr:`last_vbar`, so monitoring costs nothing when
        unused. A parameter that had no gradient in the last step reports the inertia its own last
        ``vhat`` would get with the last step's ``vbar``. Yields nothing before the first step.
        For a DTensor (FSDP2) parameter, ``ratio`` and ``beta1`` are DTensors sharded like its state
        (``full_tensor()`` gathers them), computed with the global ``vbar``. After a skipped step
        (``skip_nonfinite``) it reports the last applied step's; NaN if none has been applied yet.
        """
        if self.last_vbar is None:
            return
        for group in self.param_groups:
            hyper = self._hyper(group)
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                exp_avg_sq = state["exp_avg_sq"]
                vhat = distributed.local_part(exp_avg_sq) / F.bias_correction(hyper.beta2, state["step"])
                ratio = vhat / self.last_vbar.to(device=vhat.device, dtype=vhat.dtype)
                beta1 = F.inertia_from_ratio(ratio.clone(), hyper)
                yield Inertia(param, distributed.shaped_like(exp_avg_sq, ratio), distributed.shaped_like(exp_avg_sq, beta1))


class AdaiW(Adai):
    """Adai with decoupled weight decay (``p *= 1 - lr * wd``), the paper's AdaiW.

    Identical to ``Adai(..., decoupled=True)``; its own class so that ``--optimizer AdaiW`` works.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.1, 0.99),
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        decoupled: bool = True,
        dampening: float = 1.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        sharding: str = "auto",
        process_group: Any = None,
        skip_nonfinite: bool = True,
        max_consecutive_skips: int | None = 100,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, decoupled, dampening, maximize, foreach, fused, sharding, process_group,
            skip_nonfinite, max_consecutive_skips,
        )
