"""A snapshot of a module tree's plain Python state, restored in place (issue 19).

A ``training_step`` keeps more than tensors: ``self.training_step_outputs.append(loss)`` (Lightning's
replacement for ``training_epoch_end``), a step counter, a dict of running sums, a cache rebound every
step. The probe calls ``training_step`` dozens of times per cadence point; :class:`PythonState` puts
all of that back. It covers, on every module of the tree (torchmetrics ``Metric``\\s excepted: the
isolation context keeps those) and on what their attributes hold:

- attributes: rebound ones get their old object back, ones added are removed (counters, caches);
- ``list``, ``dict``, ``set``, ``deque`` (subclasses too: ``OrderedDict``,
  ``defaultdict``, ``AttributeDict``): their contents are restored *in place*, so a reference the
  user holds stays the same object, and what the probe appended (with its graph) is dropped;
- tuples are looked into (their containers restored); plain objects (a ``SimpleNamespace``, a
  dataclass, a tracker class of the user's) like modules: their attributes, recursively;
- a tensor attribute (``self.total += loss``) is cloned and copied back if changed in place; a tensor
  *inside* a container is only checked (its version counter), as cloning every tensor a list holds
  could double its memory: one changed in place is reported, not restored;
- NumPy arrays are copied back; ``torch.Generator``, ``random.Random`` and NumPy generators get their
  states back.

Not covered: ``_parameters``, ``_buffers``, ``_modules`` and the parameters and buffers wherever they
are referenced (parameters never change; the isolation context restores buffers, rebound ones too,
and modes; submodules are walked on their own), and, held only by reference, whatever is part of the
training machinery (the trainer, loggers, callbacks, optimizers, loaders, datasets, modules outside
the tree), is an object of torch's own classes (FSDP2's state, reached through a module's
``__dict__``: torch manages it) or is neither a container nor a plain object (C extension objects), and anything deeper
than :data:`MAX_DEPTH` references from a module.
"""

from __future__ import annotations

import collections
import functools
import random
import sys
import types
from typing import Any, Callable

import torch
from torch import Tensor

#: How many references from a module the snapshot follows into containers and plain objects.
MAX_DEPTH = 6
#: The attributes of ``nn.Module`` that other parts of the isolation handle.
MODULE_MANAGED = frozenset({"_parameters", "_buffers", "_modules"})
#: Values that cannot change in place: rebinding them back restores them.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, range, slice, type, torch.dtype, torch.device,
          types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)

#: Restores one object; returns why it could not (None when it could, or nothing had changed).
Restorer = Callable[[], "str | None"]


def _machinery() -> tuple[type, ...]:
    """Types held by reference only: the training machinery, and modules (walked on their own or not ours)."""
    import lightning.pytorch as pl
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import Logger as FabricLogger
    from lightning.pytorch.loggers import Logger

    return (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.utils.data.DataLoader,
            torch.utils.data.Dataset, pl.Trainer, pl.LightningDataModule, pl.Callback, Logger, FabricLogger, Fabric)


def _torchs_own(value: Any) -> bool:
    """Whether ``value``'s class is torch's own (FSDP2's per-module state, its parameter groups): torch
    manages those objects, so they are held by reference. FSDP2's forward fills lists that its backward
    consumes; restoring them in between (after each ``training_step``) broke the backward (IndexError)."""
    module = type(value).__module__
    return module == "torch" or module.startswith("torch.")


def _restore_sequence(container: list[Any] | collections.deque[Any], saved: list[Any]) -> None:
    if len(container) != len(saved) or any(a is not b for a, b in zip(container, saved)):
        container.clear()
        container.extend(saved)


def restore_mapping(container: dict[Any, Any], saved: dict[Any, Any]) -> None:
    """Put ``saved``'s items (by identity) back into ``container`` in place, if they changed."""
    if container.keys() != saved.keys() or any(container[key] is not value for key, value in saved.items()):
        container.clear()
        container.update(saved)


def _restore_set(container: set[Any], saved: set[Any]) -> None:
    if container != saved:
        container.clear()
        container.update(saved)


def _restore_attributes(target: Any, saved: dict[str, Any], managed: frozenset[str]) -> None:
    namespace = target.__dict__
    for name in [name for name in namespace if name not in saved and name not in managed]:
        del namespace[name]
    for name, value in saved.items():
        if namespace.get(name, saved) is not value:
            namespace[name] = value


def _restore_tensor(tensor: Tensor, version: int, copy: Tensor | None) -> str | None:
    if tensor._version == version:
        return None
    if copy is None:
        return "a tensor in a container, changed in place: only tensor attributes are copied"
    with torch.no_grad():
        tensor.copy_(copy)
    return None


def _random_state(value: Any) -> tuple[Callable[[], Any], Callable[[Any], Any]] | None:
    """(get, set) of the state of a random generator the snapshot knows, else None."""
    if isinstance(value, torch.Generator):
        return value.get_state, value.set_state
    if isinstance(value, random.Random):
        return value.getstate, value.setstate
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.random.RandomState):
        return value.get_state, value.set_state
    if numpy is not None and isinstance(value, numpy.random.Generator):
        bits = value.bit_generator
        return (lambda: bits.state), functools.partial(setattr, bits, "state")
    return None


def _put_state(put: Callable[[Any], Any], state: Any) -> None:
    """``put(state)``, returning None whatever ``put`` returns (a Restorer's non-None result is a problem)."""
    put(state)


class PythonState:
    """The plain Python state of ``root``'s module tree (see the module docstring), less the modules
    that are instances of ``skip``. :meth:`restore` puts it back."""

    def __init__(self, root: torch.nn.Module, skip: tuple[type, ...] = ()) -> None:
        self._restorers: list[tuple[str, Restorer]] = []
        # parameters and buffers, wherever else they are referenced, are left to the isolation context
        self._seen: set[int] = {id(tensor) for tensor in (*root.parameters(), *root.buffers())}
        self._machinery = _machinery()
        for name, module in root.named_modules():
            if not isinstance(module, skip):
                self._namespace(module, "self" + (f".{name}" if name else ""), 0, MODULE_MANAGED)

    def restore(self) -> dict[str, str]:
        """Restore every object; return ``{path: why}`` for those that could not be."""
        problems = {}
        for path, restore in self._restorers:
            try:
                problem = restore()
            except Exception as error:  # an object refusing its old contents: report it, restore the rest
                problem = f"{type(error).__name__}: {error}"
            if problem:
                problems[path] = problem
        return problems

    def _add(self, path: str, restorer: Restorer) -> None:
        self._restorers.append((path, restorer))

    def _namespace(self, target: Any, path: str, depth: int, managed: frozenset[str] = frozenset()) -> None:
        saved = {name: value for name, value in vars(target).items() if name not in managed}
        self._add(path, functools.partial(_restore_attributes, target, saved, managed))
        for name, value in saved.items():
            self._value(value, f"{path}.{name}", depth + 1, attribute=True)

    def _value(self, value: Any, path: str, depth: int, attribute: bool = False) -> None:
        if isinstance(value, _ATOMS) or id(value) in self._seen or depth > MAX_DEPTH:
            return
        self._seen.add(id(value))
        if isinstance(value, Tensor):
            self._tensor(value, path, attribute)
        elif isinstance(value, (list, collections.deque)):
            self._add(path, functools.partial(_restore_sequence, value, list(value)))
            self._items(enumerate(value), path, depth)
        elif isinstance(value, dict):
            self._add(path, functools.partial(restore_mapping, value, dict(value)))
            self._items(value.items(), path, depth)
        elif isinstance(value, set):
            self._add(path, functools.partial(_restore_set, value, set(value)))
        elif isinstance(value, tuple):
            self._items(enumerate(value), path, depth)
        elif (state := _random_state(value)) is not None:
            get, put = state
            self._add(path, functools.partial(_put_state, put, get()))
        elif type(value).__module__ == "numpy" and type(value).__name__ == "ndarray" and value.flags.writeable:
            self._add(path, functools.partial(value.__setitem__, Ellipsis, value.copy()))
        elif hasattr(value, "__dict__") and not isinstance(value, self._machinery) and not _torchs_own(value):
            self._namespace(value, path, depth)

    def _items(self, items: Any, path: str, depth: int) -> None:
        for key, item in list(items):
            self._value(item, f"{path}[{key!r}]", depth + 1)

    def _tensor(self, tensor: Tensor, path: str, attribute: bool) -> None:
        if tensor.is_inference():  # cannot change outside inference mode, and has no version counter
            return
        copy = tensor.detach().clone() if attribute else None
        self._add(path, functools.partial(_restore_tensor, tensor, tensor._version, copy))
