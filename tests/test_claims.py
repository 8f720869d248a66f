"""benchmarks/claims.py: the batched Adai is Adai, the tiny mode runs, and verdicts follow the numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from adai_lightning import Adai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import claims  # noqa: E402


def test_batched_adai_rows_are_independent_runs_of_adai():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 5, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [0.1], [3.0]],
                                                                                          dtype=torch.float64)
             for _ in range(40)]
    batched_param = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    batched = claims.BatchedAdai(batched_param, lr=0.1)
    rows = [torch.zeros(5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    references = [Adai([row], lr=0.1, foreach=False, fused=False) for row in rows]
    for grad in grads:
        batched_param.grad = grad.clone()
        batched.step()
        for i, (row, reference) in enumerate(zip(rows, references)):
            row.grad = grad[i].clone()
            reference.step()
    for i, row in enumerate(rows):  # each row has its own vbar: scaling a row's noise changes only that row
        assert torch.allclose(batched_param.detach()[i], row.detach(), rtol=1e-12, atol=1e-15)


def test_tiny_mode_prints_tables_and_verdicts():
    text = claims.main(["--seeds", "8", "--max-steps", "3000"])
    assert "(a) Median steps to escape a saddle" in text and "(b) Median steps to leave a well" in text
    assert text.count("| SGD |") == 2 and text.count("| Adai |") == 2
    verdict_lines = [line for line in text.splitlines() if line.startswith("| ") and "paper" not in line
                     and ("holds" in line or "inconclusive" in line)]
    assert len(verdict_lines) == 5


def median_table(steps: dict[str, list[float]]) -> dict[str, dict[float, claims.Median]]:
    return {name: {g: claims.Median(s, False) for g, s in zip(claims.CURVATURES, row)} for name, row in steps.items()}


def test_saddle_verdicts_follow_the_numbers():
    like_adam = median_table({"SGD": [10, 100, 1000], "SGD-M": [10, 100, 1000], "Adam": [20, 60, 200],
                              "Adai": [15, 70, 250]})
    words = [v.word for v in claims.saddle_verdicts(like_adam)]
    assert words == ["holds", "holds", "holds"]
    like_sgd = median_table({"SGD": [10, 100, 1000], "SGD-M": [10, 100, 1000], "Adam": [20, 60, 200],
                             "Adai": [10, 100, 1000]})
    assert [v.word for v in claims.saddle_verdicts(like_sgd)] == ["holds", "does not hold here", "does not hold here"]
    flat_sgd = median_table({"SGD": [10, 12, 14], "SGD-M": [10, 12, 14], "Adam": [20, 60, 200],
                             "Adai": [10, 100, 1000]})
    assert claims.saddle_verdicts(flat_sgd)[0].word == "does not hold here"
    censored = dict(like_adam, Adai={g: claims.Median(3000, True) for g in claims.CURVATURES})
    assert [v.word for v in claims.saddle_verdicts(censored)][1:] == ["inconclusive", "inconclusive"]


def test_minima_verdicts_and_censored_bounds():
    def table(**rows):
        return {name: {"sharp": claims.Median(*sharp), "flat": claims.Median(*flat)} for name, (sharp, flat) in rows.items()}

    base = dict(SGD=((10, False), (1000, False)), **{"SGD-M": ((10, False), (100, False))},
                Adam=((10, False), (100, False)), Adai=((10, False), (3000, True)))
    assert [v.word for v in claims.minima_verdicts(table(**base))] == ["holds", "holds"]  # Adai >= 300 > 10
    reverse = dict(base, SGD=((10, False), (50, False)), Adai=((1000, False), (3000, True)))  # Adai >= 3 vs 10
    assert [v.word for v in claims.minima_verdicts(table(**reverse))] == ["does not hold here", "inconclusive"]
    assert claims.greater(claims.Bound(5.0, False), claims.Bound(4.0, True)) is None
    assert claims.greater(claims.Bound(3.0, False), claims.Bound(4.0, True)) is False


def test_invalid_optimizer_name():
    with pytest.raises(ValueError, match="Invalid optimizer: 'RMSprop'"):
        claims.make_optimizer("RMSprop", torch.zeros(1, 1, requires_grad=True), 0.1, 1.0)
