"""``estimate_memory``: per-rank bytes of a model's training state under ZeRO strategies.

With Ψ parameters (Ψt of them trainable), N ranks, and Adam (two fp32 states, 8 bytes
per parameter), the per-rank bytes of parameters + gradients + optimizer state are:

================  ==========================  ==============================
strategy          fp32 (4 + 4 + 8 bytes)      bf16/fp16 with fp32 master
                                              (2 + 2 + 4 master + 8 Adam = 16)
================  ==========================  ==============================
replicate (DDP)   16Ψ                         16Ψ
zero1             8Ψ + 8Ψ/N                   4Ψ + 12Ψ/N
zero2             4Ψ + 12Ψ/N                  2Ψ + 14Ψ/N
zero3 (FSDP)      16Ψ/N                       16Ψ/N
================  ==========================  ==============================

ZeRO-1 shards the optimizer state (and the fp32 master copy), ZeRO-2 the gradients too,
ZeRO-3 the parameters too (the ZeRO paper's formulas, K = 12 for mixed-precision Adam).
Sharded parts take ceil(Ψ/N) elements per rank. Gradients and optimizer state count
trainable parameters only. Also counted: torch.optim's Adam keeps a float32 ``step``
scalar per parameter tensor (4 bytes each, on every rank), and buffers (replicated, in
their own dtype) are reported apart.

What it does not count: activations unless measured (see ``measure_activations``),
communication buckets, the gathered full parameters ZeRO-3 holds for one layer at a time,
allocator fragmentation, the CUDA context (~0.5-1 GiB per GPU), and temporary copies.

Note on precision: the bf16/fp16 columns describe the layout DeepSpeed uses (low-precision
parameters and gradients, fp32 master weights in the optimizer). xform's own
``mixed_precision("bf16")`` keeps fp32 parameters and computes under autocast, so its
persistent state is the fp32 column; its low-precision copies are transient.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import attrs
import torch

from xform.core.dtypes import PRECISIONS as _PRECISION_TABLE
from xform.core.strategies import STRATEGIES as _STRATEGY_TABLE

__all__ = ["MemoryEstimate", "estimate_memory", "measure_activations", "STRATEGIES", "PRECISIONS", "OPTIMIZERS"]

# The strategies whose footprint has a formula, and the precisions: derived from core's tables.
# Aliases ("ddp", "fsdp") are accepted and estimated as the strategy they name.
STRATEGIES = tuple(dict.fromkeys(s.name for s in _STRATEGY_TABLE.values() if s.name in ("replicate", "zero1", "zero2", "zero3")))
PRECISIONS = tuple(_PRECISION_TABLE)
# fp32 optimizer-state bytes per trainable parameter, and whether there is a per-tensor step counter
OPTIMIZERS: dict[str, tuple[int, bool]] = {
    "adam": (8, True),
    "adamw": (8, True),
    "sgd": (0, False),
    "sgd-momentum": (4, False),
}
_SHARDS = {  # by strategy family: which parts are sharded over the ranks (params, grads, optimizer state)
    "replicate": (False, False, False),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "zero3": (True, True, True),
}


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """Per-rank bytes of one configuration (see ``estimate_memory``).

    Attributes:
        params, grads, optimizer_state: bytes on each rank; ``optimizer_state`` includes
            the fp32 master copy of bf16/fp16 parameters.
        buffers: bytes of the module's buffers (replicated).
        activations: bytes of activations per rank, or None when not estimated.
        total: the sum of the above (activations counted when known).
    """

    strategy: str
    precision: str
    world_size: int
    optimizer: str
    num_params: int
    trainable_params: int
    params: int
    grads: int
    optimizer_state: int
    buffers: int = 0
    activations: int | None = None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state + self.buffers + (self.activations or 0)

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "total": self.total}


def _counts(module: torch.nn.Module) -> tuple[int, int, int, int]:
    params = list(module.parameters())  # shared parameters once
    total = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return total, sum(p.numel() for p in trainable), len(trainable), buffers


def estimate_memory(
    module: torch.nn.Module | int,
    *,
    strategy: str,
    precision: str = "fp32",
    world_size: int = 1,
    optimizer: str = "adam",
    activations: int | None = None,
    shard_rows: bool = False,
) -> MemoryEstimate:
    """Estimates each rank's bytes of parameters, gradients and optimizer state.

    The formulas are in this module's docs: for Adam, replicate 16Ψ; ZeRO-1
    ``4Ψ + 12Ψ/N`` (mixed precision) or ``8Ψ + 8Ψ/N`` (fp32); ZeRO-2 ``2Ψ + 14Ψ/N`` or
    ``4Ψ + 12Ψ/N``; ZeRO-3 ``16Ψ/N``.

    Args:
        module: the model (build it under ``torch.device("meta")`` to allocate nothing),
            or a parameter count (all trainable, one tensor, no buffers).
        strategy: ``"replicate"``, ``"zero1"``, ``"zero2"`` or ``"zero3"`` (FSDP's
            full sharding has ZeRO-3's footprint).
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` with an fp32 master copy.
        world_size: the number of ranks N the state is sharded over.
        optimizer: ``"adam"``/``"adamw"`` (2 states), ``"sgd-momentum"`` (1) or ``"sgd"`` (0).
        activations: bytes of activations per rank, when known (``measure_activations``).
        shard_rows: count a sharded part as the largest shard when each tensor is split
            by rows (dim 0) into ``world_size`` chunks, as xform's ZeRO and FSDP2 split
            (``sum of ceil(rows / N) * columns``), instead of ``ceil(Ψ / N)``; they differ
            when row counts do not divide by N. Needs a module.

    Example:
        >>> import torch, xform as xf
        >>> with torch.device("meta"):
        ...     model = torch.nn.Linear(1000, 1000)   # 1,001,000 parameters
        >>> e = xf.estimate_memory(model, strategy="zero2", precision="bf16", world_size=4)
        >>> e.params, e.grads, e.optimizer_state   # 2Ψ, 2Ψ/4, 12Ψ/4 + two step counters
        (2002000, 500500, 3003008)
    """
    family = _STRATEGY_TABLE[strategy].name if strategy in _STRATEGY_TABLE else None
    if family not in STRATEGIES:
        raise ValueError(f"estimate_memory: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"estimate_memory: unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"estimate_memory: unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"estimate_memory: world_size must be an int >= 1, got {world_size!r}")
    if activations is not None and (isinstance(activations, bool) or not isinstance(activations, int) or activations < 0):
        raise ValueError(f"estimate_memory: activations must be a number of bytes >= 0 or None, got {activations!r}")
    if isinstance(module, torch.nn.Module):
        total, trainable, tensors, buffers = _counts(module)
    elif isinstance(module, int) and not isinstance(module, bool) and module >= 0:
        total, trainable, tensors, buffers = module, module, 1 if module else 0, 0
    else:
        raise TypeError(f"estimate_memory: expected a torch.nn.Module or a parameter count, got {type(module).__name__}")

    low = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" else 4
    state_bytes, has_step = OPTIMIZERS[optimizer]
    shard_p, shard_g, shard_o = _SHARDS[family]

    if shard_rows:
        if not isinstance(module, torch.nn.Module):
            raise TypeError("estimate_memory: shard_rows=True needs the module (each tensor's rows), not a parameter count")
        shard = {total: _row_shard(module, world_size, trainable_only=False),
                 trainable: _row_shard(module, world_size, trainable_only=True)}  # fmt: skip
    else:
        shard = {n: math.ceil(n / world_size) for n in (total, trainable)}

    def per_rank(n: int, sharded: bool) -> int:
        return shard[n] if sharded else n

    return MemoryEstimate(
        strategy=strategy,
        precision=precision,
        world_size=world_size,
        optimizer=optimizer,
        num_params=total,
        trainable_params=trainable,
        params=low * per_rank(total, shard_p),
        grads=low * per_rank(trainable, shard_g),
        optimizer_state=(master + state_bytes) * per_rank(trainable, shard_o) + (4 * tensors if has_step else 0),
        buffers=buffers,
        activations=activations,
    )


def _row_shard(module: torch.nn.Module, world_size: int, *, trainable_only: bool) -> int:
    """Elements of the largest shard when each parameter is split by rows into world_size chunks."""
    return sum(
        math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0]) if p.dim() and p.shape[0] else p.numel()
        for p in module.parameters()
        if p.requires_grad or not trainable_only
    )


def measure_activations(module: torch.nn.Module, *inputs: Any, dtype: torch.dtype | None = None, **kwargs: Any) -> int:
    """Bytes of activations one forward pass keeps for the backward pass.

    Runs ``module(*inputs, **kwargs)`` with grad enabled and adds up the storages that
    autograd saves for backward, plus the output's; parameters and buffers are left out
    and a storage saved twice counts once. On the meta device (module and inputs built
    under ``torch.device("meta")``) nothing is allocated. It is the activation memory at
    the end of the forward pass: the backward pass adds the gradients of activations on
    top, for a short while.

    Args:
        module: the model.
        *inputs, **kwargs: the forward's arguments, e.g. ``torch.empty(8, 784, device="meta")``.
        dtype: run in this floating dtype (a deep copy of the module is cast, and the
            floating inputs), e.g. ``torch.bfloat16`` for bf16 parameters.

    Example:
        >>> import torch, xform as xf
        >>> with torch.device("meta"):
        ...     mlp = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
        ...     x = torch.empty(8, 10)
        >>> xf.measure_activations(mlp, x)   # fp32: input 8x10, ReLU output 8x20, output 8x5
        1120
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"measure_activations: expected a torch.nn.Module, got {type(module).__name__}")
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"measure_activations: dtype must be a floating dtype, got {dtype}")
        module = copy.deepcopy(module).to(dtype)
        cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
        inputs = tuple(cast(x) for x in inputs)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
    owned = {_storage_key(t) for t in (*module.parameters(), *module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in owned:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs, **kwargs)
        for t in _tensors(out):
            saved.setdefault(_storage_key(t), t.untyped_storage().nbytes())
        total = sum(saved.values())
    del out
    return total


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []
