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

import fractions
from typing import Any, Callable

import torch
import torch.distributed as dist

from xform import tree
from xform.core.backend import get_backend
from xform.core.group import group_up
from xform.core.strategies import (  # noqa: F401  (re-exported)
    STRATEGIES, FullyShard, HybridShard, Replicate, Strategy, TensorParallel, ZeRO, parse_strategy,
)
from xform.core.primitives import Handler, installed
from xform.core.state import TrainState, sharded_update
from xform.core.transform import check_step, transforms_of, wrap

__all__ = [
    "Replicate", "ZeRO", "FullyShard", "HybridShard", "TensorParallel", "STRATEGIES", "parse_strategy",
    "mesh", "shard",
]


def mesh(**axes: int):
    """A ``DeviceMesh`` over all processes with named axes, outermost first.

    Example: ``xf.mesh(dp=2, tp=2)`` on 4 processes; ``xf.mesh(replicate=2, shard=4)``
    for HSDP on 8. The product of the sizes must be the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not axes:
        raise ValueError("mesh: name at least one axis, e.g. xf.mesh(dp=2, tp=2)")
    if not group_up():
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
    processes (rank 0's), sharded ones are split. The state remembers it (a tag in its
    static part, kept by ``replace``, ``tree.map`` and ``xf.load(path, like=...)``), and the
    step refuses a state not laid out for its strategy. On one process without a process
    group the step runs unchanged (after the same check).

    Every process takes the same decision on each update: whether the gradient is finite
    is agreed by one small all-reduce per step, so a NaN or an fp16 overflow in one
    process's shard is skipped by all of them (``TrainState.create``'s
    ``max_consecutive_skips``). The same all-reduce carries each process's batch size: with
    a plain mean loss, batches of unequal sizes are refused (with ``xf.Mean`` losses they
    are exact and allowed).
    """
    check_step("shard", step)
    strategy = parse_strategy(strategy)
    if "shard" in transforms_of(step):
        raise ValueError("shard: this step is already sharded; apply shard once, outermost")
    if backend is None:  # a strategy object may imply its backend (xf.DeepSpeed)
        backend = getattr(strategy, "backend", None)
    layout = get_backend(backend).layout(strategy, mesh, inner=step)
    # A layout whose engine runs the whole step (DeepSpeed: backward, accumulation, loss
    # scale, optimizer) gives ``run(state, batch)``; shard then only checks the layout tag.
    engine_run = getattr(layout, "run", None)
    tag = _Tag(strategy, mesh)
    runs_optimizer = getattr(type(layout), "runs_optimizer", None) is not None
    # Gradients all-reduced whole are the same on every process: so is their finiteness.
    whole = isinstance(strategy, Replicate) or (isinstance(strategy, ZeRO) and strategy.stage == 1)

    def init(state: TrainState) -> TrainState:
        return layout.init(state)._laid_out(tag)

    def call(state: TrainState, batch: Any):
        laid_out = state._spec.layout
        if laid_out is not tag and laid_out != tag:
            raise ValueError(_not_laid_out(laid_out, tag))
        if engine_run is not None:
            return engine_run(state, batch)
        handler = layout.handler()
        if not handler.reduces:  # one process, no process group: the plain step
            with installed(handler):
                return step(state, batch)
        zero = layout if runs_optimizer and layout.runs_optimizer else None
        rows = _rows(batch)
        if hasattr(handler, "rows"):  # a reducer that carries the batch sizes with the gradient
            handler.rows = rows
        if hasattr(handler, "prepare"):  # a pipeline: takes the step's loss function per micro-batch
            with installed(handler):
                handler.prepare(step, state, batch)
        with installed(handler), installed(_Guard(handler, rows, zero, whole)):
            return step(state, batch)

    return wrap(
        step, call, init,
        name="shard", strategy=strategy,
    )


class _Tag:
    """What ``shard``'s init lays a state out for (kept in the state's static part)."""

    __slots__ = ("strategy", "mesh")

    def __init__(self, strategy: Any, mesh: Any):
        self.strategy, self.mesh = strategy, mesh

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Tag) and self.strategy == other.strategy and (
            self.mesh is other.mesh or self.mesh == other.mesh
        )

    def __hash__(self) -> int:
        return hash(type(self.strategy))

    def __str__(self) -> str:
        return f"shard({self.strategy.name!r})"


def _not_laid_out(laid_out: Any, tag: _Tag) -> str:
    if laid_out is None:
        what = f"was not laid out for {tag}"
    else:
        what = f"was laid out for {laid_out}{'' if laid_out.mesh == tag.mesh else ' on another mesh'}, not for {tag}"
    return (
        f"shard: this state {what}; call state = step.init(state) with this step right after "
        "TrainState.create (or load a checkpoint with xf.load(path, like=step.init(fresh_state)))"
    )


def _rows(batch: Any) -> int:
    """The batch's leading size: of its first tensor with a batch dimension (0 if none)."""
    first = next(iter(batch.values()), None) if type(batch) is dict else batch
    if type(first) is torch.Tensor and first.dim() > 0:
        return first.shape[0]
    for leaf in tree.leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return 0


_UNEQUAL = (
    "shard: the processes got batches of unequal sizes ({mine} rows on this process, {total} over {world} "
    "processes) with a plain mean loss, which weights every process alike and would not equal the step "
    "on the global batch; give every process the same number of rows (xf.DataLoader does), or return "
    "the loss as xf.Mean(sum, count) to normalize by the global count"
)
_TWICE = (
    "shard: the step called state.apply_gradients twice; a step must call it exactly once "
    "(sum the losses, or the grads, and apply them once)"
)


class _Guard(Handler):
    """``shard``'s own handler, inside the backend's: one ``apply_gradients`` per call, and
    the update's "is the gradient finite" agreed by every process, so that all of them
    skip or update together (one small all-reduce, which also carries the batch sizes;
    none when the gradient was all-reduced whole and the loss is an ``xf.Mean``, for which
    unequal batches are exact)."""

    def __init__(self, reducer: Handler, rows: int, zero: Any, whole: bool):
        self.reducer, self.rows, self.zero, self.whole = reducer, rows, zero, whole
        self.run = self._run_zero if zero is not None else None
        self.calls = 0
        self.plain = False
        self.squares: torch.Tensor | None = None  # ZeRO's clipping norm, folded into agree's all-reduce

    def apply_gradients(self, state, grads, count, next):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(_TWICE)
        pending = count if count is not None else getattr(self.reducer, "pending", None)
        self.plain = isinstance(pending, fractions.Fraction)  # a plain mean: counts assume equal pieces
        return next(state, grads, count)

    def update(self, state, grads, next):
        with sharded_update(self):
            return next(state, grads)

    def agree(self, state: TrainState, grads: dict[str, torch.Tensor], bad: torch.Tensor) -> bool:
        squares = self.zero.owned_squares(state, grads) if self.zero is not None else None
        if self.whole and squares is None:  # the gradient was all-reduced whole: so was its NaN
            if not self.plain:
                return not bool(bad)
            sizes = getattr(self.reducer, "sizes", None)
            if sizes is not None:  # the batch sizes rode on the gradient's all-reduce
                every = sizes.tolist()
                if min(every) != max(every):
                    raise ValueError(_UNEQUAL.format(mine=self.rows, total=int(sum(every)), world=len(every)))
                return not bool(bad)
        group = self.zero.group()[0] if self.zero is not None else None
        n = float(self.rows)
        status = torch.full((3 if squares is None else 4,), n, dtype=torch.float64, device=bad.device)
        status[0].copy_(bad)
        status[2].fill_(n * n)
        if squares is not None:
            status[3].copy_(squares)
        dist.all_reduce(status, group=group)
        nonfinite, total, sum_of_squares = status[:3].tolist()  # the step's one host read
        world = dist.get_world_size(group)
        if self.plain and world * sum_of_squares != total * total:  # sizes differ (Cauchy-Schwarz)
            raise ValueError(_UNEQUAL.format(mine=self.rows, total=int(total), world=world))
        self.squares = status[3] if squares is not None else None
        return nonfinite == 0

    def _run_zero(self, state: TrainState, grads: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.zero.optimizer_update(state, grads, self.squares)
