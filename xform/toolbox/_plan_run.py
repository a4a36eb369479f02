"""``plan(measure=True)``: each layout run for a few steps on a ``ProcessPool`` (gloo on
CPU): the state's bytes, the peak bytes of a step (the profiler's allocation events), the
step time, and the params against the single-process step on the global batch."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Mapping

import torch

from xform.core import strategies as _strategies
from xform.toolbox._plan_cost import _DATA_PARALLEL, _MICROBATCHES, Input, Layout, _tensors, build, resolve, rows_of

_TORCH_OPTIMIZERS: dict[str, Callable[[], tuple[type, dict]]] = {
    "adam": lambda: (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": lambda: (torch.optim.AdamW, {"lr": 1e-3}),
    "sgd": lambda: (torch.optim.SGD, {"lr": 1e-2}),
    "sgd-momentum": lambda: (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
}




def measure(source: Any, factory: Callable, make_input: Input, layouts: list[Layout | None], world: int,
            optimizer: str, tp_plan: Mapping[str, str], steps: int, timeout_s: float) -> list[dict | str | None]:  # fmt: skip
    """Runs each layout (None: skipped) on ``world`` processes; returns for each its
    figures (``params``, ``grads``, ``optimizer_state``, ``peak``, ``step_s``,
    ``max_rel_diff``, ``sgd_rel_diff``), or the error that stopped it, or None."""
    from xform.distributed.procs import ProcessPool, RemoteError

    batch_source = make_input.source
    refs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    out: list[dict | str | None] = []
    pool = None
    try:
        for lay in layouts:
            if lay is None:
                out.append(None)
                continue
            for opt in (optimizer, "sgd"):
                if (lay.dp, opt) not in refs:
                    refs[lay.dp, opt] = _reference(factory, make_input, lay.dp, opt, steps)
            if pool is None:
                pool = ProcessPool(world, timeout_s=timeout_s)
            try:
                per_rank = pool.run(_run_layout, source, batch_source, lay, optimizer, dict(tp_plan), steps)
            except RemoteError as e:
                out.append(str(e).strip().splitlines()[-1])
                pool.close(force=True)
                pool = None
                continue
            times = [max(r["times"][i] for r in per_rank) for i in range(len(per_rank[0]["times"]))]
            q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
            out.append({
                "params": max(r["params"] for r in per_rank),
                "grads": max(r["grads"] for r in per_rank),
                "optimizer_state": max(r["opt"] for r in per_rank),
                "peak": max(r["peak"] for r in per_rank),
                "step_s": (q[0], statistics.median(times), q[2]),
                "max_rel_diff": _diff(refs[lay.dp, optimizer], [r["full"] for r in per_rank]),
                "sgd_rel_diff": _diff(refs[lay.dp, "sgd"], [r["full_sgd"] for r in per_rank]),
            })  # fmt: skip
    finally:
        if pool is not None:
            pool.close()
    return out


def _diff(ref: Mapping[str, torch.Tensor], per_rank: list[Mapping[str, torch.Tensor]]) -> float:
    """``max |p - p_ref| / max |p_ref|`` over every param any process returned."""
    diff = 0.0
    if not any(per_rank):
        return math.inf
    for full in per_rank:
        for k, v in full.items():
            b = ref[k]
            diff = max(diff, float((v - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return diff


def _global_batch(make_input: Input, dp: int, i: int) -> Any:
    return make_input(rows_of(make_input) * dp, torch.Generator().manual_seed(1000 + i))


def _slice(x: Any, rank: int, dp: int) -> Any:
    n = x.shape[0] // dp
    return x[rank * n : (rank + 1) * n]


def _step(state, x):
    import xform as xf

    def loss_fn(params):
        return xf.apply(state, params, x).float().pow(2).mean()

    loss, grads = xf.value_and_grad(loss_fn)(state.params)
    _GRAD_BYTES[0] = sum(_bytes(g) for g in grads.values())
    return state.apply_gradients(grads), {"loss": loss}


_GRAD_BYTES = [0]  # per process: the local bytes of the last step's gradients (read by the worker)


def _new_state(factory: Callable, optimizer: str):
    import xform as xf

    cls, kwargs = _TORCH_OPTIMIZERS[optimizer]()
    return xf.TrainState.create(build(factory, "model"), optimizer=cls, **kwargs)


def _reference(factory: Callable, make_input: Input, dp: int, optimizer: str, steps: int) -> dict[str, torch.Tensor]:
    state = _new_state(factory, optimizer)
    for i in range(steps):
        state, _ = _step(state, _global_batch(make_input, dp, i))
    return {k: v.detach().clone() for k, v in state.params.items()}


def _bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _strategy_and_mesh(lay: Layout, tp_plan: Mapping[str, str]) -> tuple[Any, Any]:
    import xform as xf

    if lay.family in _DATA_PARALLEL:
        return lay.family, None
    mesh = xf.mesh(**dict(lay.axes))
    if lay.family == "hsdp":
        return "hsdp", mesh
    if lay.family == "tp":
        return xf.TensorParallel(plan=dict(tp_plan), data_parallel="fsdp" if lay.dp > 1 else None), mesh
    pipe = _strategies.Pipeline(stages=lay.size("pp"), schedule="gpipe", microbatches=_MICROBATCHES,
                                data_parallel="replicate" if lay.dp > 1 else None)  # fmt: skip
    return pipe, mesh


def _live_bytes() -> int:
    """Bytes of the CPU tensor storages Python can reach (a DTensor's local tensor included)."""
    gc.collect()
    objs = gc.get_objects()
    kinds = {cls for cls in set(map(type, objs)) if issubclass(cls, torch.Tensor)}  # no isinstance per object
    seen: dict[int, int] = {}
    for o in objs:
        if type(o) in kinds:
            t = o._local_tensor if hasattr(o, "_local_tensor") else o
            if t.device.type == "cpu" and not t.is_meta:
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _peak_rise(prof: Any) -> int:
    """The largest rise of live bytes inside the profiled region, from the profiler's
    allocation events replayed in order (an address allocated again counts as freed first)."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = sorted(
        (n.start_time_ns, n.extra_fields.alloc_size, n.extra_fields.ptr)
        for n in walk(prof.profiler.kineto_results.experimental_event_tree())
        if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"
    )
    live = peak = 0
    sizes: dict[int, int] = {}
    for _, size, ptr in events:
        if size > 0:
            live += size - sizes.get(ptr, 0)
            sizes[ptr] = size
        else:
            live += size  # a free: of this region's allocation, or of one alive before it
            sizes.pop(ptr, None)
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _stdout_to_stderr():
    """Kineto prints its start and stop lines on file descriptor 1: keep them off ``--json``'s stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _run_layout(source: Any, batch_source: Any, lay: Layout, optimizer: str, tp_plan: dict, steps: int) -> dict:
    """In each pool process: lays out the state, runs ``steps`` steps on this process's
    slice of the global batches, returns its figures and full params."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import xform as xf

    # torch's own advice (deprecated collectives, FSDP2's view outputs, DTensor's redistribution plans): not the user's
    warnings.filterwarnings("ignore", module=r"torch\..*")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    factory = resolve(source) if isinstance(source, str) else source
    make_input = Input(resolve(batch_source, what="batch") if isinstance(batch_source, str) else batch_source)
    strategy, mesh = _strategy_and_mesh(lay, tp_plan)
    step = xf.shard(_step, strategy, mesh=mesh)
    state = step.init(_new_state(factory, optimizer))
    if mesh is not None and "dp" in mesh.mesh_dim_names:
        dp_rank = mesh["dp"].get_local_rank()
    elif lay.family in ("tp", "pp"):
        dp_rank = 0
    else:
        dp_rank = dist.get_rank()
    times: list[float] = []
    peak = 0
    for i in range(steps):
        x = _slice(_global_batch(make_input, lay.dp, i), dp_rank, lay.dp)
        if i == steps - 1:  # the profiled step: its peak, not timed
            base = _live_bytes()
            dist.barrier()
            with _stdout_to_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                state, _ = step(state, x)
            peak = base + _peak_rise(prof)
            continue
        dist.barrier()
        t0 = time.perf_counter()
        state, metrics = step(state, x)
        float(metrics["loss"])
        if i:
            times.append(time.perf_counter() - t0)
    figures = {
        "params": sum(_bytes(p) for p in state.params.values()),
        "grads": _GRAD_BYTES[0],
        "opt": sum(_bytes(t) for t in _tensors(state.opt_state)),
    }
    full = _full(state)
    del state
    if optimizer == "sgd":
        full_sgd = full
    else:  # the equivalence again with SGD: a second layout of a fresh state
        step = xf.shard(_step, strategy, mesh=mesh)
        state = step.init(_new_state(factory, "sgd"))
        for i in range(steps):
            state, _ = step(state, _slice(_global_batch(make_input, lay.dp, i), dp_rank, lay.dp))
        full_sgd = _full(state)
    return {**figures, "peak": peak, "times": times, "full": full, "full_sgd": full_sgd}


def _full(state: Any) -> dict[str, torch.Tensor]:
    """This process's params, whole (DTensors gathered); under a pipeline, its stages' only."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.params.items()}

