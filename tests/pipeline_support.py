"""Functions the pipeline tests run in pool processes (importable by spawned workers)."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf

N = 16  # global batch rows


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
    )


def step(state, batch):
    """A plain mean loss."""

    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def mean_step(state, batch):
    """A loss that is a sum over the rows whose weight is nonzero (an ``xf.Mean``)."""

    def loss_fn(params):
        err = ((xf.apply(state, params, batch["x"]) - batch["y"]) ** 2).sum(-1) * batch["w"]
        return xf.Mean(err.sum(), (batch["w"] > 0).sum())

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


STEPS = {"plain": step, "mean": mean_step}
OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
}


def data(steps: int = 3, n: int = N, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        w = (torch.rand(n, generator=g) > 0.3).float()  # uneven per micro-batch: a wrong count shows
        out.append({"x": torch.randn(n, 5, generator=g), "y": torch.randn(n, 3, generator=g), "w": w})
    return out


def reference(loss: str, opt: str, steps: int = 3, accumulate: int = 1, load: str | None = None, start: int = 0):
    """The single-process step on global batches [start, steps): params and losses."""
    s = STEPS[loss] if accumulate == 1 else xf.accumulate(STEPS[loss], accumulate)
    state = xf.TrainState.create(model(), optimizer=OPTIMIZERS[opt])
    if load:
        state = xf.load(load, like=state)
    losses = []
    for b in data(steps)[start:]:
        state, m = s(state, b)
        losses.append(_loss(m["loss"]))
    return {k: v.detach().clone() for k, v in state.params.items()}, losses


def _loss(v) -> float:
    return float(v.total / v.count) if isinstance(v, xf.Mean) else float(v)


def pipelined(
    schedule: str, loss: str, opt: str, *, dp: int = 1, steps: int = 3, microbatches: int = 2,
    accumulate: int = 1, split=None, stages=None, dp_mode: str = "replicate", tp: int = 1, tp_plan=None,
    save: str | None = None, load: str | None = None, start: int = 0,
):
    """Trains on this process's slice of the global batches under a pipeline; returns
    this process's params (whole, gathered from DTensors), the losses it saw, and its step."""
    world = dist.get_world_size()
    pp = world // dp // tp
    strategy = xf.Pipeline(
        schedule=schedule, microbatches=microbatches, split=split, stages=stages,
        data_parallel=dp_mode if dp > 1 else None,
        tensor_parallel=xf.TensorParallel(plan=tp_plan) if tp > 1 else None,
    )
    mesh = xf.mesh(pp=pp, dp=dp) if dp > 1 else xf.mesh(pp=pp, tp=tp) if tp > 1 else None
    s = xf.shard(STEPS[loss], strategy, mesh=mesh)
    if accumulate > 1:
        s = xf.accumulate(s, accumulate)
    state = s.init(xf.TrainState.create(model(), optimizer=OPTIMIZERS[opt]))
    if load:
        state = xf.load(load, like=state)
    dp_rank = mesh["dp"].get_local_rank() if dp > 1 else 0
    losses = []
    for b in data(steps)[start:]:
        n = b["x"].shape[0] // dp
        state, m = s(state, {k: v[dp_rank * n : (dp_rank + 1) * n] for k, v in b.items()})
        losses.append(_loss(m["loss"]))
    if save:
        xf.save(state, save)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.params.items()}
    return full, losses, state.step


def error_of(case: str) -> str:
    """Runs one misuse on every process and returns the error message."""
    try:
        if case == "tp_axis":
            xf.shard(step, xf.Pipeline(), mesh=xf.mesh(pp=2, tp=2)).init(
                xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1)
            )
        elif case == "not_sequential":
            class Net(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

                def forward(self, x):
                    return self.b(self.a(x))

            xf.shard(step, xf.Pipeline(), mesh=None).init(xf.TrainState.create(Net(), optimizer=torch.optim.SGD, lr=0.1))
        elif case == "two_applies":
            def bad(state, batch):
                def loss_fn(params):
                    out = xf.apply(state, params, batch["x"])
                    return F.mse_loss(out, batch["y"]) + xf.apply(state, params, batch["x"]).mean()

                loss, grads = xf.value_and_grad(loss_fn)(state.params)
                return state.apply_gradients(grads), {"loss": loss}

            s = xf.shard(bad, xf.Pipeline(schedule="gpipe"))
            state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))
            s(state, data(1)[0])
        elif case == "no_apply":
            def bad(state, batch):
                loss, grads = xf.value_and_grad(lambda p: sum(v.sum() for v in p.values()))(state.params)
                return state.apply_gradients(grads), {"loss": loss}

            s = xf.shard(bad, xf.Pipeline(schedule="gpipe"))
            state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))
            s(state, data(1)[0])
        elif case == "indivisible_batch":
            s = xf.shard(step, xf.Pipeline(schedule="gpipe", microbatches=4))
            state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))
            s(state, {k: v[:6] for k, v in data(1)[0].items()})
        elif case == "interleaved_one_stage":
            xf.shard(step, xf.Pipeline(schedule="interleaved_1f1b", stages=2)).init(
                xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1)
            )
        else:
            raise AssertionError(case)
    except (ValueError, TypeError, RuntimeError) as e:
        return str(e)
    return "no error"


def resident(schedule: str) -> list[str]:
    """The module's parameters that hold values on this process after ``init``."""
    s = xf.shard(step, xf.Pipeline(schedule=schedule))
    state = s.init(xf.TrainState.create(model(), optimizer=OPTIMIZERS["sgd"]))
    names = sorted(k for k, p in state.module.named_parameters() if not p.is_meta)
    assert names == sorted(state.params), (names, sorted(state.params))
    return names


def dropout_twice() -> bool:
    """The same pipelined step with dropout, twice from copies of one state: equal."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    s = xf.shard(step, xf.Pipeline(schedule="1f1b"))
    state = s.init(xf.TrainState.create(net, optimizer=OPTIMIZERS["sgd"]))
    b = data(1)[0]
    one, m1 = s(state.copy(), b)
    torch.rand(3)  # the global generator moves: the step must not depend on it
    two, m2 = s(state.copy(), b)
    return all(torch.equal(one.params[k], two.params[k]) for k in one.params) and float(m1["loss"]) == float(m2["loss"])


def save_single(path: str, steps: int = 2) -> None:
    """Trains one process (no group) for ``steps`` global batches and saves."""
    s = xf.TrainState.create(model(), optimizer=OPTIMIZERS["adamw"])
    for b in data(steps):
        s, _ = step(s, b)
    xf.save(s, path)
