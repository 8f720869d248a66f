"""Helpers for the recipe tests: load a recipe, drop callbacks that are not importable yet, run the CLI."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DIST_ENV_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT")


def importable(class_path: str) -> bool:
    """Whether ``package.module.Class`` can be imported (the callbacks may not be merged yet)."""
    module, _, name = class_path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def runnable_recipe(name: str, tmp_path: Path, overrides: dict | None = None) -> Path:
    """Copy ``recipes/<name>`` into ``tmp_path`` without its non-importable callbacks; ``overrides`` maps
    dotted keys to new values. Returns the copy's path."""
    config = yaml.safe_load((RECIPES / name).read_text())
    trainer = config["trainer"]
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if importable(c["class_path"])]
    trainer["default_root_dir"] = str(tmp_path / "run")
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def clean_env() -> dict[str, str]:
    """The environment for a CLI subprocess: our worktree first on the path, no leftover DDP variables."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m adai_lightning ARGS`` in a subprocess; raises with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "adai_lightning", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"adai-lightning {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
