"""zero3/fsdp and hsdp over FSDP2 ``fully_shard``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xform.core.optim import placeholder_opt_state
from xform.core.backend import relaid, static
from xform.core.transform import transforms_of
from xform.core.primitives import Handler, Reducer
from xform.core.state import TrainState
from xform.core.strategies import FullyShard, HybridShard

from .common import _broadcast_state, _check_fresh, _default_group, _device_type, _global_count

# --- zero3 / fsdp, hsdp: FSDP2 ----------------------------------------------------------------


def ties(module: torch.nn.Module) -> list[tuple[str, ...]]:
    """The paths of the modules sharing each parameter held by more than one module
    (tied weights: GPT-2's ``lm_head`` and ``transformer.wte``)."""
    owners: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        path = name.rpartition(".")[0]
        if path not in owners.setdefault(id(p), []):
            owners[id(p)].append(path)
    return [tuple(o) for o in owners.values() if len(o) > 1]


def _inside(path: str, unit: str) -> bool:
    return unit == "" or path == unit or path.startswith(unit + ".")


def _units(module: torch.nn.Module, choose: Any) -> list[torch.nn.Module]:
    """The FSDP units below the root, parents first: the modules ``choose`` picks, except
    that a unit never splits a tie. A module holding some but not all owners of a tied
    parameter is no unit, so the tied tensor goes to the lowest chosen unit holding all
    its owners, or to the root (GPT-2's ``lm_head``/``wte``). No unit is added: a module
    whose forward is never called (a container its parent reaches into) would gather
    nothing. FSDP2 then shards the tied tensor once, and the state's names (one per
    tensor) stay valid."""
    tied = ties(module)

    def splits(unit: str) -> bool:
        return any(0 < sum(_inside(o, unit) for o in tie) < len(tie) for tie in tied)

    return [m for n, m in module.named_modules() if n and choose(m) and not splits(n)]


def _check_shardable(module: torch.nn.Module, strategy: FullyShard) -> None:
    """Refuses, before anything is laid out, what FSDP2 would refuse half-way through
    (after converting some units): a 0-dim parameter."""
    for name, p in module.named_parameters():
        if p.dim() == 0:
            raise ValueError(
                f"shard({strategy.name!r}): parameter {name!r} is 0-dim, which FSDP2 cannot shard; "
                f"store it with shape (1,) (torch.nn.Parameter(torch.tensor([v]))) or use 'zero2'"
            )


def _fully_shard_units(module: torch.nn.Module, mesh: Any, strategy: FullyShard, policy: Any) -> None:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    compute = getattr(policy, "compute_dtype", None)
    lower = compute is not None and compute != torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute if lower else None, reduce_dtype=strategy.reduce_dtype if lower else None)
    choose = strategy.units or (lambda m: any(p is not None for p in m._parameters.values()))
    for unit in reversed(_units(module, choose)):  # children before their parents
        fully_shard(unit, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, mp_policy=mp)
    fully_shard(module, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward, mp_policy=mp)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sums: xform divides by the global item count
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no AVG/PREMUL_SUM)


def _relaid(state: TrainState) -> TrainState:
    """The state over the module's new (DTensor) parameters; the old state is used up."""
    params = dict(state.module.named_parameters())
    names = static(state).trainable
    opt = {"initialized": False, "state": placeholder_opt_state(static(state).optimizer, params, names)}
    return relaid(state, "shard's step.init, which laid its params out", params=params, opt_state=opt)


class FullyShardLayout:
    def __init__(self, strategy: FullyShard, mesh: Any, inner: Any):
        self.strategy, self.mesh = strategy, mesh
        self.policy = transforms_of(inner).setting("mixed_precision", "policy")  # mixed_precision inside shard

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
        _check_shardable(state.module, self.strategy)
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
        return next(state, grads, _global_count(count, self.group, self.pieces, static(state).device))
