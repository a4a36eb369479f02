"""Pipeline parallelism (``xf.Pipeline``) over ``torch.distributed.pipelining``.

How the user's step maps onto a schedule (``docs/pipeline.md``):

1. ``shard``'s call first runs the step once per micro-batch, up to its
   ``xf.value_and_grad``, and keeps each micro-batch's loss function (a closure over
   that micro-batch): the handler takes it and stops the step there.
2. Then the step runs on the whole batch. Its ``value_and_grad`` calls the loss function
   until ``xf.apply``, which gives the pipelined part's inputs, and runs the schedule on
   them: stage modules (slices of the ``nn.Sequential``) pass activations forward and
   gradients back; on the last stage, the schedule's loss function runs micro-batch
   ``i``'s loss function with ``xf.apply`` answering that micro-batch's output.
3. The stages' gradients are read from ``.grad`` (the schedule runs ``.backward()``),
   all-reduced over the data-parallel axis, and the loss is broadcast from the last
   stage to every process, so that the step's metrics are the same everywhere.

Normalization is the reducers' rule (``xform.core.primitives.Reducer``): a plain mean
loss of micro-batch ``i`` is divided by the number of pieces of all reducers
(``microbatches`` x data-parallel size x ``accumulate``'s steps); an ``xf.Mean``'s total
is differentiated and its count, summed over micro-batches and processes, divides the
gradient once.
"""

from __future__ import annotations

import fractions
from collections import OrderedDict
from typing import Any

import attrs
import torch
import torch.distributed as dist

from xform.core.backend import relaid, static
from xform.core.mean import Mean
from xform.core.optim import placeholder_opt_state
from xform.core.primitives import Handler, Reducer, generator_for, handlers
from xform.core.state import TrainState
from xform.core.strategies import FullyShard, Pipeline
from xform.core.transform import transforms_of

from .common import _broadcast_state, _check_fresh, _default_group

__all__ = ["PipelineLayout", "plan_stages"]


class _Captured(Exception):
    """Stops the step at ``value_and_grad`` (the capture pass) or the loss function at
    ``xf.apply`` (the inputs pass)."""


def plan_stages(module: torch.nn.Module, stages: int, split: tuple[str, ...] | None) -> list[list[str]]:
    """The children names of each stage, in order.

    With ``split``, a stage starts at each named child; without, consecutive children
    are grouped so that the largest stage's parameter bytes are as small as possible
    (each stage holds at least one child).

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> plan_stages(m, 2, None)
        [['0', '1'], ['2', '3']]
        >>> plan_stages(m, 2, ("3",))
        [['0', '1', '2'], ['3']]
        >>> plan_stages(m, 3, None)
        [['0'], ['1'], ['2', '3']]
    """
    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(
            f"shard(pp): the model must be a torch.nn.Sequential (its children run in order and are cut into "
            f"stages), got {type(module).__name__}; write it as nn.Sequential(embedding, *blocks, head)"
        )
    names = [n for n, _ in module.named_children()]
    if stages > len(names):
        raise ValueError(
            f"shard(pp): {stages} stages need at least {stages} children, but the model has {len(names)}; "
            "use fewer stages or a model with more children"
        )
    if split is not None:
        unknown = [n for n in split if n not in names]
        if unknown:
            raise ValueError(f"shard(pp): split names {unknown} are not children of the model; its children are {names}")
        at = [names.index(n) for n in split]
        if at != sorted(set(at)) or at[0] == 0:
            raise ValueError(
                f"shard(pp): split={split!r} must name distinct children in model order, not the first one "
                f"({names[0]!r}); its children are {names}"
            )
        bounds = [0, *at, len(names)]
        return [names[a:b] for a, b in zip(bounds, bounds[1:])]
    cost = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in module.children()]
    return [names[a:b] for a, b in _balanced(cost, stages)]


def _balanced(cost: list[int], k: int) -> list[tuple[int, int]]:
    """Cuts ``cost`` into ``k`` non-empty consecutive runs minimizing the largest sum
    (ties: the earliest cut), by dynamic programming."""
    n = len(cost)
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for m in range(j - 1, i):
                v = max(best[j - 1][m], prefix[i] - prefix[m])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, m
    bounds, i = [n], n
    for j in range(k, 0, -1):
        i = cut[j][i]
        bounds.append(i)
    bounds.reverse()
    return list(zip(bounds, bounds[1:]))


def _refuse_inner(inner: Any) -> None:
    names = transforms_of(inner).names
    if "accumulate" in names:
        raise ValueError(
            "shard(pp): accumulate inside a pipelined shard is not supported; put it outside: "
            "xf.accumulate(xf.shard(step, xf.Pipeline(...)), k) runs k pipeline rounds of M micro-batches "
            "(k * M micro-batches) per update"
        )
    other = [n for n in names if n != "configure"]
    if other:
        raise ValueError(
            f"shard(pp): {other} inside a pipelined shard is not supported in this version (the stages run "
            "outside xf.apply, where those transforms act); shard the plain step"
        )


class PipelineLayout:
    """``Pipeline`` on a mesh: which stages this process holds, its groups, and the
    schedule (built at the first step, rebuilt when the micro-batch shapes change)."""

    def __init__(self, strategy: Pipeline, mesh: Any, inner: Any):
        _refuse_inner(inner)
        self.strategy, self.mesh = strategy, mesh
        self._schedule: Any = None
        self._key: Any = None
        self._modules: tuple[Any, dict[int, torch.nn.Module]] = (None, {})  # (model, stage -> module) made at init

    # --- groups ---------------------------------------------------------------------------

    def groups(self) -> tuple[Any, int, int, Any, int]:
        """(pp group, pp rank, pp size, dp group or None, dp size)."""
        s, mesh = self.strategy, self.mesh
        if mesh is None:
            if s.tensor_parallel is not None:
                raise ValueError(
                    f"shard(pp): tensor_parallel needs a mesh with axes {s.axis!r} and {s.tensor_parallel.axis!r}; "
                    f"pass mesh=xf.mesh({s.axis}=P, {s.tensor_parallel.axis}=T)"
                )
            if s.data_parallel:
                raise ValueError(
                    f"shard(pp): data_parallel={s.data_parallel!r} needs a mesh with axes {s.axis!r} and "
                    f"{s.dp_axis!r}; pass mesh=xf.mesh({s.axis}=P, {s.dp_axis}=D)"
                )
            group, rank, world = _default_group()
            return group, rank, world, None, 1
        names = tuple(mesh.mesh_dim_names or ())
        if s.axis not in names:
            raise ValueError(f"shard(pp): the mesh has axes {names}, not the pipeline axis {s.axis!r}; pass mesh=xf.mesh({s.axis}=P, ...)")
        used = {s.axis} | ({s.dp_axis} if s.data_parallel else set())
        if s.tensor_parallel is not None:
            if s.tensor_parallel.axis not in names:
                raise ValueError(
                    f"shard(pp): tensor_parallel needs a mesh axis {s.tensor_parallel.axis!r}, the mesh has {names}; "
                    f"pass mesh=xf.mesh({s.axis}=P, {s.tensor_parallel.axis}=T)"
                )
            used.add(s.tensor_parallel.axis)
        extra = {n: mesh[n].size() for n in names if n not in used and mesh[n].size() > 1}
        if extra:
            hint = (
                f"pass xf.Pipeline(..., data_parallel='replicate') to replicate the stages over {s.dp_axis!r}"
                if len(extra) == 1 and s.dp_axis in extra and not s.data_parallel and s.tensor_parallel is None
                else "pass xf.Pipeline(..., tensor_parallel=xf.TensorParallel(plan=...)) for pp x tp"
                if len(extra) == 1 and not s.data_parallel and s.tensor_parallel is None
                else "3-D layouts (pp x dp x tp) are not supported in this version"
            )
            raise ValueError(
                f"shard(pp): the mesh axes {extra} are not used by {s}; the supported layouts are pp alone, "
                f"pp x dp (data_parallel='replicate' or 'fsdp') and pp x tp (tensor_parallel=...); {hint}"
            )
        if s.data_parallel and s.dp_axis not in names:
            raise ValueError(
                f"shard(pp): data_parallel={s.data_parallel!r} needs a mesh axis {s.dp_axis!r}, the mesh has {names}"
            )
        pp = mesh[s.axis]
        group = pp.get_group()
        dp_group, dp = (mesh[s.dp_axis].get_group(), mesh[s.dp_axis].size()) if s.data_parallel else (None, 1)
        return group, dist.get_rank(group), pp.size(), dp_group, dp

    def stage_ids(self, pp: int, rank: int) -> list[int]:
        s = self.strategy
        total = self._total(pp)
        if s.schedule == "interleaved_1f1b":
            if total % pp or total < 2 * pp:
                raise ValueError(
                    f"shard(pp): interleaved_1f1b needs a multiple of the {pp} pipeline processes, at least two "
                    f"stages each, got stages={total}; use stages={2 * pp}"
                )
        elif total != pp:
            raise ValueError(
                f"shard(pp): schedule {s.schedule!r} runs one stage per process: stages={total} but the pipeline "
                f"axis has {pp} processes; use stages={pp}, or schedule='interleaved_1f1b' for several per process"
            )
        if s.schedule == "1f1b" and s.microbatches < pp:
            raise ValueError(
                f"shard(pp): 1f1b needs at least as many micro-batches as stages, got microbatches={s.microbatches} "
                f"for {pp} stages; use microbatches>={pp}"
            )
        return list(range(rank, total, pp))

    # --- init -----------------------------------------------------------------------------

    def init(self, state: TrainState) -> TrainState:
        group, rank, pp, _, _ = self.groups()
        if group is None:
            return state
        _check_fresh(state)
        spec = static(state)
        if spec.max_grad_norm is not None:
            raise ValueError(
                "shard(pp): max_grad_norm is not supported under a pipeline in this version (the norm spans "
                "every stage); create the state without max_grad_norm"
            )
        ids = self.stage_ids(pp, rank)
        plan = plan_stages(spec.module, self._total(pp), self.strategy.split)
        _broadcast_state(state, dist.group.WORLD)
        owner = _owners(spec, plan)
        mine = set(ids)
        keep = [k for k in state.params if owner[k] in mine]
        bkeep = [k for k in state.buffers if _child(k) in {c for i in ids for c in plan[i]}]
        params = {k: state.params[k] for k in keep}
        buffers = {k: state.buffers[k] for k in bkeep}
        _release_others(spec, params, buffers)
        s = self.strategy
        if s.data_parallel == "fsdp" or s.tensor_parallel is not None:  # the stages' params become DTensors
            from .fully_shard import _check_shardable, _fully_shard_units

            children = dict(spec.module.named_children())
            stages = {}
            for i in ids:
                stage = stages[i] = _stage_module(children, plan[i])
                if s.tensor_parallel is not None:  # split over tp, the rest replicated
                    _tensor_parallel(stage, self.mesh, s.tensor_parallel)
                else:  # fully sharded over dp (FSDP2)
                    _check_shardable(stage, FullyShard())
                    _fully_shard_units(stage, self.mesh[s.dp_axis], FullyShard(), None)
            self._modules = (spec.module, stages)
            now = dict(spec.module.named_parameters())
            params = {k: now[k] for k in keep}
        trainable = tuple(k for k in spec.trainable if k in params)
        new_spec = attrs.evolve(
            spec,
            trainable=trainable,
            trainable_set=frozenset(trainable),
            aliases={k: v for k, v in spec.aliases.items() if k in params},
            buffer_aliases={k: v for k, v in spec.buffer_aliases.items() if k in buffers},
        )
        opt = {"initialized": False, "state": placeholder_opt_state(spec.optimizer, params, trainable)}
        return relaid(
            state, "shard's step.init, which kept this process's pipeline stages",
            params=params, buffers=buffers, opt_state=opt, spec=new_spec,
        )

    def _total(self, pp: int) -> int:
        s = self.strategy
        return s.stages if s.stages is not None else (2 * pp if s.schedule == "interleaved_1f1b" else pp)

    def handler(self) -> Handler:
        group, rank, pp, dp_group, dp = self.groups()
        if group is None:
            return Handler()
        return _PipelineHandler(self, group, rank, pp, dp_group, dp)

    # --- the schedule ---------------------------------------------------------------------

    def schedule(self, state: TrainState, group: Any, rank: int, pp: int, loss_fn: Any, key: Any) -> Any:
        module = static(state).module  # another model (a second init) gets its own stages
        if self._schedule is not None and self._key[0] is module and self._key[1] == key:
            self._schedule._loss_fn = loss_fn
            return self._schedule
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        spec = static(state)
        total = self._total(pp)
        plan = plan_stages(spec.module, total, self.strategy.split)
        children = dict(spec.module.named_children())
        made = self._modules[1] if self._modules[0] is module else {}
        stages = [
            PipelineStage(made[i] if i in made else _stage_module(children, plan[i]), i, total, spec.device, group=group)
            for i in self.stage_ids(pp, rank)
        ]
        m = self.strategy.microbatches
        kind = self.strategy.schedule
        if kind == "interleaved_1f1b":
            sched = ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
            sched = cls(stages[0], n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
        self._schedule, self._key = sched, (module, key)
        return sched


def _tensor_parallel(stage: torch.nn.Module, mesh: Any, tp: Any) -> None:
    """The plan's modules of ``stage`` split over the tp axis, its other params replicated
    DTensors (as ``shard(tp)`` lays a whole model out)."""
    import fnmatch

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from .tensor_parallel import _replicate_the_rest

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    size = mesh[tp.axis].size()
    plan = {}
    for name, m in stage.named_modules():
        for pattern, style in tp.plan.items():
            if name and fnmatch.fnmatchcase(name, pattern):
                weight = getattr(m, "weight", None)
                dim = 0 if style == "colwise" else 1
                if weight is None or weight.dim() < 2 - dim or weight.shape[dim] % size:
                    raise ValueError(
                        f"shard(pp): tensor_parallel plans {name!r} ({style}), which has no weight whose dim {dim} "
                        f"the {size} processes of axis {tp.axis!r} can split evenly; leave it out of the plan"
                    )
                plan[name] = styles[style]()
    if plan:
        parallelize_module(stage, mesh[tp.axis], plan)
    _replicate_the_rest(stage, mesh[tp.axis])


def _stage_module(children: dict[str, torch.nn.Module], names: list[str]) -> torch.nn.Module:
    """A stage: the model's children ``names`` in order (the same modules and tensors)."""
    return torch.nn.Sequential(OrderedDict((n, children[n]) for n in names))


def _release_others(spec: Any, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
    """Points the module's slots for other processes' stages at meta tensors of the same
    shapes, so that this process holds only its stages' values (the old state, donated,
    is the last holder of the others)."""
    for table, slot, mine in ((spec.aliases, "_parameters", params), (spec.buffer_aliases, "_buffers", buffers)):
        for name, owners in table.items():
            if name in mine:
                continue
            for owner, attr in owners:
                t = getattr(owner, slot)[attr]
                meta = torch.empty_like(t, device="meta")
                getattr(owner, slot)[attr] = torch.nn.Parameter(meta, t.requires_grad) if slot == "_parameters" else meta


def _child(name: str) -> str:
    return name.partition(".")[0]


def _owners(spec: Any, plan: list[list[str]]) -> dict[str, int]:
    """The stage of each parameter; a parameter used by two stages (tied) is refused."""
    stage_of = {c: i for i, names in enumerate(plan) for c in names}
    module = spec.module
    owner: dict[str, int] = {}
    for name, aliases in spec.aliases.items():
        stages = set()
        for alias_owner, _ in aliases:
            path = next((n for n, m in module.named_modules() if m is alias_owner), "")
            stages.add(stage_of[_child(path)] if path else -1)
        if len(stages) != 1 or -1 in stages:
            raise ValueError(
                f"shard(pp): parameter {name!r} is used by stages {sorted(stages)} (tied weights across stages, or "
                "held by the root module); a pipeline stage must own its parameters: untie them or keep their "
                "owners in one stage (split=...)"
            )
        owner[name] = stages.pop()
    return owner


class _PipelineHandler(Reducer):
    """Runs ``value_and_grad`` as a pipeline schedule (see the module docs)."""

    def __init__(self, layout: PipelineLayout, group: Any, rank: int, pp: int, dp_group: Any, dp: int):
        super().__init__()
        self.layout, self.group, self.rank, self.pp = layout, group, rank, pp
        self.dp_group, self.dp = dp_group, dp
        self.m = layout.strategy.microbatches
        self.pieces = self.m * dp
        self.sharded = layout.strategy.data_parallel == "fsdp"
        self.mode = "idle"
        self.fns: list[Any] = []
        self.out: Any = None
        self.inputs: Any = None
        self.error: Exception | None = None  # the loss function's, on the last stage
        self.losses: dict[int, Any] = {}  # micro-batch -> (kind, loss, count), on the last stage

    # shard calls this before the step (xform/transforms/shard.py)
    def prepare(self, step: Any, state: TrainState, batch: Any) -> None:
        from xform.transforms.accumulate import split_batch

        from xform import tree

        rows = next((t.shape[0] for t in tree.leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if rows is not None and rows % self.m:
            raise ValueError(
                f"shard(pp): this process's batch has {rows} rows, which microbatches={self.m} does not divide; pass "
                f"a batch of {-(-rows // self.m) * self.m} rows or a number of micro-batches dividing {rows}"
            )
        self.fns = []
        self.mode = "capture"
        try:
            for micro in split_batch("shard(pp)", batch, self.m):
                try:
                    step(state, micro)
                except _Captured:
                    continue
                raise RuntimeError(
                    "shard(pp): the step returned without calling xf.value_and_grad; a pipelined step computes "
                    "its gradients with xf.value_and_grad(loss_fn)(state.params)"
                )
        finally:
            self.mode = "idle"

    def apply(self, state, params, args, kwargs, next):
        if self.mode == "inputs":
            self.inputs = (state, args, kwargs)
            raise _Captured()
        if self.mode == "loss":
            if self.out is None:
                raise RuntimeError(
                    "shard(pp): the loss function called xf.apply more than once; under a pipeline it calls it "
                    "once (the pipelined model), the rest of it runs on the last stage"
                )
            out, self.out = self.out, None
            return out
        raise RuntimeError(
            "shard(pp): xf.apply was called outside xf.value_and_grad's loss function; under a pipeline the model "
            "runs only there (compute metrics from the loss, or evaluate without shard)"
        )

    def value_and_grad(self, fn, params, has_aux, next):
        if self.mode == "capture":
            self.fns.append(fn)
            raise _Captured()
        if has_aux:
            raise ValueError(
                "shard(pp): has_aux=True is not supported under a pipeline (the loss function runs per micro-batch "
                "on the last stage only); return the loss alone and compute metrics from it"
            )
        if len(self.fns) != self.m:
            raise RuntimeError("shard(pp): the step called xf.value_and_grad more than once; a pipelined step calls it once")
        self.mode = "inputs"
        try:
            fn(params)
        except _Captured:
            pass
        else:
            raise ValueError(
                "shard(pp): the loss function did not call xf.apply; under a pipeline it must compute the loss "
                "from xf.apply(state, params, inputs), the pipelined model"
            )
        finally:
            self.mode = "idle"
        state, args, kwargs = self.inputs
        self.inputs = None
        if params is not state.params:
            raise ValueError(
                "shard(pp): xf.apply must be given the params that xf.value_and_grad passes to the loss function "
                "(state.params)"
            )
        _bind(state)
        names = list(static(state).trainable)
        for k in names:
            params[k].grad = None
        pieces = 1
        for h in handlers():
            if h.reduces:
                pieces *= h.pieces
        self.losses = {}

        def loss_fn(output: Any, target: torch.Tensor) -> torch.Tensor:
            # An error here is raised on every process after the schedule (the others would
            # wait for this stage's gradients); meanwhile the schedule runs on a zero loss.
            try:
                return objective(output, int(target.reshape(-1)[0]))
            except Exception as e:  # noqa: BLE001 - re-raised after the schedule, everywhere
                if self.error is None:
                    self.error = e
                return _zero_loss(output)

        def objective(output: Any, i: int) -> torch.Tensor:
            self.out, self.mode = output, "loss"
            try:
                loss = self.fns[i](params)
            finally:
                self.out, self.mode = None, "idle"
            if isinstance(loss, Mean):
                self.losses[i] = ("mean", loss.total.detach(), loss.count)
                return loss.total
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                raise ValueError(
                    "shard(pp): the loss must be a scalar floating-point tensor or xf.Mean, got "
                    f"{type(loss).__name__}; reduce it (loss.mean())"
                )
            self.losses[i] = ("plain", loss.detach(), None)
            return loss.reshape(()) / pieces

        key = tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
        sched = self.layout.schedule(state, self.group, self.rank, self.pp, loss_fn, key)
        device = static(state).device
        target = torch.arange(self.m, device=device)
        # Randomness in the stages (dropout) comes from the state's key, its data position
        # and the stage: a step is a function of (state, batch). Not the plain step's
        # stream (that one draws per whole batch), so dropout is not equal to it.
        gen = generator_for(device)
        saved = gen.get_state()
        gen.manual_seed(hash((state.rng, state.data["consumed"], "pp", self.rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            sched.step(*args, target=target, return_outputs=False, **kwargs)
        finally:
            gen.set_state(saved)
        grads = {}
        for k in names:
            g = params[k].grad
            grads[k] = g if g is not None else torch.zeros_like(params[k])
            params[k].grad = None
        if self.dp > 1 and grads and not self.sharded:  # fsdp reduce-scattered them in backward
            flat = torch.cat([g.reshape(-1) for g in grads.values()])
            dist.all_reduce(flat, group=self.dp_group)
            offset = 0
            for k, g in grads.items():
                grads[k] = flat[offset : offset + g.numel()].view_as(g)
                offset += g.numel()
        value, count = self._agree_loss(params, pieces)
        self.pending = count
        return value, grads

    def _agree_loss(self, params: dict[str, torch.Tensor], pieces: int) -> tuple[Any, Any]:
        """The loss of this process's batch and its count, from the last stage to all."""
        dtype = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
        device = next(iter(params.values())).device
        vec = torch.zeros(4, dtype=torch.float64, device=device)
        error, self.error = self.error, None
        if error is not None:
            vec[3] = 1
        elif self.losses:
            losses = [self.losses[i] for i in sorted(self.losses)]
            kinds = {k for k, _, _ in losses}
            if len(kinds) > 1:
                raise ValueError("shard(pp): the micro-batches' losses mix xf.Mean and plain tensors; return one kind")
            dtype = losses[0][1].dtype
            if kinds == {"plain"}:
                vec[1] = torch.stack([v.to(torch.float64) for _, v, _ in losses]).mean()
            else:
                vec[0] = 1
                vec[1] = torch.stack([v.to(torch.float64) for _, v, _ in losses]).sum()
                vec[2] = sum(float(c) for _, _, c in losses)
        last = dist.get_global_rank(self.group, self.pp - 1)
        dist.broadcast(vec, src=last, group=self.group)
        self.losses = {}
        if vec[3]:
            message = [f"{type(error).__name__}: {error}" if error is not None else None]
            dist.broadcast_object_list(message, src=last, group=self.group)
            if error is not None:
                raise error
            raise RuntimeError(f"shard(pp): the loss function failed on the last pipeline stage (rank {last}): {message[0]}")
        if vec[0] == 0:
            return vec[1].to(dtype), fractions.Fraction(self.pieces, pieces)
        count = vec[2].clone()
        if self.dp > 1:
            dist.all_reduce(count, group=self.dp_group)
        local = vec[2].item()
        return Mean(vec[1].to(dtype), int(local) if local.is_integer() else local), float(count)

    def apply_gradients(self, state, grads, count, next):
        return next(state, grads, self.take_count(count))


def _zero_loss(output: Any) -> torch.Tensor:
    """A zero loss on ``output``'s graph: the schedule finishes on every stage."""
    return sum(t.sum() * 0 for t in _tensors(output) if t.requires_grad)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _bind(state: TrainState) -> None:
    """Points the module's parameter and buffer slots at this state's tensors (the stages
    run the module's own children)."""
    spec = static(state)
    for name, t in state.params.items():
        for owner, attr in spec.aliases[name]:
            if owner._parameters[attr] is not t:
                owner._parameters[attr] = t
    for name, t in state.buffers.items():
        for owner, attr in spec.buffer_aliases[name]:
            if owner._buffers[attr] is not t:
                owner._buffers[attr] = t
