"""Kill -9 anywhere, resume exactly (issue 14 item 4).

A real ``adai-lightning fit`` subprocess is killed by PID (SIGKILL) at chosen moments: inside a
checkpoint write (its temporary file half written), or at a random delay after a periodic checkpoint
(mid-epoch and at the epoch's last batch). ``adai-lightning fit ... --ckpt_path last`` then finishes
the run, and its final weights, optimizer and scheduler state, the three monitoring callbacks' states
and their logged series (Hessian ones included: the probe checkpoints its evaluation subset) must be
bitwise equal to an uninterrupted run's.

The killed run writes its checkpoints with ``tests/slow_checkpoint_io.py`` (it sleeps halfway through
each write) so that the test can catch the process inside a write.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from recipe_helpers import RECIPES, ROOT, clean_env, runnable_recipe

from adai_lightning.cli import main
from adai_lightning.recipes.checkpointing import newest_first, newest_loadable
from adai_lightning.report import Metrics

CALLBACK_KEYS = ("inertia/", "saddle/", "sharpness/")
SLOW_IO = {"class_path": "slow_checkpoint_io.SlowAtomicCheckpointIO", "init_args": {"pause": 0.4}}


def recipe_copy(name: str, folder: Path, slow_writes: bool = False, cadences: dict[str, dict] | None = None,
                **overrides) -> Path:
    """``recipes/<name>`` for a short CPU run into ``folder/run``: CSV log only, no test after fit;
    ``cadences`` maps a callback's class name to init_args that replace the recipe's."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    callbacks = recipe["trainer"]["callbacks"]
    for callback in callbacks:
        callback.setdefault("init_args", {}).update((cadences or {}).get(callback["class_path"].rpartition(".")[2], {}))
    settings = {
        "trainer.logger": [c for c in recipe["trainer"]["logger"] if c["class_path"].endswith("CSVLogger")],
        "trainer.callbacks": callbacks,
        "trainer.enable_progress_bar": False,
        "test_after_fit": False,
        **overrides,
    }
    if slow_writes:
        settings["trainer.plugins"] = [SLOW_IO]
    return runnable_recipe(name, folder, settings)


def fit_in_process(config: Path, *extra: str) -> None:
    main(["fit", "--config", str(config), *extra])


def start_fit(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``adai-lightning fit --config config`` in a subprocess (its own process group: DDP's ranks with it)
    with this process's thread count (the float reductions, hence the bits, depend on it)."""
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env["PYTHONPATH"]])
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "adai_lightning", "fit", "--config", str(config), *extra],
                                cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, log: Path, timeout: float = 240,
              signum: int = signal.SIGKILL, group: bool = False) -> None:
    """Send ``signum`` (SIGKILL: every process of its group when ``group``) to ``proc`` by PID ``delay``
    seconds after ``ready()`` first holds (polled every 5 ms); SIGKILL must end it at once, SIGTERM and
    SIGINT with exit status 128 + the signal."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"kill point not reached in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    time.sleep(delay)
    (os.killpg if group else os.kill)(proc.pid, signum)
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum
    assert proc.wait(timeout=120) == expected, f"the run finished before the kill:\n{log.read_text()[-3000:]}"


def files(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern)) if folder.is_dir() else []


def writing(folder: Path, name: str, after_step: int | None = None) -> Callable[[], bool]:
    """Holds while the temporary file of checkpoint ``name`` exists (and, if given, the periodic
    checkpoint of ``after_step`` is complete): the writer is inside that write."""
    def ready() -> bool:
        done = after_step is None or files(folder, f"*step={after_step}.ckpt")
        return bool(done and files(folder, f".{name}.*.tmp"))
    return ready


def saved(folder: Path, step: int) -> Callable[[], bool]:
    """Holds once the periodic checkpoint of ``step`` and ``last.ckpt`` after it are complete."""
    def ready() -> bool:
        return bool(files(folder, f"*step={step}.ckpt")) and not files(folder, ".*.tmp") and any(
            p.stat().st_mtime_ns >= q.stat().st_mtime_ns
            for p in files(folder, "last.ckpt") for q in files(folder, f"*step={step}.ckpt"))
    return ready


def max_deviation(a, b, where: str = "") -> float:
    """The largest absolute difference between two nested checkpoint structures (0.0: bitwise equal for
    every tensor and equal for every other value); ``inf`` for a structural or non-numeric mismatch."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return math.inf
        if torch.equal(a, b):
            return 0.0
        return (a.double() - b.double()).abs().nan_to_num(math.inf).max().item() or math.inf
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((max_deviation(a[k], b[k], f"{where}.{k}") for k in a), default=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return math.inf
        return max((max_deviation(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if a == b or (math.isnan(a) and math.isnan(b)) else abs(a - b)
    return 0.0 if a == b else math.inf


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def callback_states(checkpoint: dict) -> dict:
    """The monitoring callbacks' saved states (ModelCheckpoint's hold run-specific paths)."""
    return {k: v for k, v in checkpoint["callbacks"].items() if "Checkpoint" not in k}


def logged_series(run: Path) -> Metrics:
    """The callbacks' series of the newest fit's CSV log (after a resume: the resumed part)."""
    (path,) = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))[-1:]
    return Metrics.read([path])


def series_deviation(reference: Metrics, resumed: Metrics) -> tuple[float, int]:
    """Max deviation of the resumed run's callback series from the reference's at the same steps, and the
    number of values compared. Every resumed value must have its reference twin."""
    worst, compared = 0.0, 0
    for key, points in resumed.series.items():
        if not key.startswith(CALLBACK_KEYS):
            continue
        first = points[0][0]
        expected = [p for p in reference.series.get(key, []) if p[0] >= first]
        if [s for s, _ in expected] != [s for s, _ in points]:
            return math.inf, compared
        worst = max(worst, max_deviation([v for _, v in expected], [v for _, v in points]))
        compared += len(points)
    return worst, compared


def compare_runs(reference: Path, resumed: Path) -> dict[str, float]:
    ref, res = final_state(reference), final_state(resumed)
    assert ref["global_step"] == res["global_step"] and ref["epoch"] == res["epoch"]
    series, compared = series_deviation(logged_series(reference), logged_series(resumed))
    assert compared > 0, "the resumed run logged no callback series"
    return {
        "weights": max_deviation(ref["state_dict"], res["state_dict"]),
        "optimizer": max_deviation(ref["optimizer_states"], res["optimizer_states"]),
        "lr_scheduler": max_deviation(ref["lr_schedulers"], res["lr_schedulers"]),
        "callback_states": max_deviation(callback_states(ref), callback_states(res)),
        "callback_series": series,
        "series_values": compared,
    }


def resume_step(run: Path) -> int:
    """The global step ``--ckpt_path last`` resumes from (0: no loadable checkpoint yet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = newest_loadable(newest_first([run / "checkpoints"]), lambda p: torch.load(p, weights_only=False))
    return 0 if path is None else torch.load(path, weights_only=False)["global_step"]


#: The fast case: the default recipe with 256-sample batches (5 steps an epoch), 2 epochs, a checkpoint
#: every 5 steps, the callbacks every 2-4 steps (the Hessian one on 64 samples).
FAST = dict(recipe="default.yaml", cadences={
    "PeriodicCheckpoint": {"every_n_train_steps": 5}, "InertiaMonitor": {"every_n_train_steps": 2},
    "HessianSharpness": {"every_n_train_steps": 4, "num_samples": 64, "trace_every_n_train_steps": 5},
    "SaddleEscapeMonitor": {"every_n_train_steps": 3},
}, overrides={"trainer.max_epochs": 2, "data.init_args.batch_size": 256, "trainer.log_every_n_steps": 1})
#: The default recipe (64-sample batches: 20 steps an epoch, a checkpoint every 10), 2 epochs, its Hessian
#: callbacks at cadences 40 steps reach: the trace at steps 20 and 40 (a resume that forgot the last trace
#: step would trace at 30), HessianSharpness every 10, SaddleEscapeMonitor every 20.
DEFAULT = dict(recipe="default.yaml", cadences={
    "HessianSharpness": {"every_n_train_steps": 10, "trace_every_n_train_steps": 15},
    "SaddleEscapeMonitor": {"every_n_train_steps": 20},
}, overrides={"trainer.max_epochs": 2})
#: The saddle recipe (64 steps an epoch), 2 epochs, a checkpoint every 40 steps (mid-epoch ones).
SADDLE = dict(recipe="saddle_deep_linear.yaml", cadences={"PeriodicCheckpoint": {"every_n_train_steps": 40}},
              overrides={"trainer.max_epochs": 2})


def run_copy(setting: dict, folder: Path, slow_writes: bool = False) -> Path:
    return recipe_copy(setting["recipe"], folder, slow_writes, setting["cadences"], **setting["overrides"])


def reference_run(tmp_path_factory, setting: dict) -> Path:
    """The uninterrupted run of ``setting``."""
    folder = tmp_path_factory.mktemp("reference")
    fit_in_process(run_copy(setting, folder))
    return folder / "run"


@pytest.fixture(scope="module")
def fast_reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory, FAST)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    return {name: reference_run(tmp_path_factory, setting) for name, setting in (("default", DEFAULT), ("saddle", SADDLE))}


def kill_and_resume(setting: dict, reference: Path, folder: Path, kill_point: Callable[[Path], Callable[[], bool]],
                    delay: float = 0.0, signum: int = signal.SIGKILL) -> tuple[int, dict[str, float]]:
    """Start ``setting``'s fit in a subprocess, send it ``signum`` at ``kill_point`` + ``delay``, resume
    it with ``--ckpt_path last`` and compare with ``reference``: (the step resumed from, the deviations)."""
    run = folder / "run"
    kill_when(start_fit(run_copy(setting, folder, slow_writes=signum == signal.SIGKILL), folder / "killed.log"),
              kill_point(run / "checkpoints"), delay, folder / "killed.log", signum=signum)
    (folder / "left_after_kill.txt").write_text("\n".join(p.name for p in files(run / "checkpoints", ".*.tmp")))
    step = resume_step(run)
    fit_in_process(run_copy(setting, folder), "--ckpt_path", "last")
    return step, compare_runs(reference, run)


def assert_bitwise(step: int, deviations: dict[str, float]) -> None:
    print(f"resumed from step {step}: {deviations}")
    assert all(v == 0.0 for k, v in deviations.items() if k != "series_values"), deviations


def test_kill_inside_a_checkpoint_write_resumes_bitwise(fast_reference, tmp_path):
    """The default-run case: killed while ``last.ckpt`` of step 5 (the first epoch's last batch) is half
    written (its temporary file exists; the periodic checkpoint of step 5 is complete), resumed from
    that periodic checkpoint, which removes the dead writer's temporary file."""
    step, deviations = kill_and_resume(FAST, fast_reference, tmp_path,
                                       lambda ckpts: writing(ckpts, "last.ckpt", after_step=5))
    assert (tmp_path / "left_after_kill.txt").read_text(), "the kill should leave the half-written file behind"
    assert not files(tmp_path / "run" / "checkpoints", ".*.tmp"), "the resumed fit removes the dead writer's file"
    assert step == 5
    assert_bitwise(step, deviations)


KILL_POINTS = {
    # name: (setting, ready condition on the checkpoint folder, delay range in seconds)
    "inside-first-write": ("default", lambda ckpts: writing(ckpts, "epoch=0-step=10.ckpt"), (0.0, 0.0)),
    "mid-epoch-after-step-10": ("default", lambda ckpts: saved(ckpts, 10), (0.0, 0.3)),
    "epoch-end-after-step-20": ("default", lambda ckpts: saved(ckpts, 20), (0.0, 0.3)),
    "inside-last-write-step-30": ("default", lambda ckpts: writing(ckpts, "last.ckpt", after_step=30), (0.0, 0.0)),
    "mid-epoch-after-step-30": ("default", lambda ckpts: saved(ckpts, 30), (0.0, 0.3)),
    "saddle-mid-epoch-after-step-80": ("saddle", lambda ckpts: saved(ckpts, 80), (0.0, 0.3)),
}
SETTINGS = {"default": DEFAULT, "saddle": SADDLE}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_kill_anywhere_resumes_bitwise(references, tmp_path, name):
    setting, ready, (low, high) = KILL_POINTS[name]
    delay = random.Random(name).uniform(low, high)
    step, deviations = kill_and_resume(SETTINGS[setting], references[setting], tmp_path, ready, delay)
    assert_bitwise(step, deviations)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_checkpoints_that_step_and_resumes_bitwise(fast_reference, tmp_path, signum):
    """``adai-lightning fit`` signalled by PID 0-0.3 s after the checkpoint of step 5: it saves the step in
    progress (no periodic save is due), exits 128 + signal, leaves a log ``adai-lightning report`` reads
    (every row has its step), and ``--ckpt_path last`` ends bitwise equal to the uninterrupted run."""
    delay = random.Random(int(signum)).uniform(0.0, 0.3)
    step, deviations = kill_and_resume(FAST, fast_reference, tmp_path, lambda ckpts: saved(ckpts, 5), delay, signum)
    assert 5 <= step < 10 and not files(tmp_path / "run" / "checkpoints", ".*.tmp")
    (stopped, resumed) = sorted((tmp_path / "run" / "csv").glob("version_*/metrics.csv"))
    header = stopped.read_text().splitlines()[0].split(",")
    assert "step" in header and max(int(row[header.index("step")]) for row in
                                    (line.split(",") for line in stopped.read_text().splitlines()[1:])) == step - 1
    metrics = Metrics.read([stopped, resumed])
    assert [s for s, _ in metrics.series["train/loss_step"]] == list(range(10))
    assert_bitwise(step, deviations)


# --- the pieces, fast ---------------------------------------------------------------------------------

def test_shuffle_order_depends_only_on_seed_and_epoch():
    from adai_lightning.recipes._base import EpochShuffleSampler

    sampler = EpochShuffleSampler(50, seed=3)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)
    torch.rand(7)  # the global RNG moves: the order does not
    assert list(sampler) == first and sorted(first) == list(range(50))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(EpochShuffleSampler(50, seed=4)) != first
    with pytest.raises(ValueError, match="shuffle seed"):
        EpochShuffleSampler(50, seed=-1)


def test_loader_state_resumes_mid_epoch_and_rolls_over_at_the_epoch_end():
    """Through torchdata's StatefulDataLoader as Lightning drives it: a state saved after 3 of 7
    batches continues with batch 4 of the same epoch; one saved after the last batch, restored into
    the iterator Lightning keeps, continues with the next epoch's first batch."""
    from torch.utils.data import TensorDataset

    from adai_lightning.recipes._base import SplitDataModule

    data = SplitDataModule(batch_size=4, num_workers=0, shuffle_seed=5)
    data.splits["train"] = TensorDataset(torch.arange(26))
    epochs = []
    for epoch in range(2):
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        epochs.append([batch[0].tolist() for batch in loader])
    assert epochs[0] != epochs[1] and sorted(sum(epochs[0], [])) == list(range(26))

    loader = data.train_dataloader()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    assert [batch[0].tolist() for batch in resumed] == epochs[0][3:]

    for _ in range(4):  # the epoch's last batch, taken as Lightning takes it (no StopIteration yet)
        next(iterator)
    resumed = data.train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    assert [batch[0].tolist() for batch in resumed] == epochs[1]


def test_atomic_checkpoint_write_keeps_the_old_file_when_interrupted(tmp_path):
    from adai_lightning.recipes.checkpointing import AtomicCheckpointIO

    class Interrupted(AtomicCheckpointIO):
        def write(self, checkpoint, path):
            path.write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    with pytest.raises(KeyboardInterrupt):
        Interrupted().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is gone


class NoisyItems(torch.utils.data.Dataset):
    """Items with a random 'augmentation' drawn from the global torch RNG, as torchvision's transforms do."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return index + torch.rand(())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmentation_is_drawn_from_seed_epoch_and_index(num_workers):
    """CIFAR and ImageNet modules (``augmented = True``): the same item of the same epoch gets the same
    augmentation whatever the global RNG, in the main process or in workers, and a loader restored
    mid-epoch continues with identical augmented batches."""
    from adai_lightning.recipes._base import SplitDataModule

    class Augmented(SplitDataModule):
        augmented = True

    data = Augmented(batch_size=4, num_workers=num_workers, shuffle_seed=1)
    data.splits["train"] = NoisyItems()

    def epoch_batches(loader, epoch: int, rng_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(rng_seed)
        loader.sampler.set_epoch(epoch)
        return list(loader)

    loader = data.train_dataloader()
    first = epoch_batches(loader, 1, rng_seed=0)
    again = epoch_batches(data.train_dataloader(), 1, rng_seed=123)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == 3
    other_epoch = {int(v): v for v in torch.cat(epoch_batches(loader, 2, rng_seed=0))}
    assert all(other_epoch[int(v)] != v for v in torch.cat(first))  # a new augmentation each epoch

    loader = data.train_dataloader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    torch.manual_seed(99)
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(list(resumed), first[1:]))


def test_sampler_shards_like_distributed_sampler_and_passes_the_epoch_on():
    """Under DDP each rank draws its share of the same (seed, epoch) permutation, padded as torch's
    DistributedSampler pads; being a DistributedSampler, Lightning uses it unwrapped and its
    ``set_epoch`` reaches the (epoch, index) keys of the augmentation."""
    from torch.utils.data import DistributedSampler

    from adai_lightning.recipes._base import EpochShuffleSampler

    whole = list(EpochShuffleSampler(10, seed=2))
    shares = [list(EpochShuffleSampler(10, seed=2, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(share) == 4 for share in shares)
    assert sorted(sum(shares, [])) == sorted(whole + whole[:2])  # every sample, the first two twice
    assert shares[1] == (whole + whole[:2])[1::3]
    sampler = EpochShuffleSampler(10, seed=2, with_epoch=True, num_replicas=2, rank=1)
    assert isinstance(sampler, DistributedSampler)
    sampler.set_epoch(4)
    assert {epoch for epoch, _ in sampler} == {4}
    with pytest.raises(ValueError, match="rank"):
        EpochShuffleSampler(10, seed=2, num_replicas=2, rank=2)
