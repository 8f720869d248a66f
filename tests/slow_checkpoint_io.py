"""A checkpoint writer that pauses halfway through each write, so a test can kill the process inside it.

Used by tests/test_resume_kill.py as the killed run's ``trainer.plugins`` (the subprocess imports it
from the tests folder): the first half of the bytes is on disk in the temporary file, then it sleeps.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import torch

from adai_lightning.recipes.checkpointing import AtomicCheckpointIO


class SlowAtomicCheckpointIO(AtomicCheckpointIO):
    def __init__(self, pause: float = 0.5) -> None:
        super().__init__()
        self.pause = pause

    def write(self, checkpoint: dict[str, Any], path: Path) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(self.pause)
            handle.write(data[len(data) // 2:])
            handle.flush()
            os.fsync(handle.fileno())
