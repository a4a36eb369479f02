"""What the native backend's strategy families share: process groups, the state's
broadcast, the global item count, the flat-tensor collectives."""

from __future__ import annotations

import fractions
import os
from typing import Any

import torch
import torch.distributed as dist

from xform.core.group import default_group, group_up
from xform.core.optim import local_part
from xform.core.state import TrainState

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only
# the old ones. Looked up at each call, so that tools counting collectives see them.
def _all_gather(*args: Any, **kwargs: Any) -> Any:
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter(*args: Any, **kwargs: Any) -> Any:
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


# --- process groups ---------------------------------------------------------------------


def _default_group() -> tuple[Any, int, int]:
    """(group, rank, world) of all processes; (None, 0, 1) without a process group."""
    if group_up():
        return default_group()
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


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _check_fresh(state: TrainState) -> None:
    if state.opt_state["initialized"]:
        raise ValueError(
            "shard: lay the state out with step.init(state) before training; this state's optimizer "
            "state is already initialized"
        )
