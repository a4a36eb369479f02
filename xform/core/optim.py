"""The optimizer inside a ``TrainState``: its construction, its state as pytree leaves,
and one update step (clipping, schedule, the update)."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.optim.adam as _adam
import torch.optim.optimizer as _optimizer_module
import torch.optim.sgd as _sgd

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
    was = torch.is_grad_enabled()  # torch.no_grad() without its context object, once per update
    torch._C._set_grad_enabled(False)
    try:
        direct = _direct(optimizer, params)
        if direct is not None:
            direct(grads)
            return
        for p, g in zip(params, grads):
            p.grad = g
        try:
            optimizer.step()
        finally:
            for p in params:
                p.grad = None
    finally:
        torch._C._set_grad_enabled(was)


# --- torch.optim's update without its per-call Python -------------------------------------
# ``optimizer.step()`` spends more on Python than on math for small models: a profiler
# range and hook walk, a grad-mode wrapper, and a walk over every parameter to gather the
# ``.grad``s and state tensors into lists (``_init_group``); xform also had to set and clear
# each ``p.grad``. Once the optimizer's state exists, those lists never change for a state's
# optimizer (its tensors are updated in place), so xform gathers them once and calls the
# same functional update ``step()`` calls (``torch.optim.adam.adam``, ``torch.optim.sgd.sgd``),
# with the group's hyperparameters read at each call (a schedule changes ``lr``). Same
# function, same arguments: the same result, bit for bit (tests/test_optim_direct.py). Only
# for the exact classes whose ``step`` is torch's own, and only while nothing observes
# ``step()``: with a step hook, a profiler or a CUDA graph capture, ``step()`` runs as usual.

_NOT_DIRECT = "not direct"  # cached on an optimizer that can never take the direct path


def _direct(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> "Callable[[list[torch.Tensor]], None] | None":
    """The direct update of ``optimizer`` over ``params`` (its params, in ``build_optimizer``'s
    order), or None where ``optimizer.step()`` must run."""
    if not isinstance(optimizer, torch.optim.Optimizer):  # offload's streamed and host updates
        return None
    plan = optimizer.__dict__.get("_xform_direct")
    if plan is _NOT_DIRECT:
        return None
    if (
        optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
        or _optimizer_module._global_optimizer_pre_hooks or _optimizer_module._global_optimizer_post_hooks
        or torch.autograd.profiler._is_profiler_enabled
    ):
        return None
    if plan is None or not plan.fits(optimizer, params):
        plan = optimizer.__dict__["_xform_direct"] = _DirectUpdate.build(optimizer, params)
        if not isinstance(plan, _DirectUpdate):
            return None
    if plan.cuda and torch.cuda.is_current_stream_capturing():
        return None
    return plan


class _DirectUpdate:
    """One optimizer's update as a call of torch's functional update on lists gathered once."""

    __slots__ = ("kind", "groups", "params", "anchor", "cuda")

    def __init__(self, kind: str, groups: list[tuple[dict[str, Any], list[int], tuple[list[Any], ...], bool]], params, anchor, cuda: bool):
        self.kind = kind
        self.groups = groups  # (param group, positions of its params in `params`, state lists, has_complex)
        self.params = params
        self.anchor = anchor  # (the first param's state dict entry, the tensor cached from it)
        self.cuda = cuda

    @staticmethod
    def build(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> "_DirectUpdate | str | None":
        """The plan; ``_NOT_DIRECT`` for an optimizer that never fits; None while its state
        is not created yet (the first update runs ``step()``)."""
        step = inspect.unwrap(type(optimizer).step)
        kind = _KINDS.get(step)
        if kind is None or not params or optimizer.__dict__.get("grad_scale") is not None \
                or optimizer.__dict__.get("found_inf") is not None:
            return _NOT_DIRECT
        where = {id(p): i for i, p in enumerate(params)}
        groups, seen = [], 0
        for group in optimizer.param_groups:
            if group.get("differentiable") or any(id(p) not in where for p in group["params"]):
                return _NOT_DIRECT
            states = [optimizer.state.get(p) for p in group["params"]]
            if kind == "adam":
                if any(not s or "exp_avg" not in s for s in states):
                    return None
                lists = (
                    [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                    [s["step"] for s in states],
                )
            else:  # sgd: momentum buffers exist after the first step (none without momentum)
                if group["momentum"] != 0 and any(not s or s.get("momentum_buffer") is None for s in states):
                    return None
                lists = ([s["momentum_buffer"] for s in states] if group["momentum"] != 0 else [None] * len(states),)
            groups.append((group, [where[id(p)] for p in group["params"]], lists, any(torch.is_complex(p) for p in group["params"])))
            seen += len(group["params"])
        if seen != len(params):
            return _NOT_DIRECT
        first = optimizer.param_groups[0]["params"][0]
        key = "exp_avg" if kind == "adam" else "momentum_buffer"
        state = optimizer.state.get(first)  # None: plain SGD keeps no state
        anchor = (state, key, state.get(key) if state is not None else None)
        return _DirectUpdate(kind, groups, list(params), anchor, any(p.is_cuda for p in params))

    def fits(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
        """Whether ``params`` are the ones gathered and the lists still the optimizer's (its
        ``load_state_dict`` replaces the state)."""
        state, key, tensor = self.anchor
        mine = self.params
        return (
            len(params) == len(mine) and params[0] is mine[0] and params[-1] is mine[-1]
            and optimizer.state.get(mine[0]) is state and (state is None or state.get(key) is tensor)
        )

    def __call__(self, grads: list[torch.Tensor]) -> None:
        whole = len(self.groups) == 1
        for group, where, lists, has_complex in self.groups:
            params = self.params if whole else [self.params[i] for i in where]
            gs = grads if whole else [grads[i] for i in where]
            if self.kind == "adam":
                beta1, beta2 = group["betas"]
                exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
                _adam.adam(
                    params, gs, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
                    differentiable=group["differentiable"], fused=group["fused"], grad_scale=None,
                    found_inf=None, decoupled_weight_decay=group["decoupled_weight_decay"],
                )
            else:
                _sgd.sgd(
                    params, gs, lists[0], weight_decay=group["weight_decay"], momentum=group["momentum"],
                    lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                    maximize=group["maximize"], has_sparse_grad=False, foreach=group["foreach"],
                    fused=group["fused"], grad_scale=None, found_inf=None,
                )


def _kinds() -> dict[Any, str]:
    """The ``step`` functions whose functional update ``_DirectUpdate`` calls, where this
    torch's functional takes exactly the arguments it passes (else none: ``step()`` runs)."""
    lists = {
        "adam": {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"},
        "sgd": {"params", "d_p_list", "momentum_buffer_list"},
    }
    options = {
        "adam": {"amsgrad", "has_complex", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize", "foreach",
                 "capturable", "differentiable", "fused", "grad_scale", "found_inf", "decoupled_weight_decay"},
        "sgd": {"weight_decay", "momentum", "lr", "dampening", "nesterov", "maximize", "has_sparse_grad",
                "foreach", "fused", "grad_scale", "found_inf"},
    }
    out = {}
    for kind, cls, fn in (("adam", torch.optim.Adam, getattr(_adam, "adam", None)), ("sgd", torch.optim.SGD, getattr(_sgd, "sgd", None))):
        try:
            names = set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if names == lists[kind] | options[kind]:
            out[inspect.unwrap(cls.step)] = kind
    return out


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
    try:
        metas, probe = _probe(factory, [torch.empty_like(local[k], device="meta") for k in names])
    except _StepFailed as meta_error:  # e.g. a fused kernel, which refuses meta tensors
        # one element per parameter on its device: the same state keys and dtypes, and a state
        # tensor shaped like its parameter still is (a 0-d one stays 0-d)
        tiny = [torch.zeros([1] * local[k].dim(), dtype=local[k].dtype, device=local[k].device) for k in names]
        try:
            metas, probe = _probe(factory, tiny)
        except _StepFailed as e:
            first, second = meta_error.__cause__, e.__cause__
            raise ValueError(
                f"TrainState.create: could not find the optimizer's state structure by a dry step on meta "
                f"tensors ({type(first).__name__}: {first}) nor on one-element tensors "
                f"({type(second).__name__}: {second}); optimizers must run on any device and shape"
            ) from second
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


class _StepFailed(Exception):
    """The probe optimizer's step raised (its ``__cause__``)."""


def _probe(factory, tensors: list[torch.Tensor]):
    """``(params, optimizer)`` after one step of ``factory``'s optimizer on params made from
    ``tensors`` with zero gradients; ``_StepFailed`` when that step raises."""
    metas = [torch.nn.Parameter(t) for t in tensors]
    for m in metas:
        m.grad = torch.zeros_like(m)
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
    except Exception as e:
        raise _StepFailed() from e
    return metas, probe


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


_KINDS = _kinds()
