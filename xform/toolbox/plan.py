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
by ``optimizer``. docs/plan.md gives the formulas.

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

import contextlib
import gc
import importlib
import importlib.util
import logging
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from xform.core import strategies as _strategies
from xform.toolbox.memory import OPTIMIZERS, estimate_memory, measure_activations

__all__ = ["Layout", "Measured", "PlanRow", "Plan", "plan", "FAMILIES"]

# The 1-D data-parallel strategies of core's table (aliases once), then the mesh families.
_DATA_PARALLEL = tuple(dict.fromkeys(s.name for s in _strategies.STRATEGIES.values() if s.name != "hsdp"))
FAMILIES = _DATA_PARALLEL + ("hsdp", "tp", "pp")
_TORCH_OPTIMIZERS: dict[str, Callable[[], tuple[type, dict]]] = {
    "adam": lambda: (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": lambda: (torch.optim.AdamW, {"lr": 1e-3}),
    "sgd": lambda: (torch.optim.SGD, {"lr": 1e-2}),
    "sgd-momentum": lambda: (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
}
_MICROBATCHES = 2  # pipeline micro-batches per step


@attrs.frozen(kw_only=True)
class Layout:
    """One candidate: a strategy family on a mesh.

    Attributes:
        name: e.g. ``"zero2"``, ``"hsdp 2x2"`` (replicate x shard), ``"tp2 x fsdp2"``, ``"pp2"``.
        family: one of ``FAMILIES``.
        axes: the mesh's axes and sizes, ``()`` for a 1-D strategy over all processes.
        dp: the data-parallel size: the global batch is ``dp`` times the per-replica batch.
    """

    name: str
    family: str
    axes: tuple[tuple[str, int], ...] = ()
    dp: int = 1

    def size(self, axis: str) -> int:
        return dict(self.axes).get(axis, 1)


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
    model: str | Callable[[], torch.nn.Module],
    *,
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
    world, layouts_wanted = _check_world(world_size, mesh)
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
    factory = resolve(model, what="model") if isinstance(model, str) else model
    make_input = _input_factory(batch)
    with torch.device("meta"):
        meta = _build(factory, name)
    shape = tuple(batch) if not callable(make_input.source) else ()
    if tp_plan is None:
        tp_plan = default_tp_plan(meta)

    notes: list[str] = []
    layouts = [
        lay for lay in _enumerate(world, families, tp_plan, meta, notes)
        if (layouts_wanted is None or dict(lay.axes) == layouts_wanted) and (lay.family in whole or lay.name in names)
    ]  # fmt: skip
    missing = [n for n in names if n not in {lay.name for lay in layouts}]
    if missing:
        every = [lay.name for lay in _enumerate(world, FAMILIES, tp_plan, meta, [])]
        raise ValueError(f"plan: no layout {missing} on {world} processes; they are {every}")
    if not layouts:
        raise ValueError(
            f"plan: no layout of {', '.join(families)} fits "
            + (f"the mesh {dict(layouts_wanted)}" if layouts_wanted else f"{world} processes")
            + ("" if not notes else f" ({'; '.join(notes)})")
            + "; pass other strategies or another mesh"
        )
    rows = [_predict(lay, meta, make_input, optimizer, tp_plan, budget) for lay in layouts]
    num_params = sum(p.numel() for p in meta.parameters())
    if any(r.layout.family == "tp" for r in rows):
        notes.append(f"tp plan: {dict(tp_plan)}; tp activations are predicted unsplit (an upper bound)")
    if any(r.layout.family == "pp" for r in rows):
        notes.append(f"pp: gpipe, {_MICROBATCHES} micro-batches, each stage replicated over dp; the largest stage's "
                     "params and activations")  # fmt: skip
    if measure:
        rows = _measure(model, factory, make_input, rows, world, optimizer, tp_plan, steps, timeout_s)
    if not shape:
        shape = tuple(make_input(1, torch.Generator().manual_seed(0)).shape)  # the batch factory's, for one row
    return Plan(model=name, num_params=num_params, world_size=world, batch=shape, optimizer=optimizer, budget=budget,
                steps=steps if measure else None, rows=tuple(rows), notes=tuple(notes))  # fmt: skip


# --- inputs ---------------------------------------------------------------------------------------


def resolve(spec: str, *, what: str = "model") -> Callable[..., Any]:
    """``"module:attr"`` or ``"path/to/file.py:attr"`` (``attr`` may be dotted) to the object."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"plan: {what} must be module:function or path/to/file.py:function, got {spec!r}")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"plan: no such file {target!r} (from {what} {spec!r})")
        modname = f"_xform_plan_{path.stem}_{abs(hash(str(path)))}"
        module = sys.modules.get(modname)
        if module is None:
            sys.path.insert(0, str(path.parent))  # so that it can import its neighbours
            mod_spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[modname] = module
            mod_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"plan: cannot import {target!r} (from {what} {spec!r}): {e}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"plan: {target!r} has no attribute {attr!r} (from {what} {spec!r})") from None
    if not callable(obj):
        raise ValueError(f"plan: {what} {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


class _Input:
    """``(rows, generator) -> input`` from a shape or a factory."""

    def __init__(self, source: Any):
        self.source = source

    def __call__(self, rows: int, g: torch.Generator) -> Any:
        if callable(self.source):
            return self.source(rows, g)
        return torch.randn((rows, *self.source[1:]), generator=g)


def _input_factory(batch: Any) -> _Input:
    if isinstance(batch, str):
        return _Input(resolve(batch, what="batch"))
    if callable(batch):
        return _Input(batch)
    if (not isinstance(batch, (tuple, list)) or not batch
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in batch)):  # fmt: skip
        raise ValueError(f"plan: batch must be a shape of positive ints such as (8, 16), or a function "
                         f"(rows, generator) -> input, got {batch!r}")  # fmt: skip
    return _Input(tuple(batch))


def _rows_of(make_input: _Input) -> int:
    return make_input.source[0] if not callable(make_input.source) else _ROWS_DEFAULT


_ROWS_DEFAULT = 8  # rows per replica given to a batch factory


def _build(factory: Callable[[], Any], name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 - the user's code
        raise ValueError(f"plan: building the model {name} failed: {type(e).__name__}: {e}") from e
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"plan: the model {name} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _check_world(world_size: int | None, mesh: Mapping[str, int] | None) -> tuple[int, dict[str, int] | None]:
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise ValueError(f"plan: world_size must be an int >= 1, got {world_size!r}")
    if mesh is None:
        if world_size is None:
            raise ValueError("plan: give world_size=N or mesh={...}, e.g. plan(model, batch=(8, 16), world_size=2)")
        return world_size, None
    known = {("replicate", "shard"), ("dp", "tp"), ("pp",), ("pp", "dp")}
    if tuple(mesh) not in known:
        raise ValueError(f"plan: mesh axes {tuple(mesh)} are not a layout plan knows; use replicate+shard (hsdp), "
                         f"dp+tp (tensor parallel), pp or pp+dp (pipeline)")  # fmt: skip
    bad = {k: v for k, v in mesh.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"plan: mesh sizes must be ints >= 1, got {bad}")
    size = math.prod(mesh.values())
    if world_size is not None and size != world_size:
        raise ValueError(f"plan: the mesh {dict(mesh)} holds {size} processes but world_size is {world_size}; "
                         f"make the axis sizes multiply to {world_size}")  # fmt: skip
    return size, dict(mesh)


def default_tp_plan(module: torch.nn.Module) -> dict[str, str]:
    """Megatron's split: in each ``nn.Sequential`` whose children are a ``Linear``,
    parameter-free modules (activations, dropout), and a ``Linear``, the first is
    ``colwise`` and the last ``rowwise`` (one all-reduce in forward, one in backward)."""
    out: dict[str, str] = {}
    for name, mod in module.named_modules():
        if not isinstance(mod, torch.nn.Sequential) or len(mod) < 2:
            continue
        kids = list(mod.named_children())
        first, last = kids[0], kids[-1]
        middle_free = all(not any(True for _ in m.parameters()) for _, m in kids[1:-1])
        if isinstance(first[1], torch.nn.Linear) and isinstance(last[1], torch.nn.Linear) and middle_free:
            prefix = f"{name}." if name else ""
            out[prefix + first[0]] = "colwise"
            out[prefix + last[0]] = "rowwise"
    return out


# --- enumeration and prediction --------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_ok(meta: torch.nn.Module, tp_plan: Mapping[str, str], t: int) -> str | None:
    import fnmatch

    if not tp_plan:
        return "no tp plan (no Linear-activation-Linear Sequential found; pass tp_plan)"
    for name, mod in meta.named_modules():
        for pattern, style in tp_plan.items():
            if name and fnmatch.fnmatchcase(name, pattern):
                w = getattr(mod, "weight", None)
                dim = 0 if style == "colwise" else 1
                if w is None or w.dim() != 2 or w.shape[dim] % t:
                    return f"{name!r} cannot be split {t} ways"
    return None


def _enumerate(world: int, families: Sequence[str], tp_plan: Mapping[str, str], meta: torch.nn.Module,
               notes: list[str]) -> list[Layout]:  # fmt: skip
    out: list[Layout] = []
    for fam in families:
        if fam in _DATA_PARALLEL:
            out.append(Layout(name=fam, family=fam, dp=world))
        elif fam == "hsdp":
            for r in _divisors(world):
                out.append(Layout(name=f"hsdp {r}x{world // r}", family="hsdp", axes=(("replicate", r), ("shard", world // r)),
                                  dp=world))  # fmt: skip
        elif fam == "tp":
            for t in _divisors(world)[1:]:
                why = _tp_ok(meta, tp_plan, t)
                if why:
                    notes.append(f"tp{t} left out: {why}")
                    continue
                d = world // t
                out.append(Layout(name=f"tp{t}" + (f" x fsdp{d}" if d > 1 else ""), family="tp",
                                  axes=(("dp", d), ("tp", t)), dp=d))  # fmt: skip
        elif fam == "pp":
            if not hasattr(_strategies, "Pipeline"):
                notes.append("pp left out: this build has no xform.core.strategies.Pipeline")
                continue
            if not isinstance(meta, torch.nn.Sequential):
                notes.append(f"pp left out: Pipeline needs an nn.Sequential, the model is a {type(meta).__name__}")
                continue
            for p in _divisors(world)[1:]:
                if p > len(meta):
                    notes.append(f"pp{p} left out: the Sequential has {len(meta)} children")
                    continue
                d = world // p
                axes = (("pp", p),) + ((("dp", d),) if d > 1 else ())
                out.append(Layout(name=f"pp{p}" + (f" x dp{d}" if d > 1 else ""), family="pp", axes=axes, dp=d))
    return out


def _sharded_count(meta: torch.nn.Module, tp_plan: Mapping[str, str], t: int) -> tuple[int, int]:
    """(elements per process, tensors) of the params under tensor parallelism of size t."""
    import fnmatch

    style_of: dict[str, str] = {}
    for name, _ in meta.named_modules():
        for pattern, style in tp_plan.items():
            if name and fnmatch.fnmatchcase(name, pattern):
                style_of[name] = style
    total = tensors = 0
    for pname, p in meta.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        style = style_of.get(owner)
        split = style == "colwise" or (style == "rowwise" and leaf == "weight")  # a rowwise bias is replicated
        total += math.ceil(p.numel() / t) if split else p.numel()
        tensors += 1
    return total, tensors


def _from_count(count: int, tensors: int, buffers: int, *, strategy: str, world_size: int, optimizer: str) -> dict[str, int]:
    e = estimate_memory(count, strategy=strategy, world_size=world_size, optimizer=optimizer)
    # estimate_memory counts one tensor for a bare count: add the other tensors' step counters
    steps = 4 * (tensors - (1 if count else 0)) if OPTIMIZERS[optimizer][1] else 0
    return {"params": e.params, "grads": e.grads, "optimizer_state": e.optimizer_state + steps, "buffers": buffers}


def _predict(lay: Layout, meta: torch.nn.Module, make_input: _Input, optimizer: str, tp_plan: Mapping[str, str],
             budget: int | None) -> PlanRow:  # fmt: skip
    fam = lay.family
    if fam in _DATA_PARALLEL or fam == "hsdp":
        n = lay.size("shard") if fam == "hsdp" else lay.dp
        e = estimate_memory(meta, strategy="zero3" if fam == "hsdp" else fam, world_size=n, optimizer=optimizer)
        pred = {"params": e.params, "grads": e.grads, "optimizer_state": e.optimizer_state, "buffers": e.buffers}
    else:
        buffers = sum(b.numel() * b.element_size() for b in meta.buffers())
        if fam == "tp":
            count, tensors = _sharded_count(meta, tp_plan, lay.size("tp"))
        else:  # pp: the largest stage of the split of the children that minimizes the largest stage
            count, tensors = _largest_stage(meta, lay.size("pp"))
        strategy = "zero3" if lay.dp > 1 and fam == "tp" else "replicate"
        pred = _from_count(count, tensors, buffers, strategy=strategy, world_size=lay.dp, optimizer=optimizer)
    acts = _activations(meta, make_input, lay.size("pp") if fam == "pp" else 1)
    pred["activations"] = acts
    pred["total"] = sum(v for v in pred.values() if v is not None)
    comm = _comm_bytes(lay, meta, make_input, tp_plan)
    fits = None if budget is None else pred["total"] <= budget
    return PlanRow(layout=lay, predicted=pred, comm_bytes=comm, fits=fits)


def _stage_runs(meta: torch.nn.Module, stages: int) -> list[tuple[int, int]]:
    """The cut of a ``Sequential``'s children into ``stages`` consecutive runs ``[a, b)``
    whose largest parameter count is as small as it can be (``Pipeline``'s default split,
    by parameter bytes: the same cut when every parameter has one dtype)."""
    cost = [sum(p.numel() for p in m.parameters()) for m in meta.children()]
    n = len(cost)
    # best[k][i]: the smallest largest run cutting cost[:i] into k runs; cut[k][i]: where the last run starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            run = 0
            for j in range(i - 1, k - 2, -1):
                run += cost[j]
                v = max(best[k - 1][j], run)
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    runs, i = [], n
    for k in range(stages, 0, -1):
        runs.append((cut[k][i], i))
        i = cut[k][i]
    return runs[::-1]


def _largest_stage(meta: torch.nn.Module, stages: int) -> tuple[int, int]:
    """(parameters, tensors) of the largest stage of ``_stage_runs``."""
    kids = [list(m.parameters()) for m in meta.children()]
    a, b = max(_stage_runs(meta, stages), key=lambda r: sum(p.numel() for ps in kids[r[0]:r[1]] for p in ps))
    return sum(p.numel() for ps in kids[a:b] for p in ps), sum(len(ps) for ps in kids[a:b])


def _stage_io(meta: torch.nn.Module, make_input: _Input, stages: int) -> list[tuple[Any, Any, torch.nn.Module]]:
    """(input, output, stage module) of each stage on the meta device, for one replica's batch."""
    x = make_input(_rows_of(make_input), torch.Generator().manual_seed(0))
    x = x.to("meta") if isinstance(x, torch.Tensor) else x
    kids = list(meta.children())
    out = []
    with torch.no_grad():
        for a, b in _stage_runs(meta, stages):
            stage = torch.nn.Sequential(*kids[a:b])
            y = stage(x)
            out.append((x, y, stage))
            x = y
    return out


def _activations(meta: torch.nn.Module, make_input: _Input, stages: int = 1) -> int | None:
    """``measure_activations`` of one replica's batch on meta; under a pipeline, of the
    stage that keeps the most (every micro-batch's activations alive at once, as gpipe)."""
    try:
        if stages > 1:
            return max(measure_activations(stage, x) for x, _, stage in _stage_io(meta, make_input, stages))
        x = make_input(_rows_of(make_input), torch.Generator().manual_seed(0))
        return measure_activations(meta, x.to("meta") if isinstance(x, torch.Tensor) else x)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: not predicted
        return None


def _ring(n: int, nbytes: float) -> float:
    """Bytes one process sends in a ring all-gather or reduce-scatter of ``nbytes`` over n."""
    return (n - 1) / n * nbytes


def _comm_bytes(lay: Layout, meta: torch.nn.Module, make_input: _Input, tp_plan: Mapping[str, str]) -> int:
    """Bytes one process sends per step (ring collectives; all-reduce = reduce-scatter + all-gather)."""
    grad_bytes = sum(p.numel() * 4 for p in meta.parameters() if p.requires_grad)  # fp32 grads and params
    fam, n = lay.family, lay.dp
    if fam == "replicate":
        return round(2 * _ring(n, grad_bytes))  # all-reduce of the gradients
    if fam == "zero1":
        return round(3 * _ring(n, grad_bytes))  # all-reduce of the gradients + all-gather of the params
    if fam == "zero2":
        return round(2 * _ring(n, grad_bytes))  # reduce-scatter of the gradients + all-gather of the params
    if fam == "zero3":
        return round(3 * _ring(n, grad_bytes))  # all-gather forward and backward + reduce-scatter
    if fam == "hsdp":
        r, s = lay.size("replicate"), lay.size("shard")
        return round(3 * _ring(s, grad_bytes) + 2 * _ring(r, grad_bytes / s))
    rows = _rows_of(make_input)
    if fam == "tp":
        t = lay.size("tp")
        count, _ = _sharded_count(meta, tp_plan, t)
        # all-reduce of each rowwise output in forward, of each colwise input's gradient in backward
        modules = dict(meta.named_modules())
        act = sum(rows * 4 * (modules[name].weight.shape[1] if style == "colwise" else modules[name].weight.shape[0])
                  for name, style in _planned(meta, tp_plan))  # fmt: skip
        return round(2 * _ring(t, act) + (3 * _ring(n, count * 4) if n > 1 else 0))
    if fam == "pp":
        # a stage sends its output forward and the gradient of its input backward; then all-reduces its gradients over dp
        try:
            io = _stage_io(meta, make_input, lay.size("pp"))
        except Exception:  # noqa: BLE001 - an op without a meta kernel
            io = []
        sent = [(_nbytes(y) if i < len(io) - 1 else 0) + (_nbytes(x) if i > 0 else 0) for i, (x, y, _) in enumerate(io)]
        stage_bytes = 4 * _largest_stage(meta, lay.size("pp"))[0]
        return round(max(sent, default=0) + (2 * _ring(n, stage_bytes) if n > 1 else 0))
    raise AssertionError(fam)


def _planned(meta: torch.nn.Module, tp_plan: Mapping[str, str]) -> list[tuple[str, str]]:
    import fnmatch

    return [(name, style) for name, _ in meta.named_modules() for pattern, style in tp_plan.items()
            if name and fnmatch.fnmatchcase(name, pattern)]  # fmt: skip


def _nbytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


# --- measurement ------------------------------------------------------------------------------------


def _state_of(pred: Mapping[str, int | None]) -> int:
    return int(pred["params"] or 0) + int(pred["grads"] or 0) + int(pred["optimizer_state"] or 0)


def _rel(measured: int, predicted: int) -> float:
    return (measured - predicted) / predicted if predicted else 0.0


def _measure(model: Any, factory: Callable, make_input: _Input, rows: list[PlanRow], world: int, optimizer: str,
             tp_plan: Mapping[str, str], steps: int, timeout_s: float) -> list[PlanRow]:  # fmt: skip
    from xform.distributed.procs import ProcessPool, RemoteError

    # Spawned workers import the model by name: a string as given, else the function's module and name
    source = model if isinstance(model, str) else factory
    batch_source = make_input.source
    refs: dict[int, dict[str, torch.Tensor]] = {}
    out: list[PlanRow] = []
    pool = None
    try:
        for row in rows:
            if row.fits is False:
                out.append(row)
                continue
            lay = row.layout
            for opt in (optimizer, "sgd"):
                if (lay.dp, opt) not in refs:
                    refs[lay.dp, opt] = _reference(factory, make_input, lay.dp, opt, steps)
            if pool is None:
                pool = ProcessPool(world, timeout_s=timeout_s)
            try:
                per_rank = pool.run(_run_layout, source, batch_source, lay, optimizer, dict(tp_plan), steps)
            except RemoteError as e:
                out.append(attrs.evolve(row, error=str(e).strip().splitlines()[-1]))
                pool.close(force=True)
                pool = None
                continue
            diff = _diff(refs[lay.dp, optimizer], [r["full"] for r in per_rank])
            sgd_diff = _diff(refs[lay.dp, "sgd"], [r["full_sgd"] for r in per_rank])
            times = [max(r["times"][i] for r in per_rank) for i in range(len(per_rank[0]["times"]))]
            q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
            m = Measured(
                params=max(r["params"] for r in per_rank),
                grads=max(r["grads"] for r in per_rank),
                optimizer_state=max(r["opt"] for r in per_rank),
                peak=max(r["peak"] for r in per_rank),
                step_s=(q[0], statistics.median(times), q[2]),
                max_rel_diff=diff,
                sgd_rel_diff=sgd_diff,
            )
            out.append(attrs.evolve(row, measured=m))
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


def _global_batch(make_input: _Input, dp: int, i: int) -> Any:
    return make_input(_rows_of(make_input) * dp, torch.Generator().manual_seed(1000 + i))


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
    return xf.TrainState.create(_build(factory, "model"), optimizer=cls, **kwargs)


def _reference(factory: Callable, make_input: _Input, dp: int, optimizer: str, steps: int) -> dict[str, torch.Tensor]:
    state = _new_state(factory, optimizer)
    for i in range(steps):
        state, _ = _step(state, _global_batch(make_input, dp, i))
    return {k: v.detach().clone() for k, v in state.params.items()}


def _bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


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
    make_input = _Input(resolve(batch_source, what="batch") if isinstance(batch_source, str) else batch_source)
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


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
