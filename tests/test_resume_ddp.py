"""A 2-process DDP ``adai-lightning fit`` (CPU, gloo) killed or signalled, then resumed (issue 19).

kill -9 of both ranks (the launcher's process group) and SIGTERM to rank 0 alone, each 0-0.3 s after
the checkpoint of step 3 (mid-epoch): ``--ckpt_path last`` with 2 processes ends bitwise equal to an
uninterrupted 2-process run (weights, optimizer and scheduler state, InertiaMonitor's state and its
logged series). The same checkpoint resumed by 1 process is refused in one line (exit 2).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from recipe_helpers import ROOT, clean_env
from test_resume_kill import assert_bitwise, compare_runs, kill_when, recipe_copy, resume_step, saved, start_fit

DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
#: 128 samples per rank and step: 5 steps an epoch, 2 epochs, a checkpoint every 3 steps.
CADENCES = {"PeriodicCheckpoint": {"every_n_train_steps": 3}, "InertiaMonitor": {"every_n_train_steps": 2}}
OVERRIDES = {"trainer.max_epochs": 2, "data.init_args.batch_size": 128, "trainer.log_every_n_steps": 1}


def ddp_copy(folder: Path) -> Path:
    """The default recipe without the Hessian callbacks (slow under DDP on 2 cores), for ``folder/run``."""
    path = recipe_copy("default.yaml", folder, cadences=CADENCES, **OVERRIDES)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                      if c["class_path"].rpartition(".")[2] in CADENCES]
    path.write_text(yaml.safe_dump(config))
    return path


def run_to_end(config: Path, log: Path, *extra: str) -> None:
    proc = start_fit(config, log, *DDP, *extra)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    run_to_end(ddp_copy(folder), folder / "fit.log")
    return folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill-9-both-ranks", "sigterm-rank-0"])
def test_ddp_killed_or_signalled_resumes_bitwise(ddp_reference, tmp_path, how):
    config, log = ddp_copy(tmp_path), tmp_path / "stopped.log"
    signum = signal.SIGKILL if how.startswith("kill") else signal.SIGTERM
    kill_when(start_fit(config, log, *DDP), saved(tmp_path / "run" / "checkpoints", 3),
              random.Random(how).uniform(0.0, 0.3), log, signum=signum, group=signum == signal.SIGKILL)
    step = resume_step(tmp_path / "run")
    assert step >= 3
    run_to_end(config, tmp_path / "resumed.log", "--ckpt_path", "last")
    assert_bitwise(step, compare_runs(ddp_reference, tmp_path / "run"))


@pytest.mark.slow
def test_a_ddp_checkpoint_resumed_by_one_process_is_refused(ddp_reference, tmp_path):
    config = ddp_copy(tmp_path)
    last = ddp_reference / "checkpoints" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-m", "adai_lightning", "fit", "--config", str(config), "--ckpt_path",
                           str(last)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and lines == [
        f"error: checkpoint {last} was saved by 2 processes and this run has 1: resuming would skip or repeat "
        "data; resume with 2 processes (--trainer.devices x --trainer.num_nodes = 2)"], proc.stderr[-3000:]
