"""``recipes/gpt_tiny.yaml`` (a shrunken copy) through the CLI, for tests/test_recipes_gpt.py.

Usage: ``python recipes_gpt_fsdp2.py CONFIG OUT_DIR {fsdp2,fsdp2_plain,single}``.

``fsdp2``: the recipe's documented FSDP2 command line (``ModelParallelStrategy``, 2 CPU ranks, gloo;
``fully_shard`` in ``GPTLanguageModel.configure_model``) with the config's three monitoring callbacks,
then the test split (``configure_model`` runs again for it). ``fsdp2_plain``: the same without the
monitors. ``single``: one process with the monitors and twice the per-process batch, so that every step
sees the same global batch (rank r of 2 takes every other window of the epoch's permutation). Each process
writes ``OUT_DIR/<mode>_rank<r>.json``: its loss at every step, the monitors' logged values, after every
step whether every parameter is a DTensor and whether the optimizer holds exactly the module's parameters,
the final parameters (full tensors) and the test loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import yaml

from adai_lightning.cli import main

FSDP2 = ('{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", '
         '"init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}')


class RecordingLogger(pl.loggers.Logger):
    """Keeps what is logged on every rank (Lightning's loggers write on rank zero only): ``{step: metrics}``."""

    name, version, experiment = "recording", 0, None

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}
        self._save_dir = save_dir  # where the CLI saves its config.yaml

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.setdefault(step, {}).update(metrics)


class StepRecorder(pl.Callback):
    """Records this rank's loss at every step and, after each optimizer step, whether every parameter of
    the module is a DTensor and the optimizer holds exactly those tensors (an evaluation forward leaves the root unit unsharded until the next backward, so the end of
    training is not the moment to look); at the end of training the full parameters, after the test its loss
    and the monitors' values (``inertia/``, ``sharpness/``, ``saddle/``) the :class:`RecordingLogger` kept."""

    def __init__(self, out_dir: str, name: str) -> None:
        self.out_dir, self.name = Path(out_dir), name
        self.losses, self.all_dtensor, self.optimizer_holds_module_params, self.logged = [], [], [], []
        self.final, self.test_loss = [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.tensor import DTensor

        params = list(pl_module.parameters())
        held = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        self.losses.append(float(outputs["loss"]))
        self.all_dtensor.append(all(isinstance(p, DTensor) for p in params))
        self.optimizer_holds_module_params.append({id(p) for p in held} == {id(p) for p in params})

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        full = [p.full_tensor() if isinstance(p, DTensor) else p for p in pl_module.parameters()]
        self.final = [t.detach().flatten().tolist() for t in full]

    def on_test_end(self, trainer, pl_module) -> None:
        self.test_loss = float(trainer.callback_metrics["test/loss"])
        logged = next(logger.logged for logger in trainer.loggers if isinstance(logger, RecordingLogger))
        monitored = ("inertia/", "sharpness/", "saddle/")
        self.logged = [[step, {k: v for k, v in values.items() if k.startswith(monitored)}]
                       for step, values in sorted(logged.items(), key=lambda item: item[0] or 0)]
        fields = ("losses", "all_dtensor", "optimizer_holds_module_params", "logged", "final", "test_loss")
        state = {name: getattr(self, name) for name in fields}
        (self.out_dir / f"{self.name}_rank{trainer.global_rank}.json").write_text(json.dumps(state))


if __name__ == "__main__":
    config, out_dir, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    recipe = yaml.safe_load(Path(config).read_text())
    monitors = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].startswith("adai_lightning.callbacks.")]
    recorder = {"class_path": "recipes_gpt_fsdp2.StepRecorder", "init_args": {"out_dir": str(out_dir), "name": mode}}
    callbacks = ([] if mode == "fsdp2_plain" else monitors) + [recorder]
    args = ["fit", "--config", config, "--trainer.callbacks", json.dumps(callbacks),
            "--trainer.logger", json.dumps([{"class_path": "recipes_gpt_fsdp2.RecordingLogger",
                                              "init_args": {"save_dir": str(out_dir / mode)}}]),
            "--trainer.enable_checkpointing", "false"]
    if mode.startswith("fsdp2"):
        args += ["--trainer.devices", "2", "--trainer.strategy", FSDP2]
    else:
        args += ["--data.batch_size", str(2 * recipe["data"]["init_args"]["batch_size"])]
    main(args)
