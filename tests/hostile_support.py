"""What tests/test_hostile.py runs in pool processes (importable by spawned workers):
realistic combinations a user tries (frozen and unused parameters, 0-dim parameters,
clipping with a NaN, a checkpoint resumed into another strategy, ...)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf

GLOBAL = 8


class Net(torch.nn.Module):
    """Two linears, a frozen one, a 0-dim scale and a branch taken only when asked."""

    def __init__(self, frozen: bool = False, scalar: bool = False, branch: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(5, 6)
        self.b = torch.nn.Linear(6, 3)
        if frozen:
            self.a.weight.requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.tensor(1.5)) if scalar else None
        self.other = torch.nn.Linear(6, 3) if branch else None

    def forward(self, x, use_other: bool = False):
        h = torch.tanh(self.a(x))
        out = self.other(h) if use_other else self.b(h)
        return out * self.scale if self.scale is not None else out


def step(state, batch):
    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, batch["x"]).float(), batch["y"]) * batch["mult"][0]

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def batches(n: int = 3, bad: tuple[int, ...] = (), value: float = math.nan) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        mult = torch.full((GLOBAL,), value if i in bad else 1.0)
        out.append({"x": torch.randn(GLOBAL, 5, generator=g), "y": torch.randn(GLOBAL, 3, generator=g), "mult": mult})
    return out


def world() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def mine(batch):
    size, rank = world()
    n = GLOBAL // size
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def full(state) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone() for k, v in state.params.items()}


def build(strategy: str | None, precision: str = "fp32", k: int = 1, **create: Any):
    s = step
    if precision != "fp32":
        s = xf.mixed_precision(s, precision)
    if k > 1:
        s = xf.accumulate(s, k)
    if strategy is not None:
        mesh = xf.mesh(replicate=2, shard=world()[0] // 2) if strategy == "hsdp" else None
        s = xf.shard(s, strategy, mesh=mesh)
    return s


def train(strategy: str | None, net: dict, *, precision: str = "fp32", k: int = 1, n: int = 3,
          bad: tuple[int, ...] = (), value: float = math.nan, optimizer=torch.optim.AdamW, **create: Any):
    """Trains ``Net(**net)`` on ``n`` global batches (this process's slice); returns the
    full params, the step and the non-finite counters."""
    s = build(strategy, precision, k)
    state = xf.TrainState.create(Net(**net), optimizer=optimizer, lr=1e-2, **create)
    state = getattr(s, "init", lambda x: x)(state)
    for b in batches(n, bad, value):
        state, _ = s(state, mine(b))
    return {"params": full(state), "step": int(state.step), "nonfinite": dict(state.transforms.get("nonfinite", {}))}


def phase(strategy: str | None, net: dict, *, load: str | None = None, save: str | None = None,
          precision: str = "fp32", k: int = 1, start: int = 0, stop: int = 3, bad: tuple[int, ...] = (),
          value: float = math.nan, **create: Any):
    """Trains on global batches [start, stop), loading ``load`` first and saving to ``save``
    after; returns what ``train`` returns plus the loss scale."""
    s = build(strategy, precision, k)
    state = xf.TrainState.create(Net(**net), optimizer=torch.optim.AdamW, lr=1e-2, **create)
    state = getattr(s, "init", lambda x: x)(state)
    if load:
        state = xf.load(load, like=state)
    for b in batches(stop, bad, value)[start:stop]:
        state, _ = s(state, mine(b))
    if save:
        xf.save(state, save)
    return {"params": full(state), "step": int(state.step), "nonfinite": dict(state.transforms.get("nonfinite", {})),
            "scale": float(state.transforms["mixed_precision"]["scale"]) if "mixed_precision" in state.transforms else None}


def zero3_scalar_error(strategy: str):
    """Lays a model with a 0-dim parameter out for ``strategy``; returns the error and
    whether the module was left untouched (no FSDP unit, params plain tensors)."""
    from torch.distributed.fsdp import FSDPModule

    net = Net(scalar=True)
    state = xf.TrainState.create(net, optimizer=torch.optim.SGD, lr=0.1)
    try:
        build(strategy).init(state)
        text = "no error"
    except Exception as e:  # noqa: BLE001
        text = f"{type(e).__name__}: {e}"
    untouched = not any(isinstance(m, FSDPModule) for m in net.modules()) and not any(
        hasattr(p, "full_tensor") for p in net.parameters()
    )
    return text, untouched


def managed(strategy: str | None, directory: str, keep: int):
    """Saves through a CheckpointManager after every update of batches with a NaN in the
    second (a skipped update: the step does not advance, so its save replaces the same
    ``step_N``); returns the listed names and the restored step and data position."""
    s = build(strategy)
    state = getattr(s, "init", lambda x: x)(xf.TrainState.create(Net(), optimizer=torch.optim.AdamW, lr=1e-2))
    manager = xf.CheckpointManager(directory, keep=keep)
    for b in batches(4, bad=(1,)):
        state, _ = s(state, mine(b))
        manager.save(state)
    fresh = getattr(s, "init", lambda x: x)(xf.TrainState.create(Net(), optimizer=torch.optim.AdamW, lr=1e-2))
    back = manager.restore(like=fresh)
    same = all(torch.equal(a, b) for a, b in zip(full(back).values(), full(state).values()))
    return [p.name for p in manager.checkpoints()], int(back.step), dict(back.data), same


class Routed(torch.nn.Module):
    """An expert used only by the rows that ask for it (a data-dependent branch: a
    process whose slice has no such row never runs it, so its hooks never fire there)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(5, 6)
        self.b = torch.nn.Linear(6, 3)
        self.expert = torch.nn.Linear(6, 3)

    def forward(self, x, route):
        h = torch.tanh(self.a(x))
        out = self.b(h)
        if bool(route.any()):
            out = out + self.expert(h) * route[:, None]
        return out


def routed_step(state, batch):
    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, batch["x"], batch["route"]).float(), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def routed(strategy: str | None, precision: str = "fp32", n: int = 3, k: int = 1):
    """Trains ``Routed`` on batches whose first rows (rank 0's slice) alone take the expert."""
    s = routed_step if precision == "fp32" else xf.mixed_precision(routed_step, precision)
    s = xf.accumulate(s, k) if k > 1 else s
    if strategy is not None:
        s = xf.shard(s, strategy)
    state = xf.TrainState.create(Routed(), optimizer=torch.optim.AdamW, lr=1e-2)
    state = getattr(s, "init", lambda x: x)(state)
    for b in batches(n):
        route = torch.zeros(GLOBAL)
        route[:2] = 1.0
        state, _ = s(state, mine({**b, "route": route}))
    return {"params": full(state), "step": int(state.step), "nonfinite": dict(state.transforms.get("nonfinite", {}))}


def save_onto(path: str):
    """``xf.save`` onto ``path`` (which may hold a user's files); the error, or "saved"."""
    state = xf.TrainState.create(Net(), optimizer=torch.optim.SGD, lr=0.1)
    try:
        xf.save(state, path)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "saved"


class Augmented(torch.utils.data.Dataset):
    """Example ``i`` is ``i`` plus a random augmentation drawn while fetching it."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(float(i)) + torch.rand(())


def augmented_batches(n: int = 2) -> list[torch.Tensor]:
    """This process's first ``n`` batches of a shuffled, augmented map-style dataset."""
    import itertools

    loader = xf.DataLoader(Augmented(), global_batch_size=GLOBAL, shuffle=True)
    state = xf.TrainState.create(Net(), optimizer=torch.optim.SGD, lr=0.1, seed=3)
    return list(itertools.islice(loader.iterate(state), n))
