"""A small GPT-style byte-level language model (after nanoGPT, without dropout).

Pre-norm transformer blocks (causal self-attention, then a 4x GELU MLP) between a token plus
learned position embedding and a final norm and linear head. The repeated blocks live in
``model.blocks``, an ``nn.ModuleList``: lowcomm's streaming fragment splitter strides over
them so that each fragment spans the depth of the model.

Example::

    model = GPT(GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128))
    logits, loss = model(x, targets=y)  # x, y: int64 (batch, seq) bytes

References:
    Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019;
    Karpathy, nanoGPT (github.com/karpathy/nanoGPT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "parameter_signature"]


@dataclass(frozen=True)
class GPTConfig:
    """Model shape.

    Attributes:
        vocab_size: token vocabulary (256 for bytes).
        block_size: longest sequence the position embedding covers.
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: model width.
        tie_weights: share the token embedding matrix with the output head.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    tie_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (``scaled_dot_product_attention``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over earlier positions; ``x`` is (batch, seq, n_embd)."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(4x) -> GELU -> Linear."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to (batch, seq, n_embd)."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to (batch, seq, n_embd)."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer over bytes.

    Call protocol: ``model(idx)`` returns ``(logits, None)``; ``model(idx, targets)`` returns
    ``(logits, loss)`` with the mean next-token cross-entropy (nats per byte). ``idx`` and
    ``targets`` are int64 tensors of shape (batch, seq) with seq <= ``block_size``.

    Attributes:
        config: the :class:`GPTConfig`.
        wte: token embedding.
        wpe: position embedding.
        blocks: the repeated transformer blocks (an ``nn.ModuleList``).
        ln_f: final layer norm.
        lm_head: output projection to the vocabulary (its weight is ``wte.weight`` when tied).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance does not
        # grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the loss when ``targets`` is given.

        Raises:
            ValueError: if the sequence is longer than ``block_size``.
        """
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(
                f"sequence length ({t}) must be <= block_size ({self.config.block_size})"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def parameter_signature(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` of a model's parameters and buffers, in registration order.

    Used to check that a checkpoint was written by the same architecture.
    """
    sig = {name: list(p.shape) for name, p in model.named_parameters()}
    sig.update({f"buffer:{name}": list(b.shape) for name, b in model.named_buffers()})
    return sig
