"""``shard``: the step on N processes, each with its slice of the global batch, equal to
the step on the global batch in one process.

Nesting (outermost first):

- ``shard(accumulate(f, k))``: gradients are communicated once, on the last micro-batch,
  overlapped with its backward pass (replicate, zero1, zero2); zero3/hsdp reduce-scatter
  every micro-batch, as FSDP does, to keep gradients sharded.
- ``shard(mixed_precision(f, "bf16"))``: the forward runs in bf16; zero3/hsdp gather params
  in bf16 and reduce gradients in fp32 (``FullyShard(reduce_dtype=...)``).
- ``accumulate(shard(f), k)`` is allowed but communicates every micro-batch.
- ``shard`` inside ``shard`` is refused.
"""

from __future__ import annotations

from typing import Any, Callable

from xform.core.backend import get_backend
from xform.core.strategies import (  # noqa: F401  (re-exported)
    STRATEGIES, FullyShard, HybridShard, Replicate, Strategy, TensorParallel, ZeRO, parse_strategy,
)
from xform.core.primitives import installed
from xform.core.state import TrainState
from xform.core.transform import check_step, wrap

__all__ = [
    "Replicate", "ZeRO", "FullyShard", "HybridShard", "TensorParallel", "STRATEGIES", "parse_strategy",
    "mesh", "shard",
]


def mesh(**axes: int):
    """A ``DeviceMesh`` over all processes with named axes, outermost first.

    Example: ``xf.mesh(dp=2, tp=2)`` on 4 processes; ``xf.mesh(replicate=2, shard=4)``
    for HSDP on 8. The product of the sizes must be the world size.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not axes:
        raise ValueError("mesh: name at least one axis, e.g. xf.mesh(dp=2, tp=2)")
    if not dist.is_initialized():
        raise RuntimeError("mesh: no process group; call xf.distributed.initialize() first (or run under xform launch)")
    bad = {k: v for k, v in axes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive ints, got {bad}")
    size = 1
    for v in axes.values():
        size *= v
    if size != dist.get_world_size():
        raise ValueError(
            f"mesh: axes {axes} hold {size} processes but the world has {dist.get_world_size()}; "
            "make the product of the sizes equal the number of processes"
        )
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, tuple(axes.values()), mesh_dim_names=tuple(axes))


def shard(step: Callable[..., Any], strategy: "str | Strategy" = "replicate", *, mesh: Any = None, backend: str | None = None):
    """Runs ``step`` data-parallel (and tensor-parallel) over the processes.

    Each process calls the sharded step with its slice of the global batch (as
    ``xf.DataLoader`` gives it); the result equals the plain step on the global batch in
    one process. Losses returned as ``xf.Mean`` are normalized by the global item count.

    Args:
        step: a step, possibly already transformed by ``accumulate``/``mixed_precision``.
        strategy: ``"replicate"`` (DDP), ``"zero1"``, ``"zero2"``, ``"zero3"``/``"fsdp"``,
            ``"hsdp"``, or a strategy object (``Replicate``, ``ZeRO``, ``FullyShard``,
            ``HybridShard``, ``TensorParallel``) for its settings.
        mesh: a ``DeviceMesh`` (``xf.mesh(...)``); by default one axis over all processes.
        backend: the backend's name in ``xform.core.backend.BACKENDS`` (default ``"torch"``).

    ``step.init(state)`` lays the state out: replicated params are made equal on all
    processes (rank 0's), sharded ones are split. On one process without a process group
    the step runs unchanged.
    """
    check_step("shard", step)
    strategy = parse_strategy(strategy)
    if "shard" in getattr(step, "xform_transforms", ()):
        raise ValueError("shard: this step is already sharded; apply shard once, outermost")
    layout = get_backend(backend).layout(strategy, mesh, inner=step)

    def call(state: TrainState, batch: Any):
        with installed(layout.handler()):
            return step(state, batch)

    return wrap(
        step, call, layout.init,
        xform_transforms=getattr(step, "xform_transforms", ()) + ("shard",),
        strategy=strategy,
    )
