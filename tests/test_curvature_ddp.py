"""HessianSharpness under 2-process CPU DDP equals the single-process value on the same data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "curvature_ddp_fit.py"
DDP_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp_script(script, *args, timeout):
    """Run a 2-process DDP script on a free port, with the repository importable; assert it succeeded."""
    env = {k: v for k, v in os.environ.items() if k not in DDP_VARIABLES}
    env["MASTER_PORT"] = str(free_port())
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    completed = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, timeout=timeout,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.slow
def test_ddp_lambda_max_equals_single_process(tmp_path):
    out = tmp_path / "result.json"
    run_ddp_script(SCRIPT, out, tmp_path, timeout=240)
    result = json.loads(out.read_text())
    assert len(result["logged"]) == 1
    assert result["logged"][0] == pytest.approx(result["reference"], rel=1e-4)
    assert result["same_subset"]
