"""What the numerics tests run in pool processes (importable by spawned workers): fp16 and
non-finite gradients under every strategy and both nesting orders, the layout tag, unequal
batch sizes, ``apply_gradients`` twice.

The model is one ``Linear(5, 4)``: every gradient row belongs to one output, so a NaN or an
overflow injected into one output's loss reaches only the rows of that output, which ZeRO-2
and zero3 give to one process (rows 2 and 3 live on rank 1 of 2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import xform as xf

GLOBAL = 8  # rows of a global batch
COLUMN = 3  # the output whose loss is blown up: its gradient rows live on rank 1


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(5, 4)


def step(state, batch):
    def loss_fn(params):
        out = xf.apply(state, params, batch["x"])
        return ((out.float() - batch["y"]) ** 2 * batch["mult"]).mean()

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def mean_step(state, batch):
    """``step`` with the loss as ``xf.Mean`` over the elements (normalized by the global count)."""

    def loss_fn(params):
        out = xf.apply(state, params, batch["x"])
        per = (out.float() - batch["y"]) ** 2 * batch["mult"]
        return xf.Mean(per.sum(), per.numel())

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def batches(bad: tuple[int, ...], value: float, n: int = 3) -> list[dict[str, torch.Tensor]]:
    """``n`` global batches; in batch i of ``bad`` the rows of the second half (rank 1's
    slice on 2 processes) multiply output COLUMN's loss by ``value`` (1e38: an fp16 loss
    scale overflows it; nan: a NaN loss)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        mult = torch.ones(GLOBAL, 4)
        if i in bad:
            mult[GLOBAL // 2 :, COLUMN] = value
        out.append({"x": torch.randn(GLOBAL, 5, generator=g), "y": torch.randn(GLOBAL, 4, generator=g), "mult": mult})
    return out


def build(precision: str, order: str, k: int, strategy: str | None, loss: str = "plain"):
    """The step with mixed_precision inside shard ("inner": shard(accumulate(mp(f)))) or
    outside it ("outer": mp(shard(accumulate(f)))); accumulate only when k > 1."""

    def mp(s):
        return xf.mixed_precision(s, precision) if precision != "fp32" else s

    def acc(s):
        return xf.accumulate(s, k) if k > 1 else s

    step = globals()["step"] if loss == "plain" else mean_step
    if strategy is None:
        return mp(acc(step))
    mesh = xf.mesh(replicate=2, shard=dist.get_world_size() // 2) if strategy == "hsdp" else None
    if order == "inner":
        return xf.shard(acc(mp(step)), strategy, mesh=mesh)
    return mp(xf.shard(acc(step), strategy, mesh=mesh))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(
    precision: str, order: str, k: int, strategy: str | None, bad: tuple[int, ...], value: float, loss: str = "plain"
) -> dict[str, Any]:
    """Trains on this process's slice of each global batch; what every process saw."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if strategy else (1, 0)
    s = build(precision, order, k, strategy, loss)
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1)) if hasattr(s, "init") else (
        xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1)
    )
    scales, steps = [], []
    for b in batches(bad, value):
        n = GLOBAL // world
        state, _ = s(state, {key: v[rank * n : (rank + 1) * n] for key, v in b.items()})
        mp = state.transforms.get("mixed_precision")
        scales.append(float(mp["scale"]) if mp else None)
        steps.append(state.step)
    return {
        "params": {key: full(v) for key, v in state.params.items()},
        "scales": scales,
        "steps": steps,
        "consumed": state.data["consumed"],
        "nonfinite": dict(state.transforms.get("nonfinite", {})),
    }


def train_all(
    strategy: str, precision: str, bad: tuple[int, ...], value: float, loss: str = "plain"
) -> dict[tuple[str, int], Any]:
    """Every nesting order, with and without accumulate, under ``strategy``."""
    return {
        (order, k): train(precision, order, k, strategy, bad, value, loss) for order in ("inner", "outer") for k in (1, 2)
    }


# --- layout tag, batch sizes, apply_gradients twice -----------------------------------------


def error_of(fn_name: str, *args: Any) -> str:
    try:
        globals()[fn_name](*args)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def _plain_batch(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(rows, 5, generator=g), "y": torch.randn(rows, 4, generator=g), "mult": torch.ones(rows, 4)}


def without_init(strategy: str) -> None:
    s = xf.shard(step, strategy)
    state = xf.TrainState.create(model(), optimizer=torch.optim.AdamW, lr=0.1)
    for _ in range(2):
        state, _ = s(state, _plain_batch(4))


def laid_out_for_another(first: str, second: str) -> None:
    state = xf.shard(step, first).init(xf.TrainState.create(model(), optimizer=torch.optim.AdamW, lr=0.1))
    xf.shard(step, second)(state, _plain_batch(4))


def unequal_rows(loss: str) -> str:
    """4 rows on rank 0, 3 on rank 1: refused for a plain mean loss, exact for xf.Mean."""

    def mean_step(state, batch):
        def loss_fn(params):
            per_row = ((xf.apply(state, params, batch["x"]) - batch["y"]) ** 2).sum(-1)
            return xf.Mean(per_row.sum(), per_row.shape[0])

        loss_, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss_}

    s = xf.shard(step if loss == "plain" else mean_step, "replicate")
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))
    b = _plain_batch(7)
    mine = {k: (v[:4] if dist.get_rank() == 0 else v[4:]) for k, v in b.items()}
    state, _ = s(state, mine)
    return "trained"


def apply_gradients_twice(strategy: str, precision: str) -> None:
    def twice(state, batch):
        loss, grads = xf.value_and_grad(
            lambda p: ((xf.apply(state, p, batch["x"]) - batch["y"]) ** 2).mean()
        )(state.params)
        state = state.apply_gradients(grads)
        return state.apply_gradients(grads), {"loss": loss}

    s = xf.mixed_precision(twice, precision) if precision != "fp32" else twice
    s = xf.shard(s, strategy) if strategy else s
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1)) if hasattr(s, "init") else (
        xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1)
    )
    s(state, _plain_batch(4))


def small_all_reduces(strategy: str, loss: str, clip: float | None) -> int:
    """How many all-reduces of fewer than 8 elements one step (the second) issues: the
    step's agreement on finiteness and batch sizes, the clipping norm, the item count."""
    import torch.distributed as d

    s = xf.shard(step if loss == "plain" else mean_step, strategy)
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1, max_grad_norm=clip))
    b = _plain_batch(4)
    state, _ = s(state, b)
    original, count = d.all_reduce, [0]

    def counting(t, *a, **kw):
        count[0] += t.numel() < 8
        return original(t, *a, **kw)

    d.all_reduce = counting
    try:
        s(state, b)
    finally:
        d.all_reduce = original
    return count[0]


def skips_until_error(strategy: str) -> str:
    """NaN on rank 1 only, every step, with max_consecutive_skips=3: what each process raised."""
    s = xf.shard(step, strategy)
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1, max_consecutive_skips=3))
    rank = dist.get_rank()
    try:
        for b in batches(tuple(range(5)), float("nan"), n=5):
            state, _ = s(state, {k: v[rank * 4 : (rank + 1) * 4] for k, v in b.items()})
    except FloatingPointError as e:
        return f"{state.transforms['nonfinite']} {e}"
    return "no error"
