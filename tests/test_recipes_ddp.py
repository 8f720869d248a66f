"""The default recipe as a 2-process DDP fit on CPU (gloo), launched like a user would, to completion, on one
node and as two nodes of one process each (two torchrun launches on localhost)."""

from __future__ import annotations

import csv
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from recipe_helpers import ROOT, clean_env, run_cli, runnable_recipe

from adai_lightning import report


@pytest.mark.slow
def test_default_recipe_fits_with_ddp_on_two_cpu_processes(tmp_path):
    recipe = runnable_recipe("default.yaml", tmp_path)
    run_cli("fit", "--config", str(recipe), "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", timeout=240)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"  # the recipe's PeriodicCheckpoint: the final state
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6 and checkpoint["epoch"] == 2  # written as training ended, 2 epochs done
    optimizer_state = checkpoint["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 6 for s in optimizer_state.values())  # every rank-0 parameter stepped 6 times
    metrics = report.Metrics.read(report.find_metrics(tmp_path / "run"))  # rank 0 logged, once per step
    assert [step for step, _ in metrics.series["val/acc"]] == [2, 5]


def _short_recipe(tmp_path, name):
    """The default recipe with all three callbacks at cadences a 6-step fit reaches, in ``tmp_path/name``."""
    (tmp_path / name).mkdir()
    recipe = runnable_recipe("default.yaml", tmp_path / name)
    config = yaml.safe_load(recipe.read_text())
    cadences = {"InertiaMonitor": {"every_n_train_steps": 2}, "SaddleEscapeMonitor": {"every_n_train_steps": 2},
                "HessianSharpness": {"every_n_train_steps": 3, "num_samples": 128, "trace_samples": 6,
                                     "trace_every_n_train_steps": None}}
    for callback in config["trainer"]["callbacks"]:
        name = callback["class_path"].rpartition(".")[2]
        if name in cadences:
            callback.setdefault("init_args", {}).update(cadences[name])
    assert sum(c["class_path"].rpartition(".")[2] in cadences for c in config["trainer"]["callbacks"]) == 3
    recipe.write_text(yaml.safe_dump(config))
    return recipe


#: A short fit: 2 epochs of 3 steps, 2 validation and test batches, one thread per process (both launches
#: then run the same kernels: Lightning gives a CPU DDP process cores / local processes threads otherwise).
SHORT_FIT = ("--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.max_epochs", "2",
             "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
             "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_node_fit(recipe, timeout):
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice on localhost (node ranks 0 and 1), as on two machines."""
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "adai_lightning", "fit",
         "--config", str(recipe), "--trainer.devices", "1", "--trainer.num_nodes", "2", *SHORT_FIT],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) for node in (0, 1)]
    try:
        outputs = [launch.communicate(timeout=timeout)[0] for launch in launches]
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
                launch.wait()
    for node, (launch, output) in enumerate(zip(launches, outputs)):
        assert launch.returncode == 0, f"node {node} failed:\n{output[-5000:]}"
    return outputs


def _final_state_and_series(root):
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (path,) = report.find_metrics(root)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return checkpoint, rows


@pytest.mark.slow
@pytest.mark.timeout(900)  # two fits of 1-2 minutes each, more on a loaded machine
def test_default_recipe_on_two_nodes_matches_two_processes_on_one_node(tmp_path):
    """Issue 18 item 3: 2 nodes x 1 process (two torchrun launches on localhost) against 1 node x 2
    processes: the same final weights, optimizer state and logged series (all three callbacks), bitwise."""
    single = _short_recipe(tmp_path, "single")
    proc = subprocess.run([sys.executable, "-m", "adai_lightning", "fit", "--config", str(single),
                           "--trainer.devices", "2", *SHORT_FIT], capture_output=True, text=True, timeout=300,
                          env={**clean_env(), "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    outputs = _two_node_fit(_short_recipe(tmp_path, "nodes"), timeout=300)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    saved = yaml.safe_load(next((tmp_path / "nodes" / "run").rglob("config.yaml")).read_text())
    assert saved["trainer"]["num_nodes"] == 2 and str(saved["trainer"]["devices"]) == "1"

    (reference, reference_rows), (nodes, node_rows) = (_final_state_and_series(tmp_path / name / "run")
                                                       for name in ("single", "nodes"))
    assert reference["global_step"] == nodes["global_step"] == 6
    assert reference["state_dict"].keys() == nodes["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, nodes["state_dict"][key]), key
    node_state = nodes["optimizer_states"][0]["state"]
    for index, state in reference["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(node_state[index][key])), (index, key)
    assert reference_rows == node_rows
    columns = set(reference_rows[0])
    for prefix in ("sharpness/lambda_max", "saddle/lambda_min", "inertia/", "train/loss", "val/acc", "test/acc"):
        logged = [column for column in columns if column.startswith(prefix)]
        assert any(row[column] for row in reference_rows for column in logged), prefix
