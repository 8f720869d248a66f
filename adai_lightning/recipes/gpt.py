"""A small GPT-style causal language model: the recipe that puts Adai and the curvature callbacks on a transformer.

Token and position embeddings, pre-LayerNorm blocks (causal self-attention through
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, a GELU MLP), a final LayerNorm
and an output head tied to the token embedding (GPT-2's layout). Plain eager modules and SDPA only,
so that torch picks its fused attention kernel in training; the Hessian probe runs the math kernel.
Under FSDP2 (Lightning's ``ModelParallelStrategy``) ``configure_model`` shards each block and the root.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused q/k/v projection, SDPA, an output projection."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (pre-LN, 4x MLP)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token ids ``(batch, length <= block_size)`` to next-token logits ``(batch, length, vocab_size)``.

    Initialised as GPT-2: weights N(0, 0.02^2), the residual projections N(0, (0.02 / sqrt(2 n_layers))^2),
    biases zero, LayerNorms the identity.
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 64, d_model: int = 96, n_layers: int = 3,
                 n_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layers", n_layers),
                            ("n_heads", n_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= 1")
        if d_model < 1 or d_model % n_heads:
            raise ValueError(f"Invalid d_model: {d_model}; it must be a positive multiple of n_heads={n_heads}")
        if not 0 <= dropout < 1:
            raise ValueError(f"Invalid dropout: {dropout}; it must lie in [0, 1)")
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied
        self.apply(self._init_weights)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.block_size:
            raise ValueError(f"Invalid input length: {length}; it must be <= block_size={self.block_size}")
        positions = torch.arange(length, device=tokens.device)
        x = self.drop(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class GPTLanguageModel(pl.LightningModule):
    """Next-token cross-entropy of :class:`TinyGPT` on ``(inputs, targets)`` batches of token windows.

    Logs ``train/loss`` (per step and epoch; nats per token) and, per evaluation run, ``val/loss``,
    ``val/ppl``, ``test/loss``, ``test/ppl``: the mean over every token of the split (all ranks) and
    its exponential, the perplexity. No ``configure_optimizers``: the CLI's ``--optimizer`` supplies it,
    built after ``configure_model`` (so from the sharded parameters under FSDP2).
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 64, d_model: int = 96, n_layers: int = 3,
                 n_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.gpt = TinyGPT(vocab_size, block_size, d_model, n_layers, n_heads, dropout)
        self.token_nll = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(tokens)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 ``fully_shard`` on every block, then on the root
        (embeddings, final LayerNorm and the tied head form the root's unit). Otherwise nothing, and nothing
        when already sharded: Lightning calls this again for the test after fit."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self, FSDPModule):
            return

        mesh = self.device_mesh["data_parallel"]
        for block in self.gpt.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def _loss(self, batch) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        self.token_nll[stage].update(self._loss(batch), weight=batch[1].numel())

    def _log_evaluation(self, stage: str) -> None:
        mean = self.token_nll[stage].compute()  # every token of the split, summed over ranks
        self.token_nll[stage].reset()
        self.log(f"{stage}/loss", mean, prog_bar=True)
        self.log(f"{stage}/ppl", mean.exp(), prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")
