"""The probe leaves the module's plain Python state as it found it (issue 19).

Unit tests of the isolation context on a module whose ``training_step`` changes every kind of Python
state; the end-to-end cases (Lightning's ``training_step_outputs`` pattern, a step counter, a GAN
alternating by a counter) are in ``tests/test_callbacks_foreign_modules.py``.
"""

from __future__ import annotations

import collections
import random
import types
import warnings
import weakref

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from adai_lightning.callbacks._probe_isolation import StepRecorder, isolated, step_loss


class Tracker:
    """A plain object of the user's, holding state of its own."""

    def __init__(self):
        self.seen = 0
        self.history = []


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.calls = 0
        self.cache = {}

    def forward(self, x):
        self.calls += 1
        self.cache["last"] = x
        return self.linear(x)


class Stateful(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.outputs = []
        self.nested = {"losses": [], "by_step": collections.defaultdict(list)}
        self.names = set()
        self.window = collections.deque(maxlen=3)
        self.step_count = 0
        self.total = torch.zeros(())
        self.tracker = Tracker()
        self.generator = torch.Generator().manual_seed(1)
        self.rng = random.Random(2)
        self.options = types.SimpleNamespace(mode="a")
        self.pairs = ([],)

    def training_step(self, batch, batch_idx):
        loss = self.encoder(batch).square().mean() + torch.rand((), generator=self.generator) * 0
        self.outputs.append(loss)  # with its graph
        self.nested["losses"].append(loss.detach())
        self.nested["by_step"][self.step_count].append(1)
        self.names.add(f"step{self.step_count}")
        self.window.append(self.step_count)
        self.step_count += 1
        self.total += loss.detach()
        self.tracker.seen += 1
        self.tracker.history.append(self.rng.random())
        self.options.mode = "b"
        self.last_batch = batch  # an attribute added by the step
        self.pairs[0].append(batch_idx)
        return loss


def state_of(module):
    """Everything the probe must leave as it was, as comparable values and the containers' identities."""
    return {"outputs": [id(x) for x in module.outputs], "losses": list(module.nested["losses"]),
            "by_step": {k: list(v) for k, v in module.nested["by_step"].items()}, "names": set(module.names),
            "window": list(module.window), "step_count": module.step_count, "total": module.total.clone(),
            "tracker": (module.tracker.seen, list(module.tracker.history)), "calls": module.encoder.calls,
            "cache": dict(module.encoder.cache), "generator": module.generator.get_state(),
            "rng": module.rng.getstate(), "mode": module.options.mode, "pairs": list(module.pairs[0]),
            "attributes": sorted(vars(module)), "identities": [id(x) for x in (
                module.outputs, module.nested, module.nested["losses"], module.nested["by_step"], module.names,
                module.window, module.total, module.tracker, module.tracker.history, module.encoder.cache)]}


def assert_same(before, after):
    for key, value in before.items():
        other = after[key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def trained_once():
    torch.manual_seed(0)
    module = Stateful()
    module.training_step(torch.randn(4, 3), 0)  # the state training left at the cadence point
    return module


def probe(module, calls=3, recorder=None):
    """Call training_step ``calls`` times in the isolation context, as the probe does; the losses."""
    recorder = recorder or StepRecorder()
    with isolated(module, train_mode=True, recorder=recorder):
        return [step_loss(module, torch.randn(4, 3), recorder) for _ in range(calls)]


def test_every_kind_of_python_state_is_restored_in_place():
    """Before: 3 more outputs, step_count 4, a new last_batch, the tracker and generators advanced."""
    module = trained_once()
    before = state_of(module)
    probe(module)
    assert_same(before, state_of(module))


def test_each_training_step_call_sees_the_state_of_the_cadence_point():
    """A step that branches on a counter computes the same loss on every call of one cadence point."""
    class Alternating(Stateful):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss if self.step_count % 2 else -loss

    module = Alternating()
    batch = torch.randn(4, 3)
    recorder = StepRecorder()
    with isolated(module, train_mode=True, recorder=recorder):
        losses = [step_loss(module, batch, recorder) for _ in range(3)]
    assert losses[0].item() == losses[1].item() == losses[2].item()


def test_the_probes_graphs_are_not_kept_alive():
    module = trained_once()
    kept = [weakref.ref(loss) for loss in probe(module)]  # each was appended (with its graph) to self.outputs
    assert all(ref() is None for ref in kept)


def test_rebinding_a_container_is_undone_and_the_users_reference_stays_valid():
    module = trained_once()
    outputs = module.outputs

    def rebinding_step(batch, batch_idx):
        module.outputs = []  # the clear-by-rebinding style of on_train_epoch_end, done in a step
        module.outputs.append(batch.sum())
        return batch.sum() * module.encoder.linear.weight.sum()

    module.training_step = rebinding_step
    probe(module)
    del module.training_step
    assert module.outputs is outputs and len(outputs) == 1


def test_a_tensor_changed_in_place_inside_a_list_is_named_in_one_warning():
    module = trained_once()
    module.sums = [torch.zeros(())]
    recorder = StepRecorder()

    def accumulating_step(batch, batch_idx):
        module.sums[0] += 1  # in place, inside a container: checked, not copied
        return module.encoder(batch).sum()

    module.training_step = accumulating_step
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        probe(module, recorder=recorder)
        probe(module, recorder=recorder)  # a second cadence point: no second warning
    messages = [str(w.message) for w in record if "could not restore" in str(w.message)]
    assert len(messages) == 1
    assert "self.sums[0]" in messages[0] and "loss_fn=" in messages[0]


def test_modes_shadows_and_parameters_are_left_to_the_rest_of_the_isolation():
    """The snapshot is taken inside the isolation: eval mode and the no-op log stay in force between
    calls, and the real methods and flags are back afterwards."""
    module = trained_once()
    seen = []

    def observing_step(batch, batch_idx):
        seen.append((module.training, module.log.__name__))
        module.train()
        return module.encoder(batch).sum()

    module.training_step = observing_step
    recorder = StepRecorder()
    with isolated(module, train_mode=False, recorder=recorder):
        for _ in range(2):
            step_loss(module, torch.randn(4, 3), recorder)
    assert seen == [(False, "_nothing")] * 2
    assert module.training and "log" not in vars(module)


@pytest.mark.parametrize("restore_error", [False, True])
def test_a_container_that_refuses_its_old_contents_is_reported_not_fatal(restore_error):
    class Refusing(list):
        def clear(self):
            if restore_error:
                raise TypeError("read-only")
            super().clear()

    module = trained_once()
    module.log_lines = Refusing()

    def step(batch, batch_idx):
        module.log_lines.append("x")
        return module.encoder(batch).sum()

    module.training_step = step
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        probe(module, calls=1)
    named = [str(w.message) for w in record if "self.log_lines" in str(w.message)]
    assert (named and "read-only" in named[0]) if restore_error else (not named and module.log_lines == [])


def test_buffers_rebound_or_changed_in_place_come_back_without_a_warning():
    """A rebound buffer gets its tensor back; one changed in place and also held in a list of the user's is
    the isolation context's to restore (no false "could not restore")."""
    module = trained_once()
    module.register_buffer("ema", torch.ones(2))
    module.register_buffer("seen", torch.zeros(()))
    ema, module.watched = module.ema, [module.seen]

    def ema_step(batch, batch_idx):
        output = module.encoder(batch)
        module.ema = 0.9 * module.ema + 0.1 * output.detach().mean(0)  # assigns a new tensor to the buffer
        module.seen += 1
        return output.sum()

    module.training_step = ema_step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe(module)
    assert module.ema is ema and torch.equal(ema, torch.ones(2)) and module._buffers["ema"] is ema
    assert module.watched[0] is module.seen and module.seen.item() == 0


def test_fsdp2_state_is_held_by_reference_so_the_backward_after_a_restore_works(tmp_path):
    """FSDP2's forward fills lists its backward consumes (the root's post-forward order, each group's indices
    into it); the probe restores the Python state after each ``training_step``, between the two. Restoring
    part of FSDP2's state (3 sharded blocks under a root with parameters of its own, as in the GPT recipe)
    broke that backward (IndexError) even in one gloo process; the gradients must equal plain ones."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from adai_lightning.callbacks._python_state import PythonState

    torch.manual_seed(0)
    plain = nn.Sequential(*(nn.Linear(4, 4) for _ in range(5)))
    inputs = torch.randn(2, 4)
    plain(inputs).square().sum().backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = nn.Sequential(*(nn.Linear(4, 4) for _ in range(5)))
        sharded.load_state_dict(plain.state_dict())
        mesh = init_device_mesh("cpu", (1,))
        for block in sharded[1:4]:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)  # the first and last layers: the root's own group
        sharded(inputs).square().sum().backward()  # a training step: FSDP2's lazy initialisation
        sharded.zero_grad()
        state = PythonState(sharded)  # the probe's situation
        loss = sharded(inputs).square().sum()
        assert state.restore() == {}
        loss.backward()
        grads = [p.grad.full_tensor() for p in sharded.parameters()]
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b.grad) for a, b in zip(grads, plain.parameters()))
