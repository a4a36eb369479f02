"""The native backend: ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Strategies and how they are built:

- replicate, zero1, zero2 (``_DataParallel``): own c10d code. The step takes gradients with
  ``torch.autograd.grad``; hooks on the parameters copy each gradient into a flat bucket
  as autograd produces it and start an async all-reduce (replicate, zero1) or
  reduce-scatter (zero2) when a bucket is full, so communication overlaps the rest of
  the backward pass, as DDP does. Buckets are launched strictly in order, so every
  process issues the same collectives in the same order.
- zero3/fsdp, hsdp (``_FullyShard``): ``torch.distributed.fsdp.fully_shard`` (FSDP2). Its
  per-module gather/free and reduce-scatter are module hooks that fire during
  ``.backward()``, so under these strategies ``value_and_grad`` takes gradients with
  ``.backward()`` (``Handler.uses_backward``) and reads the sharded ``.grad``s. Rewriting
  FSDP2's prefetching and memory management for ``autograd.grad`` would duplicate it for
  no gain in semantics.
- tensor parallel (``_TensorParallel``): DTensor ``parallelize_module``, optionally with
  FSDP2 over the data-parallel mesh axis.
"""

from __future__ import annotations

import fractions
import functools
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from xform._primitives import Handler, Reducer, handlers
from xform._shard import FullyShard, HybridShard, Replicate, TensorParallel, ZeRO
from xform._optim import adopt_opt_state, build_optimizer, local_part, optimizer_step, placeholder_opt_state
from xform._state import TrainState

__all__ = ["TorchBackend"]



# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only
# the old ones. Looked up at each call, so that tools counting collectives see them.
def _all_gather(*args: Any, **kwargs: Any) -> Any:
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter(*args: Any, **kwargs: Any) -> Any:
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


class TorchBackend:
    name = "torch"

    def layout(self, strategy: Any, mesh: Any, *, inner: Any = None):
        if isinstance(strategy, (Replicate, ZeRO)):
            return _DataParallel(strategy, mesh)
        if isinstance(strategy, FullyShard):
            return _FullyShard(strategy, mesh, inner)
        if isinstance(strategy, TensorParallel):
            return _TensorParallel(strategy, mesh, inner)
        raise TypeError(f"shard: the torch backend has no strategy {strategy!r}")


# --- process groups ---------------------------------------------------------------------


def _default_group() -> tuple[Any, int, int]:
    """(group, rank, world) of all processes; (None, 0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "shard: WORLD_SIZE is set but no process group is initialized; call "
            "xf.distributed.initialize() at the start of the script"
        )
    return None, 0, 1


def _mesh_group(mesh: Any, axis: str | None = None) -> tuple[Any, int, int]:
    if mesh is None:
        return _default_group()
    sub = mesh if axis is None else mesh[axis]
    group = sub.get_group()
    return group, dist.get_rank(group), dist.get_world_size(group)


def _broadcast_state(state: TrainState, group: Any, src_rank_in_group: int = 0) -> None:
    """Makes params and buffers equal to the first process's, in place."""
    if group is None:
        return
    src = dist.get_global_rank(group, src_rank_in_group) if group is not dist.group.WORLD else src_rank_in_group
    with torch.no_grad():
        for t in list(state.params.values()) + list(state.buffers.values()):
            dist.broadcast(local_part(t.detach()), src=src, group=group)


def _global_count(count: Any, group: Any, world: int, device: torch.device) -> Any:
    """The item count summed over the data-parallel processes."""
    if isinstance(count, fractions.Fraction):  # plain losses: the same on every process
        return count * world
    t = torch.as_tensor(count, device=device).detach().to(torch.float64).reshape(())
    if group is not None:
        t = t.clone()
        dist.all_reduce(t, group=group)
    return float(t)


def _inner_at_last_piece(me: Handler) -> bool:
    stack = handlers()
    return all(h.at_last_piece() for h in stack[stack.index(me) + 1 :] if h.reduces)


# --- replicate, zero1, zero2 ----------------------------------------------------------------


class _Entry:
    __slots__ = ("name", "shape", "numel", "rows", "rowsize", "lo", "hi", "chunk", "bucket", "offset", "soffset", "sharded")

    def __init__(self, name: str, t: torch.Tensor, rank: int, world: int, sharded: bool):
        self.name, self.shape, self.numel = name, t.shape, t.numel()
        self.sharded = sharded and t.dim() > 0
        self.rows = t.shape[0] if t.dim() > 0 else 1
        self.rowsize = self.numel // self.rows if self.rows else 0
        per = math.ceil(self.rows / world) if self.sharded else self.rows
        self.lo = min(rank * per, self.rows) if self.sharded else 0
        self.hi = min(self.lo + per, self.rows) if self.sharded else self.rows
        self.chunk = per * self.rowsize  # elements per process in the bucket layout
        self.bucket = self.offset = self.soffset = 0  # offsets in the whole and the per-process layout

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.hi - self.lo, *self.shape[1:]) if self.sharded else tuple(self.shape)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor shaped like the parameter (a view)."""
        return full[self.lo : self.hi] if self.sharded else full


_FIRST_BUCKET_BYTES = 2**20  # DDP's default first bucket: communication starts early in backward


class _Plan:
    """Trainable params in buckets of about ``bucket_mb``, in reverse order (the order in
    which backward tends to produce their gradients). ``sharded`` entries are laid out
    process-major inside a bucket, ready for reduce-scatter and all-gather.

    Buckets are cut as DDP cuts them: a tensor joins the open bucket, which closes once
    it holds at least the limit (so a bias shares its weight's bucket instead of costing
    a collective of its own), and the first bucket's limit is at most 1 MiB, so that the
    first collective starts as soon as the last layers' gradients are ready."""

    def __init__(self, params: dict[str, torch.Tensor], names, rank: int, world: int, bucket_mb: float, sharded: bool):
        self.world, self.rank = world, rank
        self.entries = {k: _Entry(k, params[k], rank, world, sharded) for k in names}
        self.buckets: list[list[_Entry]] = []
        self.sizes: list[int] = []  # elements per bucket, whole
        self.ssizes: list[int] = []  # elements per bucket and process, sharded layout
        self.numels: list[list[int]] = []  # elements of each entry, per bucket
        limit = max(1, int(bucket_mb * 2**20))
        group = [e for e in reversed(list(self.entries.values())) if e.sharded or not sharded]
        rest = [e for e in self.entries.values() if sharded and not e.sharded]  # 0-dim: replicated
        current: list[_Entry] = []
        size = 0
        for e in group:
            current.append(e)
            size += (e.chunk * world if e.sharded else e.numel) * params[e.name].element_size()
            if size >= (min(limit, _FIRST_BUCKET_BYTES) if not self.buckets else limit):
                self._close(current)
                current, size = [], 0
        if current:
            self._close(current)
        self.replicated = rest  # reduced by one all-reduce after the sharded buckets
        for e in rest:
            e.bucket = len(self.buckets)
        if rest:
            self._close(rest)
        self.names = list(names)
        self.n_params, self.first = len(params), next(iter(params))

    def _close(self, entries: list[_Entry]) -> None:
        offset = soffset = 0
        for e in entries:
            e.bucket, e.offset, e.soffset = len(self.buckets), offset, soffset
            offset += e.numel
            soffset += e.chunk
        self.buckets.append(entries)
        self.sizes.append(offset)
        self.ssizes.append(soffset)
        self.numels.append([e.numel for e in entries])


class _Comm:
    """One step's gradient communication: buckets filled by hooks, launched in order."""

    def __init__(self, plan: _Plan, group: Any, scatter: bool, dtype: torch.dtype, device: torch.device):
        self.plan, self.group, self.scatter = plan, group, scatter
        n = len(plan.buckets)
        self.scattered = [scatter and bool(b) and b[0].sharded for b in plan.buckets]
        self.dtype, self.device = dtype, device
        # Reduce-scatter send buffers are made when their first gradient arrives and let go
        # once sent, so zero2 holds whole gradients only for the buckets in flight.
        self.bufs: list[torch.Tensor | None] = [
            None if sc else torch.empty(size, dtype=dtype, device=device)
            for size, sc in zip(plan.sizes, self.scattered)
        ]
        self.outs = [torch.empty(ssize, dtype=dtype, device=device) if sc else None for ssize, sc in zip(plan.ssizes, self.scattered)]
        # The reduced gradients, made once per step: views of the buckets shaped like the
        # params (all-reduce; the hooks copy into them and hand them to autograd) or like
        # this process's rows (reduce-scatter).
        self.grads: dict[str, torch.Tensor] = {}
        for i, entries in enumerate(plan.buckets):
            if self.scattered[i]:
                for e in entries:
                    n_local = (e.hi - e.lo) * e.rowsize
                    self.grads[e.name] = self.outs[i][e.soffset : e.soffset + n_local].view(e.local_shape)
            else:
                for e, piece in zip(entries, self.bufs[i].split(plan.numels[i])):
                    self.grads[e.name] = piece.view(e.shape)
        self.filled = [0] * n
        self.works: list[Any] = [None] * n
        self.next = 0
        self.seen: set[str] = set()
        self.hooks: list[Any] = []

    def install(self, params: dict[str, torch.Tensor]) -> None:
        for k in self.plan.names:
            self.hooks.append(params[k].register_hook(functools.partial(self._hook, k)))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def _copy_in(self, e: _Entry, g: torch.Tensor) -> None:
        buf = self.bufs[e.bucket]
        if self.scattered[e.bucket]:
            w, size = self.plan.world, self.plan.ssizes[e.bucket]
            if buf is None:
                buf = self.bufs[e.bucket] = torch.empty(size * w, dtype=self.dtype, device=self.device)
            flat = g.reshape(-1)
            pad = e.chunk * w - e.numel
            if pad:
                flat = torch.nn.functional.pad(flat, (0, pad))
            buf.view(w, size)[:, e.soffset : e.soffset + e.chunk].copy_(flat.view(w, e.chunk))
        else:
            self.grads[e.name].copy_(g)
        self.seen.add(e.name)
        self.filled[e.bucket] += 1

    def _hook(self, name: str, g: torch.Tensor):
        e = self.plan.entries[name]
        self._copy_in(e, g)
        self._launch_ready()
        if self.scattered[e.bucket]:
            return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)  # free the full gradient
        return self.grads[name]

    def _launch_ready(self) -> None:
        for i in range(self.next):  # drop send buffers whose reduce-scatter is done
            if self.scattered[i] and self.bufs[i] is not None and self.works[i].is_completed():
                self.bufs[i] = None
        while self.next < len(self.bufs) and self.filled[self.next] == len(self.plan.buckets[self.next]):
            i = self.next
            if self.scattered[i]:
                self.works[i] = _reduce_scatter(self.outs[i], self.bufs[i], group=self.group, async_op=True)
            else:
                self.works[i] = dist.all_reduce(self.bufs[i], group=self.group, async_op=True)
            self.next += 1

    def finish(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sends what the hooks did not (unused params: zeros), waits, and returns the
        reduced gradients: whole (all-reduce) or this process's rows (reduce-scatter)."""
        for k in self.plan.names:
            if k not in self.seen:
                self._copy_in(self.plan.entries[k], grads[k])
        self._launch_ready()
        for w in self.works:
            w.wait()
        self.bufs = [None if sc else b for b, sc in zip(self.bufs, self.scattered)]
        return {k: self.grads[k] for k in self.plan.names}


class _DataParallel:
    """replicate / zero1 / zero2 over one data-parallel group."""

    def __init__(self, strategy: Replicate | ZeRO, mesh: Any):
        self.strategy = strategy
        self.mesh = mesh
        self.sharded = isinstance(strategy, ZeRO)
        self.scatter = isinstance(strategy, ZeRO) and strategy.stage == 2
        self._plan: _Plan | None = None  # the bucket layout, built once per model

    def group(self) -> tuple[Any, int, int]:
        return _mesh_group(self.mesh, None)

    def plan(self, params: dict[str, torch.Tensor]) -> _Plan:
        plan = self._plan
        if plan is None or plan.n_params != len(params) or plan.first != next(iter(params)):
            _, rank, world = self.group()
            names = [k for k, p in params.items() if p.requires_grad]
            plan = self._plan = _Plan(params, names, rank, world, self.strategy.bucket_mb, self.sharded)
        return plan

    def init(self, state: TrainState) -> TrainState:
        group, _, world = self.group()
        if group is None:
            return state
        _broadcast_state(state, group)
        if not self.sharded:
            return state
        return _shard_opt_state(state, self.plan(state.params), self.mesh)

    def handler(self) -> Handler:
        group, _, world = self.group()
        if group is None:
            return Handler()
        return _DataParallelHandler(self, group, world)


def _shard_opt_state(state: TrainState, plan: _Plan, mesh: Any) -> TrainState:
    """Optimizer state as DTensors sharded by rows (global shape = the param's), so a
    checkpoint reshards to any world size or strategy."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.device_mesh import init_device_mesh

    _check_fresh(state)
    if mesh is None:
        mesh = init_device_mesh(_device_type(), (plan.world,))
    names = state._spec.trainable
    local = {k: plan.entries[k].local(state.params[k].detach()) for k in names}
    placeholders = placeholder_opt_state(state._spec.optimizer, local, names)
    out = {}
    for k in names:
        e, full = plan.entries[k], state.params[k]
        out[k] = {
            key: DTensor.from_local(v, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
            if e.sharded and isinstance(v, torch.Tensor) and v.shape == local[k].shape
            else v
            for key, v in placeholders[k].items()
        }
    return state.replace(opt_state={"initialized": False, "state": out})


class _DataParallelHandler(Reducer):
    overlaps = True

    def __init__(self, layout: _DataParallel, group: Any, world: int):
        super().__init__()
        self.layout, self.group, self.pieces = layout, group, world
        self.reduced = False

    def value_and_grad(self, fn, params, has_aux, next):
        if not _inner_at_last_piece(self):  # accumulate: communicate only on the last micro-batch
            return next(fn, params, has_aux)
        comm = self._comm(params)
        comm.install(params)
        try:
            value, grads = next(fn, params, has_aux)
        finally:
            comm.remove()
        self.reduced = True
        return value, comm.finish(grads)

    def _comm(self, params: dict[str, torch.Tensor]) -> _Comm:
        plan = self.layout.plan(params)
        p = params[plan.names[0]]
        return _Comm(plan, self.group, self.layout.scatter, p.dtype, p.device)

    def apply_gradients(self, state, grads, count, next):
        count = self.take_count(count)
        if not self.reduced:  # gradients that did not come from value_and_grad's hooks
            grads = self._comm(state.params).finish(grads)
        return next(state, grads, _global_count(count, self.group, self.pieces, state._spec.device))

    def update(self, state: TrainState, grads, next):
        if not self.layout.sharded:
            return next(state, grads)
        return _zero_update(self.layout, state, grads, self.group)


def _zero_update(layout: _DataParallel, state: TrainState, grads: dict[str, torch.Tensor], group: Any) -> TrainState:
    plan = layout.plan(state.params)
    names = plan.names
    rt = state._runtime("TrainState.apply_gradients")
    key = ("zero", id(layout))
    cache = rt.extras.get(key)
    opt_state = state.opt_state
    if cache is None:
        views = [plan.entries[k].local(state.params[k].detach()) for k in names]
        local_state = {"initialized": opt_state["initialized"], "state": {
            k: {kk: local_part(v) for kk, v in opt_state["state"][k].items()} for k in names}}
        cache = rt.extras[key] = (views, build_optimizer(state._spec.optimizer, names, views, local_state))
    views, optimizer = cache
    local_grads = [grads[k] if layout.scatter and plan.entries[k].sharded else plan.entries[k].local(grads[k]) for k in names]

    def total_norm(gs: list[torch.Tensor]) -> torch.Tensor:
        """The whole gradient's norm: this process's rows summed over the group, plus the
        replicated (0-dim) params once."""
        owned = [g for g, k in zip(gs, names) if plan.entries[k].sharded]
        shared = [g for g, k in zip(gs, names) if not plan.entries[k].sharded]
        sq = _square_sum(owned, gs[0].device)
        dist.all_reduce(sq, group=group)
        return (sq + _square_sum(shared, gs[0].device)).sqrt().to(gs[0].dtype)

    optimizer_step(state, optimizer, views, local_grads, total_norm=total_norm)
    _all_gather_params(plan, state.params, group)
    if not opt_state["initialized"]:
        opt_state = {"initialized": True, "state": adopt_opt_state(optimizer, names, views, opt_state)}
    return state.successor(updated=True, opt_state=opt_state)


def _square_sum(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


def _all_gather_params(plan: _Plan, params: dict[str, torch.Tensor], group: Any) -> None:
    """Every process's updated rows to every process, one all-gather per bucket."""
    w = plan.world
    with torch.no_grad():
        for entries, size in zip(plan.buckets, plan.ssizes):
            if not entries or not entries[0].sharded:
                continue
            p0 = params[entries[0].name]
            mine = torch.zeros(size, dtype=p0.dtype, device=p0.device)
            for e in entries:
                n = (e.hi - e.lo) * e.rowsize
                mine[e.soffset : e.soffset + n].copy_(params[e.name].detach().reshape(-1)[e.lo * e.rowsize : e.hi * e.rowsize])
            out = torch.empty(size * w, dtype=p0.dtype, device=p0.device)
            _all_gather(out, mine, group=group)
            grid = out.view(w, size)
            for e in entries:
                full = grid[:, e.soffset : e.soffset + e.chunk].reshape(-1)[: e.numel]
                params[e.name].detach().view(-1).copy_(full)


# --- zero3 / fsdp, hsdp: FSDP2 ----------------------------------------------------------------


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _check_fresh(state: TrainState) -> None:
    if state.opt_state["initialized"]:
        raise ValueError(
            "shard: lay the state out with step.init(state) before training; this state's optimizer "
            "state is already initialized"
        )


def _fully_shard_units(module: torch.nn.Module, mesh: Any, strategy: FullyShard, policy: Any) -> None:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    compute = getattr(policy, "compute_dtype", None)
    lower = compute is not None and compute != torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute if lower else None, reduce_dtype=strategy.reduce_dtype if lower else None)
    choose = strategy.units or (lambda m: any(p is not None for p in m._parameters.values()))
    units = [m for _, m in module.named_modules() if m is not module and choose(m)]
    for unit in reversed(units):  # children before their parents
        fully_shard(unit, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, mp_policy=mp)
    fully_shard(module, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, mp_policy=mp)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sums: xform divides by the global item count
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no AVG/PREMUL_SUM)


def _relaid(state: TrainState) -> TrainState:
    """The state over the module's new (DTensor) parameters; the old state is used up."""
    params = dict(state.module.named_parameters())
    names = state._spec.trainable
    opt = {"initialized": False, "state": placeholder_opt_state(state._spec.optimizer, params, names)}
    return state._relaid("shard's step.init, which laid its params out", params=params, opt_state=opt)


class _FullyShard:
    def __init__(self, strategy: FullyShard, mesh: Any, inner: Any):
        self.strategy, self.mesh = strategy, mesh
        self.policy = getattr(inner, "policy", None)  # mixed_precision inside shard

    def dp_mesh(self) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        s = self.strategy
        if isinstance(s, HybridShard):
            names = getattr(self.mesh, "mesh_dim_names", None) or ()
            if s.replicate_axis not in names or s.shard_axis not in names:
                raise ValueError(
                    f"shard(hsdp): needs a mesh with axes {s.replicate_axis!r} and {s.shard_axis!r}, got "
                    f"{names or self.mesh}; pass mesh=xf.mesh({s.replicate_axis}=R, {s.shard_axis}=S)"
                )
            return self.mesh[(s.replicate_axis, s.shard_axis)]
        if self.mesh is not None:
            if self.mesh.ndim != 1:
                raise ValueError(
                    f"shard(zero3): needs a 1-D mesh, got axes {self.mesh.mesh_dim_names}; use 'hsdp' for 2-D"
                )
            return self.mesh
        return init_device_mesh(_device_type(), (dist.get_world_size(),))

    def init(self, state: TrainState) -> TrainState:
        group, _, _ = _default_group()
        if group is None:
            return state
        _check_fresh(state)
        _broadcast_state(state, group)
        _fully_shard_units(state.module, self.dp_mesh(), self.strategy, self.policy)
        return _relaid(state)

    def handler(self) -> Handler:
        group, _, world = _default_group()
        if group is None:
            return Handler()
        return _BackwardReducer(group, world)


class _BackwardReducer(Reducer):
    """Gradients from ``.backward()`` through module hooks (FSDP2, DTensor), already
    reduced; only the item count needs summing over the data-parallel group."""

    uses_backward = True

    def __init__(self, group: Any, world: int, *, uses_backward: bool = True):
        super().__init__()
        self.group, self.pieces, self.uses_backward = group, world, uses_backward

    def apply(self, state, params, args, kwargs, next):
        if params is not state.params:
            raise ValueError(
                "shard: under a sharding strategy, xf.apply must be given the params that "
                "xf.value_and_grad passes to the loss function (state.params)"
            )
        return next(state, params, args, kwargs)

    def apply_gradients(self, state, grads, count, next):
        count = self.take_count(count)
        return next(state, grads, _global_count(count, self.group, self.pieces, state._spec.device))


# --- tensor parallel ----------------------------------------------------------------------------


class _TensorParallel:
    def __init__(self, strategy: TensorParallel, mesh: Any, inner: Any):
        self.strategy, self.mesh = strategy, mesh
        self.policy = getattr(inner, "policy", None)

    def _check_mesh(self) -> None:
        s = self.strategy
        names = getattr(self.mesh, "mesh_dim_names", None) or ()
        need = [s.axis] + ([s.dp_axis] if s.data_parallel else [])
        if self.mesh is None or any(n not in names for n in need):
            raise ValueError(
                f"shard(tp): needs a mesh with axes {need}, got {names or self.mesh}; pass e.g. "
                f"mesh=xf.mesh({s.dp_axis}=2, {s.axis}=2)"
            )

    def init(self, state: TrainState) -> TrainState:
        import fnmatch

        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        self._check_mesh()
        _check_fresh(state)
        _broadcast_state(state, dist.group.WORLD)
        s = self.strategy
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        plan = {}
        for name, _ in state.module.named_modules():
            for pattern, style in s.plan.items():
                if name and fnmatch.fnmatchcase(name, pattern):
                    plan[name] = styles[style]()
        if not plan:
            raise ValueError(f"shard(tp): the plan {dict(s.plan)} matches no module of {type(state.module).__name__}")
        size = self.mesh[s.axis].size()
        modules = dict(state.module.named_modules())
        for name, style in plan.items():
            weight = getattr(modules[name], "weight", None)
            dim = 0 if isinstance(style, ColwiseParallel) else 1
            if weight is None or weight.dim() < 2 - dim:
                raise ValueError(f"shard(tp): module {name!r} has no weight to split; plan only Linear-like modules")
            if weight.shape[dim] % size:
                kind = "output features" if dim == 0 else "input features"
                raise ValueError(
                    f"shard(tp): {name!r} has {weight.shape[dim]} {kind}, which the {size} processes of mesh axis "
                    f"{s.axis!r} cannot split evenly; make it a multiple of {size} or leave {name!r} out of the plan"
                )
        parallelize_module(state.module, self.mesh[s.axis], plan)
        if s.data_parallel == "fsdp":
            _fully_shard_units(state.module, self.mesh[s.dp_axis], FullyShard(), self.policy)
        return _relaid(state)

    def handler(self) -> Handler:
        s = self.strategy
        if s.data_parallel:
            sub = self.mesh[s.dp_axis]
            group, world = sub.get_group(), sub.size()
        else:
            group, world = None, 1
        return _BackwardReducer(group, world, uses_backward=s.data_parallel == "fsdp")
