"""PlateauDetector on synthetic loss curves: noise, steps, slow decays, spikes, and the deep linear
network's own dynamics (balanced, aligned modes) with minibatch-like noise, against plateau lengths
known from the teacher's singular values."""

from __future__ import annotations

import math
import random

import pytest

from adai_lightning.curvature.plateaus import PlateauDetector


def noisy(curve, relative=0.3, seed=0):
    """Multiplicative log-normal noise of about ``relative`` (the saddle recipe's per-batch spread is ~31 %)."""
    rng = random.Random(seed)
    return [value * math.exp(rng.gauss(0.0, relative)) for value in curve]


def events(curve, **kwargs):
    detector = PlateauDetector(**kwargs)
    for step, loss in enumerate(curve):
        detector.update(step, loss)
    return detector.escapes


def staircase(levels, lengths, drop_steps=20):
    """Flat levels joined by smooth (log-linear) drops of ``drop_steps`` steps."""
    curve = []
    for i, (level, length) in enumerate(zip(levels, lengths)):
        curve += [level] * length
        if i + 1 < len(levels):
            ratio = levels[i + 1] / level
            curve += [level * ratio ** ((k + 1) / drop_steps) for k in range(drop_steps)]
    return curve


def deep_linear_losses(singular_values, depth=3, lr=0.01, init=0.05, steps=3000):
    """Gradient descent on a deep linear network whose layers are balanced and aligned with the teacher:
    each mode is a scalar chain ``a = w ** depth`` with loss ``(s - a) ** 2`` and the update
    ``w += lr * 2 (s - a) w ** (depth - 1)`` (Saxe et al. 2014). Returns the per-step total loss and,
    per mode, the step at which it is half learned (``a = s / 2``)."""
    weights, curve, learned = [init] * len(singular_values), [], [None] * len(singular_values)
    for step in range(steps):
        curve.append(sum((s - w ** depth) ** 2 for s, w in zip(singular_values, weights)))
        for i, s in enumerate(singular_values):
            a = weights[i] ** depth
            if learned[i] is None and a >= s / 2:
                learned[i] = step
            weights[i] += lr * 2 * (s - a) * weights[i] ** (depth - 1)
    return curve, learned


def test_noise_alone_and_a_flat_start_give_no_event():
    assert events(noisy([5.0] * 2000)) == []
    assert events(noisy([1e-3] * 2000, relative=1.0)) == []  # a converged run: huge relative noise


def test_each_step_of_a_noisy_staircase_is_one_escape_with_its_length():
    lengths = [300, 150, 600]
    found = events(noisy(staircase([30.0, 5.0, 0.7], lengths)))
    assert len(found) == 2
    assert found[0]["start"] == 0 and found[0]["length"] == pytest.approx(300, rel=0.1)
    assert found[1]["length"] == pytest.approx(150, rel=0.25)
    assert 300 < found[1]["start"] < 370  # the second plateau begins once the drop has settled


@pytest.mark.parametrize("curve", [
    [10.0 * math.exp(-t / 300) for t in range(3000)],   # exponential decay: loses a factor e every 300 steps
    [10.0 / (1 + t / 50) for t in range(3000)],          # power law
    [10.0 / (1 + t / 50) ** 2 for t in range(3000)],
], ids=["exponential", "power", "power2"])
def test_slow_decays_are_not_escapes(curve):
    assert events(curve) == [] and events(noisy(curve)) == []


def test_spikes_do_not_end_a_plateau_or_fake_a_drop():
    curve = noisy([5.0] * 1500, seed=1)
    for start in range(100, 1500, 200):
        for k in range(8):  # 8 steps of a 100x spike up, then 8 of a 100x dip
            curve[start + k] *= 100.0
            curve[start + 50 + k] /= 100.0
    assert events(curve) == []


def test_a_rise_ends_a_plateau_without_an_event():
    detector = PlateauDetector()
    for step, loss in enumerate([1.0] * 200 + [10.0] * 200):
        detector.update(step, loss)
    assert detector.escapes == [] and detector.on_plateau  # a new plateau at the higher level


def test_deep_linear_dynamics_every_drop_found_once_with_its_plateau_length():
    singular_values = (5.0, 2.0, 0.8)
    clean, learned = deep_linear_losses(singular_values)
    assert all(step is not None for step in learned)
    # the true plateaus: from one mode's half-learned step to the next's, the first from step 0
    truth = [b - a for a, b in zip([0, *learned], learned)]
    for seed in range(3):
        found = events(noisy(clean, seed=seed))
        assert len(found) == len(singular_values), found
        for event, true_length, drop in zip(found, truth, learned):
            assert event["length"] == pytest.approx(true_length, rel=0.25)
            assert abs(event["end"] - drop) <= 0.25 * true_length


def test_non_finite_and_non_positive_losses():
    detector = PlateauDetector(window=3, min_steps=5)
    for step in range(20):
        detector.update(step, math.nan if step % 3 else 0.0)
    assert detector.on_plateau and detector.escapes == []


@pytest.mark.parametrize("kwargs,message", [
    ({"window": 0}, "Invalid window: 0; it must be an integer > 0"),
    ({"min_steps": 2.5}, "Invalid min_steps"),
    ({"tolerance": -1.0}, "Invalid tolerance"),
    ({"drop_fraction": 0.8}, r"Invalid drop_fraction: 0.8; it must be a number in \(0, 0.666"),
    ({"drop_fraction": math.nan}, "Invalid drop_fraction"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlateauDetector(**kwargs)


def test_state_round_trip_continues_identically():
    curve = noisy(staircase([30.0, 5.0, 0.7], [300, 150, 300]))
    whole, first = PlateauDetector(), PlateauDetector()
    for step, loss in enumerate(curve):
        whole.update(step, loss)
    for step, loss in enumerate(curve[:380]):
        first.update(step, loss)
    second = PlateauDetector()
    second.load_state_dict(first.state_dict())
    for step, loss in enumerate(curve[380:], start=380):
        second.update(step, loss)
    assert second.escapes == whole.escapes and len(whole.escapes) == 2
