"""``InertiaMonitor``: the distribution of Adai's per-element momentum (beta1), per parameter and module.

Adai gives every element its own inertia ``beta1 = clip(1 - beta0 * vhat / vbar, 0, 1 - eps)``. This
callback summarises it at each cadence point so one sees where the optimizer is cautious (beta1 near
0: noisy or steep elements) and where it coasts (beta1 at ``1 - eps``: flat elements). SGD with
momentum and Adam/AdamW are summarised the same way with their constant momentum, so that runs with
different optimizers share one chart. See ``docs/callbacks-inertia.md`` for every key.

The statistics themselves (:func:`adai_statistics`, :func:`constant_statistics`) need no trainer.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.optim import Optimizer

from adai_lightning.callbacks._cadence import CadencedCallback, histogram_writers, log_histogram, log_scalars
from adai_lightning.optim import Adai
from adai_lightning.report import PARAMETER_ORDER_FILE

STATS = ("mean", "std", "q05", "q25", "q50", "q75", "q95", "frac_zero", "frac_max", "ratio_mean")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Quantiles of a tensor with more elements than this come from an evenly strided, deterministic
#: subsample of this many elements (torch.quantile's size limit in older torch, and a cost bound).
QUANTILE_SAMPLE_SIZE = 2**24
#: Optimizers with one momentum per param group, and how to read it from the group.
CONSTANT_MOMENTUM: tuple[tuple[tuple[type, ...], Callable[[dict], float]], ...] = (
    ((torch.optim.Adam, torch.optim.AdamW), lambda group: group["betas"][0]),
    ((torch.optim.SGD,), lambda group: group["momentum"]),
)
UNNAMED_MODULE = "_unnamed"
#: Attributes under which torch wrappers keep the module they wrap (``torch.compile``'s
#: ``OptimizedModule``, activation checkpointing's ``CheckpointWrapper``): left out of parameter
#: names, so that a compiled or wrapped run logs the same keys as an eager one (``net.0.weight``,
#: not ``net._orig_mod.0.weight``).
WRAPPER_ATTRIBUTES = frozenset({"_orig_mod", "_checkpoint_wrapped_module"})
#: Equal-width buckets between a scope's smallest and largest beta1 in its histogram.
HISTOGRAM_BINS = 64


class Histogram(NamedTuple):
    """A histogram in TensorBoard's raw form (``SummaryWriter.add_histogram_raw``'s arguments)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


class ParamInertia(NamedTuple):
    """One parameter's beta1 (flat, float32), its clip counts and the sum of its ``vhat / vbar``."""

    module: str
    beta1: Tensor
    n_zero: Tensor
    n_max: Tensor
    ratio_sum: Tensor


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor when it is a sharded DTensor (FSDP2; a collective), else the tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def module_keys(names: Iterable[str]) -> dict[str, str]:
    """``parameter name -> module key``: the module below the deepest prefix every name shares.

    Normally the top-level child (``body.0.weight -> body``); when a module keeps everything in one
    attribute (``self.model``, ``self.net``), the level below it (``model.layer1.0.weight ->
    model.layer1``), and so on down while a single child holds every parameter. A key is never a
    whole parameter name unless the parameter sits at that level itself.
    """
    names = list(names)
    parts = [name.split(".") for name in names]
    depth = 0
    while len({p[depth] for p in parts}) == 1 and all(len(p) > depth + 2 for p in parts):
        depth += 1
    return {name: ".".join(p[:depth + 1]) for name, p in zip(names, parts)}


def _sample(values: Tensor) -> Tensor:
    """``values`` itself, or an evenly strided view of at most :data:`QUANTILE_SAMPLE_SIZE` elements."""
    return values[::math.ceil(values.numel() / QUANTILE_SAMPLE_SIZE)]


def unwrapped_name(name: str) -> str:
    """``name`` without the :data:`WRAPPER_ATTRIBUTES` levels: ``net._orig_mod.0.weight -> net.0.weight``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_ATTRIBUTES)


def parameter_names(module: torch.nn.Module, optimizer: Optimizer) -> dict[int, str]:
    """``id(param) -> name`` from ``named_parameters()`` (without wrapper levels, :func:`unwrapped_name`);
    a parameter the module does not name gets ``_unnamed.<group>.<index in group>``, stable as long as
    the param groups are."""
    names = {id(param): unwrapped_name(name) for name, param in module.named_parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            names.setdefault(id(param), f"{UNNAMED_MODULE}.{g}.{i}")
    return names


def _local_inertia(optimizer: Adai, names: dict[int, str]) -> dict[str, ParamInertia]:
    """Every stepped, non-empty parameter's beta1 from :meth:`Adai.inertia`, as device tensors (no host sync)."""
    eps = {id(param): group["eps"] for group in optimizer.param_groups for param in group["params"]}
    modules = module_keys(names.values())
    out = {}
    for inertia in optimizer.inertia():
        if inertia.param.numel() == 0:
            continue
        beta1 = _full(inertia.beta1).detach().reshape(-1)
        bound = beta1.new_full((), 1.0 - eps[id(inertia.param)])  # the clamp's own bound, in beta1's dtype
        name = names[id(inertia.param)]
        out[name] = ParamInertia(modules[name], beta1.float(), (beta1 <= 0).sum(), (beta1 >= bound).sum(),
                                 _full(inertia.ratio).detach().float().sum())
    return out


def param_inertia(optimizer: Adai | ZeroRedundancyOptimizer, names: dict[int, str]) -> dict[str, ParamInertia]:
    """Every stepped parameter's inertia, in the optimizer's parameter order, identical on every rank.

    FSDP2 (DTensor state): each tensor is gathered with ``full_tensor()``. ZeRO
    (``ZeroRedundancyOptimizer`` around Adai): each rank holds whole parameters, so the ranks'
    parts are exchanged with one ``all_gather_object`` (host copies; only under ZeRO).
    """
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return _local_inertia(optimizer, names)
    local = {name: ParamInertia(*(t.cpu() if isinstance(t, Tensor) else t for t in entry))
             for name, entry in _local_inertia(optimizer.optim, names).items()}
    parts: list[Any] = [None] * dist.get_world_size(optimizer.process_group)
    dist.all_gather_object(parts, local, group=optimizer.process_group)
    merged = {name: entry for part in parts for name, entry in part.items()}
    order = (names[id(p)] for group in optimizer.param_groups for p in group["params"])
    return {name: merged[name] for name in order if name in merged}


def _summarize(values: Tensor, entries: list[ParamInertia]) -> Tensor:
    """The ten :data:`STATS` of ``values`` (the entries' beta1, concatenated) as one float32 tensor."""
    device = values.device
    std, mean = torch.std_mean(values, correction=0)
    quantiles = torch.quantile(_sample(values), values.new_tensor(QUANTILES))
    counts = torch.stack([sum(e.n_zero.to(device) for e in entries), sum(e.n_max.to(device) for e in entries)])
    ratio_sum = sum(e.ratio_sum.to(device) for e in entries)
    numel = values.numel()
    return torch.cat([mean[None], std[None], quantiles, counts.float() / numel, (ratio_sum / numel)[None]])


def _concat(entries: list[ParamInertia]) -> Tensor:
    device = entries[0].beta1.device
    return torch.cat([e.beta1.to(device) for e in entries]) if len(entries) > 1 else entries[0].beta1


def _histogram_row(values: Tensor) -> Tensor:
    """``[min, max, sum, sum of squares, counts of HISTOGRAM_BINS equal buckets]`` of every element
    of ``values``, on the device: bucket indices from one affine map, counted by ``torch.bincount``."""
    low, high = torch.aminmax(values)
    width = (high - low).clamp_min(torch.finfo(values.dtype).tiny) / HISTOGRAM_BINS
    index = ((values - low) / width).long().clamp_(0, HISTOGRAM_BINS - 1)
    counts = torch.bincount(index, minlength=HISTOGRAM_BINS).to(values.dtype)
    moments = torch.stack([values.sum(), values.square().sum()])
    return torch.cat([torch.stack([low, high]), moments, counts])


def _histogram(row: list[float], num: int) -> Histogram:
    """The :class:`Histogram` of a :func:`_histogram_row` brought to the host (bucket right edges)."""
    low, high, total, squares, counts = row[0], row[1], row[2], row[3], row[4:]
    if high == low:  # one value: a single bucket
        return Histogram(low, high, num, total, squares, [high], [float(num)])
    width = (high - low) / HISTOGRAM_BINS
    limits = [low + (i + 1) * width for i in range(HISTOGRAM_BINS - 1)] + [high]
    return Histogram(low, high, num, total, squares, limits, counts)


def _scopes(names: Iterable[str], module_of: Callable[[str], str], per_parameter: bool
            ) -> Iterator[tuple[str, list[str]]]:
    """``(key prefix, member names)`` for each parameter (if asked), each module (:func:`module_keys`), and all."""
    names = list(names)
    if per_parameter:
        for name in names:
            yield f"param/{name}/", [name]
    modules = defaultdict(list)
    for name in names:
        modules[module_of(name)].append(name)
    for module, members in modules.items():
        yield f"module/{module}/", members
    if names:
        yield "global/", names


def adai_statistics(inertia: dict[str, ParamInertia], per_parameter: bool = True,
                    histogram: Callable[[str, Histogram], None] | None = None) -> dict[str, float]:
    """``{"<scope>/<stat>": value}`` for every scope (keys without the ``inertia/`` prefix).

    Everything is computed on the device; the values come to the host in one transfer. If given,
    ``histogram("<scope>/beta1", Histogram)`` receives each module's and the global beta1 histogram
    (every element, :data:`HISTOGRAM_BINS` buckets), computed on the device as soon as the
    scope's concatenation is formed, so at most one concatenation is alive at a time.
    """
    keys, rows, histograms = [], [], []
    summaries: dict[tuple[str, ...], Tensor] = {}  # a one-module model's global row is its module row
    for key, members in _scopes(inertia, lambda name: inertia[name].module, per_parameter):
        entries = [inertia[name] for name in members]
        values = _concat(entries)
        if tuple(members) not in summaries:
            summaries[tuple(members)] = _summarize(values, entries)
        keys.append(key)
        rows.append(summaries[tuple(members)])
        if histogram is not None and not key.startswith("param/"):
            histograms.append((key + "beta1", values.numel(), _histogram_row(values)))
    if not rows:
        return {}
    device = rows[0].device
    flat = torch.cat([torch.stack([row.to(device) for row in rows]).reshape(-1)]
                     + [row.to(device) for _, _, row in histograms]).tolist()  # the one host transfer
    table = [flat[i * len(STATS):(i + 1) * len(STATS)] for i in range(len(rows))]
    offset, width = len(rows) * len(STATS), 4 + HISTOGRAM_BINS
    for i, (key, num, _) in enumerate(histograms):
        histogram(key, _histogram(flat[offset + i * width:offset + (i + 1) * width], num))
    return {key + stat: value for key, row in zip(keys, table) for stat, value in zip(STATS, row)}


def constant_summary(momenta: Iterable[tuple[float, int]]) -> dict[str, float]:
    """The :data:`STATS` (without ``ratio_mean``) of ``count`` elements each equal to ``momentum``.

    Exact and host-only: the constant optimizers' momentum is a Python float per param group.
    Quantiles interpolate linearly between order statistics, as ``torch.quantile`` does.
    """
    ordered = sorted(momenta)
    total = sum(count for _, count in ordered)
    base = ordered[0][0]  # offsets from the smallest value keep a single constant exact
    mean = base + sum((m - base) * count for m, count in ordered) / total
    std = math.sqrt(sum((m - mean) ** 2 * count for m, count in ordered) / total)

    def order_statistic(index: int) -> float:
        for momentum, count in ordered:
            if index < count:
                return momentum
            index -= count
        raise IndexError(f"order statistic {index} of {total} elements")

    stats = {"mean": mean, "std": std}
    for q, key in zip(QUANTILES, STATS[2:7]):
        position = q * (total - 1)
        low = math.floor(position)
        a, b = order_statistic(low), order_statistic(min(low + 1, total - 1))
        stats[key] = a + (b - a) * (position - low)
    stats["frac_zero"] = sum(count for m, count in ordered if m == 0) / total
    stats["frac_max"] = 0.0  # no clipping bound: the momentum is what the user set
    return stats


def momentum_reader(optimizer: Optimizer) -> Callable[[dict], float] | None:
    """How to read a constant momentum from a param group of ``optimizer`` (or ZeRO's inner one)."""
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    return next((read for types, read in CONSTANT_MOMENTUM if isinstance(inner, types)), None)


def constant_statistics(optimizer: Optimizer, read: Callable[[dict], float], names: dict[int, str],
                        per_parameter: bool = True) -> dict[str, float]:
    """``{"<scope>/<stat>": value}`` for an optimizer whose momentum is one number per param group."""
    momentum = {names[id(param)]: (float(read(group)), param.numel())
                for group in optimizer.param_groups for param in group["params"] if param.numel() > 0}
    modules = module_keys(names.values())
    return {key + stat: value
            for key, members in _scopes(momentum, modules.__getitem__, per_parameter)
            for stat, value in constant_summary(momentum[name] for name in members).items()}


def _is_adai(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, Adai) or (isinstance(optimizer, ZeroRedundancyOptimizer)
                                           and isinstance(optimizer.optim, Adai))


class InertiaMonitor(CadencedCallback):
    """Log the distribution of every optimizer's momentum (beta1) per parameter, module and globally.

    At each cadence point, for Adai/AdaiW (read through :meth:`Adai.inertia`, no recomputation):
    mean, std, quantiles 5/25/50/75/95 of beta1, the fractions clipped at 0 and at ``1 - eps``,
    and the mean of ``vhat / vbar``; keys ``inertia/module/<module>/<stat>`` and
    ``inertia/global/<stat>``, and with ``per_parameter=True`` also ``inertia/param/<name>/<stat>``
    (with several optimizers, ``inertia/opt<i>/...`` for the i-th of ``trainer.optimizers``). A
    module is a top-level child of the LightningModule, or the level below when one child holds
    every parameter (``self.model``, ``self.net``; see :func:`module_keys`), for every optimizer alike. SGD and Adam/AdamW log their
    constant momentum under the same keys (no ``ratio_mean``); other optimizers: one warning, no keys.
    Histograms of beta1 per module and globally go to TensorBoard when ``histograms`` is set.
    Parameter names leave out the levels torch wrappers add (:data:`WRAPPER_ATTRIBUTES`), so a compiled
    run logs the eager run's keys; the names in the model's order go to ``parameter_order.json`` beside
    each CSVLogger's ``metrics.csv`` (CSVLogger sorts its columns; the report draws layers in this order).

    Values are global and identical on every rank under DDP, FSDP2 and ZeRO (see
    :func:`param_inertia`); the loggers write on rank zero.

    Args:
        every_n_train_steps: log after every n-th optimizer step (None: never by steps).
        every_n_epochs: log at the end of every n-th training epoch (None: never by epochs).
        per_parameter: also log one series per parameter tensor (off by default: hundreds of keys
            on big models; the per-module series stay readable).
        histograms: add beta1 histograms to loggers that support them (TensorBoard).
    """

    def __init__(self, every_n_train_steps: int | None = 50, every_n_epochs: int | None = None,
                 per_parameter: bool = False, histograms: bool = True) -> None:
        super().__init__(every_n_train_steps, every_n_epochs)
        for name, value in (("per_parameter", per_parameter), ("histograms", histograms)):
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r}; it must be True or False")
        self.per_parameter = per_parameter
        self.histograms = histograms
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_train_steps=self.every_n_train_steps,
                                        every_n_epochs=self.every_n_epochs, per_parameter=self.per_parameter)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the parameter names in the model's order into each CSVLogger's folder (rank zero), for
        ``adai-lightning report`` to draw layers in that order: CSVLogger sorts its columns by name."""
        super().on_train_start(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        order = json.dumps([unwrapped_name(name) for name, _ in pl_module.named_parameters()])
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                folder = Path(logger.log_dir)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / PARAMETER_ORDER_FILE).write_text(order)

    def on_cadence(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        optimizers = trainer.optimizers
        metrics: dict[str, float] = {}
        for i, optimizer in enumerate(optimizers):
            prefix = "inertia/" if len(optimizers) == 1 else f"inertia/opt{i}/"
            names = parameter_names(pl_module, optimizer)
            if _is_adai(optimizer):
                histogram = (lambda key, data: log_histogram(trainer, prefix + key, data)) \
                    if self.histograms and histogram_writers(trainer) else None
                scalars = adai_statistics(param_inertia(optimizer, names), self.per_parameter, histogram)
                if (adai := getattr(optimizer, "optim", optimizer)).skip_nonfinite:  # ZeRO wraps Adai in .optim
                    scalars["skipped_steps"] = float(adai.skipped_steps)
            elif (read := momentum_reader(optimizer)) is not None:
                scalars = constant_statistics(optimizer, read, names, self.per_parameter)
            else:
                self._warn_unknown(optimizer)
                continue
            metrics.update({prefix + key: value for key, value in scalars.items()})
        log_scalars(trainer, metrics)

    def _warn_unknown(self, optimizer: Optimizer) -> None:
        kind = type(optimizer).__qualname__
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(f"InertiaMonitor does not know the momentum of {kind}; it logs nothing for it "
                           "(supported: Adai, AdaiW, SGD, Adam, AdamW, and these inside ZeroRedundancyOptimizer)")
