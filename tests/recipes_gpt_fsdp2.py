"""``recipes/gpt_tiny.yaml`` (a shrunken copy) through the CLI, for tests/test_recipes_gpt.py.

Usage: ``python recipes_gpt_fsdp2.py CONFIG OUT_DIR {fsdp2,single}``.

``fsdp2``: the recipe's documented FSDP2 command line (``ModelParallelStrategy``, 2 CPU ranks, gloo;
``fully_shard`` in ``GPTLanguageModel.configure_model``), with InertiaMonitor as the only monitoring
callback. ``single``: one process with twice the per-process batch, so that every step sees the
same global batch (rank r of 2 takes every other window of the epoch's permutation). Each process
writes ``OUT_DIR/<mode>_rank<r>.json``: its loss at every step and, after every step, whether every
parameter is a DTensor and whether the optimizer holds exactly the module's parameters.
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


class StepRecorder(pl.Callback):
    """Records this rank's loss at every step and, after each optimizer step, whether every parameter of
    the module is a DTensor and the optimizer holds exactly those tensors (an evaluation forward leaves
    the root unit unsharded until the next backward, so the end of training is not the moment to look)."""

    def __init__(self, out_dir: str, name: str) -> None:
        self.out_dir, self.name = Path(out_dir), name
        self.losses, self.all_dtensor, self.optimizer_holds_module_params = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.tensor import DTensor

        params = list(pl_module.parameters())
        held = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        self.losses.append(float(outputs["loss"]))
        self.all_dtensor.append(all(isinstance(p, DTensor) for p in params))
        self.optimizer_holds_module_params.append({id(p) for p in held} == {id(p) for p in params})

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out_dir / f"{self.name}_rank{trainer.global_rank}.json").write_text(json.dumps(vars(self), default=str))


if __name__ == "__main__":
    config, out_dir, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    batch_size = yaml.safe_load(Path(config).read_text())["data"]["init_args"]["batch_size"]
    callbacks = [{"class_path": "adai_lightning.callbacks.InertiaMonitor", "init_args": {"every_n_train_steps": 2}},
                 {"class_path": "recipes_gpt_fsdp2.StepRecorder", "init_args": {"out_dir": str(out_dir), "name": mode}}]
    args = ["fit", "--config", config, "--trainer.callbacks", json.dumps(callbacks),
            "--trainer.enable_checkpointing", "false", "--test_after_fit", "false"]
    if mode == "fsdp2":
        args += ["--trainer.devices", "2", "--trainer.strategy", FSDP2]
    else:
        args += ["--data.batch_size", str(2 * batch_size)]
    main(args)
