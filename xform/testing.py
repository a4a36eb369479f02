"""Checks that your own step keeps xform's promises: equivalence, purity, exact resume.

Each check takes your step, a ``make_state`` factory and data, runs the step the ways
that should agree, and raises ``AssertionError`` naming the first state leaf that
differs (e.g. ``params['0.weight']``) and by how much. Use them in your own tests:

Example:
    >>> import torch, torch.nn.functional as F, xform as xf
    >>> from xform.testing import assert_accumulate_equivalent
    >>> def step(state, batch):
    ...     def loss_fn(params):
    ...         return F.mse_loss(xf.apply(state, params, batch["x"]), batch["y"])
    ...     loss, grads = xf.value_and_grad(loss_fn)(state.params)
    ...     return state.apply_gradients(grads), {"loss": loss}
    >>> def make_state():
    ...     torch.manual_seed(0)  # a new module each call, with the same initial values
    ...     return xf.TrainState.create(torch.nn.Linear(3, 1), optimizer=torch.optim.AdamW, lr=1e-3)
    >>> batch = {"x": torch.randn(8, 3), "y": torch.randn(8, 1)}
    >>> _ = assert_accumulate_equivalent(step, make_state, batch, k=4)

``make_state`` is a zero-argument callable returning a fresh ``TrainState``: build a new
module each call (under a fixed ``torch.manual_seed``) so that two calls give equal but
independent states. The checks call ``step.init`` on it when the step has one (calling
it on an already laid-out state is harmless).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from xform import tree
from xform.transforms.accumulate import accumulate
from xform.checkpoint import load, save
from xform.core.state import DonatedStateError, TrainState
from xform.core.transform import init_of

__all__ = [
    "assert_accumulate_equivalent",
    "assert_deterministic",
    "assert_resume_equivalent",
    "assert_states_close",
    "counting_collectives",
    "fresh_states",
    "run_steps",
]


# --- comparing trees ----------------------------------------------------------------------


def _tensor_mismatch(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> str | None:
    """Why ``a`` and ``b`` differ, or None when they agree within the tolerances."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    a, b = a.detach(), b.detach()
    if a.device != b.device:
        b = b.to(a.device)
    both_nan = a.isnan() & b.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    if rtol == 0 and atol == 0 or not a.is_floating_point():
        bad = ~((a == b) | both_nan)
    else:
        bad = ~(torch.isclose(a, b, rtol=rtol, atol=atol) | both_nan)
    if not bool(bad.any()):
        return None
    a64, b64 = a.double(), b.double()
    diff = (a64 - b64).abs()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / b64.abs())  # inf where expected is 0
    first = tuple(int(i) for i in bad.nonzero()[0]) if a.dim() else ()
    return (
        f"max abs diff {float(diff.max()):.3g}, max rel diff {float(rel.max()):.3g}; "
        f"{int(bad.sum())} of {a.numel()} elements differ, the first at index {first}: "
        f"{float(a64[first]) if a.dim() else float(a64)!r} vs {float(b64[first]) if b.dim() else float(b64)!r}"
    )


def assert_states_close(
    actual: Any, expected: Any, *, rtol: float = 0.0, atol: float = 0.0, msg: str = ""
) -> None:
    """Asserts that two states (or any xform pytrees) agree leaf by leaf.

    Tensor leaves must have equal shapes and dtypes and agree within
    ``|actual - expected| <= atol + rtol * |expected|`` (NaNs agree with NaNs); with the
    default ``rtol=atol=0`` they must be equal element by element, i.e. bit for bit up
    to the sign of zero and NaN payloads. Integer tensors and other leaves (``step``, the
    data position, ...) must be equal.

    Args:
        actual, expected: ``TrainState`` values, metrics dicts, lists of them, ...
        rtol, atol: the tolerances for floating-point tensors.
        msg: a prefix for the error, e.g. ``"after step 3"``.

    Raises:
        AssertionError: naming the first path that differs (``params['0.weight']``),
            the max abs and rel difference, and how many other paths differ.

    Example:
        >>> import torch
        >>> from xform.testing import assert_states_close
        >>> assert_states_close({"w": torch.ones(2)}, {"w": torch.ones(2) + 1e-9}, rtol=1e-6)
    """
    a_items = tree.flatten_with_path(actual)
    b_items = tree.flatten_with_path(expected)
    prefix = f"{msg}: " if msg else ""
    a_paths, b_paths = [p for p, _ in a_items], [p for p, _ in b_items]
    if a_paths != b_paths:
        first = next((f"{x} vs {y}" for x, y in zip(a_paths, b_paths) if x != y), None)
        if first is None and len(a_paths) != len(b_paths):
            longer = a_paths if len(a_paths) > len(b_paths) else b_paths
            first = f"{longer[min(len(a_paths), len(b_paths))]} is in one tree only"
        raise AssertionError(f"{prefix}the trees have different structures: {first}")
    problems = []
    for (path, a), (_, b) in zip(a_items, b_items):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            why = _tensor_mismatch(a, b, rtol, atol)
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            why = f"a {type(a).__name__} vs a {type(b).__name__}"
        elif isinstance(a, float) and isinstance(b, float) and (rtol or atol):
            ok = math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))
            why = None if ok else f"{a!r} vs {b!r}"
        else:
            both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
            why = None if (a is b or both_nan or a == b) else f"{a!r} vs {b!r}"
        if why is not None:
            problems.append((path or "<root>", why))
    if problems:
        path, why = problems[0]
        more = f" ({len(problems) - 1} other leaves differ too: {[p for p, _ in problems[1:6]]})" if len(problems) > 1 else ""
        tol = "bit for bit" if rtol == 0 and atol == 0 else f"rtol={rtol:g}, atol={atol:g}"
        raise AssertionError(f"{prefix}the states differ at {path} ({tol}): {why}{more}")


# --- building and running -----------------------------------------------------------------


def fresh_states(make_state: Callable[[], TrainState], n: int) -> list[TrainState]:
    """Calls ``make_state`` ``n`` times and checks the states are equal and independent.

    Raises:
        TypeError: ``make_state`` did not return a ``TrainState``.
        AssertionError: two states share a tensor (``make_state`` reuses one module) or
            differ (the module's initialization is not seeded).
    """
    states = []
    for _ in range(n):
        state = make_state()
        if not isinstance(state, TrainState):
            raise TypeError(
                f"xform.testing: make_state() must return a TrainState, got {type(state).__name__}"
            )
        states.append(state)
    storages: dict[int, int] = {}
    for i, state in enumerate(states):
        for path, leaf in tree.flatten_with_path(state):
            if isinstance(leaf, torch.Tensor) and leaf.numel():
                owner = storages.setdefault(leaf.untyped_storage().data_ptr(), i)
                if owner != i:
                    raise AssertionError(
                        f"xform.testing: make_state() returned states that share the tensor at {path}; "
                        "build a new module inside make_state on every call"
                    )
    for other in states[1:]:
        try:
            assert_states_close(other, states[0])
        except AssertionError as e:
            raise AssertionError(
                f"xform.testing: two calls of make_state() gave different states ({e}); build the "
                "module under a fixed torch.manual_seed(...) inside make_state"
            ) from None
    return states


def run_steps(step: Callable[..., Any], state: TrainState, batches: Iterable[Any], n: int | None = None):
    """Runs ``state, metrics = step(state, batch)`` over ``batches`` (the first ``n``).

    Returns:
        ``(final_state, [metrics, ...])``.
    """
    history = []
    for i, batch in enumerate(batches):
        if n is not None and i >= n:
            break
        state, metrics = step(state, batch)
        history.append(metrics)
    if n is not None and len(history) < n:
        raise ValueError(f"xform.testing: the batches ran out after {len(history)} of {n} steps")
    return state, history


# --- the checks ---------------------------------------------------------------------------


def assert_accumulate_equivalent(
    step: Callable[..., Any],
    make_state: Callable[[], TrainState],
    batch: Any,
    k: int,
    *,
    steps: int = 3,
    rtol: float = 1e-6,
    atol: float = 1e-7,
    check_metrics: bool = True,
) -> tuple[TrainState, TrainState]:
    """Asserts ``xf.accumulate(step, k)`` equals ``step`` on the full batch.

    Runs both ``steps`` times on ``batch`` from equal fresh states and compares every
    state leaf (params, optimizer state, ...) after each step, and the metrics. The step
    must not draw randomness in ``apply`` (dropout): each micro-batch gets its own
    random stream, so masks differ from the full batch's.

    A loss that is a mean over a variable number of items per example (tokens) must be
    returned as ``xf.Mean(loss_sum, n_items)``; a per-micro-batch mean fails this check.

    The default tolerances allow for the other order of floating-point sums. Adam-type
    optimizers divide each gradient element by its running RMS, which can amplify that
    rounding by ``lr / eps`` where a gradient element nearly cancels: with AdamW's default
    ``eps=1e-8`` about one random case in a thousand then differs by up to ~2e-6 after a
    few steps at ``lr=1e-3``. Check with a larger ``eps`` (e.g. ``1e-3``) or with SGD to
    keep the check tight. Prefer SGD without gradient clipping: AdamW and clipping are
    nearly blind to a gradient off by a constant factor (a loss summed over micro-batches
    instead of averaged), which SGD shows in the params.

    Args:
        step: the step to check, possibly already transformed (e.g. by
            ``mixed_precision``).
        make_state: zero-argument callable returning a fresh ``TrainState``.
        batch: one batch whose leading dimension is divisible by ``k``.
        k: the number of micro-batches.
        steps: how many updates to compare.
        rtol, atol: tolerances for floating-point leaves (the two differ by the order
            of floating-point sums).
        check_metrics: also compare the metrics (``xf.Mean`` pooled, floats averaged,
            integers summed by ``accumulate``).

    Returns:
        The final ``(full_batch_state, accumulated_state)``.

    Example:
        >>> import torch, xform as xf
        >>> from xform.testing import assert_accumulate_equivalent
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> def make_state():
        ...     torch.manual_seed(0)
        ...     return xf.TrainState.create(torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, lr=0.1)
        >>> _ = assert_accumulate_equivalent(step, make_state, torch.randn(6, 2), k=3)
    """
    acc = accumulate(step, k)
    ref_state, acc_state = fresh_states(make_state, 2)
    ref_state, acc_state = init_of(step)(ref_state), init_of(acc)(acc_state)
    for i in range(steps):
        ref_state, ref_metrics = step(ref_state, batch)
        acc_state, acc_metrics = acc(acc_state, batch)
        where = f"accumulate(step, {k}) vs step, after update {i + 1}"
        assert_states_close(acc_state, ref_state, rtol=rtol, atol=atol, msg=where)
        if check_metrics:
            assert_states_close(acc_metrics, ref_metrics, rtol=rtol, atol=atol, msg=f"{where}, metrics")
    return ref_state, acc_state


def assert_deterministic(
    step: Callable[..., Any], make_state: Callable[[], TrainState], batch: Any, *, steps: int = 2
) -> None:
    """Asserts that ``step`` is a pure function of ``(state, batch)``.

    Checks, bit for bit: two copies of one state give equal states and metrics over
    ``steps`` updates (also with dropout: randomness comes from the state); stepping a
    ``state.copy()`` leaves ``state`` unchanged; and stepping ``state`` itself gives the
    same result and leaves ``state`` either unchanged or donated (every access raises
    ``xf.DonatedStateError``), never silently changed.

    Example:
        >>> import torch, xform as xf
        >>> from xform.testing import assert_deterministic
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> def make_state():
        ...     torch.manual_seed(0)
        ...     model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        ...     return xf.TrainState.create(model, optimizer=torch.optim.AdamW, lr=1e-3)
        >>> assert_deterministic(step, make_state, torch.randn(4, 2))
    """
    (state,) = fresh_states(make_state, 1)
    state = init_of(step)(state)
    snapshot = state.copy()
    runs = []
    for _ in range(2):
        s, history, first = state.copy(), [], None
        for i in range(steps):
            s, metrics = step(s, batch)
            history.append(metrics)
            if i == 0:
                first = s.copy()
        runs.append((s, history, first))
        assert_states_close(state, snapshot, msg="step(state.copy(), batch) changed `state`")
    (s1, h1, first1), (s2, h2, _) = runs
    assert_states_close(s2, s1, msg="two copies of one state gave different states")
    assert_states_close(h2, h1, msg="two copies of one state gave different metrics")
    out, metrics = step(state, batch)
    assert_states_close(out, first1, msg="step(state) and step(state.copy()) gave different states")
    assert_states_close(metrics, h1[0], msg="step(state) and step(state.copy()) gave different metrics")
    if state.donated:
        try:
            state.params
        except DonatedStateError:
            pass
        else:
            raise AssertionError("the donated input state still gives access to its params")
    else:
        assert_states_close(state, snapshot, msg="step(state, batch) silently changed `state`")


def _unlike(state: TrainState) -> TrainState:
    """``state`` with another RNG key, step and data position: what only a checkpoint
    can restore."""
    data = {k: v + 1009 if type(v) is int else v for k, v in state.data.items()}
    return state.replace(step=state.step + 1009, rng=(state.rng + 0x9E3779B97F4A7C15) % 2**63, data=data)


def assert_resume_equivalent(
    step: Callable[..., Any],
    make_state: Callable[[], TrainState],
    batches: "Sequence[Any] | Any",
    split_at: int,
    tmp_path: "str | os.PathLike",
    *,
    num_steps: int | None = None,
) -> list[Any]:
    """Asserts that save -> load -> continue equals an uninterrupted run, bit for bit.

    Runs ``step`` uninterrupted; then again for ``split_at`` steps, saves with
    ``xf.save``, loads into a fresh ``step.init(make_state())`` with ``xf.load`` and runs
    the remaining steps. The metrics of every step and the final states must be equal.

    The state loaded into (``like``) is given another RNG key, step and data position
    (shuffle seed and batches consumed) than the saved one, so that a load which kept any
    of ``like``'s values instead of the checkpoint's fails the check: the loaded state
    must equal the saved one leaf by leaf.

    Args:
        step: the step (with its transforms).
        make_state: zero-argument callable returning a fresh ``TrainState``.
        batches: a sequence of batches, or an ``xf.DataLoader``: its ``iterate(state)``
            then gives the batches, so the data position is checked too.
        split_at: the number of steps before the checkpoint.
        tmp_path: a directory for the checkpoint.
        num_steps: the total number of steps; required with a loader, else all batches.

    Returns:
        The metrics of the uninterrupted run, one entry per step.

    Example:
        >>> import tempfile, torch, xform as xf
        >>> from xform.testing import assert_resume_equivalent
        >>> def step(state, batch):
        ...     loss, grads = xf.value_and_grad(lambda p: xf.apply(state, p, batch).square().mean())(state.params)
        ...     return state.apply_gradients(grads), {"loss": loss}
        >>> def make_state():
        ...     torch.manual_seed(0)
        ...     return xf.TrainState.create(torch.nn.Linear(2, 1), optimizer=torch.optim.AdamW, lr=1e-3)
        >>> loader = xf.DataLoader(torch.randn(10, 2), batch_size=4, shuffle=True)
        >>> _ = assert_resume_equivalent(step, make_state, loader, 2, tempfile.mkdtemp(), num_steps=5)
    """
    from_loader = hasattr(batches, "iterate")
    if from_loader and num_steps is None:
        raise TypeError("assert_resume_equivalent: pass num_steps with a data loader")
    if not from_loader:
        batches = list(batches)
        num_steps = len(batches) if num_steps is None else num_steps

    def stream(state: TrainState, done: int) -> Iterable[Any]:
        return batches.iterate(state, epochs=None) if from_loader else batches[done:]

    if not 0 < split_at < num_steps:
        raise ValueError(f"assert_resume_equivalent: need 0 < split_at < {num_steps}, got {split_at}")
    init = init_of(step)
    full, first, like = (init(s) for s in fresh_states(make_state, 3))
    like = _unlike(like)
    full, expected = run_steps(step, full, stream(full, 0), num_steps)
    first, got = run_steps(step, first, stream(first, 0), split_at)
    path = save(first, Path(tmp_path) / "xform-testing-resume")
    restored = load(path, like=like)
    assert_states_close(restored, first, msg="the loaded state differs from the saved one")
    restored, rest = run_steps(step, restored, stream(restored, split_at), num_steps - split_at)
    assert_states_close(
        got + rest, expected, msg=f"metrics of the run resumed after step {split_at} vs the uninterrupted run"
    )
    assert_states_close(
        restored, full, msg=f"final state of the run resumed after step {split_at} vs the uninterrupted run"
    )
    return expected


# --- counting collectives -----------------------------------------------------------------

_MODULE_COLLECTIVES = (
    "all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "all_gather",
    "all_gather_single", "reduce_scatter_single",
)


@contextlib.contextmanager
def counting_collectives() -> Iterator["collections.Counter[str]"]:
    """Counts the collectives this process issues inside the block, by name, in the
    ``collections.Counter`` it yields: those of the ``torch.distributed`` module
    (``all_reduce``, ``reduce_scatter_tensor``, ``all_gather_into_tensor``, ``broadcast``,
    ``all_gather``, ``all_gather_single``, ``reduce_scatter_single``, as FSDP2 and xform's
    ZeRO code call them) and ``ProcessGroup.allreduce`` called on a group directly (as
    xform's gradient buckets do), each collective once. One on a float64 tensor (an item
    count, the finiteness flag, a clipping norm) counts as ``"NAME:f64"``, apart from those
    that carry gradients or parameters. Collectives issued from C++ (the reducer of
    ``DistributedDataParallel``) are not seen.

    It replaces those functions process-wide while the block runs: use it in tests and
    benchmarks, not around concurrent training.

    Example (in each process of a group, e.g. to see that ``accumulate`` communicates only
    on its last micro-batch)::

        with counting_collectives() as calls:
            state, metrics = step(state, batch)
        print(dict(calls))  # {'all_reduce': 2}
    """
    import torch.distributed as dist

    calls: collections.Counter[str] = collections.Counter()
    saved = {name: getattr(dist, name) for name in _MODULE_COLLECTIVES if hasattr(dist, name)}
    inside = [0]  # depth of module-level collectives: their own call on the group is not counted again

    def key(name: str, args: tuple, kwargs: dict) -> str:
        t = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(t, list) and t:  # ProcessGroup.allreduce takes a list of tensors
            t = t[0]
        return f"{name}:f64" if getattr(t, "dtype", None) == torch.float64 else name

    def module_level(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[key(name, args, kwargs)] += 1
            inside[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] -= 1

        return counted

    group_class = dist.ProcessGroup
    own = group_class.__dict__.get("allreduce")  # the descriptor itself: put back as it was
    method = group_class.allreduce  # called with the group as first argument

    def group_allreduce(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not inside[0]:
            calls[key("all_reduce", args, kwargs)] += 1
        return method(self, *args, **kwargs)

    for name, fn in saved.items():
        setattr(dist, name, module_level(name, fn))
    group_class.allreduce = group_allreduce
    try:
        yield calls
    finally:
        if own is None:
            del group_class.allreduce
        else:
            group_class.allreduce = own
        for name, fn in saved.items():
            setattr(dist, name, fn)
