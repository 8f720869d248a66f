"""Run random sequences of what users do to an optimizer, each against the float64 oracle; print JSON lines.

    PYTHONPATH=. python tests/scripts/optimizer_sequences.py SEED [SEED ...] [--triton]

A sequence (all of it drawn from its seed) builds a small model of float32/float64 parameters in
one or two param groups and an Adai on one path, then applies 4 to 10 of: a step with random
gradients, a step with a NaN or infinite gradient element, a dtype move of one parameter
(``p.data = p.data.to(...)``, as ``model.double()`` does), a state load from another optimizer (of
the same shapes, of other shapes, or of the same parameters in another group order), and a switch
of path (native CPU kernel, foreach, single-tensor; with ``--triton`` also the multi-tensor Triton
kernels under Triton's interpreter). The oracle (``tests/adai_oracle.py``) mirrors every accepted
change. Per sequence the script prints ``{"seed": ..., "start": true}`` before (so that a caller
whose process died from a signal or hung knows which one) and ``{"seed", "outcome", "detail"}`` after:
outcome ``match`` (every step equal to the oracle's), ``exception`` (a Python exception refused an
operation: the sequence ends there) or ``mismatch``. It measures, it does not judge
(``tests/test_optim_sequences.py`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings

if "--triton" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adai_lightning.optim import Adai, _multi_tensor, _native  # noqa: E402
from tests.adai_oracle import OracleAdai  # noqa: E402

SHAPES = [(3,), (2, 3), (4, 1), (), (3, 2)]
DTYPES = [torch.float32, torch.float64]
#: Group options: a path's flags (what ``param_groups[i]`` holds).
PATHS = {"native": dict(foreach=None, fused=None), "foreach": dict(foreach=True, fused=False),
         "single": dict(foreach=False, fused=False), "triton": dict(foreach=None, fused=True)}
#: Relative tolerance against the float64 oracle, by the coarsest parameter dtype.
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}
_native_supports = _native.supports


class Sequence:
    """One random sequence: the model, its Adai, the oracle's float64 mirror, and the operations."""

    def __init__(self, seed: int, paths: list[str]) -> None:
        self.rng = random.Random(seed)
        self.paths = paths
        count = self.rng.randint(2, 4)
        self.params = [nn.Parameter(torch.randn(self.rng.choice(SHAPES), dtype=self.rng.choice(DTYPES),
                                                generator=torch.Generator().manual_seed(seed * 10 + i)))
                       for i in range(count)]
        split = self.rng.randint(1, count - 1) if self.rng.random() < 0.5 else count
        self.options = [dict(lr=0.5), dict(lr=0.1, weight_decay=0.01)]
        self.layout = [self.params[:split], self.params[split:]] if split < count else [self.params]
        self.adai = self.optimizer(self.layout)
        self.oracle = OracleAdai(self.mirror_groups())
        self.use_path(self.rng.choice(paths))

    def optimizer(self, layout: list[list[nn.Parameter]]) -> Adai:
        return Adai([{"params": group, **options} for group, options in zip(layout, self.options)])

    def mirror_groups(self) -> list[dict]:
        """The oracle's groups: float64 copies of the parameters, with each Adai group's options."""
        self.copies = {id(p): p.detach().double().clone() for p in self.params}
        keys = ("lr", "betas", "eps", "weight_decay", "decoupled", "dampening", "maximize")
        return [{"params": [self.copies[id(p)] for p in group["params"]], **{k: group[k] for k in keys}}
                for group in self.adai.param_groups]

    def use_path(self, path: str) -> str:
        _native.supports = (lambda *args: False) if path == "triton" else _native_supports
        for group in self.adai.param_groups:
            group.update(PATHS[path])
        return path

    def step(self, poison: float | None = None) -> str:
        for index, p in enumerate(self.params):
            grad = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
            if poison is not None and index == 0 and p.numel():
                grad.view(-1)[0] = poison
            p.grad = grad.to(p.dtype)
            self.copies[id(p)].grad = p.grad.double()
        self.adai.step()
        if poison is None:
            self.oracle.step()  # a non-finite gradient: skipped by default, the oracle stays where it was
        return self.compare()

    def compare(self) -> str:
        rtol = RTOL[min((p.dtype for p in self.params), key=lambda d: torch.finfo(d).bits)]
        for p in self.params:
            torch.testing.assert_close(p.detach().double(), self.copies[id(p)], rtol=rtol, atol=rtol * 1e-3)
        return "equal"

    def cast(self) -> str:
        p = self.rng.choice(self.params)
        dtype = self.rng.choice(DTYPES)
        p.data = p.data.to(dtype)
        p.grad = None
        self.copies[id(p)].copy_(p.detach().double())  # the oracle sees the rounding too
        return f"cast to {dtype}"

    def load(self) -> str:
        """Load the state of another Adai that stepped: same shapes, other shapes, or another group order."""
        kind = self.rng.choice(["same shapes", "other shapes", "groups reordered"])
        if kind == "groups reordered":
            layout = self.layout[::-1]
            source, target = self.adai, self.optimizer(layout)
        else:
            shapes = [p.shape if kind == "same shapes" else self.rng.choice(SHAPES) for p in self.params]
            others = [nn.Parameter(torch.randn(s, dtype=self.rng.choice(DTYPES))) for s in shapes]
            source = self.optimizer([others[:len(self.layout[0])], others[len(self.layout[0]):]][:len(self.layout)])
            for p in others:
                p.grad = torch.randn_like(p)
            source.step()
            layout, target = self.layout, self.adai
        saved = source.state_dict()
        target.load_state_dict(saved)
        self.adai, self.layout = target, layout
        self.check_loaded(saved)
        self.resync()
        return kind

    def check_loaded(self, saved: dict) -> None:
        """The loaded state is the saved one, parameter by parameter in group order."""
        ids = [i for group in saved["param_groups"] for i in group["params"]]
        members = [p for group in self.adai.param_groups for p in group["params"]]
        for saved_id, p in zip(ids, members):
            for key in ("exp_avg", "exp_avg_sq", "beta1_prod"):
                if saved_id in saved["state"]:
                    expected = saved["state"][saved_id][key].to(self.adai.state[p][key].dtype)
                    assert torch.equal(self.adai.state[p][key], expected), f"loaded {key} differs"

    def resync(self) -> None:
        """Rebuild the oracle from the optimizer's (checked) state and options."""
        self.oracle = OracleAdai(self.mirror_groups())
        for p in self.params:
            state = self.adai.state.get(p)
            if state:
                self.oracle.state[id(self.copies[id(p)])] = {
                    "step": int(state["step"]), "m": state["exp_avg"].double().clone(),
                    "v": state["exp_avg_sq"].double().clone(), "P": state["beta1_prod"].double().clone()}

    def run(self) -> tuple[str, str]:
        done = []
        operations = [lambda: self.step(), lambda: self.step(), lambda: self.step(),
                      lambda: self.step(self.rng.choice([float("nan"), float("inf")])), self.cast, self.load,
                      lambda: "path " + self.use_path(self.rng.choice(self.paths))]
        for _ in range(self.rng.randint(4, 10)):
            operation = self.rng.choice(operations)
            try:
                done.append(operation())
            except AssertionError as error:
                return "mismatch", f"{done} then {str(error)[:300]}"
            except Exception as error:  # noqa: BLE001  (any Python exception is an allowed outcome)
                return "exception", f"{done} then {type(error).__name__}: {str(error)[:300]}"
        return "match", str(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", type=int, nargs="+")
    parser.add_argument("--triton", action="store_true", help="also the Triton kernels, under the interpreter")
    args = parser.parse_args()
    paths = ["native", "foreach", "single"]
    if args.triton:
        _multi_tensor.DEVICE_TYPES = ("cuda", "cpu")
        paths.append("triton")
    warnings.simplefilter("ignore")  # the first skipped step warns; the outcome is what is measured
    for seed in args.seeds:
        print(json.dumps({"seed": seed, "start": True}), flush=True)
        outcome, detail = Sequence(seed, paths).run()
        print(json.dumps({"seed": seed, "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    main()
