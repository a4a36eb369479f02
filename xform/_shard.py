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

from typing import Any, Callable, Mapping

import attrs
import torch

from xform._backend import get_backend
from xform._primitives import installed
from xform._state import TrainState
from xform._transform import check_step, wrap

__all__ = [
    "Replicate", "ZeRO", "FullyShard", "HybridShard", "TensorParallel", "STRATEGIES", "parse_strategy",
    "mesh", "shard",
]


@attrs.frozen(kw_only=True)
class Replicate:
    """DDP semantics: params and optimizer state replicated; gradients all-reduced in
    buckets of ``bucket_mb``, started from autograd hooks as gradients become ready."""

    bucket_mb: float = 25.0
    name = "replicate"


@attrs.frozen(kw_only=True)
class ZeRO:
    """ZeRO stage 1 or 2: params replicated; optimizer state (stage 1) and gradients
    (stage 2) sharded by rows across the data-parallel processes. Stage 1 all-reduces
    gradients and keeps them whole; stage 2 reduce-scatters them as they are produced
    and keeps only this process's rows. Each process updates its rows; params are then
    all-gathered."""

    stage: int = 1
    bucket_mb: float = 25.0

    def __attrs_post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"ZeRO: stage must be 1 or 2 (use FullyShard() for stage 3), got {self.stage}")

    @property
    def name(self) -> str:
        return f"zero{self.stage}"


@attrs.frozen(kw_only=True)
class FullyShard:
    """ZeRO-3 / FSDP2 semantics: params, gradients and optimizer state sharded by rows;
    params gathered just in time per unit (each child module that holds parameters,
    or the modules ``units`` selects) and freed after forward and after backward.

    Attributes:
        reshard_after_forward: free gathered params after forward (re-gather in backward).
        units: a predicate ``module -> bool`` choosing the modules gathered together;
            default: every module that directly holds parameters.
        reduce_dtype: dtype of gradient reduce-scatter under mixed precision (fp32).
    """

    reshard_after_forward: bool = True
    units: Callable[[torch.nn.Module], bool] | None = None
    reduce_dtype: torch.dtype = torch.float32
    name = "zero3"


@attrs.frozen(kw_only=True)
class HybridShard(FullyShard):
    """HSDP: fully shard inside the mesh axis ``shard_axis``, replicate across
    ``replicate_axis`` (e.g. shard inside a node, replicate across nodes)."""

    replicate_axis: str = "replicate"
    shard_axis: str = "shard"
    name = "hsdp"


@attrs.frozen(kw_only=True)
class TensorParallel:
    """Tensor parallelism over the mesh axis ``axis``: ``plan`` maps parameter-owning
    module names (fnmatch patterns) to ``"colwise"`` or ``"rowwise"``. Composed with
    ``data_parallel`` (``None`` or ``"fsdp"``) over ``dp_axis`` on a 2-D mesh. Every process
    of a tensor-parallel group must get the same batch: give ``xf.DataLoader`` the
    data-parallel rank and size (``rank=mesh["dp"].get_local_rank(), world_size=...``)."""

    plan: Mapping[str, str]
    axis: str = "tp"
    data_parallel: str | None = None
    dp_axis: str = "dp"
    name = "tp"

    def __attrs_post_init__(self):
        bad = {k: v for k, v in self.plan.items() if v not in ("colwise", "rowwise")}
        if bad:
            raise ValueError(f"TensorParallel: plan values must be 'colwise' or 'rowwise', got {bad}")
        if self.data_parallel not in (None, "fsdp"):
            raise ValueError(
                f"TensorParallel: data_parallel must be None or 'fsdp', got {self.data_parallel!r}"
            )


Strategy = Replicate | ZeRO | FullyShard | HybridShard | TensorParallel

STRATEGIES: dict[str, Strategy] = {
    "replicate": Replicate(),
    "ddp": Replicate(),
    "zero1": ZeRO(stage=1),
    "zero2": ZeRO(stage=2),
    "zero3": FullyShard(),
    "fsdp": FullyShard(),
    "hsdp": HybridShard(),
}


def parse_strategy(strategy: "str | Strategy") -> Strategy:
    if isinstance(strategy, (Replicate, ZeRO, FullyShard, TensorParallel)):
        return strategy
    if isinstance(strategy, str) and strategy.lower() in STRATEGIES:
        return STRATEGIES[strategy.lower()]
    raise ValueError(
        f"shard: unknown strategy {strategy!r}; use one of {sorted(STRATEGIES)} or a strategy object "
        "(xf.Replicate(...), xf.ZeRO(stage=...), xf.FullyShard(...), xf.HybridShard(...), xf.TensorParallel(...))"
    )


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
        backend: the backend's name in ``xform._backend.BACKENDS`` (default ``"torch"``).

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
