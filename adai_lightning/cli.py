"""The ``adai-lightning`` console script: a LightningCLI that knows Adai and AdaiW by their short names.

``adai-lightning fit --config recipes/default.yaml --optimizer Adai --optimizer.lr 0.5`` works as in any
LightningCLI (``fit``, ``validate``, ``test``, ``predict``), with omegaconf interpolation in configs.
``adai-lightning report RUN_DIR`` and ``adai-lightning compare --config RECIPE ...`` render a run's logs.

A configuration error (an out-of-range or mistyped argument, a bad callback argument, a missing dataset
or checkpoint) and an output folder that cannot take the run's files (a full disk, a read-only folder)
print ``error: <one line>`` and exit with status 2; ``--debug`` (anywhere on the
command line) or ``ADAI_LIGHTNING_DEBUG=1`` shows the full traceback instead. ``--ckpt_path last``
resumes from the newest checkpoint that loads (see ``adai_lightning.recipes.checkpointing``); the
optimizer's hyperparameters then come from the checkpoint, and a warning names each configured
``--optimizer.*`` value that differs (it does not apply).
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from functools import partial, update_wrapper
from importlib import import_module
from pathlib import Path
from types import MethodType
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, _global_add_class_path, instantiate_class
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

import adai_lightning  # noqa: F401  (registers Adai and AdaiW as torch optimizers for the parser)
from adai_lightning.recipes.checkpointing import CheckpointError, OutputWriteError, resolve_checkpoint
from adai_lightning.recipes.vision_data import MissingDataError

#: Short optimizer names that resolve to this package even when another imported package
#: (pytorch-optimizer, say) exports a class of the same name.
SHORT_NAMES = {"Adai": "adai_lightning.Adai", "AdaiW": "adai_lightning.AdaiW"}
DEBUG_FLAG, DEBUG_ENV = "--debug", "ADAI_LIGHTNING_DEBUG"
#: Exceptions that, raised while the command line is parsed and its classes are built, are the user's
#: configuration (a wrong value, type, name or path), not a failure of the code.
CONFIGURATION_ERRORS = (ArgumentError, ValueError, TypeError, LookupError, OSError, ImportError)
#: Exceptions that are configuration errors even when raised once the subcommand runs.
RUN_TIME_CONFIGURATION_ERRORS = (MissingDataError, CheckpointError)
DESCRIPTION = (
    "Lightning's fit / validate / test / predict with the Adai optimizer (--optimizer Adai or AdaiW). "
    "Also: 'adai-lightning report RUN_DIR' (plots a run's logs into report.png / report.html) and "
    "'adai-lightning compare --config RECIPE --optimizers Adai,SGD,Adam --seeds N' (runs and compares "
    "optimizers); each takes --help. A configuration error prints one line and exits 2; --debug or "
    f"{DEBUG_ENV}=1 shows its traceback."
)


class ConfigurationError(Exception):
    """The command line or a config is wrong; the message is one line that says what and where."""


def one_line(error: BaseException) -> str:
    """The message of ``error``'s innermost configuration cause on one line, after the parser key it
    concerns (jsonargparse wraps a class's own ``ValueError`` in a many-line union error under
    ``Parser key "...":``; the key and the class's message are what the user needs)."""
    key = None
    while True:
        match = re.match(r'Parser key "([^"]+)":', str(error))
        key = key or (match and match.group(1))
        if not isinstance(error.__cause__, CONFIGURATION_ERRORS):
            break
        error = error.__cause__
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{key}: {message}" if key and not message.startswith("Parser key") else message


def _comparable(value: Any) -> Any:
    """A hyperparameter as a config gives it (lists) and as torch saves it (tuples), made comparable."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _is_instance(callback: Any, kind: type) -> bool:
    """Whether a callback's config (a ``class_path`` namespace) or instance is a ``kind``."""
    class_path = getattr(callback, "class_path", None)
    if class_path is None:
        return isinstance(callback, kind)
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, kind)


def qualify_optimizer_names(args: Sequence[str]) -> list[str]:
    """Rewrite ``--optimizer Adai`` and ``--optimizer=Adai`` to the full class path of ours."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--optimizer" and i + 1 < len(out) and out[i + 1] in SHORT_NAMES:
            out[i + 1] = SHORT_NAMES[out[i + 1]]
        elif arg.startswith("--optimizer=") and arg.split("=", 1)[1] in SHORT_NAMES:
            out[i] = "--optimizer=" + SHORT_NAMES[arg.split("=", 1)[1]]
    return out


class AdaiCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation on and a config saved per run (overwriting allowed).

    ``--optimizer`` / ``--lr_scheduler`` are built after ``configure_model`` (see
    :meth:`_add_configure_optimizers_method_to_model`), so they also work under FSDP2.

    ``fit --test_after_fit true`` (set in ``recipes/default.yaml``) tests the final weights on the
    data module's test split right after training, so one command gives the test metrics.

    A configuration error raises :class:`ConfigurationError` with a one-line message: every
    ``CONFIGURATION_ERRORS`` exception until the subcommand starts (parsing, building the classes,
    finding the checkpoint), and ``RUN_TIME_CONFIGURATION_ERRORS`` after (a missing dataset), and at any
    time an output file that cannot be written (:class:`OutputWriteError`: full disk, read-only folder).
    """

    def __init__(self, *args, **kwargs) -> None:
        parser_kwargs = kwargs.pop("parser_kwargs", None) or {}
        # "omegaconf+" resolves ${...} interpolations after the command line is merged, so that
        # ``--trainer.default_root_dir X`` also moves the loggers whose save_dir interpolates it.
        # Absolute paths (``${trainer.max_epochs}``) are made relative, so they work under a subcommand.
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        parser_kwargs.setdefault("exit_on_error", False)  # raise, so that the error becomes one line
        parser_kwargs.setdefault("description", DESCRIPTION)
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        self._running = False
        try:
            super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)
        except Exception as error:
            message = self._user_error(error)
            if message is None:
                raise
            raise ConfigurationError(message) from error

    def _user_error(self, error: Exception) -> str | None:
        """One line for an error the user fixes (a configuration error, a full or read-only output
        folder), ``None`` for a failure of the code (its traceback is shown)."""
        unwritable = OutputWriteError.found_in(error)
        if unwritable is not None:
            return str(unwritable)
        if isinstance(error, RUN_TIME_CONFIGURATION_ERRORS) or \
                (not self._running and isinstance(error, CONFIGURATION_ERRORS)):
            return one_line(error)
        return None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads an explicit ``ckpt_path``'s hyperparameters while parsing: a file that does
        not load is a :class:`CheckpointError` naming it, not torch's many-line RuntimeError."""
        try:
            super()._parse_ckpt_path()
        except ArgumentError:
            raise
        except Exception as error:
            raise CheckpointError.unreadable(self.config[self.config.subcommand].get("ckpt_path"), error) from error

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's arguments, with ``ckpt_path`` checked (and ``"last"`` resolved); training starts next."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None:
            kwargs["ckpt_path"] = resolve_checkpoint(self.trainer, kwargs["ckpt_path"])
            if subcommand == "fit" and Path(kwargs["ckpt_path"]).is_file():
                self._warn_unapplied_optimizer_values(Path(kwargs["ckpt_path"]))
        self._running = True
        return kwargs

    def _warn_unapplied_optimizer_values(self, path: Path) -> None:
        """Resuming restores the optimizer's param groups from the checkpoint, so a configured
        ``--optimizer.*`` value that differs from the saved one does not apply: warn, naming each."""
        configured = self._automatic_init(self._parser("fit")._optimizers)
        if not configured:
            return
        checkpoint = self.trainer.strategy.checkpoint_io.load_checkpoint(path, map_location="cpu", weights_only=False)
        groups = [g for state in checkpoint.get("optimizer_states", []) for g in state.get("param_groups", [])]
        for key, value in (configured.get("init_args") or {}).items():
            saved = [g.get("initial_lr", g[key]) if key == "lr" else g[key] for g in groups if key in g]
            if saved and _comparable(value) != _comparable(saved[0]):
                rank_zero_warn(f"--optimizer.{key} {value} does not apply: resuming from {path} restores the "
                               f"optimizer's saved {key} = {saved[0]}; start a new run to change it")

    def before_instantiate_classes(self) -> None:
        """``--trainer.enable_checkpointing false`` also drops the recipe's ``ModelCheckpoint`` callbacks,
        and ``--trainer.logger false`` its ``LearningRateMonitor`` (Lightning refuses either combination),
        so a recipe with periodic checkpoints and a logged lr can still run without them."""
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).trainer
        refused = [kind for kind, off in ((ModelCheckpoint, trainer.enable_checkpointing is False),
                                          (LearningRateMonitor, trainer.logger is False)) if off]
        if refused and isinstance(trainer.callbacks, list):
            trainer.callbacks = [c for c in trainer.callbacks if not any(_is_instance(c, kind) for kind in refused)]

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After fit, run test with the final weights (fit only).")

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)

    def _automatic_init(self, register: dict[str, tuple[Any, str]]) -> dict[str, Any] | None:
        """The configured ``class_path``/``init_args`` of the 'AUTOMATIC' optimizer or scheduler group, if any."""
        for key, (class_type, link_to) in register.items():
            if link_to == "AUTOMATIC":
                init = self._get(self.config_init, key)
                return init if isinstance(class_type, tuple) else _global_add_class_path(class_type, init)
        return None

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """Build ``--optimizer`` and ``--lr_scheduler`` inside ``configure_optimizers``, not before it.

        LightningCLI builds them from ``model.parameters()`` when the model is created, BEFORE
        ``configure_model`` runs. Under FSDP2 / ``ModelParallelStrategy`` ``configure_model`` replaces
        the parameters with DTensors, so that optimizer would update stale tensors: nothing trains and
        nothing fails. Lightning calls ``configure_optimizers`` after ``configure_model``, so building
        them there sees the parameters that train. Lightning's own method still runs first, for its
        checks (and it builds a throwaway optimizer early, which surfaces config errors before training).
        """
        super()._add_configure_optimizers_method_to_model(subcommand)
        if not isinstance(getattr(self.model.configure_optimizers, "__func__", None), partial):
            return  # no automatic optimizer: the model's own configure_optimizers stays
        parser = self._parser(subcommand)
        optimizer_init = self._automatic_init(parser._optimizers)
        scheduler_init = self._automatic_init(parser._lr_schedulers)

        def configure_optimizers(model: LightningModule) -> Any:
            optimizer = instantiate_class(model.parameters(), optimizer_init)
            scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
            return self.configure_optimizers(model, optimizer, scheduler)

        update_wrapper(configure_optimizers, self.configure_optimizers)  # Lightning's `is_overridden` needs it
        self.model.configure_optimizers = MethodType(configure_optimizers, self.model)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``adai-lightning`` console script.

    ``report`` and ``compare`` are our own subcommands (see ``adai_lightning.report`` and
    ``adai_lightning.compare``); everything else goes to the LightningCLI. Without ``args`` the command
    line is ``sys.argv``, rewritten in place (short optimizer names qualified, ``--debug`` removed), so
    that LightningCLI reads it itself and DDP's re-launch of this script sees the same arguments.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if DEBUG_FLAG in argv:
        argv.remove(DEBUG_FLAG)
        os.environ[DEBUG_ENV] = "1"  # also for the processes DDP launches
    try:
        if argv and argv[0] in ("report", "compare"):
            import_module(f"adai_lightning.{argv[0]}").main(argv[1:])
            return
        argv = qualify_optimizer_names(argv)
        if args is None:
            sys.argv[1:] = argv
        AdaiCLI(args=None if args is None else argv)
    except ConfigurationError as error:
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
