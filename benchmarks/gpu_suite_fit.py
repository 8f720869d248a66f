"""One short ``adai-lightning fit`` of the CIFAR-10 recipe on stand-in data (part of ``gpu_suite.sh``).

    PYTHONPATH=. python benchmarks/gpu_suite_fit.py [--accelerator gpu] [--batches 20]

Writes random images in CIFAR-10's on-disk format (as ``tests/test_recipes_vision.py`` does; the
official md5 sums cannot match, so only the files' presence is checked), then runs the console
script's entry point on ``recipes/cifar10_resnet18.yaml`` for one epoch of ``--batches`` batches
and prints one markdown line: accelerator, batches, seconds, and the Adai path each bucket took.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from adai_lightning import cli  # noqa: E402
from adai_lightning.optim import adai  # noqa: E402
from tests.test_recipes_vision import write_fake_cifar  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torchvision.datasets.cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
    chosen: set[str] = set()
    passes = adai._GroupWork.passes

    def recording_passes(self, params, grads):  # which path each bucket takes, for the report line
        functions = passes(self, params, grads)
        chosen.add(functions[1].__module__.rsplit(".", 1)[-1])
        return functions

    adai._GroupWork.passes = recording_passes
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_fake_cifar(root / "data", "CIFAR10", images_per_batch=args.batches * args.batch_size // 5 + 1)
        started = time.perf_counter()
        cli.main(["fit", "--config", str(ROOT / "recipes" / "cifar10_resnet18.yaml"), "--data.root",
                  str(root / "data"), "--trainer.default_root_dir", str(root / "run"),
                  "--trainer.accelerator", args.accelerator, "--trainer.max_epochs", "1",
                  "--trainer.limit_train_batches", str(args.batches), "--trainer.limit_val_batches", "1",
                  "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
                  "--trainer.enable_progress_bar", "false", "--data.batch_size", str(args.batch_size),
                  "--data.num_workers", "0"])
        seconds = time.perf_counter() - started
    print("| recipe | accelerator | train batches | wall s | Adai path |")
    print("| --- | --- | ---: | ---: | --- |")
    print(f"| cifar10_resnet18 | {args.accelerator} | {args.batches} | {seconds:.1f} | {', '.join(sorted(chosen))} |")


if __name__ == "__main__":
    main()
