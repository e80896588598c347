"""The demo's model and data: a small decoder-only transformer trained on synthetic sequences.

Built in, seeded, no downloads: :class:`TinyLM` in the sizes of :data:`SIZES`, trained by
:func:`train_step` on :func:`make_batch`'s sequences (deterministic per step), so that two runs
from one seed train identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SIZES", "TinyLM", "make_batch", "make_model", "train_step"]

# name -> (layers, d_model, heads, vocab, seq, batch)
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (2, 64, 4, 256, 32, 8),
    "small": (4, 128, 4, 1024, 64, 8),
    "large": (8, 1024, 16, 16384, 256, 8),
}


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (b, t, 3d) -> 3 x (b, heads, t, d/heads)
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """A small pre-norm decoder-only transformer with tied embeddings.

    It has a persistent buffer that every forward updates in place (``tokens_seen``), so the
    checkpoint holds parameters, tied parameters, buffers and optimizer state.
    """

    def __init__(self, layers: int, d: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.tokens_seen += idx.numel()
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_batch(
    step: int, batch: int, seq: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``x[t+1] = (a * x[t] + b) mod vocab`` with random ``a``, ``b`` per row;
    deterministic per step."""
    g = torch.Generator().manual_seed(10_000 + step)
    a = torch.randint(1, 8, (batch, 1), generator=g) * 2 - 1
    b = torch.randint(0, vocab, (batch, 1), generator=g)
    x = torch.empty(batch, seq + 1, dtype=torch.int64)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for t in range(seq):
        x[:, t + 1] = (a[:, 0] * x[:, t] + b[:, 0]) % vocab
    x = x.to(device)
    return x[:, :-1], x[:, 1:]


def make_model(size: str, device: torch.device, seed: int) -> tuple[TinyLM, torch.optim.Optimizer]:
    """The model of ``size`` (a key of :data:`SIZES`) on ``device``, seeded, and its AdamW."""
    layers, d, heads, vocab, seq, _ = SIZES[size]
    torch.manual_seed(seed)
    model = TinyLM(layers, d, heads, vocab, seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return model, opt


def train_step(
    model: TinyLM, opt: torch.optim.Optimizer, step: int, size: str, device: torch.device
) -> torch.Tensor:
    """One training step on the batch of ``step``; returns the loss."""
    _, _, _, vocab, seq, batch = SIZES[size]
    x, y = make_batch(step, batch, seq, vocab, device)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
