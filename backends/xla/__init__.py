"""The XLA backend: one step is one XLA graph, traced once, compiled once; SPMD over the
devices of this process.

``xf.shard(step, strategy, backend="xla")`` (or ``xf.configure`` with ``backend="xla"``,
``xform launch --backend xla``):

- ``step.init(state)`` moves the state (params, buffers; the optimizer state when it is
  made) to the XLA device, and turns on SPMD (``torch_xla.runtime.use_spmd``) over every
  device of the process on one mesh axis, ``"data"``.
- Each call moves the batch to the device and shards its leading dimension over the
  mesh, runs the step lazily (torch_xla records the whole step, forward, backward and the
  optimizer update, as one graph) and ends it with ``torch_xla.sync()``: the graph
  boundary is here, never in user code. XLA compiles a graph once and reuses it for
  every later step of the same shapes.
- The update's "is the gradient finite" is a select on the device (the update always
  runs; ``torch.where`` keeps the old params and optimizer state), as under ``xf.jit``;
  the flag is the one scalar read on the host per step, after the graph is dispatched,
  to keep ``state.step`` and the skip counters exact. The metrics stay on the device
  until you read them.
- A state's first update runs as in eager PyTorch (torch.optim makes its state then, and
  reads a flag on the host mid-step), so the first two steps compile; later steps of the
  same shapes compile nothing (``compilations()``; a warning names a step that
  recompiles after that).

Strategies: ``replicate`` (the batch sharded, params and optimizer state replicated),
``zero1`` (the optimizer state sharded too), ``zero3``/``fsdp`` (params and optimizer state
sharded by rows; XLA's SPMD partitioner inserts the all-gathers and reduce-scatters).
A tensor whose leading size does not divide by the device count stays replicated. The
semantics are the single-device step on the global batch: the program is written for one
device and XLA partitions it.

Requires torch_xla (a separate environment: ``scripts/xla_env.sh``). torch_xla is imported
only when this backend is asked for.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from xform import tree
from xform.core import primitives
from xform.core.backend import cached, moved, static
from xform.core.state import _NONFINITE, _TOO_MANY_SKIPS, TrainState
from xform.core.strategies import FullyShard, HybridShard, Replicate, ZeRO

__all__ = ["XlaBackend", "XlaLayout"]

_API = "shard(backend='xla')"


def _xla():
    try:
        import torch_xla
        import torch_xla.debug.metrics as metrics
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr
    except ImportError as e:  # pragma: no cover - the main environment has no torch_xla
        raise ImportError(
            f"{_API}: torch_xla is not installed in this environment ({e}); create the XLA environment "
            "with scripts/xla_env.sh and run in .venv-xla (PJRT_DEVICE=CPU on a machine without TPU/GPU)"
        ) from e
    return torch_xla, xr, xs, metrics


def compilations() -> int:
    """How many XLA graphs this process has compiled (torch_xla's ``CompileTime`` count)."""
    _, _, _, metrics = _xla()
    data = metrics.metric_data("CompileTime")
    return int(data[0]) if data else 0


class XlaBackend:
    name = "xla"

    def layout(self, strategy: Any, mesh: Any, *, inner: Any = None) -> "XlaLayout":
        if isinstance(strategy, HybridShard) or not isinstance(strategy, (Replicate, ZeRO, FullyShard)):
            raise ValueError(
                f"{_API}: strategy {getattr(strategy, 'name', strategy)!r} is not built on XLA; use 'replicate', "
                "'zero1' or 'zero3'/'fsdp' (SPMD over the devices of this process)"
            )
        if isinstance(strategy, ZeRO) and strategy.stage == 2:
            raise ValueError(
                f"{_API}: 'zero2' is not built on XLA (gradients are values inside one graph, not buffers "
                "kept between steps); use 'zero1' (optimizer state sharded) or 'zero3' (params too)"
            )
        if mesh is not None:
            raise ValueError(
                f"{_API}: mesh={mesh!r}; the XLA backend makes its own SPMD mesh over every device of this "
                "process (one axis, 'data'); pass mesh=None"
            )
        return XlaLayout(strategy, inner)


class XlaLayout:
    """``strategy`` on XLA SPMD: see the module docs."""

    def __init__(self, strategy: Any, inner: Any):
        self.strategy = strategy
        self.inner = inner
        self.shard_params = isinstance(strategy, FullyShard)
        self.shard_opt = self.shard_params or isinstance(strategy, ZeRO)
        self.mesh = None
        self.device = None
        self.compiled = 0  # XLA graphs compiled inside this step's calls

    # --- layout ------------------------------------------------------------------------

    def _start(self) -> None:
        if self.mesh is not None:
            return
        torch_xla, xr, xs, _ = _xla()
        import numpy as np

        if not xr.is_spmd():
            xr.use_spmd()
        n = xr.global_runtime_device_count()
        device = torch_xla.device()
        # Under SPMD, torch's autograd engine sizes its per-device queues at the process's first
        # backward pass; one on the CPU first leaves none for XLA. A first backward on XLA here
        # sets them up (a CPU backward before it cannot be undone: the error says so).
        w = torch.ones(2, device=device, requires_grad=True)
        try:
            torch.autograd.grad((w * 2).sum(), [w])
        except RuntimeError as e:
            if "device_ready_queues" not in str(e):
                raise
            raise RuntimeError(
                f"{_API}: this process ran a backward pass on the CPU before the XLA devices were set up, "
                "and torch's autograd engine then has no queue for them under SPMD; lay the state out "
                "(step.init(state)) before any other backward pass of the process"
            ) from None
        self.mesh = xs.Mesh(np.arange(n), (n,), ("data",))
        self.device = device

    @property
    def devices(self) -> int:
        self._start()
        return int(self.mesh.size())

    def _mark(self, t: torch.Tensor, *, required: str | None = None) -> None:
        """Shards ``t``'s leading dimension over the mesh when it divides (else replicated, or
        an error naming ``required``)."""
        _, _, xs, _ = _xla()
        n = self.devices
        if t.dim() == 0 or t.shape[0] % n:
            if required is not None and n > 1:
                raise ValueError(
                    f"{_API}: {required} has {t.shape[0] if t.dim() else 'no'} rows, which do not divide over the "
                    f"{n} XLA devices; give a batch whose size is a multiple of {n}"
                )
            return
        xs.mark_sharding(t, self.mesh, ("data",) + (None,) * (t.dim() - 1))

    def init(self, state: TrainState) -> TrainState:
        if state.opt_state["initialized"]:
            raise ValueError(
                f"{_API}: lay the state out with step.init(state) before training; this state's optimizer "
                "state is already initialized (load a checkpoint with xf.load(path, like=step.init(fresh)))"
            )
        self._start()
        spec = static(state)
        module = spec.module.to(self.device)  # Parameters are replaced, not moved in place, on XLA
        params = {k: p for k, p in module.named_parameters() if k in state.params}
        buffers = {k: b for k, b in module.named_buffers() if k in state.buffers}
        missing = set(state.params) - set(params)
        if missing:
            raise ValueError(f"{_API}: parameters {sorted(missing)} are not the module's own; cannot move them")
        # the optimizer's per-param state; its step counts stay on the CPU (host scalars)
        opt_state = tree.map(
            lambda t: t.to(self.device) if isinstance(t, torch.Tensor) and t.dim() > 0 else t, state.opt_state
        )
        new = moved(
            state, self.device, "shard(backend='xla').init", params=params, buffers=buffers, opt_state=opt_state
        )
        self._place(new)
        return new

    def _place(self, state: TrainState) -> None:
        """Marks the shardings the strategy gives params and optimizer state (again)."""
        if self.shard_params:
            for p in state.params.values():
                self._mark(p)
        if self.shard_opt:
            for t in tree.leaves(state.opt_state):
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    self._mark(t)

    def handler(self) -> primitives.Handler:
        return primitives.Handler()

    # --- the step ----------------------------------------------------------------------

    def _put(self, batch: Any) -> Any:
        def put(x):
            if not isinstance(x, torch.Tensor):
                return x
            if x.device != self.device:
                x = x.to(self.device)
            if x.dim() > 0:
                self._mark(x, required="the batch")
            return x

        return tree.map(put, batch)

    def run(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        torch_xla, _, _, _ = _xla()
        import torch_xla.core.xla_model as xm

        compiled_before = compilations()
        state_count = cached(state, "xla-steps", lambda: [0])  # steps run by this set of tensors
        if state_count[0] == 0:  # a state new to this layout (laid out, or loaded: xf.load drops shardings)
            self._place(state)
        batch = self._put(batch)
        first = not state.opt_state["initialized"]
        before_step, counter = state.step, state.transforms.get(_NONFINITE)
        # dropout's stream: from the state's key and data position, as on the other backends
        xm.set_rng_state((state.rng * 1_000_003 + state.data["consumed"] * 7_919 + 1) & 0x7FFF_FFFF)
        trace = None if first else primitives.Trace(capturable=False)
        token = primitives._TRACING.set(trace)
        try:
            new, metrics = self.inner(state, batch)
        finally:
            primitives._TRACING.reset(token)
        # The graph boundary. Only the state and the metrics are materialized: a plain
        # torch_xla.sync() would also make outputs of whatever other lazy tensors are alive
        # (garbage awaiting the cycle collector, at a time of its choosing), and a graph
        # with other outputs is a new graph to compile.
        outs = [t for t in tree.leaves((new, metrics)) if isinstance(t, torch.Tensor) and t.device.type == "xla"]
        outs += trace.flags if trace is not None else []
        found = new._runtime(_API).extras.get(_NONFINITE)  # the check's flag, reused across steps
        if found is not None:
            outs += [found.found, found.one]
        torch_xla._XLAC._xla_sync_multi(outs, devices=[], wait=False)
        self._watch_compiles(state_count, compiled_before, new.step)
        if trace is None or not trace.flags:
            return new, metrics
        finite = not bool(trace.flags[0].item())
        if finite:
            with torch.no_grad():
                for t, value in trace.pending:  # the optimizer's host step counts
                    t.copy_(value)
        return _settle(new, finite=finite, before_step=before_step, counter=counter), metrics

    def _watch_compiles(self, count: list[int], before: int, step: int) -> None:
        """Warns when a step compiles after warm-up: the eager first update, and the first two
        traced steps of a state (fresh, or loaded: new tensors, new input shardings)."""
        count[0] += 1
        new = compilations() - before
        self.compiled += new
        if new and count[0] > 3:
            warnings.warn(
                f"{_API}: step {step} compiled {new} new XLA graph(s) after warm-up; a step of new shapes, "
                "dtypes or Python control flow recompiles: keep batch shapes fixed (xf.PadCollate, drop_last=True)",
                RuntimeWarning, stacklevel=4,
            )


def _settle(new: TrainState, *, finite: bool, before_step: int, counter: Any) -> TrainState:
    """The host bookkeeping of a traced update (the select already kept the old values when
    the gradient was not finite): ``step`` and the skip counters as an eager update makes them."""
    transforms = new.transforms
    if finite:
        if counter is not None and counter["consecutive"]:
            return new._evolve_leaves(transforms={**transforms, _NONFINITE: {**counter, "consecutive": 0}})
        return new
    if counter is None:
        return new._evolve_leaves(step=before_step)
    n = counter["consecutive"] + 1
    limit = static(new).max_consecutive_skips
    if limit is not None and n >= limit:
        raise FloatingPointError(_TOO_MANY_SKIPS.format(n=n, step=before_step, consumed=new.data["consumed"] - 1))
    counter = {"skipped": counter["skipped"] + 1, "consecutive": n}
    return new._evolve_leaves(step=before_step, transforms={**transforms, _NONFINITE: counter})
