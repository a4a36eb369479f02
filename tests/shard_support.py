"""Functions the sharding tests run in pool processes (importable by spawned workers)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xform as xf


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def step(state, batch):
    def loss_fn(params):
        return F.mse_loss(xf.apply(state, params, batch["x"]), batch["y"])

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def data(steps: int = 4, n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(n, 5, generator=g), "y": torch.randn(n, 3, generator=g)} for _ in range(steps)]


def world() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def make(strategy: str | None):
    s = xf.accumulate(step, 2)
    if strategy is not None:
        s = xf.shard(s, strategy)
    init = getattr(s, "init", lambda x: x)
    return s, init(xf.TrainState.create(model(), optimizer=torch.optim.AdamW, lr=1e-2))


def phase(strategy: str | None, path: str | None, start: int, stop: int, load: str | None = None):
    """Trains on global batches [start, stop) (this process's slice), loading ``load``
    first and saving to ``path`` after; returns the full params and the step."""
    size, rank = world()
    s, state = make(strategy)
    if load:
        state = xf.load(load, like=state)
    for b in data()[start:stop]:
        n = b["x"].shape[0] // size
        state, _ = s(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
    if path:
        xf.save(state, path)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.params.items()}
    return full, state.step


def error_of(fn_name: str) -> str:
    """Runs one misuse on this process and returns the error message."""
    try:
        globals()[fn_name]()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def hsdp_without_mesh():
    xf.shard(step, "hsdp").init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))


def tp_plan_matches_nothing():
    s = xf.shard(step, xf.TensorParallel(plan={"nothing*": "colwise"}), mesh=xf.mesh(dp=1, tp=2))
    s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))


def mesh_of_wrong_size():
    xf.mesh(dp=3)


def init_after_training():
    s = xf.shard(step, "zero1")
    state = xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1, momentum=0.9)
    state, _ = step(state, data()[0])
    s.init(state)


def apply_with_other_params_under_zero3():
    s = xf.shard(lambda st, b: (st, xf.apply(st, dict(st.params), b["x"])), "zero3")
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))
    s(state, data()[0])


def async_save_then_train(strategy: str | None, path: str):
    """Saves asynchronously, trains on (changing the params in place), then finishes the
    save; returns the params at save time and the params loaded back."""
    size, rank = world()
    s, state = make(strategy)
    b = data()[0]
    n = b["x"].shape[0] // size
    mine = {k: v[rank * n : (rank + 1) * n] for k, v in b.items()}
    state, _ = s(state, mine)
    at_save = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.params.items()}
    pending = xf.save(state, path, async_save=True)
    state, _ = s(state, mine)  # the update runs in place while the save is in flight
    pending.wait()
    _, fresh = make(strategy)
    loaded = xf.load(path, like=fresh)
    return at_save, {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in loaded.params.items()}


def tp_uneven_split():
    s = xf.shard(step, xf.TensorParallel(plan={"0": "colwise", "2": "rowwise"}), mesh=xf.mesh(dp=1, tp=2))
    s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))  # hidden width 7


def kept_gradients(strategy: str, bucket_mb: float):
    """Trains 3 steps of a step that returns its (reduced) gradients in its metrics, keeping
    each step's; returns each kept gradient as it was when its step returned and as it is
    after the last step."""
    size, rank = world()

    def keeping(state, batch):
        def loss_fn(params):
            return F.mse_loss(xf.apply(state, params, batch["x"]), batch["y"])

        loss, grads = xf.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"grads": grads}

    s = xf.shard(keeping, _strategy(strategy, bucket_mb))
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))
    kept, at_return = [], []
    for b in data(3):
        n = b["x"].shape[0] // size
        state, metrics = s(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
        kept.append(metrics["grads"])
        at_return.append({k: v.clone() for k, v in metrics["grads"].items()})
    return at_return, kept


def bucket_reuse(strategy: str, bucket_mb: float):
    """The data-parallel layout's buckets over two steps' worth of gradients: whether the
    second step reuses the first's memory when nothing kept a gradient, and whether it
    takes fresh memory when one was kept (and the kept gradient's values after it)."""
    from xform.backends.torch_native.data_parallel import DataParallel

    layout = DataParallel(_strategy(strategy, bucket_mb), None)
    group = layout.group()[0]
    params = dict(model().named_parameters())
    fake = {k: torch.full_like(p, 1.0 + dist.get_rank()) for k, p in params.items()}
    comm = layout.comm(params, group)
    comm.begin(4)
    comm.finish(fake)  # the gradients are dropped
    first = [t.data_ptr() for t in comm.held]
    comm = layout.comm(params, group)
    comm.begin(4)
    kept = comm.finish(fake)
    reused = [t.data_ptr() for t in comm.held] == first
    was = {k: v.clone() for k, v in kept.items()}
    comm = layout.comm(params, group)
    comm.begin(4)
    comm.finish({k: 2 * v for k, v in fake.items()})
    fresh = [t.data_ptr() for t in comm.held] != first
    return reused, fresh, was, kept


def _strategy(name: str, bucket_mb: float):
    return xf.Replicate(bucket_mb=bucket_mb) if name == "replicate" else xf.ZeRO(stage=int(name[-1]), bucket_mb=bucket_mb)


def folded_params(ks: tuple[int, ...], bucket_mb: float):
    """Params after 3 steps of ``shard(accumulate(...accumulate(step, ks[-1])..., ks[0]),
    Replicate(bucket_mb))``, SGD: one bucket (the earlier micro-batches' sums added before
    the all-reduce, no hooks) or one per tensor (the sums folded in by autograd hooks)."""
    size, rank = world()
    s = step
    for k in reversed(ks):
        s = xf.accumulate(s, k)
    s = xf.shard(s, xf.Replicate(bucket_mb=bucket_mb))
    state = s.init(xf.TrainState.create(model(), optimizer=torch.optim.SGD, lr=0.1))
    for b in data(3, n=24):
        n = b["x"].shape[0] // size
        state, _ = s(state, {k: v[rank * n : (rank + 1) * n] for k, v in b.items()})
    return {k: v.detach().clone() for k, v in state.params.items()}
