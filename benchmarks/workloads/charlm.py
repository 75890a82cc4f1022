"""A small character-level transformer language model on CPython's own documentation text.

The text is ``pydoc_data.topics.topics`` (the help topics shipped with CPython, about
465k characters), topics in sorted order. Characters outside printable ASCII and
newline map to one unknown id (97 ids in all). The first 90 % of the text is for
training, the rest for testing; a sample is a window of ``CONTEXT`` characters and
the character that follows it. Window positions are fixed (the same for every seed).

The model (pre-LayerNorm GPT, 2 blocks, width 48, 4 heads, causal attention written
with plain tensor ops) predicts the next character from the last position, so the
workload is a 97-way classification like the others. BackPACK supports neither
Embedding, LayerNorm nor attention: only the exact curvatures can measure alpha* here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Data, Workload

CONTEXT, WIDTH, HEADS, BLOCKS = 24, 48, 4, 2
VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]
UNKNOWN = len(VOCAB)
N_TRAIN, N_TEST, SPLIT_SEED = 20_000, 2_000, 0


def encode(text: str) -> Tensor:
    """Character ids of ``text`` (unknown characters → :data:`UNKNOWN`)."""
    index = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([index.get(c, UNKNOWN) for c in text], dtype=torch.int64)


def _windows(ids: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, len(ids) - CONTEXT - 1, (n,), generator=gen)
    offsets = torch.arange(CONTEXT)
    return ids[starts[:, None] + offsets], ids[starts + CONTEXT]


def load_data(seed: int, size: str) -> Data:
    from pydoc_data.topics import topics

    ids = encode("".join(topics[k] for k in sorted(topics)))
    split = int(0.9 * len(ids))
    n_train, n_test = (128, 64) if size == "tiny" else (N_TRAIN, N_TEST)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    x_train, y_train = _windows(ids[:split], n_train, gen)
    x_test, y_test = _windows(ids[split:], n_test, gen)
    return Data(x_train, y_train, x_test, y_test)


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); causal multi-head attention."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.ln2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
        self.register_buffer("mask", torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.reshape(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // HEADS)
        scores = scores.masked_fill(~self.mask[:t, :t], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attended)
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token + position embeddings, :data:`BLOCKS` blocks, LayerNorm, logits of the next character."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(UNKNOWN + 1, WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.Sequential(*(Block() for _ in range(BLOCKS)))
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, UNKNOWN + 1)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        h = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device))
        return self.head(self.ln(self.blocks(h))[:, -1])


def make_model() -> nn.Module:
    return CharTransformer()


WORKLOAD = Workload(
    name="pydoc_charlm",
    description=(
        f"char-level transformer ({BLOCKS} blocks, width {WIDTH}, {HEADS} heads, context {CONTEXT}), "
        "next character, cross-entropy, CPython's pydoc_data.topics text"
    ),
    load_data=load_data,
    make_model=make_model,
    loss="cross_entropy",
    batch_size=64,
    steps={"tiny": 3, "quick": 300, "full": 1500},
    backpack=False,
    embedded=True,
)
