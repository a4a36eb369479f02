"""``plan``: compare parallelism strategies on one model, predicted and measured.

Given a model factory, the batch each data-parallel replica sees, and a world size (or a
mesh), ``plan`` enumerates the layouts the world size allows, from the one table
``xform.core.strategies.STRATEGIES`` plus the mesh combinations: replicate, zero1, zero2,
zero3, hsdp (every ``replicate x shard`` factorization), tensor parallel (alone, or with
FSDP over a ``dp`` axis), and pipeline parallel when ``xform.core.strategies`` has
``Pipeline``. For each it predicts the per-process bytes of parameters, gradients,
optimizer state and activations (``xform.toolbox.memory``'s formulas: ``estimate_memory``
and ``measure_activations``, on the meta device) and the bytes each process sends per
step. With ``measure=True`` it runs every candidate for a few steps on real processes
(``xform.distributed.procs.ProcessPool``, gloo on CPU) and adds what it measured: the
state's bytes, the peak bytes alive during a step, the step time, and the largest
relative difference of the params from the single-process step on the global batch.

The training step it runs is fixed: ``loss = mean(apply(x) ** 2)`` (a mean over the
rows, so the sharded step must equal the single-process one), with the optimizer named
by ``optimizer``. docs/plan.md gives the formulas; ``_plan_cost`` holds the cost model,
``_plan_run`` the measurement.

Example:
    >>> import torch, xform as xf
    >>> def mlp():
    ...     return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    >>> p = xf.plan(mlp, batch=(8, 16), world_size=4, strategies=["replicate", "zero3", "hsdp", "tp"])
    >>> [r.layout.name for r in p.rows]
    ['replicate', 'zero3', 'hsdp 1x4', 'hsdp 2x2', 'hsdp 4x1', 'tp2 x fsdp2', 'tp4']
    >>> print(p.table())  # doctest: +ELLIPSIS
    Model: mlp (2,128 parameters); 4 processes; batch 8x16 per data-parallel replica; optimizer adamw
    strategy     mesh  pred params  pred grads  pred optim  pred activ  pred total  pred comm/step
    ...
    >>> p.rows[0].predicted["params"]   # (16*64 + 64 + 64*16 + 16) * 4 bytes, on every process
    8512
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from xform.core import strategies as _strategies
from xform.toolbox._plan_cost import (
    _MICROBATCHES,
    FAMILIES,
    Factory,
    Layout,
    build,
    check_world,
    default_tp_plan,
    enumerate_layouts,
    input_factory,
    predict,
    resolve,
)
from xform.toolbox._plan_run import _TORCH_OPTIMIZERS
from xform.toolbox._plan_run import measure as _run_layouts

__all__ = ["Layout", "Measured", "PlanRow", "Plan", "plan", "FAMILIES", "default_tp_plan", "resolve"]


@attrs.frozen(kw_only=True)
class Measured:
    """What ``plan(measure=True)`` measured for one layout, the largest over the processes.

    Attributes:
        params, grads, optimizer_state: local bytes of the state's params and optimizer
            state after the steps, and of the gradients ``value_and_grad`` returned.
        peak: bytes alive in PyTorch's CPU allocator at the peak of one step: the
            reachable tensor storages before it plus the largest rise the profiler's
            allocation events show inside it.
        step_s: (first quartile, median, third quartile) of the step time in seconds,
            each step's time being the slowest process's.
        max_rel_diff: ``max |p - p_ref| / max |p_ref|`` over the params after the steps,
            against the single-process step on the global batch.
        sgd_rel_diff: the same for a second run with plain SGD (``lr=1e-2``), where a
            wrong gradient scale shows in full (Adam's update divides most of it out, and
            turns rounding noise in near-zero gradients into whole steps of ``lr``).
    """

    params: int
    grads: int
    optimizer_state: int
    peak: int
    step_s: tuple[float, float, float]
    max_rel_diff: float
    sgd_rel_diff: float

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer_state


@attrs.frozen(kw_only=True)
class PlanRow:
    """One layout's predicted figures (bytes per process), and measured ones when run.

    ``predicted`` holds ``params``, ``grads``, ``optimizer_state``, ``buffers``,
    ``activations`` (None when the forward could not run on meta) and ``total``;
    ``comm_bytes`` is the predicted bytes each process sends per step; ``fits`` is whether
    the predicted total fits the budget (None without one); ``error`` says why a
    measurement failed.
    """

    layout: Layout
    predicted: Mapping[str, int | None]
    comm_bytes: int
    fits: bool | None = None
    measured: Measured | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        m = self.measured
        return {
            "name": self.layout.name,
            "family": self.layout.family,
            "mesh": dict(self.layout.axes),
            "dp": self.layout.dp,
            "predicted": {**self.predicted, "comm_bytes": self.comm_bytes},
            "fits": self.fits,
            "measured": None if m is None else {
                "params": m.params, "grads": m.grads, "optimizer_state": m.optimizer_state, "state": m.state,
                "peak": m.peak, "step_s": {"q1": m.step_s[0], "median": m.step_s[1], "q3": m.step_s[2]},
                "max_rel_diff": m.max_rel_diff, "sgd_rel_diff": m.sgd_rel_diff,
                "state_error": _rel(m.state, _state_of(self.predicted)),
            },
            "error": self.error,
        }  # fmt: skip


@attrs.frozen(kw_only=True)
class Plan:
    """The result of ``plan``: one row per layout; ``table()``, ``to_dict()``, ``plot(path)``."""

    model: str
    num_params: int
    world_size: int
    batch: tuple[int, ...]
    optimizer: str
    budget: int | None
    steps: int | None
    rows: tuple[PlanRow, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "num_params": self.num_params, "world_size": self.world_size,
            "batch": list(self.batch), "optimizer": self.optimizer, "budget": self.budget, "steps": self.steps,
            "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes),
        }  # fmt: skip

    def table(self) -> str:
        """The rows as a text table; ``pred`` columns are predicted, ``meas`` columns measured."""
        measured = any(r.measured for r in self.rows)
        header = ["strategy", "mesh", "pred params", "pred grads", "pred optim", "pred activ", "pred total",
                  "pred comm/step"]  # fmt: skip
        if self.budget is not None:
            header.append("fits")
        if measured:
            header += ["meas p+g+o (err)", "meas peak (/pred)", "meas step ms [q1-q3]", f"meas rel diff {self.optimizer}|sgd"]
        lines = [header]
        for r in self.rows:
            p = r.predicted
            mesh = " ".join(f"{a}={n}" for a, n in r.layout.axes) or f"{self.world_size}"
            cells = [r.layout.name, mesh, _human(p["params"]), _human(p["grads"]), _human(p["optimizer_state"]),
                     _human(p["activations"]), _human(p["total"]), _human(r.comm_bytes)]  # fmt: skip
            if self.budget is not None:
                cells.append("yes" if r.fits else "no")
            if measured:
                m = r.measured
                if m is None:
                    cells += [("error: " + r.error.splitlines()[0][:60]) if r.error else "not run", "", "", ""]
                else:
                    q1, med, q3 = (1e3 * t for t in m.step_s)
                    err = _rel(m.state, _state_of(p))
                    cells += [f"{_human(m.state)} ({100 * err:+.1f}%)", f"{_human(m.peak)} ({m.peak / p['total']:.2f}x)",
                              f"{med:.2f} [{q1:.2f}-{q3:.2f}]", f"{m.max_rel_diff:.1e}|{m.sgd_rel_diff:.1e}"]  # fmt: skip
            lines.append(cells)
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        out = [f"Model: {self.model} ({self.num_params:,} parameters); {self.world_size} processes; "
               f"batch {'x'.join(map(str, self.batch))} per data-parallel replica; optimizer {self.optimizer}"
               + (f"; budget {_human(self.budget)}" if self.budget is not None else "")]  # fmt: skip
        for i, row in enumerate(lines):
            out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append("pred = predicted (formulas, docs/plan.md); meas = measured on real processes"
                   + (f" over {self.steps} steps" if measured else "") + "; bytes per process.")  # fmt: skip
        if measured:
            out.append("err = (meas p+g+o - pred p+g+o) / pred; /pred = meas peak / pred total; rel diff = "
                       "max |params - single-process params| / max |single-process params| after the steps on the "
                       f"global batch, with {self.optimizer} and with plain SGD.")  # fmt: skip
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def plot(self, path: str | os.PathLike) -> None:
        """Writes a PNG of memory against step time per layout (predicted memory when
        not measured, as bars). Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        runs = [r for r in self.rows if r.measured is not None]
        if runs:
            for r in runs:
                m = r.measured
                x = 1e3 * m.step_s[1]
                ax.errorbar(x, m.peak / 2**20, xerr=[[x - 1e3 * m.step_s[0]], [1e3 * m.step_s[2] - x]], fmt="o", capsize=3)
                ax.scatter([x], [r.predicted["total"] / 2**20], marker="x", color="gray")
                ax.annotate(r.layout.name, (x, m.peak / 2**20), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel("measured step time, ms (median, quartiles)")
            ax.set_ylabel("MiB per process (o measured peak, x predicted)")
        else:
            names = [r.layout.name for r in self.rows]
            bottom = [0.0] * len(names)
            for part in ("params", "grads", "optimizer_state", "activations"):
                vals = [(r.predicted[part] or 0) / 2**20 for r in self.rows]
                ax.bar(names, vals, bottom=bottom, label=part)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_ylabel("predicted MiB per process")
            ax.legend()
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        ax.set_title(f"{self.model}: {self.world_size} processes")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def plan(
    model: str | Callable[..., torch.nn.Module],
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    batch: Sequence[int] | str | Callable[[int, torch.Generator], Any],
    world_size: int | None = None,
    mesh: Mapping[str, int] | None = None,
    budget: int | None = None,
    optimizer: str = "adamw",
    strategies: Sequence[str] | None = None,
    tp_plan: Mapping[str, str] | None = None,
    measure: bool = False,
    steps: int = 6,
    timeout_s: float = 120.0,
) -> Plan:
    """Enumerates the layouts ``world_size`` processes allow for ``model``; predicts each
    one's per-process memory and communication, and with ``measure=True`` runs them.

    Args:
        model: a function (or class) returning the ``nn.Module``, or its name as
            ``"module:function"`` or ``"path/to/file.py:function"``. It is called with
            ``torch.manual_seed(0)`` set, under ``torch.device("meta")`` for predictions.
        model_kwargs: keyword arguments of ``model``, e.g. ``{"dim": 256}``.
        batch: the input of one data-parallel replica: a shape (float32, e.g. ``(8, 16)``)
            or a function ``(rows, generator) -> input`` (or its name) for other inputs
            (token ids); the global batch has ``dp`` times the rows.
        world_size: the number of processes; or give ``mesh``.
        mesh: axis sizes (``{"replicate": 2, "shard": 2}``, ``{"dp": 2, "tp": 2}``,
            ``{"pp": 2, "dp": 2}``): only the layouts on that mesh.
        budget: bytes per process: rows whose predicted total exceeds it are marked and
            not measured.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"`` or ``"sgd-momentum"``.
        strategies: the families to consider (default all of ``FAMILIES``).
        tp_plan: tensor parallel's plan (``{"blocks.*.mlp.0": "colwise", ...}``); by default
            each ``nn.Sequential`` of ``Linear, <parameter-free modules>, Linear`` is split
            Megatron-style (first colwise, last rowwise).
        measure: run each candidate (that fits) on ``world_size`` local processes.
        steps: steps run per candidate when measuring (the first is a warm-up, the last
            is profiled for the peak; at least 3).
        timeout_s: the longest a candidate's run may take.

    Example:
        >>> import torch, xform as xf
        >>> p = xf.plan(lambda: torch.nn.Linear(4, 4), batch=(2, 4), mesh={"replicate": 2, "shard": 1})
        >>> [(r.layout.name, r.predicted["params"]) for r in p.rows]
        [('hsdp 2x1', 80)]
    """
    world, layouts_wanted = check_world(world_size, mesh)
    if isinstance(strategies, str):
        raise TypeError(f"plan: strategies must be a list of names, got the string {strategies!r}; pass [{strategies!r}]")
    wanted = tuple(strategies) if strategies is not None else FAMILIES
    names = [s for s in wanted if s not in FAMILIES and s not in _strategies.STRATEGIES]  # layout names: "hsdp 2x2"
    bad = [s for s in names if not isinstance(s, str) or s.split(" ")[0].rstrip("0123456789") not in FAMILIES]
    if bad:
        raise ValueError(f"plan: unknown strategies {bad}; use some of {', '.join(FAMILIES)}, or layout names such as "
                         "'hsdp 2x2', 'tp2 x fsdp2', 'pp2 x dp2'")  # fmt: skip
    whole = [_strategies.STRATEGIES[s].name if s in _strategies.STRATEGIES else s for s in wanted if s not in names]
    families = tuple(dict.fromkeys(whole + [s.split(" ")[0].rstrip("0123456789") for s in names]))
    if optimizer not in _TORCH_OPTIMIZERS:
        raise ValueError(f"plan: unknown optimizer {optimizer!r}; use one of {', '.join(_TORCH_OPTIMIZERS)}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise ValueError(f"plan: budget must be a number of bytes > 0 or None, got {budget!r}")
    if measure and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 3):
        raise ValueError(f"plan: steps must be an int >= 3 (a warm-up, timed steps, a profiled one), got {steps!r}")
    name = model if isinstance(model, str) else getattr(model, "__qualname__", repr(model))
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"plan: model_kwargs must be a mapping of keyword arguments, got {type(model_kwargs).__name__}")
    factory = resolve(model, what="model") if isinstance(model, str) else model
    if model_kwargs:
        factory = Factory(model, dict(model_kwargs))
    make_input = input_factory(batch)
    with torch.device("meta"):
        meta = build(factory, name)
    shape = tuple(batch) if not callable(make_input.source) else ()
    if tp_plan is None:
        tp_plan = default_tp_plan(meta)

    notes: list[str] = []
    layouts = [
        lay for lay in enumerate_layouts(world, families, tp_plan, meta, notes)
        if (layouts_wanted is None or dict(lay.axes) == layouts_wanted) and (lay.family in whole or lay.name in names)
    ]  # fmt: skip
    missing = [n for n in names if n not in {lay.name for lay in layouts}]
    if missing:
        every = [lay.name for lay in enumerate_layouts(world, FAMILIES, tp_plan, meta, [])]
        raise ValueError(f"plan: no layout {missing} on {world} processes; they are {every}")
    if not layouts:
        raise ValueError(
            f"plan: no layout of {', '.join(families)} fits "
            + (f"the mesh {dict(layouts_wanted)}" if layouts_wanted else f"{world} processes")
            + ("" if not notes else f" ({'; '.join(notes)})")
            + "; pass other strategies or another mesh"
        )
    rows = []
    for lay in layouts:
        pred, comm = predict(lay, meta, make_input, optimizer, tp_plan)
        rows.append(PlanRow(layout=lay, predicted=pred, comm_bytes=comm, fits=None if budget is None else pred["total"] <= budget))
    num_params = sum(p.numel() for p in meta.parameters())
    if any(r.layout.family == "tp" for r in rows):
        notes.append(f"tp plan: {dict(tp_plan)}")
    if any(r.layout.family == "pp" for r in rows):
        notes.append(f"pp: gpipe, {_MICROBATCHES} micro-batches, each stage replicated over dp; the largest stage's "
                     "params and activations")  # fmt: skip
    if measure:
        # spawned workers import the model by name: the string as given, else the function's module and name
        source = model if isinstance(model, str) and not model_kwargs else factory
        runs = _run_layouts(source, factory, make_input, [None if r.fits is False else r.layout for r in rows], world,
                       optimizer, tp_plan, steps, timeout_s)  # fmt: skip
        rows = [r if m is None else attrs.evolve(r, error=m) if isinstance(m, str) else attrs.evolve(r, measured=Measured(**m))
                for r, m in zip(rows, runs)]  # fmt: skip
    if not shape:
        shape = tuple(make_input(1, torch.Generator().manual_seed(0)).shape)  # the batch factory's, for one row
    return Plan(model=name, num_params=num_params, world_size=world, batch=shape, optimizer=optimizer, budget=budget,
                steps=steps if measure else None, rows=tuple(rows), notes=tuple(notes))  # fmt: skip

def _state_of(pred: Mapping[str, int | None]) -> int:
    return int(pred["params"] or 0) + int(pred["grads"] or 0) + int(pred["optimizer_state"] or 0)


def _rel(measured: int, predicted: int) -> float:
    return (measured - predicted) / predicted if predicted else 0.0


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
