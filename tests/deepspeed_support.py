"""Functions the DeepSpeed tests run in pool processes (importable by spawned workers)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf

OPTIMIZERS = {
    "sgd": dict(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9),
    "adamw": dict(optimizer=torch.optim.AdamW, lr=1e-2),
}


def _schedule(step: int) -> float:
    return 0.2 / (1 + step)


OPTIMIZERS["sgd-schedule"] = dict(optimizer=torch.optim.SGD, lr=_schedule, momentum=0.9)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def step(state, batch):
    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def sum_step(state, batch):
    """A sum over items returned as xf.Mean: normalized by the global item count."""

    def loss_fn(params):
        err = (xf.apply(state, params, batch["x"]) - batch["y"]).square().sum(-1)
        return xf.Mean(err.sum(), torch.tensor(float(err.numel())))

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def data(steps: int = 4, n: int = 8, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, 5, generator=g), "y": torch.randn(n, 3, generator=g)} for _ in range(steps)]


def world() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def wrapped(acc: int, precision: str, fn=step):
    s = fn
    if precision != "fp32":
        s = xf.mixed_precision(s, precision)
    return xf.accumulate(s, acc)


def fresh(opt: str, clip: float | None = None):
    return xf.TrainState.create(model(), max_grad_norm=clip, **OPTIMIZERS[opt])


def reference(acc: int, precision: str, opt: str, steps: int = 4, clip: float | None = None, loss: str = "step", rows=None):
    """The single-process native step on the global batches: the full params after ``steps``."""
    s = wrapped(acc, precision, globals()[loss])
    state = getattr(s, "init", lambda x: x)(fresh(opt, clip))
    for b in data(steps):
        if rows is not None:
            b = {k: v[:rows] for k, v in b.items()}
        state, _ = s(state, b)
    return {k: v.detach().clone() for k, v in state.params.items()}, state.step


def mine(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    size, rank = world()
    n = b["x"].shape[0] // size
    return {k: v[rank * n : (rank + 1) * n] for k, v in b.items()}


def ds_run(stage, acc: int, precision: str, opt: str, steps: int = 4, clip: float | None = None, loss: str = "step"):
    """The same on this process's slice, under xf.DeepSpeed(stage): the full fp32 params after ``steps``."""
    from xform.backends.deepspeed import full_params

    s = xf.shard(wrapped(acc, precision, globals()[loss]), xf.DeepSpeed(stage=stage))
    state = s.init(fresh(opt, clip))
    losses = []
    for b in data(steps):
        state, metrics = s(state, mine(b))
        losses.append(float(metrics["loss"] if not isinstance(metrics["loss"], xf.Mean) else metrics["loss"].value))
    return full_params(state), state.step, losses


def ds_phase(stage, acc: int, precision: str, opt: str, path: str | None, start: int, stop: int, load: str | None = None):
    """Trains under xf.DeepSpeed(stage) on global batches [start, stop) (this process's
    slice), loading ``load`` first and saving to ``path`` after: the full fp32 params,
    the step, and the params' leaves as the engine holds them (for a bit-exact check)."""
    from xform.backends.deepspeed import full_params

    s = xf.shard(wrapped(acc, precision), xf.DeepSpeed(stage=stage))
    state = s.init(fresh(opt))
    if load:
        state = xf.load(load, like=state)
    for b in data()[start:stop]:
        state, _ = s(state, mine(b))
    if path:
        xf.save(state, path)
    leaves = {k: v.detach().clone() for k, v in state.params.items()}
    return full_params(state), state.step, leaves, dict(state.data)


def plain_phase(acc: int, precision: str, opt: str, load: str, start: int, stop: int):
    """One process, no DeepSpeed: loads a DeepSpeed checkpoint into a plain state and
    trains on [start, stop): the params right after loading and at the end."""
    s = wrapped(acc, precision)
    state = xf.load(load, like=getattr(s, "init", lambda x: x)(fresh(opt)))
    loaded = {k: v.detach().clone() for k, v in state.params.items()}
    for b in data()[start:stop]:
        state, _ = s(state, b)
    return loaded, {k: v.detach().clone() for k, v in state.params.items()}, state.step


def error_of(fn_name: str, *args) -> str:
    try:
        globals()[fn_name](*args)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def other_model_load(path: str):
    """Loads a checkpoint of ``model()`` into a DeepSpeed state of a wider model."""
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(5, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    s = xf.shard(wrapped(1, "fp32"), xf.DeepSpeed(stage=2))
    xf.load(path, like=s.init(xf.TrainState.create(wide, **OPTIMIZERS["sgd"])))


def auto_stage(budget: int):
    """The stage (and offload) stage='auto' picks under ``budget`` bytes per process."""
    from xform.backends.deepspeed import engine_of

    s = xf.shard(wrapped(1, "fp32"), xf.DeepSpeed(stage="auto", memory_budget=budget))
    engine = engine_of(s.init(fresh("adamw")))
    return engine.zero_optimization_stage()


def fp16_on_cpu():
    xf.shard(wrapped(1, "fp16"), xf.DeepSpeed(stage=2)).init(fresh("sgd"))


def native_phase(strategy: str | None, path: str | None, start: int, stop: int, acc: int = 2, opt: str = "adamw"):
    """The native backend (or one plain process: ``strategy`` None) on [start, stop), saving to ``path``."""
    s = wrapped(acc, "fp32")
    if strategy is not None:
        s = xf.shard(s, strategy)
    state = getattr(s, "init", lambda x: x)(fresh(opt))
    size, rank = world() if strategy is not None else (1, 0)
    for b in data()[start:stop]:
        n = b["x"].shape[0] // size
        state, _ = s(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
    xf.save(state, path)
    return state.step
