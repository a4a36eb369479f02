"""What each process runs in the shard properties (importable by spawned workers).

A case is a plain dict (picklable): the model's widths, the loss kind, the transforms and
the strategy. ``train`` runs it on this process's slice of each global batch and returns
the full parameters (gathered from shards) and the losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf


def model(case: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(case["seed"])
    widths = case["widths"]
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def batches(case: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(case["seed"] + 1)
    n, d_in, d_out = case["global_batch"], case["widths"][0], case["widths"][-1]
    out = []
    for _ in range(case["steps"]):
        mask = (torch.rand(n, generator=g) < 0.6).float()
        mask[0] = 1.0  # at least one item counts
        out.append({"x": torch.randn(n, d_in, generator=g), "y": torch.randn(n, d_out, generator=g), "mask": mask})
    return out


def make_step(case: dict[str, Any]):
    masked = case["loss"] == "masked"

    def step(state, batch):
        def loss_fn(params):
            out = xf.apply(state, params, batch["x"])
            if masked:  # a sum over a variable number of items per process and micro-batch
                per_item = ((out - batch["y"]) ** 2).sum(-1) * batch["mask"]
                return xf.Mean(per_item.sum(), batch["mask"].sum())
            return F.mse_loss(out, batch["y"])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    if case.get("precision", "fp32") != "fp32":
        step = xf.mixed_precision(step, case["precision"])
    if case["k"] > 1:
        step = xf.accumulate(step, case["k"])
    return step


def strategy_and_mesh(case: dict[str, Any]) -> tuple[Any, Any, int, int]:
    """(strategy, mesh, data-parallel size, data-parallel rank) on this process."""
    world, rank = dist.get_world_size(), dist.get_rank()
    name = case["strategy"]
    if name == "hsdp":
        return "hsdp", xf.mesh(replicate=2, shard=world // 2), world, rank
    if name in ("tp", "tp+fsdp"):
        mesh = xf.mesh(dp=world // 2, tp=2)
        dp = name == "tp+fsdp"
        plan = xf.TensorParallel(plan={"0": "colwise", "2": "rowwise"}, data_parallel="fsdp" if dp else None)
        return plan, mesh, (world // 2 if dp else 1), (mesh["dp"].get_local_rank() if dp else 0)
    return name, None, world, rank


def optimizer(case: dict[str, Any]) -> dict[str, Any]:
    """AdamW is nearly blind to the gradient's scale, so cases also draw SGD, which is not:
    a wrong normalization (count) shows in SGD's params."""
    if case.get("optimizer", "adamw") == "sgd":
        return {"optimizer": torch.optim.SGD, "lr": 0.1, "momentum": 0.9}
    return {"optimizer": torch.optim.AdamW, "lr": 1e-2, "weight_decay": 0.1}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(case: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The case on this process (sharded when a process group exists)."""
    step = make_step(case)
    size, rank = 1, 0
    if dist.is_initialized():
        strategy, mesh, size, rank = strategy_and_mesh(case)
        step = xf.shard(step, strategy, mesh=mesh)
    init = getattr(step, "init", lambda s: s)
    state = init(xf.TrainState.create(model(case), max_grad_norm=case.get("clip"), **optimizer(case)))
    losses = []
    for b in batches(case):
        n = b["x"].shape[0] // size
        state, metrics = step(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
        losses.append(float(metrics["loss"]))
    return {k: full(v) for k, v in state.params.items()}, losses


def count_collectives(case: dict[str, Any]) -> list[int]:
    """Collectives issued during each micro-batch of one step of ``case``."""
    import torch.distributed as d

    counter = [0]
    names = ["all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "all_gather",
             "all_gather_single", "reduce_scatter_single"]
    names = [n for n in names if hasattr(d, n)]
    originals = {n: getattr(d, n) for n in names}

    def counting(fn):
        def wrapper(*a, **kw):
            counter[0] += 1
            return fn(*a, **kw)
        return wrapper

    per_micro: list[int] = []
    strategy, mesh, size, rank = strategy_and_mesh(case)
    inner = make_step({**case, "k": 1})

    def recording(state, batch):
        before = counter[0]
        out = inner(state, batch)
        per_micro.append(counter[0] - before)
        return out

    step = xf.shard(xf.accumulate(recording, case["k"]), strategy, mesh=mesh)
    state = step.init(xf.TrainState.create(model(case), optimizer=torch.optim.AdamW, lr=1e-2))
    b = batches(case)[0]
    n = b["x"].shape[0] // size
    for n_ in names:
        setattr(d, n_, counting(originals[n_]))
    try:
        step(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
    finally:
        for n_, fn in originals.items():
            setattr(d, n_, fn)
    return per_micro
