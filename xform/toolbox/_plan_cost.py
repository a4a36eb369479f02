"""``plan``'s model, inputs, layouts and cost model: what each layout is predicted to hold
and send per process (docs/plan.md has the formulas). Memory comes from
``xform.toolbox.memory`` (``estimate_memory``, ``measure_activations``) on the meta device."""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

from xform.core import strategies as _strategies
from xform.toolbox.memory import OPTIMIZERS, estimate_memory, measure_activations
from xform.toolbox.memory import STRATEGIES as _MEMORY_STRATEGIES
from xform.toolbox._callable import load_callable

# The 1-D data-parallel strategies of core's table (as memory.py derives them), then the mesh families.
_DATA_PARALLEL = _MEMORY_STRATEGIES  # replicate, zero1, zero2, zero3: the families estimate_memory has formulas for
FAMILIES = _DATA_PARALLEL + ("hsdp", "tp", "pp")
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


# --- inputs ---------------------------------------------------------------------------------------


def resolve(spec: str, *, what: str = "model") -> Callable[..., Any]:
    """``"module:attr"`` or ``"path/to/file.py:attr"`` (``attr`` may be dotted) to the object."""
    try:
        return load_callable(spec, what=what, kind="function")
    except ValueError as e:
        raise ValueError(f"plan: {e}") from None


class Input:
    """``(rows, generator) -> input`` from a shape or a factory."""

    def __init__(self, source: Any):
        self.source = source

    def __call__(self, rows: int, g: torch.Generator) -> Any:
        if callable(self.source):
            return self.source(rows, g)
        return torch.randn((rows, *self.source[1:]), generator=g)


def input_factory(batch: Any) -> Input:
    if isinstance(batch, str):
        return Input(resolve(batch, what="batch"))
    if callable(batch):
        return Input(batch)
    if (not isinstance(batch, (tuple, list)) or not batch
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in batch)):  # fmt: skip
        raise ValueError(f"plan: batch must be a shape of positive ints such as (8, 16), or a function "
                         f"(rows, generator) -> input, got {batch!r}")  # fmt: skip
    return Input(tuple(batch))


def rows_of(make_input: Input) -> int:
    return make_input.source[0] if not callable(make_input.source) else _ROWS_DEFAULT


_ROWS_DEFAULT = 8  # rows per replica given to a batch factory


@attrs.frozen
class Factory:
    """``source(**kwargs)``, ``source`` a function or its ``module:function`` name: picklable
    by name, so that spawned processes build the same model."""

    source: Any
    kwargs: Mapping[str, Any]

    def __call__(self) -> Any:
        fn = resolve(self.source, what="model") if isinstance(self.source, str) else self.source
        return fn(**self.kwargs)


def build(factory: Callable[[], Any], name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        module = factory()
    except Exception as e:  # noqa: BLE001 - the user's code
        raise ValueError(f"plan: building the model {name} failed: {type(e).__name__}: {e}") from e
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"plan: the model {name} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def check_world(world_size: int | None, mesh: Mapping[str, int] | None) -> tuple[int, dict[str, int] | None]:
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


def enumerate_layouts(world: int, families: Sequence[str], tp_plan: Mapping[str, str], meta: torch.nn.Module,
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


def predict(lay: Layout, meta: torch.nn.Module, make_input: Input, optimizer: str,
            tp_plan: Mapping[str, str]) -> tuple[dict[str, int | None], int]:  # fmt: skip
    """(predicted bytes per process by part, bytes sent per step) of one layout."""
    fam = lay.family
    if fam in _DATA_PARALLEL or fam == "hsdp":
        n = lay.size("shard") if fam == "hsdp" else lay.dp
        e = estimate_memory(meta, strategy="zero3" if fam == "hsdp" else fam, world_size=n, optimizer=optimizer,
                            shard_rows=True)
        pred = {"params": e.params, "grads": e.grads, "optimizer_state": e.optimizer_state, "buffers": e.buffers}
    else:
        buffers = sum(b.numel() * b.element_size() for b in meta.buffers())
        if fam == "tp":
            count, tensors = _sharded_count(meta, tp_plan, lay.size("tp"))
        else:  # pp: the largest stage of the split of the children that minimizes the largest stage
            count, tensors = _largest_stage(meta, lay.size("pp"))
        strategy = "zero3" if lay.dp > 1 and fam == "tp" else "replicate"
        pred = _from_count(count, tensors, buffers, strategy=strategy, world_size=lay.dp, optimizer=optimizer)
    if fam == "tp":
        acts = _activations(_narrowed(meta, tp_plan, lay.size("tp")), make_input)
    else:
        acts = _activations(meta, make_input, lay.size("pp") if fam == "pp" else 1)
    pred["activations"] = acts
    pred["total"] = sum(v for v in pred.values() if v is not None)
    return pred, _comm_bytes(lay, meta, make_input, tp_plan)


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


def _stage_io(meta: torch.nn.Module, make_input: Input, stages: int) -> list[tuple[Any, Any, torch.nn.Module]]:
    """(input, output, stage module) of each stage on the meta device, for one replica's batch."""
    x = make_input(rows_of(make_input), torch.Generator().manual_seed(0))
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


def _activations(meta: torch.nn.Module, make_input: Input, stages: int = 1) -> int | None:
    """``measure_activations`` of one replica's batch on meta; under a pipeline, of the
    stage that keeps the most (every micro-batch's activations alive at once, as gpipe)."""
    try:
        if stages > 1:
            return max(measure_activations(stage, x) for x, _, stage in _stage_io(meta, make_input, stages))
        x = make_input(rows_of(make_input), torch.Generator().manual_seed(0))
        return measure_activations(meta, x.to("meta") if isinstance(x, torch.Tensor) else x)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: not predicted
        return None


def _narrowed(meta: torch.nn.Module, tp_plan: Mapping[str, str], t: int) -> torch.nn.Module:
    """A meta copy of the model as one tensor-parallel process computes it: each planned
    ``colwise`` Linear with ``1/t`` of its outputs, each ``rowwise`` one with ``1/t`` of its
    inputs (its output, all-reduced, is whole)."""
    import copy

    narrow = copy.deepcopy(meta)
    modules = dict(narrow.named_modules())
    for name, style in _planned(meta, tp_plan):
        old = modules[name]
        out_f, in_f = old.weight.shape
        shape = (in_f, out_f // t) if style == "colwise" else (in_f // t, out_f)
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent], leaf, torch.nn.Linear(*shape, bias=old.bias is not None, device="meta"))
    return narrow


def _ring(n: int, nbytes: float) -> float:
    """Bytes one process sends in a ring all-gather or reduce-scatter of ``nbytes`` over n."""
    return (n - 1) / n * nbytes


def _comm_bytes(lay: Layout, meta: torch.nn.Module, make_input: Input, tp_plan: Mapping[str, str]) -> int:
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
    rows = rows_of(make_input)
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
    return [(name, style) for name, _ in meta.named_modules() for pattern, style in tp_plan.items()
            if name and fnmatch.fnmatchcase(name, pattern)]  # fmt: skip


def _nbytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []
