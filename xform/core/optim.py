"""The optimizer inside a ``TrainState``: its construction, its state as pytree leaves,
and one update step (clipping, schedule, the update)."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

if TYPE_CHECKING:
    from xform.core.state import TrainState

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def optimizer_step(
    state: "TrainState",
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    total_norm: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
) -> None:
    """One step of ``optimizer`` on ``params`` with ``grads``: gradient clipping, the
    learning-rate schedule, the update. ``total_norm`` computes the global gradient norm
    when ``grads`` are only this process's shards."""
    spec = state._spec
    if grads and grads[0].dtype != params[0].dtype:
        grads = [g.to(p.dtype) for g, p in zip(grads, params)]
    if spec.max_grad_norm is not None:
        norm = total_norm(grads) if total_norm else _norm(grads)
        torch._foreach_mul_(grads, torch.clamp(spec.max_grad_norm / (norm + 1e-6), max=1.0))
    if spec.schedule is not None:
        lr = float(spec.schedule(state._step))
        for group in optimizer.param_groups:
            group["lr"] = lr
    for p, g in zip(params, grads):
        p.grad = g
    was = torch.is_grad_enabled()  # torch.no_grad() without its context object, once per update
    torch._C._set_grad_enabled(False)
    try:
        optimizer.step()
    finally:
        torch._C._set_grad_enabled(was)
    for p in params:
        p.grad = None


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    if hasattr(grads[0], "full_tensor"):  # DTensor gradients: the norm over all shards
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _optimizer_factory(optimizer: Any, kwargs: dict[str, Any]) -> OptimizerFactory:
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if "foreach" not in kwargs and "fused" not in kwargs and _accepts(optimizer, "foreach"):
            kwargs = {**kwargs, "foreach": True}  # torch picks the per-tensor loop on CPU otherwise
        return functools.partial(optimizer, **kwargs)
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "TrainState.create: optimizer must be an optimizer class or a factory, got an optimizer "
            f"instance ({type(optimizer).__name__}); pass optimizer={type(optimizer).__name__}, lr=... "
            "or functools.partial(...)"
        )
    if not callable(optimizer):
        raise TypeError(
            f"TrainState.create: optimizer must be a torch.optim.Optimizer subclass or a callable "
            f"params -> optimizer, got {optimizer!r}"
        )
    if kwargs:
        raise TypeError(
            f"TrainState.create: keyword arguments {sorted(kwargs)} go to an optimizer class, but "
            "optimizer is a factory; bind them in the factory (functools.partial(torch.optim.AdamW, lr=...))"
        )
    return optimizer


def _accepts(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def placeholder_opt_state(factory, params: Mapping[str, torch.Tensor], names) -> dict[str, dict[str, Any]]:
    """The optimizer state's structure, found by one update on meta tensors.

    torch.optim creates its state lazily at the first step; a checkpoint needs the
    structure up front so that ``load(path, like=fresh_state)`` can check it. The
    values are placeholders (zeros, laid out like their parameter: a sharded parameter
    gets sharded placeholders) and are replaced by the real initial state at the first
    update.
    """
    local = {k: local_part(params[k]) for k in names}
    metas = [torch.nn.Parameter(torch.empty_like(local[k], device="meta")) for k in names]
    for m in metas:
        m.grad = torch.empty_like(m)
    try:
        probe = factory(metas)
    except (TypeError, ValueError) as e:
        raise type(e)(f"TrainState.create: the optimizer rejected its arguments: {e}") from e
    if not isinstance(probe, torch.optim.Optimizer):
        raise TypeError(
            f"TrainState.create: the optimizer factory returned {type(probe).__name__}, not a torch.optim.Optimizer"
        )
    try:
        probe.step()
    except Exception as e:  # an optimizer that cannot run on meta tensors
        raise ValueError(
            f"TrainState.create: could not find the optimizer's state structure by a dry step on meta "
            f"tensors ({type(e).__name__}: {e}); optimizers must run on any device"
        ) from e
    out: dict[str, dict[str, Any]] = {}
    for k, m in zip(names, metas):
        real = params[k]
        entry = {}
        for key, v in probe.state.get(m, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == m.shape and v.shape != ():
                entry[key] = torch.zeros_like(real.detach(), dtype=v.dtype)
            elif isinstance(v, torch.Tensor):
                device = local[k].device if v.device.type == "meta" else v.device
                entry[key] = torch.zeros(v.shape, dtype=v.dtype, device=device)
            else:
                entry[key] = v
        out[k] = entry
    return out


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` on this process: a DTensor's local shard, else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def build_optimizer(factory: OptimizerFactory, names, params, opt_state: dict[str, Any]) -> torch.optim.Optimizer:
    """An optimizer over ``params`` (a dict, or a list in ``names`` order) holding
    ``opt_state``'s tensors as its state once that is initialized."""
    plist = [params[k] for k in names] if isinstance(params, Mapping) else list(params)
    optimizer = factory(plist)
    if opt_state["initialized"]:
        for k, p in zip(names, plist):
            optimizer.state[p] = dict(opt_state["state"][k])
    return optimizer


def adopt_opt_state(optimizer, names, params, old) -> dict[str, dict[str, Any]]:
    """Moves the optimizer's freshly created state into the placeholder tensors (whose
    local part has the same shape) and points the optimizer at them."""
    out = {}
    for k, p in zip(names, params):
        live = optimizer.state[p]
        entry = {}
        for key, v in live.items():
            ph = old["state"][k].get(key)
            if not (isinstance(v, torch.Tensor) and isinstance(ph, torch.Tensor) and ph.dtype == v.dtype):
                entry[key] = live[key] = v
            elif is_dtensor(v) or not is_dtensor(ph):  # alike: copy whole
                ph.copy_(v)
                entry[key] = live[key] = ph
            else:  # a local shard in the optimizer, a DTensor in the state
                local_part(ph).copy_(v)
                entry[key], live[key] = ph, local_part(ph)
        out[k] = entry
    return out
