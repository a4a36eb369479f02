"""The DeepSpeed layout: ``step.init`` builds the engine, the step runs through it.

How the transforms inside ``shard`` are turned into config (the design choice):

DeepSpeed's engine owns backward (``engine.backward``), gradient reduction, the
accumulation boundary, the loss scale, clipping and the optimizer step. The handlers of
``accumulate`` and ``mixed_precision`` would do the same jobs a second time (sum
micro-batch gradients, scale and unscale the loss). So the layout *strips* them: at wrap
time it reads their settings from the step's record (``step.xform``), turns them into
config (``config.py``), and keeps the user's own step (the function under them,
``__wrapped__``). At each call the layout, not ``accumulate``, splits the batch into the
micro-batches (``split_batch``, the same RNG salts), and runs the user's step once per
micro-batch under one handler that takes over the primitives:

- ``apply``: the engine's forward (its hooks gather ZeRO-3 params and arm its backward),
  inputs cast to the engine's model dtype (bf16/fp16), outputs to the policy's output
  dtype; the forward's randomness comes from the state's RNG key as everywhere else.
- ``value_and_grad``: the loss, then ``engine.backward`` (which divides by the
  accumulation steps; ``xf.Mean`` losses are normalized by the global item count, one
  small all-reduce). The gradients stay in the engine (partitioned under ZeRO-2/3); the
  dict returned holds empty placeholders, one per trainable parameter.
- ``apply_gradients``/``update``: ``engine.step``; at the accumulation boundary the state
  advances (``step``, data position); a step the engine skipped (fp16 overflow) keeps
  ``step`` and counts in ``state.transforms["nonfinite"]``, as on the native backend.

Other transforms inside ``shard`` are refused (DESIGN.md's handlers compose, but the
engine's backward cannot run under another transform's ``value_and_grad``).

The state's leaves after ``init``: ``params`` are the engine's model tensors (ZeRO-1/2:
the whole tensors, bf16 under bf16; ZeRO-3: this process's flat partition,
``param.ds_tensor``); ``opt_state["state"]`` holds, per optimizer group, the fp32
master partition (``"master"``) and the torch optimizer's state over it; ``step``, ``rng``,
``data`` and ``transforms`` are as on every backend. ``full_params(state)`` gathers the
float32 params whole (collective).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist

from xform.core.backend import relaid, static
from xform.core.group import group_up
from xform.core.mean import Mean
from xform.core.primitives import Handler, generator_for, installed, rng_guard, rng_salt
from xform.core.state import TrainState
from xform.core.strategies import DeepSpeed
from xform.core.transform import check_result, transforms_of
from xform.transforms.accumulate import combine_metrics, split_batch

from .config import Settings, generate_config, model_dtype, settings_of

__all__ = ["DeepSpeedLayout", "engine_of", "full_params", "estimate_stage_memory"]

_ENGINE = "_xform_deepspeed_engine"  # in the module's __dict__: the engine that wraps it
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def engine_of(state_or_module: Any) -> Any:
    """The DeepSpeed engine a state (or module) was laid out with by ``step.init``, or None."""
    module = state_or_module if isinstance(state_or_module, torch.nn.Module) else static(state_or_module).module
    return module.__dict__.get(_ENGINE)


def _strip(step: Any) -> Any:
    """The user's step under the transforms the engine takes over."""
    for _ in transforms_of(step).applied:  # all of them engine-owned (settings_of refuses others)
        step = step.__wrapped__  # each transform's functools.wraps
    return step


class DeepSpeedLayout:
    """``xf.DeepSpeed`` on the DeepSpeed engine (see the module docs)."""

    def __init__(self, strategy: DeepSpeed, inner: Any):
        self.strategy = strategy
        self.settings: Settings = settings_of(transforms_of(inner))
        model_dtype(self.settings)  # refuses a policy the engine cannot run, at wrap time
        self.step = _strip(inner)
        self.chosen: tuple[int, str | None, str | None] | None = None  # stage="auto"'s choice, once made

    # --- init -------------------------------------------------------------------------

    def init(self, state: TrainState) -> TrainState:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if not group_up():
            raise RuntimeError(
                "shard: the DeepSpeed backend needs a process group; call xf.distributed.initialize() at the start "
                "of the script (xform launch sets the environment it reads)"
            )
        if state.opt_state["initialized"]:
            raise ValueError(
                "shard: lay the state out with step.init(state) before training; this state's optimizer state is "
                "already initialized"
            )
        spec = static(state)
        module = spec.module
        if engine_of(module) is not None:
            raise ValueError(
                "shard: this model is already wrapped by a DeepSpeed engine (step.init ran on a state of it before); "
                "build a fresh model and state (TrainState.create(model(), ...)) for each step.init"
            )
        own = dict(module.named_parameters())
        if any(own.get(k) is not t for k, t in state.params.items()):
            raise ValueError(
                "shard: the DeepSpeed engine trains the module's own parameters, but this state's params are other "
                "tensors; call step.init on the state TrainState.create returned"
            )
        dtype = model_dtype(self.settings)
        if dtype == "float16" and not get_accelerator().is_fp16_supported():
            raise ValueError(
                f"shard: DeepSpeed does not run float16 on this device ({get_accelerator().device_name()}); "
                "use mixed_precision(step, 'bf16') or run on a GPU"
            )
        stage, off_opt, off_par = self._stage(state)
        config = generate_config(
            self.strategy, self.settings, max_grad_norm=spec.max_grad_norm,
            stage=stage, offload_optimizer=off_opt, offload_params=off_par,
        )
        optimizer = spec.optimizer([state.params[k] for k in spec.trainable])
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
        module.__dict__[_ENGINE] = engine
        from .checkpoint import HOOK, DeepSpeedCheckpoint

        module.__dict__[HOOK] = DeepSpeedCheckpoint(engine, stage)  # what xf.save/xf.load call for this state
        engine.__dict__["_xform"] = _Bound(engine, stage, _DTYPES[dtype], self.settings, spec.trainable)
        params = _param_leaves(engine, module)
        return relaid(state, "shard(DeepSpeed).init", params=params, opt_state=_opt_leaves(engine, False))

    def _stage(self, state: TrainState) -> tuple[int, str | None, str | None]:
        s = self.strategy
        if s.stage != "auto":
            return s.stage, s.offload_optimizer, s.offload_params
        return choose_stage(state, s, self.settings)

    def handler(self) -> Handler:
        raise RuntimeError("shard: the DeepSpeed layout runs the step itself (run)")

    # --- the step -----------------------------------------------------------------------

    def run(self, state: TrainState, batch: Any):
        engine = engine_of(state)
        if engine is None:
            raise ValueError("shard: this state has no DeepSpeed engine; call state = step.init(state) first")
        bound: _Bound = engine.__dict__["_xform"]
        k = self.settings.accumulation
        handler = _Handler(engine, bound)
        if k == 1:
            with installed(handler):
                out = check_result("shard", self.step(state, batch))
            if handler.calls != 1:
                raise RuntimeError(_ONCE.format(where="the step"))
            return out
        metrics = []
        with installed(handler), rng_guard(generator_for(static(state).device)):
            for i, micro in enumerate(split_batch("accumulate", batch, k)):
                handler.calls = 0
                with rng_salt(i):
                    state, m = check_result("accumulate", self.step(state, micro))
                if handler.calls != 1:
                    raise RuntimeError(_ONCE.format(where=f"micro-batch {i}"))
                metrics.append(m)
        return state, combine_metrics(metrics)


_ONCE = "shard: the step must call state.apply_gradients exactly once; it did not on {where}"


class _Bound:
    """What the layout keeps beside its engine."""

    __slots__ = ("engine", "stage", "dtype", "settings", "placeholders")

    def __init__(self, engine: Any, stage: int, dtype: torch.dtype, settings: Settings, trainable: tuple[str, ...]):
        self.engine, self.stage, self.dtype, self.settings = engine, stage, dtype, settings
        # The engine holds the gradients: value_and_grad returns one empty tensor per trainable param.
        self.placeholders = {k: torch.empty(0) for k in trainable}


def _param_leaves(engine: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    if engine.zero_optimization_partition_weights():  # ZeRO-3: the local partition
        return {k: p.ds_tensor for k, p in params.items()}
    return params


def _flats(engine: Any) -> dict[str, torch.Tensor]:
    """The fp32 master partitions the optimizer steps, by name ``group{i}``. (ZeRO-3 puts
    them in the torch optimizer's param groups only while it steps.)"""
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", None)
    if flats is None:  # no ZeRO partitions: the optimizer's own params
        flats = [p for g in zero.optimizer.param_groups for p in g["params"]]
    return {f"group{i}": p for i, p in enumerate(flats)}


def _opt_leaves(engine: Any, initialized: bool) -> dict[str, Any]:
    """Per optimizer group: the fp32 master partition and the optimizer's state over it."""
    inner = engine.optimizer.optimizer
    out: dict[str, Any] = {}
    for name, p in _flats(engine).items():
        out[name] = {"master": p, **inner.state.get(p, {})}
    return {"initialized": initialized, "state": out}


# --- the handler --------------------------------------------------------------------------


def _cast(x: Any, dtype: torch.dtype) -> Any:
    from xform.transforms.mixed_precision import _cast_floats

    return _cast_floats(x, dtype)


class _Handler(Handler):
    """Takes over the primitives for one call of the step (see the module docs)."""

    def __init__(self, engine: Any, bound: _Bound):
        self.engine, self.bound = engine, bound
        self.calls = 0
        self.grads: dict[str, torch.Tensor] | None = None
        self.params: dict[str, torch.Tensor] | None = None

    def apply(self, state, params, args, kwargs, next):
        if params is not state.params:
            raise ValueError(
                "xf.apply: under the DeepSpeed backend the engine holds the model; pass the params the loss "
                "function receives (state.params), not other tensors"
            )
        from xform.core.primitives import _RNG, _next_seed  # the forward's randomness, as apply's base draws it

        gen = generator_for(static(state).device)
        frame = _RNG.get()
        saved = None if frame is not None and frame.guarded else gen.get_state()
        gen.manual_seed(_next_seed(state, frame))
        dtype = self.bound.dtype
        try:
            if dtype != torch.float32:
                args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
            out = self.engine(*args, **kwargs)
        finally:
            if saved is not None:
                gen.set_state(saved)
        return _cast(out, torch.float32) if dtype != torch.float32 else out

    def value_and_grad(self, fn, params, has_aux, next):
        with rng_salt():
            out = fn(params)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"xf.value_and_grad: with has_aux=True the function must return (loss, aux), got {type(out).__name__}")
            loss, aux = out
        else:
            loss, aux = out, None
        if isinstance(loss, Mean):
            objective = self._global_mean(loss)
        else:
            objective = loss
        if not isinstance(objective, torch.Tensor) or objective.numel() != 1 or not objective.is_floating_point():
            raise ValueError(
                "xf.value_and_grad: the loss must be a scalar floating-point tensor or xf.Mean; reduce it "
                "(loss.mean(), or xf.Mean(loss.sum(), n))"
            )
        self.engine.backward(objective.reshape(()))
        self.grads = self.bound.placeholders
        value = loss.detach() if isinstance(loss, (Mean, torch.Tensor)) else loss
        return ((value, aux) if has_aux else value), dict(self.grads)

    def _global_mean(self, loss: Mean) -> torch.Tensor:
        if self.bound.settings.accumulation > 1:
            raise ValueError(
                "shard: an xf.Mean loss under the DeepSpeed backend with accumulate is not supported in this version "
                "(the engine divides every micro-batch by the accumulation steps, before the global item count is "
                "known); return a plain mean loss, or use the torch backend"
            )
        count = torch.as_tensor(loss.count, dtype=torch.float64).detach().reshape(()).clone()
        dist.all_reduce(count)
        world = dist.get_world_size()
        return loss.total * (world / float(count))  # the engine averages over the processes

    def apply_gradients(self, state, grads, count, next):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("shard: the step called state.apply_gradients twice; a step must call it exactly once")
        if self.grads is None or any(g is not self.grads.get(k) for k, g in grads.items()):
            raise ValueError(
                "shard: under the DeepSpeed backend the engine holds the gradients; pass state.apply_gradients the "
                "grads xf.value_and_grad returned, unchanged (change the loss instead)"
            )
        self.grads = None
        engine = self.engine
        boundary = engine.is_gradient_accumulation_boundary()
        spec = static(state)
        if boundary and spec.schedule is not None:
            lr = float(spec.schedule(state.step))
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
        skipped = engine.skipped_steps
        engine.step()
        if not boundary:
            return state
        updated = engine.skipped_steps == skipped
        transforms = dict(state.transforms)
        counter = transforms.get("nonfinite")
        if counter is not None:
            if updated:
                counter = {**counter, "consecutive": 0}
            else:
                counter = {"skipped": counter["skipped"] + 1, "consecutive": counter["consecutive"] + 1}
                limit = spec.max_consecutive_skips
                if limit is not None and counter["consecutive"] >= limit:
                    raise FloatingPointError(
                        f"shard: DeepSpeed skipped {counter['consecutive']} updates in a row (gradient overflow), "
                        f"step {state.step}; lower the learning rate, use bf16, or raise "
                        "TrainState.create(max_consecutive_skips=...)"
                    )
            transforms["nonfinite"] = counter
        scale = transforms.get("mixed_precision")
        if isinstance(scale, dict) and "scale" in scale:  # fp16: the engine's loss scale, visible as in mixed_precision
            cur = float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0)))
            transforms["mixed_precision"] = {**scale, "scale": torch.tensor(cur, dtype=scale["scale"].dtype)}
        changes: dict[str, Any] = {"transforms": transforms}
        if updated and not state.opt_state["initialized"]:
            changes["opt_state"] = _opt_leaves(engine, True)
        return state.successor(updated=updated, **changes)


# --- full params (for tests, export and checkpoints) -----------------------------------------


def full_params(state: TrainState) -> dict[str, torch.Tensor]:
    """The float32 params whole, on every process (the engine's fp32 masters for
    trainable params, its model tensors otherwise). Collective: every process calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine = engine_of(state)
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[name] = safe_get_full_fp32_param(p).detach().clone().float()
        else:
            out[name] = _gathered(engine, p).float()
    return out


def _gathered(engine: Any, p: torch.Tensor) -> torch.Tensor:
    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    return p.detach().clone()


# --- stage="auto" -------------------------------------------------------------------------

_CANDIDATES = ((1, None, None), (2, None, None), (3, None, None), (3, "cpu", None), (3, "cpu", "cpu"))


def estimate_stage_memory(
    n_params: int, opt_bytes_per_param: float, world: int, stage: int, *, low_precision: bool,
    offload_optimizer: str | None = None, offload_params: str | None = None,
) -> int:
    """Estimated bytes of model states per process on the device (params, gradients,
    fp32 master and optimizer state; activations not included), DeepSpeed's layout.

    Example:
        >>> from xform.backends.deepspeed.layout import estimate_stage_memory
        >>> [estimate_stage_memory(10**6, 8, 4, s, low_precision=True) // 10**6 for s in (1, 2, 3)]
        [7, 5, 4]
    """
    w = 2 if low_precision else 4
    weights, grads, states = n_params * w, n_params * w, n_params * (4 + opt_bytes_per_param)
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    states /= world
    if offload_optimizer is not None:
        states = 0
    if offload_params is not None:
        weights = 0
    return int(math.ceil(weights + grads + states))


def _budget(strategy: DeepSpeed, device: torch.device) -> tuple[int, str]:
    if strategy.memory_budget is not None:
        return strategy.memory_budget, "memory_budget"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(psutil.virtual_memory().available // max(local, 1)), f"available host memory / {local} local processes"


def choose_stage(state: TrainState, strategy: DeepSpeed, settings: Settings) -> tuple[int, str | None, str | None]:
    """``stage="auto"``: the first of stage 1, 2, 3, 3 + optimizer offload, 3 + both
    offloads whose estimate fits the budget; printed on rank 0 with the estimates."""
    spec = static(state)
    names = spec.trainable
    n = sum(state.params[k].numel() for k in state.params)
    opt_bytes = 0
    for k in names:
        for v in state.opt_state["state"][k].values():
            if isinstance(v, torch.Tensor) and v.numel() == state.params[k].numel():
                opt_bytes += v.numel() * v.element_size()
    per_param = opt_bytes / max(1, sum(state.params[k].numel() for k in names))
    world = dist.get_world_size()
    low = model_dtype(settings) != "float32"
    budget, where = _budget(strategy, spec.device)
    rows = []
    choice = None
    for stage, oo, op in _CANDIDATES:
        est = estimate_stage_memory(n, per_param, world, stage, low_precision=low, offload_optimizer=oo, offload_params=op)
        label = f"stage {stage}" + (f" + offload_optimizer={oo!r}" if oo else "") + (f" + offload_params={op!r}" if op else "")
        rows.append(f"{label}: {est / 2**20:.2f} MiB")
        if choice is None and est <= budget:
            choice = (stage, oo, op, label, est)
    table = "; ".join(rows)
    if choice is None:
        raise ValueError(
            f"shard: DeepSpeed(stage='auto'): no stage fits the budget of {budget / 2**20:.2f} MiB per process ({where}); "
            f"estimates of the model states per process: {table}; add processes or memory, or raise memory_budget"
        )
    stage, oo, op, label, est = choice
    if dist.get_rank() == 0:
        print(
            f"DeepSpeed(stage='auto'): chose {label}, estimated {est / 2**20:.2f} MiB of model states per process, "
            f"budget {budget / 2**20:.2f} MiB ({where}); estimates: {table}",
            flush=True,
        )
    return stage, oo, op
