"""Which Adai lr a model takes: the fraction of seeds whose weights stay finite, with and without warmup.

The README's snippets used the paper's lr 1.0, which fits BatchNorm CNNs; this measures it against
networks without BatchNorm, next to lower lrs and momentum SGD at lr 0.1 (the README's "equivalent"):

- ``mlp``: a 10-20-1 MLP, MSE on Gaussian inputs and targets, batches of 64 from 256 samples;
- ``boring``: Lightning's ``BoringModel`` (Linear(32, 2), MSE to ones, batch 1, its own loader);
- ``cnn`` / ``bncnn``: conv(16) conv(32, stride 2) pool linear on scikit-learn's 8x8 digits,
  cross-entropy, batches of 64, without / with BatchNorm after each conv.

Adai with weight decay 5e-4 (L2, as in the README), warmup: ``LinearLR`` from 0.01 over 30 steps.

    PYTHONPATH=. python benchmarks/first_lr.py [--seeds 10] [--steps 200]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from adai_lightning import Adai

LRS = (1.0, 0.3, 0.1)
WARMUP_STEPS = 30


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(data.target)


def conv_net(batch_norm: bool) -> nn.Module:
    norm = nn.BatchNorm2d if batch_norm else (lambda channels: nn.Identity())
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                         norm(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def problem(kind: str, seed: int):
    """``(model, batches)``: the model and an endless iterator over ``(loss, inputs, targets)`` batches."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if kind == "boring":
        from lightning.pytorch.demos.boring_classes import BoringModel

        model = BoringModel()
        epochs = itertools.chain.from_iterable(itertools.repeat(model.train_dataloader()))
        return model, ((lambda out, _: model.loss(out), batch, None) for batch in epochs)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))
        x, y, loss = torch.randn(256, 10, generator=generator), torch.randn(256, 1, generator=generator), nn.functional.mse_loss
    else:
        model = conv_net(kind == "bncnn")
        (x, y), loss = digits(), nn.functional.cross_entropy
    picks = (torch.randint(0, len(x), (64,), generator=generator) for _ in itertools.count())
    return model, ((loss, x[i], y[i]) for i in picks)


def finite_run(kind: str, make, seed: int, steps: int, warmup: bool) -> bool:
    model, batches = problem(kind, seed)
    optimizer = make(model.parameters())
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, total_iters=WARMUP_STEPS) if warmup else None
    for _, (loss_fn, x, y) in zip(range(steps), batches):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--models", default="mlp,boring,cnn,bncnn")
    options = parser.parse_args()
    torch.set_num_threads(1)
    cases = [(f"Adai lr {lr}", lambda p, lr=lr: Adai(p, lr=lr, weight_decay=5e-4), warmup)
             for lr in LRS for warmup in (False, True)]
    cases.append(("SGD-M lr 0.1", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4), False))
    kinds = options.models.split(",")
    print(f"seeds whose weights are finite after {options.steps} steps, of {options.seeds}\n")
    print("| optimizer | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for label, make, warmup in cases:
        cells = [sum(finite_run(kind, make, seed, options.steps, warmup) for seed in range(options.seeds))
                 for kind in kinds]
        name = label + (f" + warmup {WARMUP_STEPS}" if warmup else "")
        print(f"| {name} | " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
