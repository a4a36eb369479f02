"""``jit``: compile a whole (transformed) step, its update included, with ``torch.compile``.

How it works (as ``jax.jit``): on the first call for a given structure (the state's
pytree, its tensors' shapes, dtypes and devices, the batch's), the step runs once in
Python on fake tensors under ``make_fx``, with every handler of the transforms live:
the handler stack, ``accumulate``'s micro-batch loop, ``mixed_precision``'s casts, the
hooks, the optimizer's ``step`` are plain Python then, so they are *resolved at trace
time* and leave only tensor operations behind. The one host read of an eager step (is
the gradient finite?) becomes a select on the device (``primitives.tracing``: the
update runs, then ``torch.where`` keeps the old params and optimizer state when the
gradient was not finite). The recorded graph, forward, backward and optimizer update in
one, is compiled by ``torch.compile(fullgraph=True)`` (no graph breaks by construction;
``JittedStep.explain`` shows dynamo's count). Later calls with the same structure reuse
it: no retracing, no recompilation. The host-side bookkeeping (``state.step``, the data
position, the skip counters) is done around the compiled call.

Like ``jax.jit``, Python side effects of the step (prints, appends to a list) run once,
while tracing, and a step must not read tensor values on the host (``loss.item()``,
``if loss > 1``): that is refused with an error naming the line.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import os
import traceback
from typing import Any, Callable

import optree
import torch

from xform.core import primitives
from xform.core.state import TrainState, _NONFINITE, _TOO_MANY_SKIPS
from xform.core.strategies import Replicate
from xform.core.transform import check_result, check_step, init_of, transforms_of
from xform.tree import NAMESPACE

__all__ = ["jit", "JittedStep", "JitError"]

_BACKENDS = ("inductor", "aot_eager", "eager")


class JitError(TypeError):
    """A step that ``xf.jit`` cannot compile (it reads a tensor's value on the host, ...)."""


_HOST_READ = (
    "xf.jit: the step reads a tensor's value on the host at {where}; a compiled step cannot "
    "branch on or convert tensor values ({what}). Keep the value a tensor (torch.where(cond, a, b) "
    "instead of `if`, return it in the metrics instead of .item()), or call the step without xf.jit"
)

_XFORM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class _Program:
    """One traced and compiled step: what the compiled graph takes and returns."""

    __slots__ = ("compiled", "gm", "aliases", "n_out", "out_spec", "metrics_spec", "metric_consts", "has_flag")

    def __init__(self, gm, compiled, aliases, n_out, out_spec, metrics_spec, metric_consts, has_flag):
        self.gm = gm
        self.compiled = compiled
        self.aliases = aliases  # per output tensor leaf of the state: ("in", i) or ("out", j)
        self.n_out = n_out
        self.out_spec = out_spec
        self.metrics_spec = metrics_spec
        self.metric_consts = metric_consts  # per metric leaf: ("in", i) / ("out", j) / ("const", v)
        self.has_flag = has_flag


class JittedStep:
    """A step compiled whole by ``xf.jit``; call it as the step: ``step(state, batch)``.

    Attributes:
        step: the step it compiles.
        compilations: how many times it traced and compiled (one per structure).
    """

    def __init__(self, step: Callable[..., Any], backend: Any, mode: str | None):
        self.step = step
        self.backend = backend
        self.mode = mode
        self.compilations = 0
        self._programs: dict[Any, _Program] = {}
        self.xform = transforms_of(step).then("jit", backend=backend if isinstance(backend, str) else "custom")
        functools.update_wrapper(self, step)

    def init(self, state: TrainState) -> TrainState:
        """The inner step's ``init``: lays the state out for the transforms."""
        return init_of(self.step)(state)

    # --- the call ------------------------------------------------------------------------

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
        if not isinstance(state, TrainState):
            raise TypeError(
                f"xf.jit: expected a TrainState as the first argument, got {type(state).__name__}; call "
                "step(state, batch) with state = step.init(xf.TrainState.create(...))"
            )
        state._alive("xf.jit")
        if not state._opt_state["initialized"]:
            # torch.optim makes its state at the first update: run that one eagerly, then
            # every later step has the same structure (one trace, one compilation).
            return check_result("xf.jit", self.step(state, batch))
        leaves, spec = optree.tree_flatten(state, namespace=NAMESPACE)
        b_leaves, b_spec = optree.tree_flatten(batch, namespace=NAMESPACE)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        b_tensors = [x for x in b_leaves if isinstance(x, torch.Tensor)]
        key = (spec, b_spec, _meta(leaves, state), _meta(b_leaves, None))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._trace(state, leaves, spec, batch, b_leaves, b_spec)
        return self._run(program, state, leaves, spec, tensors, b_tensors)

    def _run(self, program: _Program, state: TrainState, leaves, spec, tensors, b_tensors):
        gen = state._life.runtime.generator
        saved = gen.get_state()
        gen.manual_seed(hash((state._rng, state._data["consumed"], "jit")) & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            with torch.no_grad():
                outs = program.compiled(tensors, b_tensors)
        finally:
            gen.set_state(saved)
        if program.has_flag:
            # The host read of the step's outcome, after the whole step ran (the select on
            # the device already kept the old params if the gradient was not finite).
            finite = not bool(outs[-1])
        else:
            finite = None
        new_tensors = [tensors[i] if kind == "in" else outs[i] for kind, i in program.aliases]
        metrics = optree.tree_unflatten(
            program.metrics_spec,
            [tensors[v] if kind == "in" else outs[v] if kind == "out" else v for kind, v in program.metric_consts],
        )
        if finite is None:  # a step without an update (evaluation): the state is unchanged
            return state, metrics
        it = iter(new_tensors)
        new_leaves = [next(it) if isinstance(x, torch.Tensor) else x for x in leaves]
        new = optree.tree_unflatten(spec, new_leaves)
        counter = state._transforms.get(_NONFINITE)
        if finite:
            transforms = new._transforms
            if counter is not None and counter["consecutive"]:
                transforms = {**transforms, _NONFINITE: {**counter, "consecutive": 0}}
            new = new._evolve_leaves(
                step=state._step + 1, data={**state._data, "consumed": state._data["consumed"] + 1},
                transforms=transforms,
            )
        else:
            transforms = new._transforms
            if counter is not None:
                n = counter["consecutive"] + 1
                limit = state._spec.max_consecutive_skips
                if limit is not None and n >= limit:
                    raise FloatingPointError(
                        _TOO_MANY_SKIPS.format(n=n, step=state._step, consumed=state._data["consumed"])
                    )
                transforms = {**transforms, _NONFINITE: {"skipped": counter["skipped"] + 1, "consecutive": n}}
            new = new._evolve_leaves(data={**state._data, "consumed": state._data["consumed"] + 1}, transforms=transforms)
        state._donate(f"the update that produced step {new._step} (xf.jit)")
        return new, metrics

    # --- tracing -------------------------------------------------------------------------

    def _trace(self, state: TrainState, leaves, spec, batch, b_leaves, b_spec) -> _Program:
        from torch.fx.experimental.proxy_tensor import make_fx

        _check_supported(self.step, state)
        record: dict[str, Any] = {}

        def pure(tensors: list[torch.Tensor], b_tensors: list[torch.Tensor]):
            it = iter(tensors)
            traced_state = optree.tree_unflatten(spec, [next(it) if isinstance(x, torch.Tensor) else x for x in leaves])
            bit = iter(b_tensors)
            traced_batch = optree.tree_unflatten(
                b_spec, [next(bit) if isinstance(x, torch.Tensor) else x for x in b_leaves]
            )
            trace = primitives.Trace()
            token = primitives._TRACING.set(trace)
            try:
                new, metrics = check_result("xf.jit", self.step(traced_state, traced_batch))
            finally:
                primitives._TRACING.reset(token)
            if len(trace.flags) > 1:
                raise JitError(
                    f"xf.jit: the step ran {len(trace.flags)} optimizer updates; a jitted step runs at most one "
                    "(call apply_gradients once per step)"
                )
            out_leaves, out_spec = optree.tree_flatten(new, namespace=NAMESPACE)
            if out_spec != spec:
                raise JitError(
                    "xf.jit: the step returned a state of another structure than it received (a leaf added or "
                    "removed); a jitted step must keep the state's structure: lay it out in step.init"
                )
            ids = {id(t): i for i, t in enumerate(tensors)}
            outputs: list[torch.Tensor] = []
            aliases = []
            for x, y in zip(leaves, out_leaves):
                if isinstance(x, torch.Tensor):
                    if not isinstance(y, torch.Tensor):
                        raise JitError("xf.jit: the step replaced a tensor leaf of the state by a non-tensor")
                    if id(y) in ids:
                        aliases.append(("in", ids[id(y)]))
                    else:
                        aliases.append(("out", len(outputs)))
                        outputs.append(y)
            m_leaves, m_spec = optree.tree_flatten(metrics, namespace=NAMESPACE)
            consts = []
            for m in m_leaves:
                if isinstance(m, torch.Tensor):
                    if id(m) in ids:
                        consts.append(("in", ids[id(m)]))
                    else:
                        consts.append(("out", len(outputs)))
                        outputs.append(m)
                else:
                    consts.append(("const", m))
            if trace.flags:
                outputs.append(trace.flags[0])
                _check_host_leaves(state, leaves, out_leaves)
            record.update(aliases=aliases, consts=consts, m_spec=m_spec, n_out=len(outputs),
                          has_flag=bool(trace.flags))
            return outputs

        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        b_tensors = [x for x in b_leaves if isinstance(x, torch.Tensor)]
        try:
            with _compiling():
                gm = make_fx(pure, tracing_mode="fake", _allow_non_fake_inputs=False)(tensors, b_tensors)
        except JitError:
            raise
        except Exception as e:
            where = _user_line(e.__traceback__)
            if _is_host_read(e):
                raise JitError(_HOST_READ.format(where=where, what=f"{type(e).__name__}")) from e
            raise
        finally:
            state._life.runtime.bind(state)  # the module's slots held the traced tensors
        _drop_profiler_marks(gm)
        compiled = torch.compile(gm, backend=self.backend, mode=self.mode, fullgraph=True, dynamic=False)
        self.compilations += 1
        return _Program(gm, compiled, record["aliases"], record["n_out"], spec, record["m_spec"], record["consts"],
                        record["has_flag"])

    def explain(self, state: TrainState, batch: Any) -> Any:
        """``torch._dynamo.explain`` of the compiled graph of ``(state, batch)``'s
        structure (traced if needed; ``state`` is not updated): its graph and graph-break
        counts, as dynamo sees them.

        Example:
            >>> import torch, xform as xf
            >>> def step(state, batch):  # doctest: +SKIP
            ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).sum())(state.params)
            ...     return state.apply_gradients(grads), {"loss": loss}
            >>> xf.jit(step).explain(state, batch).graph_break_count  # doctest: +SKIP
            0
        """
        leaves, spec = optree.tree_flatten(state, namespace=NAMESPACE)
        b_leaves, b_spec = optree.tree_flatten(batch, namespace=NAMESPACE)
        if not state._opt_state["initialized"]:
            raise ValueError("xf.jit.explain: run one step first (the first update runs eagerly)")
        key = (spec, b_spec, _meta(leaves, state), _meta(b_leaves, None))
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._trace(state, leaves, spec, batch, b_leaves, b_spec)
        tensors = [x.detach().clone() for x in leaves if isinstance(x, torch.Tensor)]
        b_tensors = [x for x in b_leaves if isinstance(x, torch.Tensor)]
        with torch.no_grad():
            return torch._dynamo.explain(program.gm)(tensors, b_tensors)


def jit(step: Callable[..., Any], *, backend: Any = "inductor", mode: str | None = None) -> JittedStep:
    """Compiles the whole step, the optimizer update included, with ``torch.compile``.

    The handlers of the transforms (``mixed_precision``, ``accumulate``) are resolved
    when the step is traced, so the compiled step holds no Python dispatch: one graph,
    forward, backward and update (``fullgraph=True``). A non-finite gradient still skips
    the update (a select on the device, then one host read of the flag after the step).
    One trace and compilation per structure of ``(state, batch)``; the first update of a
    fresh state runs eagerly (torch.optim makes its state then).

    Args:
        step: a step, plain or transformed (put ``jit`` outermost).
        backend: ``torch.compile``'s backend: ``"inductor"`` (fused kernels),
            ``"aot_eager"`` (the traced graph run op by op: for checking), or a callable.
        mode: ``torch.compile``'s mode (``"max-autotune"``, ``"reduce-overhead"``, ...).

    Under ``shard("replicate")`` each process compiles its step, the gradient
    all-reduce included (a functional collective in the graph; its buckets as eager).

    Limits: no other ``shard`` strategy yet, no learning-rate schedule (a host value per step),
    no fp16 loss scaling; the step may not read tensor values on the host. Dropout is
    deterministic per ``(state.rng, data position)`` but draws other masks than the eager step.

    Example:
        >>> import torch, xform as xf
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> fast = xf.jit(xf.mixed_precision(step, "bf16"), backend="aot_eager")
        >>> state = fast.init(xf.TrainState.create(torch.nn.Linear(4, 2), optimizer=torch.optim.SGD, lr=0.1))
        >>> for _ in range(3):
        ...     state, metrics = fast(state, torch.ones(8, 4))
        >>> state.step, fast.compilations
        (3, 1)
    """
    check_step("xf.jit", step)
    if isinstance(step, JittedStep):
        return step
    if isinstance(backend, str) and backend not in _BACKENDS:
        raise ValueError(f"xf.jit: backend must be one of {list(_BACKENDS)} or a callable, got {backend!r}")
    if not isinstance(backend, str) and not callable(backend):
        raise TypeError(f"xf.jit: backend must be a string or a torch.compile backend callable, got {backend!r}")
    strategy = transforms_of(step).setting("shard", "strategy")
    if strategy is not None and not isinstance(strategy, Replicate):
        raise ValueError(
            f"xf.jit: shard(strategy={strategy!r}) is not supported yet, only 'replicate' (its gradient "
            "all-reduce becomes a functional collective in the graph); use that strategy, or this one eagerly"
        )
    return JittedStep(step, backend, mode)


# --- helpers ------------------------------------------------------------------------------


def _check_supported(step: Any, state: TrainState) -> None:
    if state._spec.schedule is not None:
        raise ValueError(
            "xf.jit: a learning-rate schedule (lr=function) is not supported: it sets a host value per step; "
            "pass a constant lr, or call the step without xf.jit"
        )
    record = transforms_of(step)
    mp = record.find("mixed_precision")
    if mp is not None and "mixed_precision" in state._transforms:
        raise ValueError(
            "xf.jit: fp16 loss scaling is not supported (its growth reads whether the update ran); use "
            "mixed_precision(step, 'bf16'), or call the step without xf.jit"
        )


_SKIP_PATHS = (("step",), ("data", "consumed"), ("transforms", _NONFINITE, "skipped"),
               ("transforms", _NONFINITE, "consecutive"))


def _meta(leaves: list[Any], state: TrainState | None) -> tuple[Any, ...]:
    """What a compiled program depends on: tensors' shapes, dtypes, devices and
    requires_grad, and the host leaves, but the step counter, the data position and the
    skip counters (done on the host around the compiled call)."""
    out = []
    skip = _skip_indices(state) if state is not None else frozenset()
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            out.append((tuple(x.shape), x.dtype, x.device, x.requires_grad))
        elif i not in skip:
            out.append(x if _hashable(x) else id(x))
    return tuple(out)


def _skip_indices(state: TrainState) -> frozenset[int]:
    paths, _, _ = optree.tree_flatten_with_path(state, namespace=NAMESPACE)
    return frozenset(i for i, p in enumerate(paths) if tuple(p) in _SKIP_PATHS)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _check_host_leaves(state: TrainState, before: list[Any], after: list[Any]) -> None:
    skip = _skip_indices(state)
    paths, _, _ = optree.tree_flatten_with_path(state, namespace=NAMESPACE)
    for i, (x, y) in enumerate(zip(before, after)):
        if i in skip or isinstance(x, torch.Tensor):
            continue
        if x is not y and x != y:
            raise JitError(
                f"xf.jit: the step changes the host value state{''.join(f'[{k!r}]' for k in paths[i])} "
                f"({x!r} -> {y!r}); a compiled step changes only tensors, the step counter and the data "
                "position. Keep that value in a tensor, or call the step without xf.jit"
            )


def _drop_profiler_marks(gm: torch.fx.GraphModule) -> None:
    """Removes ``record_function`` marks (``Optimizer.step`` records one) from the traced
    graph: they return a script object, which dynamo cannot put in a graph."""
    profiler = torch.ops.profiler
    marks = (profiler._record_function_exit._RecordFunction, profiler._record_function_enter_new.default)
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and (node.target in marks or "profiler" in str(node.target)):
            gm.graph.erase_node(node)
    gm.recompile()


@contextlib.contextmanager
def _compiling():
    """``torch.compiler.is_compiling()`` is True while tracing: torch.optim then keeps its
    step counts and bias corrections on the device instead of reading them with ``.item()``."""
    import torch.compiler as tc

    old = tc._is_compiling_flag
    tc._is_compiling_flag = True
    try:
        yield
    finally:
        tc._is_compiling_flag = old


def _is_host_read(e: BaseException) -> bool:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    names = ("GuardOnDataDependentSymNode", "DataDependentOutputException", "UnsupportedOperatorException")
    seen = e
    while seen is not None:
        if isinstance(seen, (DataDependentOutputException, DynamicOutputShapeException)) or type(seen).__name__ in names:
            return True
        if "data-dependent" in str(seen) or "Data dependent" in str(seen) or ".item()" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _user_line(tb: Any) -> str:
    """``file:line `code``` of the innermost frame outside torch and xform (the user's)."""
    where = "an unknown line"
    for frame, lineno in traceback.walk_tb(tb):
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(_TORCH_DIR) or filename.startswith(_XFORM_DIR) or filename.startswith("<"):
            continue
        code = linecache.getline(filename, lineno).strip()
        where = f"{filename}:{lineno} `{code}`"
    return where
