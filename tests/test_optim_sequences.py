"""Random sequences of steps, dtype moves, state loads, group reorders, non-finite gradients and path
switches, each in a subprocess: every outcome equals the float64 oracle or is a Python exception,
never a signal (SIGSEGV, SIGABRT from "double free") or a hang.

The sequences are drawn and run by ``tests/scripts/optimizer_sequences.py`` (see its docstring), a
batch per subprocess. The default run takes 10 sequences on the CPU paths (native, foreach,
single-tensor) in one subprocess; ``ADAI_HYPOTHESIS_PROFILE=thorough`` (the profile of
``tests/test_optim_properties.py``) takes 300. The slow test adds the multi-tensor Triton kernels
under Triton's interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adai_lightning.optim import _multi_tensor

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = 300 if os.environ.get("ADAI_HYPOTHESIS_PROFILE") == "thorough" else 10


def run_sequences(seeds: range, *flags: str, timeout: float = 240) -> list[dict]:
    """The outcome of every sequence; fails naming the sequence a signal or a hang interrupted."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tests" / "scripts" / "optimizer_sequences.py"), *map(str, seeds), *flags]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        stdout, returncode = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        stdout, returncode = (expired.stdout or b"").decode(), None
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    started = [line["seed"] for line in lines if line.get("start")]
    if returncode != 0:
        cause = ("hung past the timeout" if returncode is None else
                 f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}")
        last = started[-1] if started else None
        pytest.fail(f"sequence {last} {cause}: {done.stderr[-2000:] if returncode is not None else ''}")
    return [line for line in lines if "outcome" in line]


def assert_outcomes(outcomes: list[dict], count: int) -> None:
    assert len(outcomes) == count
    mismatches = [o for o in outcomes if o["outcome"] not in ("match", "exception")]
    assert not mismatches, mismatches
    assert any(o["outcome"] == "match" for o in outcomes)  # not every sequence may end in a refusal


def test_random_sequences_match_the_oracle_or_raise():
    assert_outcomes(run_sequences(range(SEQUENCES)), SEQUENCES)


@pytest.mark.slow
@pytest.mark.skipif(not _multi_tensor.triton_available(), reason="Triton is not installed")
def test_random_sequences_with_the_triton_kernels_match_the_oracle_or_raise():
    assert_outcomes(run_sequences(range(1000, 1040), "--triton", timeout=900), 40)
