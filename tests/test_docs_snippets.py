"""Every ```python snippet in README.md and docs/*.md runs and leaves finite parameters (issue 20).

Each snippet runs on its own, after a prelude with what a reader's script already has: ``torch``; a
``model`` (the 10-20-1 MLP on which the README's former ``Adai(..., lr=1.0)`` reached NaN within 20
steps); an ``optimizer`` (Adai at lr 0.1 that has taken steps on it); and ``Trainer``: Lightning's,
made to run a few CPU steps without logger, checkpoints or progress bar, whatever the snippet passes
(``from lightning.pytorch import Trainer`` inside a snippet gets it too). Then:

- every optimizer the snippet builds on ``model`` takes :data:`STEPS` steps of a regression on it,
  from the same initial weights, with the schedulers the snippet built on that optimizer stepped
  after each step: its loss and ``model``'s parameters must stay finite;
- a ``configure_optimizers`` the snippet defines, and every ``Trainer`` it builds, fit a stand-in
  LightningModule, a small BatchNorm CNN like the recipes' (:class:`BatchNormClassifier`), for
  :data:`FIT_STEPS` steps: its parameters must stay finite.

A snippet that cannot run here (several processes, a dataset) is marked in the markdown by the line
``<!-- snippet: not run: <reason> -->`` just before its fence; it is reported as a skipped test with
its place and reason (``pytest -rs``), so none escapes silently. A failure names the file and line
of the snippet; tracebacks point at the markdown lines.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import NamedTuple

import lightning
import lightning.pytorch
import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adai_lightning import Adai

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Optimizer steps each optimizer a snippet builds takes on ``model``.
STEPS = 20
#: Training steps of each fit of the stand-in LightningModule.
FIT_STEPS = 5
NOT_RUN = re.compile(r"^<!--\s*snippet:\s*not run:\s*(.+?)\s*-->\s*$")


class Snippet(NamedTuple):
    path: Path
    line: int  # of the first code line
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a markdown file, with the line of their first code line and their mark."""
    lines = path.read_text().splitlines()
    found, start = [], None
    for number, line in enumerate(lines, start=1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            mark = NOT_RUN.match(lines[start - 2].strip()) if start > 1 else None
            found.append(Snippet(path, start + 1, "\n".join(lines[start:number - 1]), mark and mark.group(1)))
            start = None
    return found


ALL_SNIPPETS = [snippet for path in DOCUMENTS for snippet in snippets(path)]


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(64, 10, generator=generator), torch.randn(64, 1, generator=generator)


def regression_loss(model: nn.Module) -> torch.Tensor:
    x, y = regression_data()
    return nn.functional.mse_loss(model(x), y)


class BatchNormClassifier(LightningModule):
    """The stand-in LightningModule: conv, BatchNorm, ReLU, pooling, linear on 8x8 images, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return Adai(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        images, labels = torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
        return DataLoader(TensorDataset(images, labels), batch_size=16)


class StandInTrainer(lightning.pytorch.Trainer):
    """The snippets' ``Trainer``: their callbacks and arguments, but a few CPU steps and no files."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.update(max_steps=FIT_STEPS, max_epochs=None, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
        super().__init__(*args, **kwargs)


def prelude() -> dict:
    """What the reader's script already has when a snippet starts (see the module docstring)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))
    optimizer = Adai(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        regression_loss(model).backward()
        optimizer.step()
    return {"torch": torch, "model": model, "optimizer": optimizer, "Trainer": StandInTrainer}


def finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def record_instances(monkeypatch, base: type) -> list:
    """Every instance of ``base`` (and subclasses) constructed from now on, in order."""
    made, original = [], base.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(base, "__init__", init)
    return made


def fail_on_error(snippet: Snippet, what: str, action, *args) -> None:
    """``action(*args)``; an exception fails the test with the snippet's place and the traceback."""
    try:
        action(*args)
    except Exception as error:
        pytest.fail(f"{snippet.where}: {what} raised {type(error).__name__}: {error}\n{traceback.format_exc()}")


def run(snippet: Snippet, namespace: dict) -> tuple[list, list]:
    """Execute the snippet in ``namespace``; the optimizers and schedulers it built."""
    code = compile("\n" * (snippet.line - 1) + snippet.code, str(snippet.path), "exec")  # tracebacks: markdown lines
    with pytest.MonkeyPatch.context() as patch:
        for module in (lightning.pytorch, lightning):
            patch.setattr(module, "Trainer", StandInTrainer)
        optimizers = record_instances(patch, torch.optim.Optimizer)
        schedulers = record_instances(patch, torch.optim.lr_scheduler.LRScheduler)
        fail_on_error(snippet, "the snippet", exec, code, namespace)
    return optimizers, schedulers


def train_on_model(snippet: Snippet, model: nn.Module, optimizer: torch.optim.Optimizer, schedulers: list) -> None:
    """:data:`STEPS` steps of the regression with ``optimizer`` and its schedulers; all must stay finite."""
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = regression_loss(model)
        loss.backward()
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        assert torch.isfinite(loss) and finite(model), (
            f"{snippet.where}: {type(optimizer).__name__} (lr {optimizer.defaults.get('lr')}) made the loss or "
            f"the parameters non-finite at step {step + 1} of {STEPS} on the 10-20-1 MLP")


@pytest.mark.parametrize("snippet", ALL_SNIPPETS, ids=[snippet.where for snippet in ALL_SNIPPETS])
def test_snippet_runs_and_stays_finite(snippet: Snippet, tmp_path, monkeypatch):
    if snippet.not_run:
        pytest.skip(f"{snippet.where}: marked not run: {snippet.not_run}")
    monkeypatch.chdir(tmp_path)  # anything a snippet writes goes here
    namespace = prelude()
    model, start = namespace["model"], {k: v.clone() for k, v in namespace["model"].state_dict().items()}
    optimizers, schedulers = run(snippet, namespace)
    own = {id(p) for p in model.parameters()}
    for optimizer in optimizers:
        if all(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            model.load_state_dict(start)
            train_on_model(snippet, model, optimizer, [s for s in schedulers if s.optimizer is optimizer])
    trainers = [value for value in namespace.values() if isinstance(value, lightning.pytorch.Trainer)]
    if "configure_optimizers" in namespace and not trainers:
        trainers = [StandInTrainer()]
    for trainer in trainers:
        module = BatchNormClassifier()
        if "configure_optimizers" in namespace:
            module.configure_optimizers = namespace["configure_optimizers"].__get__(module)
        fail_on_error(snippet, "fitting the stand-in module", trainer.fit, module)
        assert trainer.global_step == FIT_STEPS, f"{snippet.where}: the fit stopped at step {trainer.global_step}"
        assert finite(module), f"{snippet.where}: the stand-in module's parameters are not finite after the fit"
    assert finite(model), f"{snippet.where}: `model`'s parameters are not finite after the snippet"


def test_snippets_are_found_and_marks_are_read(tmp_path):
    """The collection itself: the README's snippets are found, with their lines and marks."""
    assert len([s for s in ALL_SNIPPETS if s.path.name == "README.md"]) >= 2
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n<!-- snippet: not run: needs two processes -->\n```python\n"
                    "y = 2\nz = 3\n```\n```bash\nls\n```\n")
    assert snippets(page) == [Snippet(page, 3, "x = 1", None), Snippet(page, 7, "y = 2\nz = 3", "needs two processes")]
