"""The example model of ``xform plan`` (docs/plan.md): a residual MLP as an ``nn.Sequential``,
so that every strategy applies: pipeline stages cut between its children, and tensor
parallelism splits each block's ``Linear -> GELU -> Linear`` Megatron-style.

    .venv/bin/xform plan examples/plan_model.py:model --batch 8,32 --nproc 2 --measure
"""

from __future__ import annotations

import torch


class Block(torch.nn.Module):
    """``x + mlp(norm(x))``, the MLP half of a transformer block."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def model(inputs: int = 32, dim: int = 128, depth: int = 4, outputs: int = 32) -> torch.nn.Sequential:
    """``Linear(inputs, dim)``, ``depth`` blocks, ``Linear(dim, outputs)``: 536,224 parameters by default."""
    return torch.nn.Sequential(torch.nn.Linear(inputs, dim), *[Block(dim) for _ in range(depth)], torch.nn.Linear(dim, outputs))
