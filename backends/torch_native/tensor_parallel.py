"""Tensor parallel over DTensor ``parallelize_module``, optionally with FSDP2 over ``dp``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xform.core.optim import is_dtensor
from xform.core.primitives import Handler
from xform.core.transform import transforms_of
from xform.core.state import TrainState
from xform.core.strategies import FullyShard, TensorParallel

from .common import _broadcast_state, _check_fresh
from .fully_shard import _BackwardReducer, _fully_shard_units, _relaid, ties

# --- tensor parallel ----------------------------------------------------------------------------


class TensorParallelLayout:
    def __init__(self, strategy: TensorParallel, mesh: Any, inner: Any):
        self.strategy, self.mesh = strategy, mesh
        self.policy = transforms_of(inner).setting("mixed_precision", "policy")

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
        for tie in ties(state.module):
            planned = [o for o in tie if o in plan]
            if planned:
                others = [o or "the root module" for o in tie if o != planned[0]]
                raise ValueError(
                    f"shard(tp): {planned[0]!r} shares its weight with {others} (tied weights), which tensor "
                    f"parallelism would split apart; leave {planned[0]!r} out of the plan, or untie the weights"
                )
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
            parent = modules[name.rpartition(".")[0]]
            head = getattr(parent, "head_dim", None)  # attention projections (HF): split by whole heads
            if isinstance(head, int) and head > 0 and weight.shape[dim] % head == 0 and (weight.shape[dim] // head) % size:
                raise ValueError(
                    f"shard(tp): {name!r} holds {weight.shape[dim] // head} heads of {head} features, which the {size} "
                    f"processes of mesh axis {s.axis!r} cannot split into whole heads; use a tp size that divides "
                    f"{weight.shape[dim] // head}, or leave {name!r} out of the plan"
                )
        parallelize_module(state.module, self.mesh[s.axis], plan)
        if s.data_parallel == "fsdp":
            _fully_shard_units(state.module, self.mesh[s.dp_axis], FullyShard(), self.policy)
        else:
            _replicate_the_rest(state.module, self.mesh[s.axis])
        return _relaid(state)

    def handler(self) -> Handler:
        s = self.strategy
        if s.data_parallel:
            sub = self.mesh[s.dp_axis]
            group, world = sub.get_group(), sub.size()
        else:
            group, world = None, 1
        return _BackwardReducer(group, world, uses_backward=s.data_parallel == "fsdp")


def _replicate_the_rest(module: torch.nn.Module, mesh: Any) -> None:
    """Makes every parameter the plan left whole (embeddings, norms, the output head) a
    DTensor replicated over the tp axis, so that the state holds one kind of tensor and
    the core's fused (foreach) updates and checks apply to all of them, as under FSDP.

    Each module owning such a parameter then runs on DTensors: its tensor inputs enter
    as replicated DTensors and its outputs leave as local tensors, so the modules around
    it see what they saw before. Every process of the tp group computes the same values
    and gradients for these parameters (their inputs are the same), so no communication
    is added. A tied parameter becomes one DTensor shared by all its owners."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.utils._pytree import tree_map

    def to_dtensor(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not is_dtensor(x):
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return x

    def to_local(x: Any) -> Any:
        return x.to_local() if is_dtensor(x) else x

    def enter(_m: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        return tree_map(to_dtensor, args), tree_map(to_dtensor, kwargs)

    def leave(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
        return tree_map(to_local, out)

    replicated: dict[int, torch.nn.Parameter] = {}  # by the original tensor: ties stay ties
    for m in module.modules():
        own = {k: p for k, p in m._parameters.items() if p is not None and not is_dtensor(p)}
        if not own:
            continue
        for k, p in own.items():
            if id(p) not in replicated:
                local = DTensor.from_local(p.detach(), mesh, [Replicate()], run_check=False)
                replicated[id(p)] = torch.nn.Parameter(local, requires_grad=p.requires_grad)
            m._parameters[k] = replicated[id(p)]
        m.register_forward_pre_hook(enter, with_kwargs=True)
        m.register_forward_hook(leave)
