"""Reductions shared by the curvature queries and the optimizer."""

from __future__ import annotations

import torch
from torch import Tensor


def dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`a^\\top b` over all entries, accumulated in at least float32 (bf16/fp16 inputs)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))
