"""replicate, zero1, zero2: own c10d code, gradients in buckets started from autograd hooks."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist

from xform.core.optim import adopt_opt_state, build_optimizer, local_part, optimizer_step, placeholder_opt_state
from xform.core.backend import cached, static
from xform.core.primitives import Handler, Reducer, handlers, tracing
from xform.core.state import TrainState
from xform.core.strategies import Replicate, ZeRO

from .common import (
    _all_gather, _check_fresh, _device_type, _global_count, _mesh_group, _reduce_scatter,
    _broadcast_state,
)

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

    def overlaps(self, scatter: bool) -> bool:
        """Whether gradients are sent as autograd produces them (hooks): with several
        buckets, or reduce-scattered ones; a single all-reduced bucket has nothing to
        overlap and is sent after backward."""
        return len(self.buckets) > 1 or (scatter and any(b and b[0].sharded for b in self.buckets))

    def _close(self, entries: list[_Entry]) -> None:
        offset = soffset = 0
        for e in entries:
            e.bucket, e.offset, e.soffset = len(self.buckets), offset, soffset
            offset += e.numel
            soffset += e.chunk
        self.buckets.append(entries)
        self.sizes.append(offset)
        self.ssizes.append(soffset)


class _Comm:
    """A plan's gradient communication: buckets filled by hooks as autograd produces the
    gradients, launched in order.

    Made once per model and dtype and reused by every step, as DDP keeps its buckets: a
    fresh bucket each step would cost, on CPU, the page faults of its first write (glibc
    maps large blocks afresh). The gradients a step hands out are views of the buckets,
    made for that step and not kept: when the next step begins, a bucket whose memory any
    tensor still views (a gradient of an earlier step kept by the caller) gets fresh
    memory, so a kept gradient is never overwritten. With a single all-reduced bucket
    nothing could be sent before backward ends, so no hooks are registered: the gradients
    are copied in after it, in one call."""

    def __init__(self, plan: _Plan, group: Any, scatter: bool, dtype: torch.dtype, device: torch.device):
        self.plan, self.group, self.scatter = plan, group, scatter
        self.sum = dist.AllreduceOptions()
        self.sum.reduceOp = dist.ReduceOp.SUM
        n = len(plan.buckets)
        self.scattered = [scatter and bool(b) and b[0].sharded for b in plan.buckets]
        self.any_scattered = any(self.scattered)
        self.hooked = plan.overlaps(scatter)  # else one bucket: copied in after backward
        self.dtype, self.device = dtype, device
        # The batch sizes of all processes ride on the last all-reduced bucket: ``world``
        # more elements, this process's size in its own slot, so every process reads every
        # size exactly after the all-reduce, at no extra collective (float32 counts are exact
        # up to 2**24). None when there is no such bucket or the dtype cannot hold the count.
        self.tail = None
        if dtype in (torch.float32, torch.float64):
            self.tail = next((i for i in reversed(range(n)) if not self.scattered[i]), None)
        self.counts = [len(b) for b in plan.buckets]  # gradients per bucket
        self.bucket_of = {k: plan.entries[k].bucket for k in plan.names}
        hook = self._hook if self.any_scattered else self._hook_whole
        self.fns = {k: functools.partial(hook, k) for k in plan.names}
        # Where each gradient lies, in the params' order: (name, bucket, start, stop, shape)
        # in the bucket's memory: the whole param (all-reduce) or this process's rows
        # (reduce-scatter).
        self.index = []
        for k in plan.names:
            e = plan.entries[k]
            if self.scattered[e.bucket]:
                self.index.append((k, e.bucket, e.soffset, e.soffset + (e.hi - e.lo) * e.rowsize, e.local_shape))
            else:
                self.index.append((k, e.bucket, e.offset, e.offset + e.numel, e.shape))
        # The all-reduced buckets' views made in one call each (torch's own unflatten, which
        # reads only the shapes of its templates: meta tensors): (bucket, names, templates).
        self.flat = [
            (i, [e.name for e in b], [torch.empty(e.shape, device="meta") for e in b])
            for i, b in enumerate(plan.buckets) if not self.scattered[i]
        ]
        # Per bucket: the all-reduce buffer (reduce-scatter: the send buffer, made when its
        # first gradient arrives and let go once sent, so zero2 holds whole gradients only
        # for the buckets in flight), the reduce-scatter output, and the one of them the
        # gradients view, with its storage's use count while no gradient views it.
        self.bufs: list[torch.Tensor | None] = [None] * n
        self.outs: list[torch.Tensor | None] = [None] * n
        self.held: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        self.uses = [0] * n
        self.tail_view: torch.Tensor | None = None
        for i in range(n):
            self._allocate(i)
        self.grads: dict[str, torch.Tensor] = {}  # this step's gradients: views of the buckets
        self.sizes: torch.Tensor | None = None  # every process's batch size, once reduced
        self.filled = [0] * n
        self.works: list[Any] = [None] * n
        self.next = 0
        self.seen: set[str] = set()
        self.sums: list[dict[str, torch.Tensor]] = []  # earlier micro-batches' gradient sums (Reducer.fold)
        self.hooks: list[Any] = []

    def _allocate(self, i: int) -> None:
        """Fresh memory for bucket ``i``."""
        plan = self.plan
        if self.scattered[i]:
            out = self.outs[i] = torch.empty(plan.ssizes[i], dtype=self.dtype, device=self.device)
        else:
            extra = plan.world if i == self.tail else 0
            out = self.bufs[i] = torch.empty(plan.sizes[i] + extra, dtype=self.dtype, device=self.device)
            if extra:
                self.tail_view = out[plan.sizes[i] :]
        self.held[i] = out
        self.uses[i] = _uses(out)

    def begin(self, rows: int | None) -> None:
        """Readies the buckets for a step and makes its gradient views; ``rows``: this
        process's batch size, to carry."""
        held = self.held
        traced = tracing() is not None  # a comm made for this trace: nothing to reuse
        if not traced:
            for i, out in enumerate(held):
                uses = _uses(out)
                if uses < 0 or uses != self.uses[i]:  # an earlier step's gradient is still referenced
                    self._allocate(i)
        if not traced and not self.any_scattered:
            views: dict[str, torch.Tensor] = {}
            for i, names, templates in self.flat:
                views.update(zip(names, _unflatten(held[i], templates)))
            self.grads = {k: views[k] for k in self.plan.names}
        else:  # a graph holds only ops dynamo knows; reduce-scattered rows lie apart
            self.grads = {k: held[i][a:b].view(shape) for k, i, a, b, shape in self.index}
        n = len(held)
        self.filled = [0] * n
        self.works = [None] * n
        self.next = 0
        self.seen = set()
        self.sums = []
        self.sizes = None
        if self.tail_view is not None:
            self.tail_view.zero_()
            if rows is not None and rows < 2**24:
                self.sizes = self.tail_view
                self.sizes[self.plan.rank] = rows

    def install(self, params: dict[str, torch.Tensor]) -> None:
        if self.hooked:
            fns = self.fns
            self.hooks = [params[k].register_hook(fns[k]) for k in self.plan.names]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _copy_in(self, e: _Entry, g: torch.Tensor) -> None:
        if self.scattered[e.bucket]:
            w, size = self.plan.world, self.plan.ssizes[e.bucket]
            buf = self.bufs[e.bucket]
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
        for earlier in self.sums:  # in order, innermost accumulate first, as one hook after another
            g = g + earlier[name]
        self._copy_in(e, g)
        self._launch_ready()
        if self.scattered[e.bucket]:
            return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)  # free the full gradient
        return self.grads[name]

    def _hook_whole(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """``_hook`` where every bucket is all-reduced: the gradient (plus the earlier
        micro-batches' sums) written into its place in the bucket, which goes out once
        full (and all before it are)."""
        view = self.grads[name]
        if self.sums:
            torch.add(g, self.sums[0][name], out=view)
            for earlier in self.sums[1:]:
                view.add_(earlier[name])
        else:
            view.copy_(g)
        self.seen.add(name)
        i = self.bucket_of[name]
        self.filled[i] += 1
        if i == self.next and self.filled[i] == self.counts[i]:
            self._launch_ready()
        return view

    def _launch_ready(self) -> None:
        if self.any_scattered:
            for i in range(self.next):  # drop send buffers whose reduce-scatter is done
                if self.scattered[i] and self.bufs[i] is not None and self.works[i].is_completed():
                    self.bufs[i] = None
        while self.next < len(self.bufs) and self.filled[self.next] == self.counts[self.next]:
            self._launch(self.next)
            self.next += 1

    def _launch(self, i: int) -> None:
        if self.scattered[i]:
            self.works[i] = _reduce_scatter(self.outs[i], self.bufs[i], group=self.group, async_op=True)
        elif tracing() is not None:  # xf.jit traces the step: a collective the graph can hold
            self.works[i] = _TracedAllReduce(self.bufs[i], self.group)
        else:  # the group's own method: dist.all_reduce's Python checks cost ~3% of a small step's CPU
            self.works[i] = self.group.allreduce([self.bufs[i]], self.sum)

    def finish(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sends what the hooks did not (all of it without hooks; unused params: zeros),
        plus the earlier micro-batches' sums, waits, and returns the reduced gradients:
        whole (all-reduce) or this process's rows (reduce-scatter)."""
        names = self.plan.names
        if not self.hooked:  # one all-reduced bucket: one call copies every gradient in
            views = list(self.grads.values())
            torch._foreach_copy_(views, [grads[k] for k in names])
            for earlier in self.sums:
                torch._foreach_add_(views, [earlier[k] for k in names])
            for i in range(len(self.held)):
                self._launch(i)
            self.next = len(self.held)
        else:
            for k in names:
                if k not in self.seen:  # as if its hook ran: the earlier sums added, the bucket counted
                    self.fns[k](grads[k])
            self._launch_ready()
        for w in self.works:
            w.wait()
        if self.any_scattered:
            self.bufs = [None if sc else b for b, sc in zip(self.bufs, self.scattered)]
        out, self.grads = self.grads, {}  # not kept: a view kept past the step shows in the count
        return out


_unflatten = torch._C._nn.unflatten_dense_tensors  # views of a flat tensor shaped like the templates


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _uses(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s memory (each view holds its storage once); -1 where
    this torch cannot tell, which makes every step take fresh memory."""
    return _USE_COUNT(t.untyped_storage()._cdata) if _USE_COUNT is not None else -1


class _TracedAllReduce:
    """The bucket's all-reduce while ``xf.jit`` traces the step: a functional collective
    (``_c10d_functional.all_reduce``, which a compiled graph holds), written back into the
    bucket at ``wait`` so the gradient views of the bucket read the sum, as after an
    in-place ``dist.all_reduce``."""

    def __init__(self, buf: torch.Tensor, group: Any):
        from torch.distributed import _functional_collectives as funcol

        self.buf, self.funcol = buf, funcol
        self.out = funcol.all_reduce(buf, "sum", group)

    def is_completed(self) -> bool:
        return False

    def wait(self) -> None:
        self.buf.copy_(self.funcol.wait_tensor(self.out))


class DataParallel:
    """replicate / zero1 / zero2 over one data-parallel group."""

    def __init__(self, strategy: Replicate | ZeRO, mesh: Any):
        self.strategy = strategy
        self.mesh = mesh
        self.sharded = isinstance(strategy, ZeRO)
        self.scatter = isinstance(strategy, ZeRO) and strategy.stage == 2
        self._plan: _Plan | None = None  # the bucket layout, built once per model
        self._comm: _Comm | None = None  # its buckets, reused step after step

    def group(self) -> tuple[Any, int, int]:
        return _mesh_group(self.mesh, None)

    def plan(self, params: dict[str, torch.Tensor]) -> _Plan:
        plan = self._plan
        if plan is None or plan.n_params != len(params) or plan.first != next(iter(params)):
            _, rank, world = self.group()
            names = [k for k, p in params.items() if p.requires_grad]
            plan = self._plan = _Plan(params, names, rank, world, self.strategy.bucket_mb, self.sharded)
        return plan

    def comm(self, params: dict[str, torch.Tensor], group: Any) -> _Comm:
        """The gradient communication of ``params``' plan: the one kept from the last
        step when it fits, a fresh one while ``xf.jit`` traces (a graph does not hold
        buffers kept between calls)."""
        plan = self.plan(params)
        p = params[plan.names[0]]
        if tracing() is not None:
            return _Comm(plan, group, self.scatter, p.dtype, p.device)
        comm = self._comm
        if comm is None or comm.plan is not plan or comm.group is not group or comm.dtype != p.dtype or comm.device != p.device:
            comm = self._comm = _Comm(plan, group, self.scatter, p.dtype, p.device)
        return comm

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

    def optimizer_update(
        self, state: TrainState, grads: dict[str, torch.Tensor], squares: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """zero1/zero2: the optimizer on this process's rows, then the params all-gathered;
        returns the new ``opt_state``. Reached through the ``update`` primitive's base, so
        every handler of ``update`` (the loss scale's unscale and skip) wraps it.
        ``squares``: ``owned_squares`` already summed over the group (by shard's one
        all-reduce of the step), for the clipping norm."""
        group, _, _ = self.group()
        return _zero_update(self, state, grads, group, squares)

    def owned_squares(self, state: TrainState, grads: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """With gradient clipping under zero1/zero2: the sum of squares of this process's
        gradient rows (float64), for shard to fold into its all-reduce; else None."""
        if static(state).max_grad_norm is None or not self.sharded:
            return None
        plan = self.plan(state.params)
        local = _local_grads(self, plan, grads)
        return _square_sum([g for g, k in zip(local, plan.names) if plan.entries[k].sharded], local[0].device)

    @property
    def runs_optimizer(self) -> bool:
        return self.sharded and self.group()[0] is not None


def _shard_opt_state(state: TrainState, plan: _Plan, mesh: Any) -> TrainState:
    """Optimizer state as DTensors sharded by rows (global shape = the param's), so a
    checkpoint reshards to any world size or strategy."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.device_mesh import init_device_mesh

    _check_fresh(state)
    if mesh is None:
        mesh = init_device_mesh(_device_type(), (plan.world,))
    names = static(state).trainable
    local = {k: plan.entries[k].local(state.params[k].detach()) for k in names}
    placeholders = placeholder_opt_state(static(state).optimizer, local, names)
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
    """Attributes:
        rows: this process's batch size, set by ``shard`` before the step; it rides on the
            gradient all-reduce (see ``_Comm``), and ``sizes`` holds every process's after.
    """

    def __init__(self, layout: DataParallel, group: Any, world: int):
        super().__init__()
        self.layout, self.group, self.pieces = layout, group, world
        self.reduced = False
        self.rows: int | None = None
        self.sizes: torch.Tensor | None = None

    def value_and_grad(self, fn, params, has_aux, next):
        if not self.last_piece_inside():  # accumulate: communicate only on the last micro-batch
            return next(fn, params, has_aux)
        comm = self._comm(params)
        comm.sums = _earlier_sums(self)  # an inner accumulate's: added to each gradient before it goes out
        comm.install(params)
        try:
            value, grads = next(fn, params, has_aux)
        finally:
            comm.remove()
        self.reduced = True
        grads = comm.finish(grads)
        self.sizes = comm.sizes
        return value, grads

    def _comm(self, params: dict[str, torch.Tensor]) -> _Comm:
        comm = self.layout.comm(params, self.group)
        comm.begin(self.rows)
        return comm

    def apply_gradients(self, state, grads, count, next):
        count = self.take_count(count)
        if not self.reduced:  # gradients that did not come from value_and_grad's hooks
            comm = self._comm(state.params)
            grads = comm.finish(grads)
            self.sizes = comm.sizes
        return next(state, grads, _global_count(count, self.group, self.pieces, static(state).device))


def _earlier_sums(me: Handler) -> list[dict[str, torch.Tensor]]:
    """The earlier micro-batches' gradient sums of the reducers inside ``me``, innermost first."""
    stack = handlers()
    out = []
    for h in reversed(stack[stack.index(me) + 1 :]):
        if h.reduces:
            earlier = h.fold()
            if earlier is not None:
                out.append(earlier)
    return out


def _local_grads(layout: DataParallel, plan: _Plan, grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """This process's rows of each gradient (zero2's reduce-scatter already gave only them)."""
    return [grads[k] if layout.scatter and plan.entries[k].sharded else plan.entries[k].local(grads[k]) for k in plan.names]


def _zero_update(
    layout: DataParallel, state: TrainState, grads: dict[str, torch.Tensor], group: Any, squares: torch.Tensor | None
) -> dict[str, Any]:
    plan = layout.plan(state.params)
    names = plan.names
    opt_state = state.opt_state

    def make() -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        views = [plan.entries[k].local(state.params[k].detach()) for k in names]
        local_state = {"initialized": opt_state["initialized"], "state": {
            k: {kk: local_part(v) for kk, v in opt_state["state"][k].items()} for k in names}}
        return views, build_optimizer(static(state).optimizer, names, views, local_state)

    views, optimizer = cached(state, ("zero", id(layout)), make)
    local_grads = _local_grads(layout, plan, grads)

    def total_norm(gs: list[torch.Tensor]) -> torch.Tensor:
        """The whole gradient's norm: this process's rows summed over the group (folded
        into shard's all-reduce when it gave ``squares``), plus the replicated (0-dim)
        params once."""
        shared = [g for g, k in zip(gs, names) if not plan.entries[k].sharded]
        sq = squares
        if sq is None:
            sq = _square_sum([g for g, k in zip(gs, names) if plan.entries[k].sharded], gs[0].device)
            dist.all_reduce(sq, group=group)
        return (sq + _square_sum(shared, gs[0].device)).sqrt().to(gs[0].dtype)

    optimizer_step(state, optimizer, views, local_grads, total_norm=total_norm)
    _all_gather_params(plan, state.params, group)
    if not opt_state["initialized"]:
        opt_state = {"initialized": True, "state": adopt_opt_state(optimizer, names, views, opt_state)}
    return opt_state


def _square_sum(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(tensors)).double().square().sum()


def _all_gather_params(plan: _Plan, params: dict[str, torch.Tensor], group: Any) -> None:
    """Every process's updated rows to every process, one all-gather per bucket.

    This process's rows are packed straight into its slot of the output (the all-gather's
    input is a view of its output), and each process's rows are copied out slot by slot:
    no send buffer and no reshaped copy of a parameter beside the gathered bucket."""
    w, rank = plan.world, plan.rank
    with torch.no_grad():
        for entries, size in zip(plan.buckets, plan.ssizes):
            if not entries or not entries[0].sharded:
                continue
            p0 = params[entries[0].name]
            grid = torch.empty(size * w, dtype=p0.dtype, device=p0.device).view(w, size)
            mine = grid[rank]
            for e in entries:
                n = (e.hi - e.lo) * e.rowsize
                mine[e.soffset : e.soffset + n].copy_(params[e.name].detach().view(-1)[e.lo * e.rowsize : e.hi * e.rowsize])
                mine[e.soffset + n : e.soffset + e.chunk].zero_()  # the padding of a short last share
            _all_gather(grid.view(-1), mine, group=group)
            for e in entries:
                flat = params[e.name].detach().view(-1)
                for r in range(w):
                    lo = min(r * e.chunk, e.numel)
                    hi = min(lo + e.chunk, e.numel)
                    if hi > lo:
                        flat[lo:hi].copy_(grid[r, e.soffset : e.soffset + hi - lo])
